"""Learner memory with a large vocabulary: materialised vs chunked logits.

  python scripts/bench_learner_memory.py --vocab=151936 --rows=16 \
      --length=1024 --chunks=0,4096,1024

Compiles (does not run) the train step of the default recipe's objective on
one packed minibatch of --rows rows x --length tokens, for a model with the
default body and a --vocab-token output layer (untied, as in most LLMs),
once per `optim.logits_chunk` in --chunks (0: the [positions, vocab] logits
materialised), and prints XLA's memory analysis of each compiled program:
temporaries (activations, logits and their gradients), arguments and
outputs. --attention_chunk sets backend.attention_chunk for every run.
--run also times the step (use small shapes on a CPU).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from rlx import config as config_lib
from rlx import learner
from rlx import sharding
from rlx import policy as policy_lib
from rlx.models import transformer

_VOCAB = flags.DEFINE_integer('vocab', 151936, 'Output vocabulary.')
_ROWS = flags.DEFINE_integer('rows', 16, 'Packed rows per minibatch.')
_LENGTH = flags.DEFINE_integer('length', 1024, 'Tokens per row.')
_CHUNKS = flags.DEFINE_list('chunks', ['0', '4096', '1024'],
                            'optim.logits_chunk values.')
_ATTENTION_CHUNK = flags.DEFINE_integer(
    'attention_chunk', 0, 'backend.attention_chunk (queries per attention '
    'block; 0: all at once).')
_RUN = flags.DEFINE_bool('run', False, 'Also run and time the step.')


def _batch(rows: int, length: int, vocab: int) -> learner.Batch:
  """One prompt per row, its response filling the row (G = 1)."""
  p = length // 4
  t = length - p + 1
  rng = np.random.default_rng(0)
  prompt = rng.integers(1, vocab, (rows, p))
  response = rng.integers(1, vocab, (rows, 1, t))
  batch = learner.Batch(
      prompt=prompt, prompt_mask=np.ones((rows, p), bool), response=response,
      loss_mask=np.ones((rows, 1, t), bool),
      old_logp=np.full((rows, 1, t), -5.0, np.float32),
      rewards=rng.integers(0, 2, (rows, 1)).astype(np.float32),
      group_mask=np.ones((rows, 1), bool))
  return learner.pack_batch(batch)


def main(argv):
  del argv
  c = config_lib.default_config_dict()
  c.model.tie_embeddings = False
  c.rl.batch_prompts, c.rl.group_size = _ROWS.value, 2
  c.backend.attention_chunk = _ATTENTION_CHUNK.value
  batch = _batch(_ROWS.value, _LENGTH.value, _VOCAB.value)
  print(f'{jax.devices()[0].device_kind}: vocab {_VOCAB.value}, '
        f'{batch.packed.tokens.shape[1]} packed rows x '
        f'{batch.packed.tokens.shape[2]} tokens, model width '
        f'{c.model.embed_dim}, attention_chunk {_ATTENTION_CHUNK.value}')
  print('| logits_chunk | temporaries | arguments | outputs | step s |')
  print('|---|---|---|---|---|')
  for chunk in (int(x) for x in _CHUNKS.value):
    c.optim.logits_chunk = chunk
    cfg = config_lib.build(c)
    model, logits_fn = policy_lib.build_model(cfg, _VOCAB.value)
    opt = learner.make_optimizer(cfg.optim)
    step = learner.make_train_step(logits_fn, opt, cfg,
                                   split=policy_lib.split_model(model))
    params = transformer.init_params(model.cfg, jax.random.key(0))
    state = learner.init_state(params, opt)
    stats = sharding.memory_stats(step, state, None, batch)
    seconds = '-'
    if _RUN.value:
      state, m = step(state, None, batch)  # Compiles.
      jax.block_until_ready(m)
      start = time.perf_counter()
      state, m = step(state, None, batch)
      jax.block_until_ready(m)
      seconds = f'{time.perf_counter() - start:.2f}'
    fmt = sharding.format_bytes
    print(f'| {chunk or "0 (materialised)"} | {fmt(stats["temp"])} | '
          f'{fmt(stats["argument"])} | {fmt(stats["output"])} | {seconds} |')


if __name__ == '__main__':
  app.run(main)
