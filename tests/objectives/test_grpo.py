"""GRPO advantages, PPO-clip loss, KL estimators and aggregation vs numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx import objectives

MODES = ('token-mean', 'seq-mean-token-mean', 'seq-mean-token-sum',
         'seq-mean-token-sum-norm')
NORM_LEN = 7


# ----------------------------------------------------------------- references


def _np_grpo(rewards, mask, eps):
  """Loop over groups: (r - mean) / (std_ddof1 + eps) on valid entries."""
  rewards = np.asarray(rewards, np.float64)
  mask = np.asarray(mask, bool)
  out = np.zeros_like(rewards)
  for b in range(rewards.shape[0]):
    valid = rewards[b][mask[b]]
    if valid.size < 2:
      continue  # Zero or one valid sample: no baseline, A = 0.
    mean = valid.mean()
    std = valid.std(ddof=1)
    out[b][mask[b]] = (valid - mean) / (std + eps)
  return out


def _np_aggregate(values, mask, mode, norm_len=NORM_LEN):
  """Aggregation over [B, G, T] written as explicit loops over sequences."""
  values = np.asarray(values, np.float64)
  mask = np.asarray(mask, bool)
  if mode == 'token-mean':
    n = mask.sum()
    return values[mask].sum() / max(n, 1)
  per_seq = []
  for b in range(values.shape[0]):
    for g in range(values.shape[1]):
      m = mask[b, g]
      if not m.any():
        continue  # Zero-length sequences are not counted by default.
      v = values[b, g][m]
      if mode == 'seq-mean-token-mean':
        per_seq.append(v.mean())
      elif mode == 'seq-mean-token-sum':
        per_seq.append(v.sum())
      elif mode == 'seq-mean-token-sum-norm':
        per_seq.append(v.sum() / norm_len)
      else:
        raise AssertionError(mode)
  return np.mean(per_seq) if per_seq else 0.0


def _np_ppo(logp, old_logp, adv, eps_low, eps_high):
  """Per-token -min(rho A, clip(rho) A) and the clip indicators."""
  logp = np.asarray(logp, np.float64)
  old_logp = np.asarray(old_logp, np.float64)
  adv = np.asarray(adv, np.float64)
  if adv.ndim < logp.ndim:
    adv = adv[..., None] * np.ones_like(logp)
  rho = np.exp(logp - old_logp)
  loss = np.empty_like(rho)
  for idx in np.ndindex(rho.shape):
    r, a = rho[idx], adv[idx]
    loss[idx] = -min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a)
  low = (rho < 1 - eps_low) & (adv < 0)
  high = (rho > 1 + eps_high) & (adv > 0)
  return loss, rho, low, high, adv


def _random_inputs(seed, b=3, g=4, t=6):
  rng = np.random.default_rng(seed)
  logp = rng.uniform(-3.0, -0.05, (b, g, t)).astype(np.float32)
  # Ratios spread over ~[0.5, 1.7]: both sides of the clip band are hit.
  old_logp = (logp + rng.uniform(-0.5, 0.7, (b, g, t))).astype(np.float32)
  adv = rng.normal(size=(b, g)).astype(np.float32)
  lengths = rng.integers(1, t + 1, (b, g))
  lengths[0, 1] = 0  # A zero-length response (all-false mask row).
  lengths[1, 0] = t  # A full-length one.
  mask = np.arange(t) < lengths[..., None]
  return logp, old_logp, adv, mask


# ---------------------------------------------------------------- advantages


@pytest.mark.parametrize('eps', [1e-6, 0.1])
def test_grpo_matches_numpy_reference(eps):
  rng = np.random.default_rng(0)
  rewards = rng.normal(size=(6, 5)).astype(np.float32)
  mask = rng.random((6, 5)) < 0.7
  mask[np.arange(6), rng.integers(0, 5, 6)] = True  # >= 1 valid per row.
  mask[2] = [True, True, False, False, False]
  mask[3] = [False, False, True, False, False]  # Exactly one valid.
  got = np.asarray(objectives.compute_advantages(
      'grpo', jnp.asarray(rewards), jnp.asarray(mask), eps=eps))
  want = _np_grpo(rewards, mask, eps)
  assert got.shape == (6, 5)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.all(got[~mask] == 0.0)
  # Masked rewards must not leak into the statistics.
  poisoned = np.where(mask, rewards, 1e6).astype(np.float32)
  got2 = np.asarray(objectives.compute_advantages(
      'grpo', jnp.asarray(poisoned), jnp.asarray(mask), eps=eps))
  np.testing.assert_array_equal(got2, got)


def test_grpo_hand_cases():
  rewards = np.array([
      [1.0, 0.0, 0.0, 0.0],  # Binary, one correct.
      [1.0, 1.0, 1.0, 1.0],  # All equal (binary).
      [0.0, 0.0, 0.0, 0.0],  # All equal (binary).
      [5.0, 3.0, 0.0, 0.0],  # One valid sample only.
      [2.0, 7.0, 1.0, 4.0],  # Fully masked row.
      [1.0, 0.0, 1.0, 9.0],  # Last masked: group of three.
  ], np.float32)
  mask = np.array([
      [True] * 4, [True] * 4, [True] * 4,
      [True, False, False, False],
      [False] * 4,
      [True, True, True, False],
  ])
  eps = 1e-6
  got = np.asarray(objectives.compute_advantages(
      'grpo', jnp.asarray(rewards), jnp.asarray(mask), eps=eps))
  assert not np.any(np.isnan(got))
  # [1, 0, 0, 0]: mean 1/4, unbiased var = (9/16 + 3/16) / 3 = 1/4, std 1/2.
  np.testing.assert_allclose(
      got[0], np.array([1.5, -0.5, -0.5, -0.5]) / (1 + 2 * eps), rtol=1e-6)
  np.testing.assert_array_equal(got[1], np.zeros(4))
  np.testing.assert_array_equal(got[2], np.zeros(4))
  np.testing.assert_array_equal(got[3], np.zeros(4))
  np.testing.assert_array_equal(got[4], np.zeros(4))
  # [1, 0, 1]: mean 2/3, var = (1/9 + 4/9 + 1/9) / 2 = 1/3.
  std = np.sqrt(1 / 3)
  np.testing.assert_allclose(
      got[5], np.array([1 / 3, -2 / 3, 1 / 3, 0.0]) / (std + eps),
      rtol=1e-5)


@pytest.mark.parametrize('value,size', [(0.9, 6), (0.3, 7), (0.1, 7)])
def test_grpo_equal_non_binary_rewards_give_zero(value, size):
  rewards = jnp.full((1, size), value, jnp.float32)
  got = np.asarray(objectives.compute_advantages(
      'grpo', rewards, jnp.ones((1, size), bool), eps=1e-6))
  np.testing.assert_array_equal(got, np.zeros((1, size)))


def test_grpo_equal_rewards_eps_zero_no_nan():
  got = np.asarray(objectives.compute_advantages(
      'grpo', jnp.ones((1, 4)), jnp.ones((1, 4), bool), eps=0.0))
  np.testing.assert_array_equal(got, np.zeros((1, 4)))


def test_unknown_advantage_lists_known_names():
  with pytest.raises(ValueError) as e:
    objectives.compute_advantages('nope', jnp.zeros((1, 2)),
                                  jnp.ones((1, 2), bool))
  assert 'nope' in str(e.value)
  for name in objectives.ADVANTAGES:
    assert repr(name) in str(e.value)


# ---------------------------------------------------------------- policy loss


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('eps_high', [0.0, 0.28])
def test_ppo_clip_matches_numpy(mode, eps_high):
  logp, old_logp, adv, mask = _random_inputs(1)
  eps_low = 0.2
  loss, metrics = objectives.policy_loss(
      'ppo_clip', jnp.asarray(logp), jnp.asarray(old_logp), jnp.asarray(adv),
      jnp.asarray(mask), aggregation=mode, clip_eps=eps_low,
      clip_eps_high=eps_high, norm_len=NORM_LEN)
  high = eps_high or eps_low
  per_tok, rho, low_c, high_c, _ = _np_ppo(logp, old_logp, adv, eps_low,
                                           high)
  np.testing.assert_allclose(float(loss),
                             _np_aggregate(per_tok, mask, mode),
                             rtol=1e-5, atol=1e-7)
  n = mask.sum()
  # The inputs must exercise both clip sides, on valid tokens.
  assert (low_c & mask).sum() > 0 and (high_c & mask).sum() > 0
  np.testing.assert_allclose(float(metrics['clip_frac/low']),
                             (low_c & mask).sum() / n, rtol=1e-6)
  np.testing.assert_allclose(float(metrics['clip_frac/high']),
                             (high_c & mask).sum() / n, rtol=1e-6)
  np.testing.assert_allclose(float(metrics['ratio/mean']), rho[mask].mean(),
                             rtol=1e-5)
  np.testing.assert_allclose(float(metrics['ratio/max']), rho[mask].max(),
                             rtol=1e-5)
  diff = old_logp.astype(np.float64) - logp
  k3 = np.exp(logp - old_logp.astype(np.float64)) + diff - 1
  np.testing.assert_allclose(float(metrics['approx_kl_old']), k3[mask].mean(),
                             rtol=1e-5)


def test_ppo_clip_per_token_advantages():
  logp, old_logp, adv, mask = _random_inputs(2)
  rng = np.random.default_rng(3)
  adv_t = rng.normal(size=logp.shape).astype(np.float32)
  loss, _ = objectives.policy_loss(
      'ppo_clip', jnp.asarray(logp), jnp.asarray(old_logp),
      jnp.asarray(adv_t), jnp.asarray(mask), clip_eps=0.2)
  per_tok = _np_ppo(logp, old_logp, adv_t, 0.2, 0.2)[0]
  np.testing.assert_allclose(float(loss),
                             _np_aggregate(per_tok, mask, 'token-mean'),
                             rtol=1e-5)


def test_ppo_clip_hand_case():
  # rho = 1.5 with A = 1 -> clipped at 1.2; rho = 0.5 with A = -1 -> clipped
  # at 0.8; rho = 0.5 with A = 1 -> unclipped 0.5; rho = 1.5, A = -1 ->
  # unclipped -1.5 (pessimistic side).
  rho = np.array([1.5, 0.5, 0.5, 1.5], np.float32)
  adv = np.array([1.0, -1.0, 1.0, -1.0], np.float32)
  old = np.full(4, -1.0, np.float32)
  logp = old + np.log(rho)
  shape = (1, 1, 4)
  loss, m = objectives.policy_loss(
      'ppo_clip', jnp.asarray(logp).reshape(shape),
      jnp.asarray(old).reshape(shape), jnp.asarray(adv).reshape(shape),
      jnp.ones(shape, bool), clip_eps=0.2)
  # Per token: -1.2, +0.8, -0.5, +1.5 -> mean 0.6 / 4.
  np.testing.assert_allclose(float(loss), (-1.2 + 0.8 - 0.5 + 1.5) / 4,
                             rtol=1e-6)
  assert float(m['clip_frac/high']) == 0.25
  assert float(m['clip_frac/low']) == 0.25


@pytest.mark.parametrize('eps_high', [0.0, 0.28])
def test_ppo_clip_gradient(eps_high):
  logp, old_logp, adv, mask = _random_inputs(4)

  def f(lp):
    return objectives.policy_loss(
        'ppo_clip', lp, jnp.asarray(old_logp), jnp.asarray(adv),
        jnp.asarray(mask), aggregation='token-mean', clip_eps=0.2,
        clip_eps_high=eps_high)[0]

  grad = np.asarray(jax.grad(f)(jnp.asarray(logp)))
  high = eps_high or 0.2
  _, rho, low_c, high_c, adv_t = _np_ppo(logp, old_logp, adv, 0.2, high)
  want = -adv_t * rho / mask.sum()
  want = np.where(mask & ~low_c & ~high_c, want, 0.0)
  assert (high_c & mask).sum() > 0
  np.testing.assert_array_equal(grad[high_c], 0.0)
  np.testing.assert_array_equal(grad[low_c], 0.0)
  np.testing.assert_array_equal(grad[~mask], 0.0)
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-8)


def test_unknown_policy_loss_lists_known_names():
  x = jnp.zeros((1, 1, 2))
  with pytest.raises(ValueError) as e:
    objectives.policy_loss('nope', x, x, jnp.zeros((1, 1)),
                           jnp.ones((1, 1, 2), bool))
  assert 'nope' in str(e.value)
  for name in objectives.LOSSES:
    assert repr(name) in str(e.value)


# ------------------------------------------------------------------------ KL


def test_kl_estimators():
  rng = np.random.default_rng(5)
  logp = rng.uniform(-4, 0, (3, 7)).astype(np.float32)
  ref = rng.uniform(-4, 0, (3, 7)).astype(np.float32)
  lp, rf = logp.astype(np.float64), ref.astype(np.float64)
  want = {
      'k1': lp - rf,
      'k2': 0.5 * (lp - rf) ** 2,
      'k3': np.exp(rf - lp) - (rf - lp) - 1,
  }
  for kind, w in want.items():
    got = np.asarray(objectives.kl_penalty(jnp.asarray(logp),
                                           jnp.asarray(ref), kind))
    np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6, err_msg=kind)
  k3 = np.asarray(objectives.kl_penalty(jnp.asarray(logp), jnp.asarray(ref),
                                        'k3'))
  assert np.all(k3 >= 0)
  for kind in want:
    same = np.asarray(objectives.kl_penalty(jnp.asarray(logp),
                                            jnp.asarray(logp), kind))
    np.testing.assert_array_equal(same, 0.0)
  # Default is k3.
  np.testing.assert_array_equal(
      np.asarray(objectives.kl_penalty(jnp.asarray(logp), jnp.asarray(ref))),
      k3)
  with pytest.raises(ValueError, match='k1, k2, k3'):
    objectives.kl_penalty(jnp.asarray(logp), jnp.asarray(ref), 'k4')


# ---------------------------------------------------------------- aggregation


@pytest.mark.parametrize('mode', MODES)
def test_aggregate_matches_numpy(mode):
  rng = np.random.default_rng(6)
  values = rng.normal(size=(4, 3, 5)).astype(np.float32)
  mask = rng.random((4, 3, 5)) < 0.6
  mask[1, 2] = False
  # Garbage under the mask must not matter.
  values_poisoned = np.where(mask, values, 1e3).astype(np.float32)
  got = objectives.aggregate(jnp.asarray(values_poisoned), jnp.asarray(mask),
                             mode, norm_len=NORM_LEN)
  np.testing.assert_allclose(float(got), _np_aggregate(values, mask, mode),
                             rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('mode', MODES)
def test_aggregate_fully_masked_is_zero(mode):
  got = objectives.aggregate(jnp.ones((2, 2, 3)), jnp.zeros((2, 2, 3), bool),
                             mode, norm_len=NORM_LEN)
  assert float(got) == 0.0


@pytest.mark.parametrize('mode', MODES)
def test_aggregate_split_halves_sum_to_full(mode):
  rng = np.random.default_rng(7)
  values = rng.normal(size=(6, 3, 5)).astype(np.float32)
  lengths = rng.integers(0, 6, (6, 3))
  lengths[0, 0] = 0
  lengths[4, :] = 0  # A whole prompt of empty responses in one half.
  mask = np.arange(5) < lengths[..., None]
  full = float(objectives.aggregate(jnp.asarray(values), jnp.asarray(mask),
                                    mode, norm_len=NORM_LEN))
  totals = dict(total_tokens=jnp.asarray(mask.sum()),
                total_seqs=jnp.asarray((lengths > 0).sum()))
  halves = sum(
      float(objectives.aggregate(jnp.asarray(values[s]), jnp.asarray(mask[s]),
                                 mode, norm_len=NORM_LEN, **totals))
      for s in (slice(0, 3), slice(3, 6)))
  np.testing.assert_allclose(halves, full, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(full, _np_aggregate(values, mask, mode),
                             rtol=1e-5, atol=1e-7)


def test_aggregate_unknown_mode():
  with pytest.raises(ValueError, match='token-mean'):
    objectives.aggregate(jnp.ones((1, 2)), jnp.ones((1, 2), bool), 'nope')
