"""Tests for rlx.rewards.shaping (DAPO overlong reward shaping)."""

import jax.numpy as jnp
import numpy as np
import pytest

from rlx.rewards import shaping


def _np_overlong(lengths, max_len, buffer):
  """Piecewise definition, element by element, float64."""
  out = np.zeros(np.shape(lengths))
  for idx in np.ndindex(out.shape):
    y = float(np.asarray(lengths)[idx])
    if y <= max_len - buffer:
      out[idx] = 0.0
    elif y <= max_len:
      out[idx] = ((max_len - buffer) - y) / buffer
    else:
      out[idx] = -1.0
  return out


def test_overlong_penalty_hand_cases():
  # L = 16, L_c = 4: free up to 12, linear to -1 at 16, -1 beyond.
  lengths = np.array([0, 5, 12, 13, 14, 15, 16, 17, 100])
  got = shaping.overlong_penalty(lengths, max_len=16, buffer=4)
  np.testing.assert_allclose(
      np.asarray(got), [0, 0, 0, -0.25, -0.5, -0.75, -1, -1, -1], rtol=1e-6)
  assert got.dtype == jnp.float32


def test_overlong_penalty_dapo_setting_matches_numpy():
  # DAPO: L_max = 20480, L_cache = 4096.
  rng = np.random.default_rng(0)
  lengths = rng.integers(0, 24000, (4, 8))
  lengths[0, :4] = [16384, 16385, 20480, 20481]
  got = shaping.overlong_penalty(lengths, max_len=20480, buffer=4096)
  assert got.shape == (4, 8)
  want = _np_overlong(lengths, 20480, 4096)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(got)[0, :4],
                             [0.0, -1 / 4096, -1.0, -1.0], rtol=1e-5)
  assert np.all((np.asarray(got) <= 0) & (np.asarray(got) >= -1))


@pytest.mark.parametrize('as_jax', [False, True])
def test_overlong_penalty_input_kinds(as_jax):
  lengths = np.array([[3.0, 9.0], [10.0, 11.0]], np.float32)
  x = jnp.asarray(lengths) if as_jax else lengths
  got = shaping.overlong_penalty(x, max_len=10, buffer=4)
  np.testing.assert_allclose(np.asarray(got), [[0.0, -0.75], [-1.0, -1.0]],
                             rtol=1e-6)
  scalar = shaping.overlong_penalty(8, max_len=10, buffer=4)
  assert scalar.shape == ()
  np.testing.assert_allclose(float(scalar), -0.5, rtol=1e-6)


def test_overlong_penalty_zero_buffer_and_errors():
  got = shaping.overlong_penalty(np.array([9, 10, 11]), max_len=10, buffer=0)
  np.testing.assert_array_equal(np.asarray(got), [0.0, 0.0, -1.0])
  for buffer in (-1, 11):
    with pytest.raises(ValueError, match='buffer'):
      shaping.overlong_penalty(np.array([1]), max_len=10, buffer=buffer)
