"""Cost of the sampler's logits processing per decode step.

  python scripts/bench_logits.py --rows=64 --vocab=36,32000,151936

Times `rlx.sampling.sampler.process_logits` (temperature, top-k, top-p and
the two log-softmaxes that every decode step of every sampler runs) on
random [rows, vocab] logits, jitted, median of --reps calls after one
compiling call, for each vocabulary size (36: chain_arith; 32000: Llama 2;
151936: Qwen2) and each top_p in --top_p, with --top_k. --reference also
times the sort-based nucleus filter that rlx used before (a full sort of
the vocabulary per row, whatever top_p; after `lax.top_k` when --top_k,
as rlx still does), as the "before" column.
"""

import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from rlx.sampling import sampler

_ROWS = flags.DEFINE_integer('rows', 64, 'Rows (slots) per decode step.')
_VOCAB = flags.DEFINE_list('vocab', ['36', '32000', '151936'],
                           'Vocabulary sizes.')
_TOP_P = flags.DEFINE_list('top_p', ['1.0', '0.9'], 'Nucleus masses.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Top-k (0: off).')
_REPS = flags.DEFINE_integer('reps', 7, 'Timed calls per setting.')
_REFERENCE = flags.DEFINE_bool('reference', True, 'Also time the sort-based '
                               'nucleus filter.')


def sorted_nucleus(logits, temperature, top_p, top_k=0):
  """rlx's filter before the bisection: `lax.top_k` (unchanged), then a
  sort of every row, cumulative mass, cutoff, whatever top_p."""
  scaled = logits / temperature
  behaviour = jax.nn.log_softmax(scaled, axis=-1)
  if top_k:
    kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
    scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
  sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
  sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  keep = (mass_before < top_p) | (top_p >= 1.0)
  cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), -1, keepdims=True)
  return jax.nn.log_softmax(jnp.where(scaled < cutoff, -jnp.inf, scaled),
                            axis=-1), behaviour


def _median_ms(fn, *args) -> float:
  jax.block_until_ready(fn(*args))  # Compiles.
  times = []
  for _ in range(_REPS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def main(argv):
  del argv
  rlx_fn = jax.jit(lambda x, t, p: sampler.process_logits(
      x, t, p, top_k=_TOP_K.value))
  ref_fn = jax.jit(functools.partial(sorted_nucleus, top_k=_TOP_K.value))
  print(f'{jax.devices()[0].device_kind}; rows {_ROWS.value}, top_k '
        f'{_TOP_K.value}; ms per call (median of {_REPS.value})')
  print('| vocab | top_p | rlx ms | sort-based ms | x |')
  print('|---|---|---|---|---|')
  for v in (int(x) for x in _VOCAB.value):
    logits = 3 * jax.random.normal(jax.random.key(v), (_ROWS.value, v))
    for p in (float(x) for x in _TOP_P.value):
      args = (logits, jnp.float32(1.0), jnp.float32(p))
      ours = _median_ms(rlx_fn, *args)
      if _REFERENCE.value:
        ref = _median_ms(ref_fn, *args)
        print(f'| {v} | {p} | {ours:.2f} | {ref:.2f} | {ref / ours:.1f} |')
      else:
        print(f'| {v} | {p} | {ours:.2f} | - | - |')


if __name__ == '__main__':
  app.run(main)
