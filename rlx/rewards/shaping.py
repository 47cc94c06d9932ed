"""Reward shaping terms added to task rewards."""

import jax.numpy as jnp
import numpy as np

from rlx.types import Array


def overlong_penalty(lengths: np.ndarray | Array, *, max_len: int,
                     buffer: int) -> Array:
  """DAPO soft overlong punishment (Yu et al. 2025, eq. 13).

  With L = max_len and L_c = buffer, a response of |y| tokens gets
    0                          if |y| <= L - L_c,
    ((L - L_c) - |y|) / L_c    if L - L_c < |y| <= L  (from 0 down to -1),
    -1                         if |y| > L,
  added to its task reward. DAPO uses L = 20480, L_c = 4096. |y| is the
  response's token count (e.g. `loss_mask.sum(-1)`); responses truncated
  at the sampler's budget count as that budget.

  Args:
    lengths: integer or float response lengths, any shape (numpy or jax).
    max_len: L.
    buffer: L_c, 0 <= L_c <= L; 0 gives a hard 0 / -1 step at L.

  Returns:
    float32 jax array of the shape of `lengths`, in [-1, 0].

  Raises:
    ValueError: if buffer < 0 or buffer > max_len.
  """
  if not 0 <= buffer <= max_len:
    raise ValueError(f'need 0 <= buffer <= max_len; got buffer={buffer}, '
                     f'max_len={max_len}')
  length = jnp.asarray(lengths).astype(jnp.float32)
  start = float(max_len - buffer)
  ramp = (start - length) / max(buffer, 1)
  return jnp.where(length <= start, 0.0,
                   jnp.where(length <= max_len, ramp, -1.0)).astype(
                       jnp.float32)
