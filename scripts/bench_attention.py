"""Attention implementations side by side: `python scripts/bench_attention.py`.

Times, on the default model's sizes (configs/grpo.py), a full-sequence
forward, its gradient (the learner's pass) and a sampler call (prefill +
KV-cached decode) for each `backend.attention` implementation that runs on
this platform, each with every `backend.causal_block` value of
--causal_block (full-sequence calls only; the sampler's cached calls
ignore it), in one process, and prints seconds and ratios to `einsum`
without blocks (rlx's reference). `auto` picks from what this measures
(rlx/backend.py).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import dataclasses
import jax
import jax.numpy as jnp

from rlx import backend
from rlx import config as config_lib
from rlx.models import kv_cache
from rlx.models import transformer
from rlx.sampling import sampler as sampler_lib

_ROWS = flags.DEFINE_integer('rows', 256, 'Sequences per forward/gradient.')
_LEN = flags.DEFINE_integer('length', 120, 'Tokens per sequence (P + T).')
_PROMPTS = flags.DEFINE_integer('prompts', 32, 'Sampler prompts (x G=8).')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed calls (median).')
_DTYPE = flags.DEFINE_string('dtype', 'float32', 'Activation dtype.')
_CAUSAL_BLOCK = flags.DEFINE_list(
    'causal_block', ['0', '128'], 'backend.causal_block values to time per '
    'implementation (0: every query over every key; the first is the '
    'reference with einsum).')


def _median_time(fn, repeats):
  jax.block_until_ready(fn())  # Compile.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2]


def _time_impl(impl, block, mcfg, repeats):
  cfg = dataclasses.replace(mcfg, attention=impl, causal_block=block)
  model = transformer.Transformer(cfg)
  params = transformer.init_params(cfg, jax.random.key(0))
  rows, length = _ROWS.value, _LEN.value
  tokens = jax.random.randint(jax.random.key(1), (rows, length), 3,
                              cfg.vocab_size)
  valid = jnp.ones((rows, length), bool)
  pos = kv_cache.positions_from_mask(valid)
  mask = kv_cache.causal_mask(valid, query_len=length, cache_index=0)
  loss = lambda p: jnp.mean(model.apply({'params': p}, tokens, pos,
                                        mask)[0])
  fwd, grad = jax.jit(loss), jax.jit(jax.grad(loss))
  sample = sampler_lib.transformer_sampler(model, sampler_lib.SamplerConfig(
      max_new_tokens=80, stop_tokens=(-1,)))  # Never stops: fixed work.
  prompts = tokens[:_PROMPTS.value, :40]
  pmask = jnp.ones_like(prompts, bool)
  return {
      'forward': _median_time(lambda: fwd(params), repeats),
      'gradient': _median_time(lambda: grad(params), repeats),
      'sample': _median_time(lambda: sample(
          params, prompts, pmask, jax.random.key(2), 1.0, 1.0,
          num_samples=8).tokens, repeats),
  }


def main(argv):
  del argv
  cfg = config_lib.build(config_lib.default_config_dict())
  known = {f.name for f in dataclasses.fields(transformer.TransformerConfig)}
  sizes = {k: v for k, v in dataclasses.asdict(cfg.model).items()
           if k in known}
  mcfg = transformer.TransformerConfig(**{**sizes, 'vocab_size': 32,
                                          'dtype': _DTYPE.value})
  plat = backend.platform()
  impls = []
  for impl in ('einsum', 'xla', 'cudnn'):
    try:
      backend.resolve_attention(impl, plat, mcfg,
                                capability=backend.compute_capability())
      impls.append(impl)
    except config_lib.ConfigError as e:
      print(f'{impl}: skipped ({e})')
  print(f'{jax.devices()[0].device_kind} x{jax.device_count()} ({plat}); '
        f'auto -> {backend.resolve_attention("auto", plat, mcfg, capability=backend.compute_capability())}; '  # pylint: disable=line-too-long
        f'forward/gradient [{_ROWS.value}, {_LEN.value}], sample '
        f'{_PROMPTS.value}x8 rows x 80 tokens, {_DTYPE.value}')
  sizes = [int(b) for b in _CAUSAL_BLOCK.value]
  results = {(impl, b): _time_impl(impl, b, mcfg, _REPEATS.value)
             for impl in impls for b in sizes}
  print('| implementation | causal block | forward s | gradient s | '
        'sample s | x einsum (fwd / grad / sample) |')
  print('|---|---|---|---|---|---|')
  base = results[('einsum', sizes[0])]
  for (impl, b), r in results.items():
    ratios = ' / '.join(f'{r[k] / base[k]:.2f}' for k in r)
    print(f'| {impl} | {b} | {r["forward"]:.3f} | {r["gradient"]:.3f} | '
          f'{r["sample"]:.3f} | {ratios} |')


if __name__ == '__main__':
  app.run(main)
