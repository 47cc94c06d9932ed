"""Policy losses and mismatch corrections vs independent numpy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx import objectives
from rlx.config import ConfigError
from rlx.config import ObjectiveConfig

MODES = ('token-mean', 'seq-mean-token-mean', 'seq-mean-token-sum',
         'seq-mean-token-sum-norm')
NORM_LEN = 7
B, G, T = 3, 4, 6

# (loss name, hyper-parameters) pairs exercised by the reference tests.
CASES = [
    ('ppo_clip', {}),
    ('ppo_clip', {'clip_eps': 0.2, 'clip_eps_high': 0.28}),
    ('dapo', {}),
    ('dual_clip', {}),
    ('dual_clip', {'clip_eps_high': 0.28, 'dual_clip_c': 2.0}),
    ('gspo', {}),
    ('gspo', {'variant': 'token'}),
    ('gspo', {'eps_low': 0.2, 'eps_high': 0.28}),
    ('gppo', {}),
    ('gppo', {'clip_eps': 0.1, 'clip_eps_high': 0.0}),
    ('cispo', {}),
    ('cispo', {'clip_eps_high': 0.5, 'clip_low': 0.6}),
    ('decoupled', {}),
    ('decoupled', {'clip_eps_high': 0.28}),
]
SEQ_ONLY = ('gspo',)


def _case_id(case):
  name, hp = case
  return '-'.join([name] + [f'{k}={v}' for k, v in hp.items()])


# ----------------------------------------------------------------- references


def _np_aggregate(values, mask, mode, norm_len=NORM_LEN):
  """Aggregation over [B, G, T] as explicit loops over sequences."""
  values = np.asarray(values, np.float64)
  mask = np.asarray(mask, bool)
  if mode == 'token-mean':
    return values[mask].sum() / max(mask.sum(), 1)
  per_seq = []
  for idx in np.ndindex(mask.shape[:-1]):
    m = mask[idx]
    if not m.any():
      continue
    v = values[idx][m]
    per_seq.append({'seq-mean-token-mean': v.mean(),
                    'seq-mean-token-sum': v.sum(),
                    'seq-mean-token-sum-norm': v.sum() / norm_len}[mode])
  return np.mean(per_seq) if per_seq else 0.0


def _clip(x, lo, hi):
  return min(max(x, lo), hi)


def _np_loss(name, logp, old, adv, mask, mu, **hp):
  """Per-token loss, ratio, clipped_low, clipped_high by loops, float64."""
  logp, old, mu = (np.asarray(x, np.float64) for x in (logp, old, mu))
  adv = np.asarray(adv, np.float64)
  seq_adv = adv.ndim < logp.ndim
  adv_t = adv[..., None] * np.ones_like(logp) if seq_adv else adv
  loss = np.zeros_like(logp)
  ratio = np.zeros_like(logp)
  low = np.zeros(logp.shape, bool)
  high = np.zeros(logp.shape, bool)
  if name == 'gspo':
    assert seq_adv
    el, eh = hp.get('eps_low', 3e-4), hp.get('eps_high', 4e-4)
    for idx in np.ndindex(logp.shape[:-1]):
      m = mask[idx]
      d = (logp[idx] - old[idx])[m]
      s = np.exp(d.mean()) if d.size else 1.0
      a = adv[idx]
      loss[idx] = -min(s * a, _clip(s, 1 - el, 1 + eh) * a)
      ratio[idx] = s
      low[idx] = s < 1 - el and a < 0
      high[idx] = s > 1 + eh and a > 0
    return loss, ratio, low, high
  for idx in np.ndindex(logp.shape):
    lp, a = logp[idx], adv_t[idx]
    rho = np.exp(lp - old[idx])
    ratio[idx] = rho
    if name == 'cispo':
      eh, lo = hp.get('clip_eps_high', 0.28), hp.get('clip_low', 0.0)
      loss[idx] = -_clip(rho, lo, 1 + eh) * a * lp
      low[idx], high[idx] = rho < lo, rho > 1 + eh
      continue
    default_high = 0.28 if name in ('dapo', 'gppo') else 0.0
    el = hp.get('clip_eps', 0.2)
    eh = hp.get('clip_eps_high', default_high) or el
    if name == 'decoupled':
      r, r_old = np.exp(lp - mu[idx]), np.exp(old[idx] - mu[idx])
      j = min(a * r, a * _clip(r, r_old * (1 - el), r_old * (1 + eh)))
    else:
      j = min(rho * a, _clip(rho, 1 - el, 1 + eh) * a)
    low[idx] = rho < 1 - el and a < 0
    high[idx] = rho > 1 + eh and a > 0
    if name == 'dual_clip' and a < 0:
      c = hp.get('dual_clip_c', 3.0)
      if c * a > j:
        j = c * a
        low[idx] = True
    loss[idx] = -j
  return loss, ratio, low, high


def _np_grad(name, logp, old, adv, mask, mu, **hp):
  """d(token-mean loss)/d logp from the closed forms, float64."""
  logp, old, mu = (np.asarray(x, np.float64) for x in (logp, old, mu))
  adv = np.asarray(adv, np.float64)
  adv_t = adv[..., None] * np.ones_like(logp) if adv.ndim < 3 else adv
  _, rho, low, high = _np_loss(name, logp, old, adv, mask, mu, **hp)
  if name == 'cispo':
    w = np.clip(rho, hp.get('clip_low', 0.0), 1 + hp.get('clip_eps_high',
                                                          0.28))
    g = -w * adv_t
  elif name == 'gppo':
    el = hp.get('clip_eps', 0.2)
    eh = hp.get('clip_eps_high', 0.28) or el
    # Inside the band (or on the pessimistic side): -A rho; clipped below:
    # -(1 - eps_low) A; clipped above: -(1 + eps_high) A.
    g = np.where(low, -(1 - el) * adv_t,
                 np.where(high, -(1 + eh) * adv_t, -rho * adv_t))
  elif name == 'decoupled':
    g = np.where(low | high, 0.0, -adv_t * np.exp(logp - mu))
  else:  # ppo_clip, dapo, dual_clip.
    g = np.where(low | high, 0.0, -adv_t * rho)
  return np.where(mask, g, 0.0) / mask.sum()


def _inputs(seed, per_token_adv=False):
  """Random [B, G, T] inputs hitting every clip region, one empty response.

  Ratios exp(logp - old) span ~[0.27, 4.5]; responses (2, 0) and (2, 1)
  have tiny log-ratios, so their GSPO sequence ratio is inside the band;
  (1, 1) and (1, 2) have sequence ratios below (A < 0) and above (A > 0)
  both GSPO bands.
  """
  rng = np.random.default_rng(seed)
  logp = rng.uniform(-3.0, -0.05, (B, G, T)).astype(np.float32)
  delta = rng.uniform(-1.3, 1.5, (B, G, T))
  delta[2, :2] = rng.uniform(-1e-4, 1e-4, (2, T))
  shape = (B, G, T) if per_token_adv else (B, G)
  adv = rng.normal(size=shape).astype(np.float32)
  # Sequence ratios clearly below (A < 0) and above (A > 0) any band.
  delta[1, 1] = rng.uniform(-1.3, -0.4, T)
  delta[1, 2] = rng.uniform(0.4, 1.5, T)
  adv[1, 1] = -np.abs(adv[1, 1]) - 0.1
  adv[1, 2] = np.abs(adv[1, 2]) + 0.1
  old = (logp - delta).astype(np.float32)
  # The sampler: w = exp(old - mu) in ~[0.37, 7.4].
  mu = (old - rng.uniform(-1.0, 2.0, (B, G, T))).astype(np.float32)
  lengths = rng.integers(1, T + 1, (B, G))
  lengths[0, 1] = 0  # A zero-length response.
  lengths[1, 0] = T
  mask = np.arange(T) < lengths[..., None]
  return logp, old, adv, mask, mu


def _j(*xs):
  return tuple(jnp.asarray(x) for x in xs)


# ------------------------------------------------------------ forward values


# GSPO takes sequence-level advantages only (test_gspo_rejects_*).
FORWARD_CASES = [(n, hp, pt) for n, hp in CASES for pt in (False, True)
                 if not (pt and n in SEQ_ONLY)]


@pytest.mark.parametrize(
    'name,hp,per_token_adv', FORWARD_CASES,
    ids=[_case_id(c[:2]) + ('-adv_bgt' if c[2] else '-adv_bg')
         for c in FORWARD_CASES])
def test_loss_matches_numpy(name, hp, per_token_adv):
  logp, old, adv, mask, mu = _inputs(10, per_token_adv)
  loss, diag = objectives.LOSSES.get(name)(
      *_j(logp, old, adv, mask), behaviour_logp=jnp.asarray(mu), **hp)
  want, ratio, low, high = _np_loss(name, logp, old, adv, mask, mu, **hp)
  assert loss.shape == diag['ratio'].shape == (B, G, T)
  np.testing.assert_allclose(np.asarray(loss)[mask], want[mask], rtol=2e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(diag['ratio'])[mask], ratio[mask],
                             rtol=2e-5)
  np.testing.assert_array_equal(np.asarray(diag['clipped_low'])[mask],
                                low[mask])
  np.testing.assert_array_equal(np.asarray(diag['clipped_high'])[mask],
                                high[mask])
  if name != 'cispo' or hp.get('clip_low'):
    assert (low & mask).any(), 'inputs must hit the low clip'
  assert (high & mask).any(), 'inputs must hit the high clip'
  assert (mask & ~low & ~high).any()

  # Through policy_loss: aggregation and metrics.
  for mode in ('token-mean', 'seq-mean-token-mean'):
    total, m = objectives.policy_loss(
        name, *_j(logp, old, adv, mask), behaviour_logp=jnp.asarray(mu),
        aggregation=mode, **hp)
    np.testing.assert_allclose(float(total), _np_aggregate(want, mask, mode),
                               rtol=2e-5, atol=1e-6)
  n = mask.sum()
  np.testing.assert_allclose(float(m['clip_frac/low']), (low & mask).sum() / n,
                             rtol=1e-6)
  np.testing.assert_allclose(float(m['clip_frac/high']),
                             (high & mask).sum() / n, rtol=1e-6)
  np.testing.assert_allclose(float(m['ratio/mean']), ratio[mask].mean(),
                             rtol=2e-5)
  np.testing.assert_allclose(float(m['ratio/max']), ratio[mask].max(),
                             rtol=2e-5)
  assert not any(k.startswith('correction/') for k in m)


@pytest.mark.parametrize('name,hp', [c for c in CASES if c[0] != 'gspo'],
                         ids=[_case_id(c) for c in CASES if c[0] != 'gspo'])
def test_loss_gradient_matches_numpy(name, hp):
  logp, old, adv, mask, mu = _inputs(11)

  def f(lp):
    return objectives.policy_loss(name, lp, *_j(old, adv, mask),
                                  behaviour_logp=jnp.asarray(mu), **hp)[0]

  grad = np.asarray(jax.grad(f)(jnp.asarray(logp)))
  want = _np_grad(name, logp, old, adv, mask, mu, **hp)
  np.testing.assert_allclose(grad, want, rtol=2e-5, atol=1e-8)
  np.testing.assert_array_equal(grad[~mask], 0.0)


def test_all_losses_jit():
  logp, old, adv, mask, mu = _inputs(12)
  args = _j(logp, old, adv, mask)

  def all_losses(*args, behaviour_logp):
    return [objectives.policy_loss(name, *args, behaviour_logp=behaviour_logp,
                                   correction='tis', **hp)
            for name, hp in CASES]

  fn = functools.partial(all_losses, behaviour_logp=jnp.asarray(mu))
  eager, jitted = fn(*args), jax.jit(fn)(*args)
  for (name, _), e, j in zip(CASES, eager, jitted):
    for a, b in zip(jax.tree.leaves(e), jax.tree.leaves(j)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                 atol=1e-7, err_msg=name)


# ------------------------------------------------------------- per method


def test_dapo_is_clip_higher_ppo():
  logp, old, adv, mask, mu = _inputs(13)
  got, d1 = objectives.LOSSES.get('dapo')(*_j(logp, old, adv, mask))
  want, d2 = objectives.LOSSES.get('ppo_clip')(
      *_j(logp, old, adv, mask), clip_eps=0.2, clip_eps_high=0.28)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  for k in d1:
    np.testing.assert_array_equal(np.asarray(d1[k]), np.asarray(d2[k]))
  del mu


def test_dual_clip_hand_case():
  # (rho, A): (5, 1) ppo clip at 1.2 -> -1.2, no dual bound for A > 0;
  # (5, -1) ppo 5 -> bounded at -c A = 3; (0.5, -1) ppo 0.8 < 3;
  # (1, -1) -> 1; (2.5, -1) -> 2.5 < 3 stays.
  rho = np.array([5.0, 5.0, 0.5, 1.0, 2.5], np.float32)
  adv = np.array([1.0, -1.0, -1.0, -1.0, -1.0], np.float32)
  old = np.full(5, -1.0, np.float32)
  logp = old + np.log(rho)
  shape = (1, 1, 5)
  args = [jnp.asarray(x).reshape(shape) for x in (logp, old, adv)]
  loss, diag = objectives.LOSSES.get('dual_clip')(
      *args, jnp.ones(shape, bool), dual_clip_c=3.0)
  np.testing.assert_allclose(np.asarray(loss).ravel(),
                             [-1.2, 3.0, 0.8, 1.0, 2.5], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(diag['clipped_low']).ravel(),
                                [False, True, True, False, False])
  np.testing.assert_array_equal(np.asarray(diag['clipped_high']).ravel(),
                                [True, False, False, False, False])

  def f(lp):
    return jnp.sum(objectives.LOSSES.get('dual_clip')(
        lp, args[1], args[2], jnp.ones(shape, bool), dual_clip_c=3.0)[0])

  grad = np.asarray(jax.grad(f)(args[0])).ravel()
  np.testing.assert_allclose(grad, [0.0, 0.0, 0.0, 1.0, 2.5], rtol=1e-6)


def test_dual_clip_bound_only_for_negative_advantages():
  logp, old, adv, mask, _ = _inputs(14, per_token_adv=True)
  ppo, _ = objectives.LOSSES.get('ppo_clip')(*_j(logp, old, adv, mask))
  dual, diag = objectives.LOSSES.get('dual_clip')(
      *_j(logp, old, adv, mask), dual_clip_c=3.0)
  ppo, dual = np.asarray(ppo), np.asarray(dual)
  rho = np.exp(logp.astype(np.float64) - old)
  pos, neg = adv >= 0, adv < 0
  np.testing.assert_array_equal(dual[pos], ppo[pos])
  bounded = neg & (rho > 3.0)
  assert bounded.sum() > 0 and (pos & (rho > 3.0)).sum() > 0
  np.testing.assert_allclose(dual[bounded], -3.0 * adv[bounded], rtol=1e-6)
  assert np.all(ppo[bounded] > dual[bounded])
  np.testing.assert_array_equal(dual[neg & ~bounded], ppo[neg & ~bounded])
  assert np.all(np.asarray(diag['clipped_low'])[bounded])
  with pytest.raises(ValueError, match='dual_clip_c'):
    objectives.LOSSES.get('dual_clip')(*_j(logp, old, adv, mask),
                                       dual_clip_c=1.0)


@pytest.mark.parametrize('eps_high', [0.28, 0.0])
def test_gppo_forward_is_clip_higher_but_gradient_survives(eps_high):
  logp, old, adv, mask, _ = _inputs(15)
  hp = dict(clip_eps=0.2, clip_eps_high=eps_high)
  gppo, gd = objectives.LOSSES.get('gppo')(*_j(logp, old, adv, mask), **hp)
  ppo, pd = objectives.LOSSES.get('ppo_clip')(*_j(logp, old, adv, mask), **hp)
  np.testing.assert_allclose(np.asarray(gppo), np.asarray(ppo), rtol=1e-7,
                             atol=0)
  for k in gd:
    np.testing.assert_array_equal(np.asarray(gd[k]), np.asarray(pd[k]))

  def grad(name):
    return np.asarray(jax.grad(lambda lp: objectives.policy_loss(
        name, lp, *_j(old, adv, mask), **hp)[0])(jnp.asarray(logp)))

  g_gppo, g_ppo = grad('gppo'), grad('ppo_clip')
  low = np.asarray(gd['clipped_low']) & mask
  high = np.asarray(gd['clipped_high']) & mask
  assert low.any() and high.any()
  n = mask.sum()
  a = np.broadcast_to(adv[..., None], logp.shape)
  el, eh = 0.2, eps_high or 0.2
  # Clipped: PPO drops the gradient; GPPO keeps -(1 -/+ eps) A / N.
  np.testing.assert_array_equal(g_ppo[low | high], 0.0)
  assert np.all(g_gppo[low | high] != 0.0)
  np.testing.assert_allclose(g_gppo[low], -(1 - el) * a[low] / n, rtol=1e-5)
  np.testing.assert_allclose(g_gppo[high], -(1 + eh) * a[high] / n,
                             rtol=1e-5)
  # Unclipped tokens: identical to PPO.
  inside = ~(low | high)
  np.testing.assert_allclose(g_gppo[inside], g_ppo[inside], rtol=1e-6)


@pytest.mark.parametrize('eps', [(3e-4, 4e-4), (0.2, 0.28)])
@pytest.mark.parametrize('mode', ['seq-mean-token-mean', 'token-mean'])
def test_gspo_token_form_gradient_equals_sequence_form(eps, mode):
  logp, old, adv, mask, _ = _inputs(16)
  hp = dict(eps_low=eps[0], eps_high=eps[1])

  def f(lp, variant):
    return objectives.policy_loss('gspo', lp, *_j(old, adv, mask),
                                  aggregation=mode, variant=variant, **hp)[0]

  lp = jnp.asarray(logp)
  g_seq = np.asarray(jax.grad(f)(lp, 'seq'))
  g_tok = np.asarray(jax.grad(f)(lp, 'token'))
  np.testing.assert_allclose(float(f(lp, 'token')), float(f(lp, 'seq')),
                             rtol=1e-6)
  np.testing.assert_allclose(g_tok, g_seq, rtol=1e-5, atol=1e-9)
  # Closed form: unclipped response i, token t: -A_i s_i * (agg. weight).
  _, s, low, high = _np_loss('gspo', logp, old, adv, mask, None, **hp)
  lengths = mask.sum(-1, keepdims=True)
  if mode == 'seq-mean-token-mean':
    weight = 1.0 / (np.maximum(lengths, 1) * (lengths > 0).sum())
  else:
    weight = np.full(lengths.shape, 1.0 / mask.sum())
  want = np.where(mask & ~low & ~high, -adv[..., None] * s * weight, 0.0)
  assert (mask & ~low & ~high).any() and (mask & (low | high)).any()
  np.testing.assert_allclose(g_seq, want, rtol=1e-5, atol=1e-9)


def test_gspo_sequence_ratio_and_empty_response():
  logp, old, adv, mask, _ = _inputs(17)
  # Garbage under the mask must not reach s_i.
  logp_poisoned = np.where(mask, logp, 50.0).astype(np.float32)
  _, diag = objectives.LOSSES.get('gspo')(*_j(logp_poisoned, old, adv, mask))
  ratio = np.asarray(diag['ratio'])
  np.testing.assert_array_equal(ratio[0, 1], 1.0)  # Empty response.
  d = np.where(mask, logp.astype(np.float64) - old, 0.0).sum(-1)
  want = np.exp(d / np.maximum(mask.sum(-1), 1))
  np.testing.assert_allclose(ratio, np.broadcast_to(want[..., None],
                                                    ratio.shape), rtol=2e-5)


def test_gspo_rejects_token_advantages_and_bad_variant():
  logp, old, adv, mask, _ = _inputs(18, per_token_adv=True)
  with pytest.raises(ValueError, match=r'\[B, G\]'):
    objectives.policy_loss('gspo', *_j(logp, old, adv, mask))
  with pytest.raises(ValueError, match='variant'):
    objectives.policy_loss('gspo', *_j(logp, old, adv[..., 0], mask),
                           variant='nope')


def test_cispo_gradient_never_dropped():
  logp, old, adv, mask, _ = _inputs(19)
  lp = jnp.asarray(logp)
  grad = np.asarray(jax.grad(lambda x: objectives.policy_loss(
      'cispo', x, *_j(old, adv, mask))[0])(lp))
  _, diag = objectives.LOSSES.get('cispo')(lp, *_j(old, adv, mask))
  rho = np.exp(logp.astype(np.float64) - old)
  a = np.broadcast_to(adv[..., None], logp.shape)
  clipped = np.asarray(diag['clipped_high']) & mask
  assert clipped.any()
  assert np.all(grad[mask & (a != 0)] != 0.0)
  assert np.all(grad[clipped] != 0.0)
  want = -np.minimum(rho, 1.28) * a / mask.sum()
  np.testing.assert_allclose(grad[mask], want[mask], rtol=1e-5)
  np.testing.assert_array_equal(grad[~mask], 0.0)


@pytest.mark.parametrize('eps_high', [0.0, 0.28])
def test_decoupled_equals_ppo_when_behaviour_is_old(eps_high):
  logp, old, adv, mask, _ = _inputs(20)
  hp = dict(clip_eps=0.2, clip_eps_high=eps_high)

  def f(lp, name):
    return objectives.policy_loss(name, lp, *_j(old, adv, mask),
                                  behaviour_logp=jnp.asarray(old), **hp)

  lp = jnp.asarray(logp)
  (l_dec, m_dec), g_dec = jax.value_and_grad(f, has_aux=True)(lp, 'decoupled')
  (l_ppo, m_ppo), g_ppo = jax.value_and_grad(f, has_aux=True)(lp, 'ppo_clip')
  np.testing.assert_allclose(float(l_dec), float(l_ppo), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(g_dec), np.asarray(g_ppo), rtol=1e-6,
                             atol=1e-9)
  for k in m_ppo:
    np.testing.assert_allclose(float(m_dec[k]), float(m_ppo[k]), rtol=1e-6)


def test_decoupled_needs_behaviour_logp():
  logp, old, adv, mask, _ = _inputs(21)
  with pytest.raises(ValueError, match='behaviour_logp'):
    objectives.policy_loss('decoupled', *_j(logp, old, adv, mask))


# --------------------------------------------------------------- corrections


@pytest.mark.parametrize('name', ['ppo_clip', 'gspo', 'cispo'])
@pytest.mark.parametrize('correction', ['tis', 'icepop'])
def test_corrections_match_numpy(name, correction):
  logp, old, adv, mask, mu = _inputs(22)
  hp = dict(tis_cap=2.0, icepop_low=0.5, icepop_high=5.0)

  def f(lp):
    return objectives.policy_loss(
        name, lp, *_j(old, adv, mask), behaviour_logp=jnp.asarray(mu),
        correction=correction, aggregation='seq-mean-token-mean', **hp)

  lp = jnp.asarray(logp)
  (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(lp)
  plain_grad = jax.grad(lambda x: objectives.policy_loss(
      name, x, *_j(old, adv, mask), aggregation='seq-mean-token-mean')[0])(lp)
  w = np.exp(old.astype(np.float64) - mu)
  capped = w > 2.0
  dropped = (w < 0.5) | (w > 5.0)
  assert (capped & mask).any() and (dropped & mask).any()
  if correction == 'tis':
    factor = np.minimum(w, 2.0)
  else:
    factor = np.where(dropped, 0.0, 1.0)
  per_tok = _np_loss(name, logp, old, adv, mask, mu)[0]
  np.testing.assert_allclose(
      float(loss), _np_aggregate(per_tok * factor, mask,
                                 'seq-mean-token-mean'), rtol=2e-5, atol=1e-6)
  # The factor carries no gradient: grad = factor * uncorrected grad. GSPO's
  # per-token loss is its sequence loss broadcast, so the sequence gets the
  # mean factor over its tokens.
  if name == 'gspo':
    seq_factor = (np.where(mask, factor, 0.0).sum(-1, keepdims=True) /
                  np.maximum(mask.sum(-1, keepdims=True), 1))
    factor_grad = np.broadcast_to(seq_factor, factor.shape)
  else:
    factor_grad = factor
  np.testing.assert_allclose(np.asarray(grad),
                             factor_grad * np.asarray(plain_grad), rtol=2e-5,
                             atol=1e-9)
  if correction == 'icepop' and name != 'gspo':
    np.testing.assert_array_equal(np.asarray(grad)[dropped], 0.0)
  n = mask.sum()
  np.testing.assert_allclose(float(metrics['correction/weight_mean']),
                             w[mask].mean(), rtol=2e-5)
  if correction == 'tis':
    assert float(metrics['correction/masked_frac']) == 0.0
    np.testing.assert_allclose(float(metrics['correction/capped_frac']),
                               (capped & mask).sum() / n, rtol=1e-6)
  else:
    np.testing.assert_allclose(float(metrics['correction/masked_frac']),
                               (dropped & mask).sum() / n, rtol=1e-6)


def test_correction_is_noop_when_behaviour_is_old():
  logp, old, adv, mask, _ = _inputs(23)
  args = _j(logp, old, adv, mask)
  plain, _ = objectives.policy_loss('ppo_clip', *args)
  for correction in ('tis', 'icepop'):
    got, m = objectives.policy_loss('ppo_clip', *args,
                                    behaviour_logp=jnp.asarray(old),
                                    correction=correction)
    assert float(got) == float(plain)
    assert float(m['correction/weight_mean']) == 1.0
    assert float(m['correction/masked_frac']) == 0.0


def test_correction_errors():
  logp, old, adv, mask, mu = _inputs(24)
  args = _j(logp, old, adv, mask)
  with pytest.raises(ValueError, match='behaviour_logp'):
    objectives.policy_loss('ppo_clip', *args, correction='tis')
  with pytest.raises(ValueError) as e:
    objectives.policy_loss('ppo_clip', *args, behaviour_logp=jnp.asarray(mu),
                           correction='nope')
  assert "'nope'" in str(e.value)
  for c in objectives.CORRECTIONS:
    assert repr(c) in str(e.value)


# --------------------------------------------------------------------- names


def test_unknown_loss_lists_all_known_names():
  logp, old, adv, mask, _ = _inputs(25)
  with pytest.raises(ValueError) as e:
    objectives.policy_loss('nope', *_j(logp, old, adv, mask))
  assert "'nope'" in str(e.value)
  assert set(objectives.LOSSES) == {'ppo_clip', 'dapo', 'dual_clip', 'gspo',
                                    'gppo', 'cispo', 'decoupled'}
  for name in objectives.LOSSES:
    assert repr(name) in str(e.value)


def test_check_names_accepts_every_loss():
  for name in objectives.LOSSES:
    objectives.check_names(ObjectiveConfig(loss=name))
  with pytest.raises(ConfigError, match='objective.loss'):
    objectives.check_names(ObjectiveConfig(loss='nope'))
