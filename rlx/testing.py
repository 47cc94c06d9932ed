"""Helpers shared by tests and notebooks: tiny configs and fake models."""

import functools
import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlx import config as config_lib
from rlx import learner
from rlx.types import Array


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=None)
def load_script(name: str):
  """Imports scripts/<name>.py once per process, for its functions.

  Scripts define absl flags when imported, and several share names
  (`--workdir`): absl refuses a second definition, so a name that an
  earlier script loaded here already holds is handed to this one (the
  earlier script's flag of that name is unregistered). Tests call the
  scripts' functions, not their flags, so which test ran first in a
  process does not matter.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      f'rlx_script_{name}', os.path.join(_ROOT, 'scripts', f'{name}.py'))
  while True:
    module = importlib.util.module_from_spec(spec)
    try:
      spec.loader.exec_module(module)
      return module
    except flags.DuplicateFlagError as e:
      taken = re.match(r"The flag '([^']+)' is defined twice", str(e))
      if taken is None or taken.group(1) not in flags.FLAGS:
        raise
      delattr(flags.FLAGS, taken.group(1))


def tiny_config_dict(tmp_dir: str) -> ml_collections.ConfigDict:
  """A config that runs end to end in seconds on a CPU."""
  c = config_lib.default_config_dict()
  c.task.data_dir = f'{tmp_dir}/data'
  c.task.num_train, c.task.num_test = 200, 16
  c.task.max_steps, c.task.prompt_len = 3, 12
  c.model.num_layers, c.model.embed_dim, c.model.mlp_dim = 2, 32, 64
  c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 2, 1, 16
  c.sampling.max_new_tokens = 24
  c.rl.num_steps, c.rl.batch_prompts, c.rl.group_size = 4, 4, 4
  c.warmstart.num_steps, c.warmstart.batch_size = 4, 8
  c.warmstart.warmup_steps = 2
  c.warmstart.cache_dir = f'{tmp_dir}/warmstart'
  c.eval.every, c.eval.num_prompts = 2, 8
  c.eval.samples_per_prompt, c.eval.batch_prompts = 2, 8
  c.log.checkpoint_every, c.log.progress = 2, False
  c.log.tensorboard = False
  c.mesh.shape = (1, 1, 1)  # One device; tests/test_sharding.py does meshes.
  return c


def fixed_sequence_model(sequence: Array, vocab_size: int, *,
                         sharpness: float = 4.0):
  """A fake `apply_fn` for the sampler with known output.

  Whatever the input, the logits at generated step i (counted by the RoPE
  position fed relative to the prompt) put `sharpness` on token
  sequence[i] and 0 elsewhere, so the log-prob of that token under
  temperature tau is log_softmax(logits / tau)[sequence[i]].

  Args:
    sequence: [T] int tokens the model "wants" to emit.
    vocab_size: V.
    sharpness: logit of the wanted token.

  Returns:
    (apply_fn, init_cache_fn) for `rlx.sampling.sampler.make_sampler`. The
    cache holds the first position seen per row so steps are counted from
    the end of the prompt.
  """
  sequence = jnp.asarray(sequence)

  def logits_for(step):  # step [R, L] -> [R, L, V]
    tok = sequence[jnp.clip(step, 0, sequence.shape[0] - 1)]
    return jax.nn.one_hot(tok, vocab_size) * sharpness

  def apply_fn(params, tokens, positions, mask, cache, index):
    del params, tokens, mask
    if not isinstance(index, jax.Array):  # Prefill (index is the int 0).
      start = positions[:, -1:] + 1
      return logits_for(positions - start + 1), (start,)
    (start,) = cache
    return logits_for(positions - start + 1), cache

  def init_cache_fn(batch, length):
    del length
    return (jnp.zeros((batch, 1), jnp.int32),)

  return apply_fn, init_cache_fn


def two_group_batch(seed: int = 0, *, vocab: int = 300):
  """A fixed learner batch of 2 prompts x 2 responses x 6 tokens (prompt
  length 4), one right and one wrong response per group."""
  rng = np.random.default_rng(seed)
  b, g, p, t = 2, 2, 4, 6
  return learner.Batch(
      prompt=jnp.asarray(rng.integers(3, vocab, (b, p)), jnp.int32),
      prompt_mask=jnp.ones((b, p), bool),
      response=jnp.asarray(rng.integers(3, vocab, (b, g, t)), jnp.int32),
      loss_mask=jnp.ones((b, g, t), bool),
      old_logp=jnp.full((b, g, t), -5.0, jnp.float32),
      rewards=jnp.asarray([[1.0, 0.0], [0.0, 1.0]]),
      group_mask=jnp.ones((b, g), bool))


def random_responses(seed: int, *, vocab: int, b: int = 6, g: int = 4,
                     p: int = 7, t: int = 9):
  """(prompt [b, p] left-padded, prompt_mask, response [b, g, t], lengths
  [b, g]) for packing tests: random prompt lengths, some responses long
  and many short (they share rows), one of full length."""
  rng = np.random.default_rng(seed)
  plen = rng.integers(1, p + 1, b)
  prompt_mask = np.arange(p)[None, :] >= (p - plen)[:, None]
  prompt = np.where(prompt_mask, rng.integers(1, vocab, (b, p)), 0)
  response = rng.integers(1, vocab, (b, g, t))
  lengths = rng.integers(0, t + 1, (b, g))
  lengths[:, 2:] //= 3
  lengths[0, 0] = t
  return prompt, prompt_mask, response, lengths
