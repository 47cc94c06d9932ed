"""Check a JAX install for rlx: `python scripts/env_check.py`.

Prints the JAX version, the devices, the platform rlx detects, the attention
implementation `backend.attention=auto` picks, the XLA flags, and whether a
small jitted attention with each implementation runs and agrees with rlx's
einsum reference (output and gradients).
"""

import importlib.metadata
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np

from rlx import backend
from rlx import config as config_lib
from rlx.models import kv_cache
from rlx.models import transformer

# Largest |difference| from the float32 reference that counts as agreement:
# float32 differs only in summation order; bfloat16 keeps 8 mantissa bits.
# A wrong mask or head grouping differs by order 1.
TOLERANCE = {'float32': 1e-5, 'bfloat16': 1e-1}


def check_attention(implementation: str, dtype: str) -> tuple[float, float]:
  """Runs `attend` jitted, with its gradient, against the einsum reference.

  A GQA problem (N=4 query heads, K=2 kv heads, H=64) with an odd length
  and a left-padded row, as the learner's forward has.

  Args:
    implementation: one of transformer.ATTENTION_IMPLS.
    dtype: input dtype; the reference sees the same values in float32.

  Returns:
    Max |difference| of the outputs and of the q/k/v gradients, over real
    query rows.
  """
  b, l, n, k, h = 2, 9, 4, 2, 64
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, l, n, h)).astype(dtype)
  kv = [jax.random.normal(key, (b, k, l, h)).astype(dtype)
        for key in keys[1:3]]
  weight = jax.random.normal(keys[3], (b, l, n, h))
  valid = jnp.arange(l)[None] >= jnp.array([[3], [0]])  # Row 0: 3 pads.
  mask = kv_cache.causal_mask(valid, query_len=l, cache_index=0)

  def loss(impl, q, k, v):
    out = transformer.attend(q, k, v, mask, implementation=impl)
    out = jnp.where(valid[:, :, None, None], out.astype(jnp.float32), 0.0)
    return jnp.sum(out * weight), out

  run = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True),
                static_argnums=0)
  as32 = lambda x: x.astype(jnp.float32)
  # Full float32 matmuls: GPUs would otherwise use TF32 for float32 inputs.
  with jax.default_matmul_precision('float32'):
    (_, out), grads = run(implementation, q, *kv)
    (_, ref), ref_grads = run('einsum', as32(q), *map(as32, kv))
  diff = lambda a, b: float(np.max(np.abs(np.asarray(as32(a) - b))))
  return diff(out, ref), max(map(diff, grads, ref_grads))


def _attention_lines(plat: str, capability) -> list[str]:
  lines = []
  for impl, dtype in (('xla', 'float32'), ('cudnn', 'bfloat16')):
    try:
      backend.resolve_attention(impl, plat, capability=capability)
    except config_lib.ConfigError as e:
      lines.append(f'attention {impl}: skipped ({e})')
      continue
    try:
      fwd, grad = check_attention(impl, dtype)
    except Exception as e:  # pylint: disable=broad-except
      first = str(e).strip().splitlines()[0] if str(e).strip() else ''
      lines.append(f'attention {impl} ({dtype}): FAILED: '
                   f'{type(e).__name__}: {first}')
      continue
    verdict = ('agrees' if max(fwd, grad) <= TOLERANCE[dtype]
               else f'DISAGREES (tolerance {TOLERANCE[dtype]:.0e})')
    lines.append(f'attention {impl} ({dtype}): max |diff| vs einsum: output '
                 f'{fwd:.1e}, gradients {grad:.1e}: {verdict}')
  return lines


def report(added_flags: str = '') -> list[str]:
  """The lines `main` prints (starts the JAX backend)."""
  devices = jax.devices()
  plat = backend.platform()
  capability = backend.compute_capability()
  kinds = sorted({d.device_kind for d in devices})
  lines = [
      f'jax {jax.__version__}, jaxlib {importlib.metadata.version("jaxlib")}',
      f'devices: {len(devices)} x {", ".join(kinds)} (JAX platform '
      f'{devices[0].platform}); process {jax.process_index()} of '
      f'{jax.process_count()}, {jax.local_device_count()} local',
      f'platform: {plat}' + (f' (compute capability {capability})'
                             if capability else ''),
  ]
  picks = []
  for name, model in (('default model', config_lib.ModelConfig()),
                      ('bfloat16 model',
                       config_lib.ModelConfig(dtype='bfloat16'))):
    impl = backend.resolve_attention('auto', plat, model,
                                     capability=capability)
    why = backend.cudnn_limitation(model, capability)
    picks.append(f'{name} -> {impl}' + (f' ({why})' if plat == 'cuda' and
                                         why else ''))
  lines.append('attention auto: ' + '; '.join(picks))
  var = backend.flags_variable(plat)
  lines += [
      f'{var} in effect: {os.environ.get(var, "")!r}'
      + (f' (rlx added {added_flags!r})' if added_flags else ''),
      f'recommended for {plat}: {backend.xla_flags(plat) or "(none)"}',
  ]
  return lines + _attention_lines(plat, capability)


def main(argv):
  del argv
  added = backend.configure(backend.BackendConfig())
  print('\n'.join(report(added)))


if __name__ == '__main__':
  app.run(main)
