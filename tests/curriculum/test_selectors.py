"""Selectors: preference for p near 0.5, determinism, eligibility, GDRO."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx import config as config_lib
from rlx.curriculum import dots as dots_lib
from rlx.curriculum import estimators as est
from rlx.curriculum import likelihood as lik
from rlx.curriculum import selectors as sel

N, MID = 60, 12  # Prompts 0..11 sit at p = 0.5, the rest near 0 or 1.


def _state(num_refs: int = 4):
  alpha = np.ones(N, np.float32)
  beta = np.ones(N, np.float32)
  alpha[:MID], beta[:MID] = 20.0, 20.0
  half = MID + (N - MID) // 2
  beta[MID:half] = 40.0  # p ~ 0.02: far too hard.
  alpha[half:] = 40.0  # p ~ 0.98: far too easy.
  stats = est.PromptStats(jnp.asarray(alpha), jnp.asarray(beta),
                          jnp.zeros(N, jnp.int32), jnp.full(N, -1, jnp.int32),
                          jnp.zeros((), jnp.int32))
  # DOTS: one-hot-ish embeddings by group, references with their rates.
  group = np.where(np.arange(N) < MID, 0, np.where(np.arange(N) < half, 1, 2))
  embed = np.eye(3, dtype=np.float32)[group] * 10.0
  refs = np.array([0, MID, half, 1])[:num_refs]
  rates = np.array([0.5, 0.0, 1.0, 0.5])[:num_refs]
  dots = sel.DotsState(jnp.asarray(embed), jnp.asarray(refs, jnp.int32),
                       jnp.asarray(rates, jnp.float32))
  return sel.CurriculumState(stats, sel.gdro_init(5), dots)


def _make(name, **knobs) -> sel.Selector:
  """The selector `name` under the default curriculum knobs (mmr1_mix 0.5,
  spo_floor 0.05, dots.tau 0.1) and `knobs`."""
  cfg = config_lib.CurriculumConfig(selector=name, **knobs)
  return sel.make(cfg, est.beta_bernoulli(),
                  score_fn=lambda params, ids: np.zeros(len(ids)))


def _selector(name, **knobs):
  """Its pure `select`."""
  return _make(name, **knobs).select


INFORMED = ('vade', 'insight', 'cures', 'mmr1_vas', 'spo', 'dots')


@pytest.mark.parametrize('name', sel.SELECTORS.names())
def test_deterministic_under_a_fixed_key_and_distinct(name):
  fn = jax.jit(_selector(name), static_argnums=2)
  state, key = _state(), jax.random.key(3)
  a, b = fn(state, key, 10), fn(state, key, 10)
  np.testing.assert_array_equal(a, b)
  assert len(set(np.asarray(a).tolist())) == 10
  assert np.all((np.asarray(a) >= 0) & (np.asarray(a) < N))


@pytest.mark.parametrize('name', INFORMED)
def test_prefers_prompts_near_half(name):
  fn = jax.jit(_selector(name), static_argnums=2)
  state = _state()
  picks = np.zeros(N)
  for i in range(200):
    picks[np.asarray(fn(state, jax.random.key(i), 6))] += 1
  mid_rate, far_rate = picks[:MID].mean() / 200, picks[MID:].mean() / 200
  assert mid_rate > 2 * far_rate, (mid_rate, far_rate)


@pytest.mark.parametrize('name', ('vade', 'insight'))
def test_score_selectors_take_only_the_informative(name):
  ids = _selector(name)(_state(), jax.random.key(0), MID)
  assert set(np.asarray(ids).tolist()) == set(range(MID))


def test_uniform_ignores_the_posterior():
  fn = jax.jit(sel.uniform, static_argnums=2)
  picks = np.zeros(N)
  for i in range(300):
    picks[np.asarray(fn(_state(), jax.random.key(i), 6))] += 1
  np.testing.assert_allclose(picks / 300, 0.1, atol=0.07)


@pytest.mark.parametrize('name', sel.SELECTORS.names())
def test_respects_eligibility_until_exhausted(name):
  fn = _selector(name)
  eligible = jnp.zeros(N, bool).at[jnp.arange(30, 45)].set(True)
  ids = np.asarray(fn(_state(), jax.random.key(1), 10, eligible))
  assert np.all((ids >= 30) & (ids < 45))
  ids = np.asarray(fn(_state(), jax.random.key(1), 20, eligible))
  assert set(range(30, 45)) <= set(ids.tolist()) and len(set(ids)) == 20


@pytest.mark.parametrize('name', sel.SELECTORS.names())
def test_the_fill_beyond_the_eligible_is_drawn_not_the_lowest_ids(name):
  # 2 eligible prompts for 5 slots: the other 3 come from the ineligible
  # ones by the selector's own rule, so they vary with the key (they were
  # ids 0, 1, 2 whatever the key when ineligible weights sat at -1e9).
  fn = jax.jit(_selector(name), static_argnums=2)
  eligible = jnp.zeros(N, bool).at[jnp.array([40, 50])].set(True)
  fills = set()
  for i in range(20):
    ids = np.asarray(fn(_state(), jax.random.key(i), 5, eligible))
    assert set(ids[:2].tolist()) == {40, 50} and len(set(ids.tolist())) == 5
    fills.add(tuple(sorted(ids[2:].tolist())))
  assert len(fills) > 1, fills


@pytest.mark.parametrize('name', sel.SELECTORS.names())
def test_int_tiers_draw_lower_tiers_first(name):
  fn = jax.jit(_selector(name), static_argnums=2)
  tiers = jnp.asarray(np.arange(N) % 3, jnp.int32)  # 20 prompts per tier.
  for i in range(10):
    ids = np.asarray(fn(_state(), jax.random.key(i), 25, tiers))
    got = np.sort(np.asarray(tiers)[ids])
    np.testing.assert_array_equal(got, [0] * 20 + [1] * 5)


def test_the_ineligible_fill_follows_the_weights():
  w = jnp.array([1.0, 3.0, 1.0, 1.0, 4.0])
  eligible = jnp.array([True, False, True, False, False])
  draws = jax.vmap(lambda k: sel.sample_weighted(k, w, 3, eligible)[2])(
      jax.random.split(jax.random.key(0), 20000))
  freq = np.bincount(np.asarray(draws), minlength=5) / 20000
  np.testing.assert_allclose(freq, [0, 3 / 8, 0, 1 / 8, 4 / 8], atol=0.015)


def test_gumbel_top_one_matches_weights():
  w = jnp.array([1.0, 2.0, 3.0, 4.0])
  draws = jax.vmap(lambda k: sel.sample_weighted(k, w, 1)[0])(
      jax.random.split(jax.random.key(0), 20000))
  freq = np.bincount(np.asarray(draws), minlength=4) / 20000
  np.testing.assert_allclose(freq, np.asarray(w) / 10, atol=0.015)


def test_mmr1_mixes_vps_and_uniform_draws():
  fn = jax.jit(_selector('mmr1_vas', mmr1_mix=0.5), static_argnums=2)
  picks = np.zeros(N)
  for i in range(300):
    picks[np.asarray(fn(_state(), jax.random.key(i), 10))] += 1
  # Far prompts are still drawn by the uniform half.
  assert picks[MID:].sum() > 0.3 * 300 * 5 * (N - MID) / N


def test_gdro_update_by_hand():
  gdro = sel.gdro_init(2)
  stats = est.beta_bernoulli().init(2)
  stats = stats._replace(alpha=jnp.array([1.0, 9.0]),
                         beta=jnp.array([9.0, 1.0]))  # Bins 0 and 1.
  new = sel.gdro_update(gdro, stats, jnp.array([0, 1]), jnp.array([1.0, 0.0]),
                        eta=1.0, decay=0.5, explore=0.0)
  # EMA 0.5 * obs, debiased by 1 - 0.5 -> obs; centred: [0.5, -0.5].
  q = np.exp(np.asarray(new.log_q))
  np.testing.assert_allclose(q[0], 1 / (1 + np.exp(-1.0)), rtol=1e-5)
  np.testing.assert_allclose(q.sum(), 1.0, rtol=1e-6)
  ids = [np.asarray(sel.prompt_gdro(
      sel.CurriculumState(stats, new, _state().dots), jax.random.key(i), 1))[0]
         for i in range(400)]
  np.testing.assert_allclose(np.mean(np.array(ids) == 0), q[0], atol=0.07)


def test_dots_prediction_by_hand():
  embed = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  dots = sel.DotsState(embed, jnp.array([0, 1, -1], jnp.int32),
                       jnp.array([0.2, 0.8, 0.0]))
  logits = np.asarray(embed) @ np.asarray(embed)[[0, 1]].T / np.sqrt(2)
  attn = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(dots_lib.dots_predict(dots), attn @ [0.2, 0.8],
                             rtol=1e-5)
  none = dots._replace(ref_ids=jnp.full((3,), -1, jnp.int32))
  np.testing.assert_allclose(dots_lib.dots_predict(none), 0.5)


def test_dots_history_prediction_by_hand():
  # Prompt 0 seen (3 successes, 1 failure), prompt 1 seen (0 / 4), prompt 2
  # unseen; the references are prompts 0 and 1 (slot 3 empty).
  embed = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
  alpha = jnp.array([4.0, 1.0, 1.0])
  beta = jnp.array([2.0, 5.0, 1.0])
  stats = est.PromptStats(alpha, beta, jnp.array([1, 1, 0]),
                          jnp.array([0, 0, -1]), jnp.ones((), jnp.int32))
  dots = sel.DotsState(embed, jnp.array([1, 0, -1], jnp.int32),
                       jnp.zeros(3))
  state = sel.CurriculumState(stats, sel.gdro_init(5), dots)
  scale, prior = 3.0, 2.0
  got = np.asarray(dots_lib.dots_history_predict(state, scale, prior=prior))
  rate = np.array([3 / 4, 0 / 4])  # The references' evidence.
  # Prompt 0 and 1: the only other reference is the other prompt.
  m0, m1 = rate[1], rate[0]
  w = np.exp(scale * np.array([0.6, 0.8]))  # Prompt 2 against 0 and 1.
  m2 = (w / w.sum()) @ rate
  want = [(3 + prior * m0) / (4 + prior), (0 + prior * m1) / (4 + prior),
          m2]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # No references: every prompt's prior is 0.5.
  empty = state._replace(dots=dots._replace(
      ref_ids=jnp.full((3,), -1, jnp.int32)))
  np.testing.assert_allclose(
      dots_lib.dots_history_predict(empty, scale, prior=prior),
      [(3 + 1) / 6, 1 / 6, 0.5], rtol=1e-5)


def test_dots_explore_draws_a_uniform_share():
  # DOTS' share goes to the middle group (p = 0.5); the explored share is
  # uniform over the rest, so it lands in the middle MID / N of the time.
  state = _state()
  select = jax.jit(_selector('dots', dots=dict(
      tau=0.05, explore=0.5, similarity='cosine', cosine_scale=1.0)),
                   static_argnums=2)
  picks = np.stack([np.asarray(select(state, jax.random.key(i), 8))
                    for i in range(200)])
  assert all(len(set(row)) == 8 for row in picks)  # Distinct ids.
  np.testing.assert_array_equal(picks[0], select(state, jax.random.key(0),
                                                 8))
  assert np.mean(picks[:, :4] < MID) > 0.95  # DOTS' half.
  explored = np.mean(picks[:, 4:] < MID)  # Uniform over N - 4 others.
  assert abs(explored - (MID - 4) / (N - 4)) < 0.05
  none = jax.jit(_selector('dots', dots=dict(
      tau=0.05, similarity='cosine', cosine_scale=1.0)), static_argnums=2)
  assert np.mean(np.asarray(none(state, jax.random.key(0), 8)) < MID) == 1.0


def _np_ridge(x, y, lam, weight=None):
  """Numpy reference: (weighted) ridge of y - 0.5 on [x, 1]; predict(x') +
  0.5."""
  xb = np.concatenate([x, np.ones((len(x), 1))], 1)
  wx = xb if weight is None else xb * weight[:, None]
  w = np.linalg.solve(wx.T @ xb + lam * np.eye(xb.shape[1]), wx.T @ (y - 0.5))
  return lambda z: np.clip(
      0.5 + np.concatenate([z, np.ones((len(z), 1))], 1) @ w, 0.0, 1.0)


def test_ridge_readout_against_numpy_and_leave_one_out_refits():
  rng = np.random.default_rng(0)
  embed = rng.normal(size=(12, 3)).astype(np.float32)
  refs = np.array([4, 0, 7, -1, 9, 2, -1, 11])
  valid = refs >= 0
  rates = rng.uniform(size=8).astype(np.float32)
  lam = 0.7
  pred, loo = dots_lib.ridge_readout(
      jnp.asarray(embed), jnp.asarray(refs), jnp.asarray(rates),
      jnp.asarray(valid), lam)
  fit = _np_ridge(embed[refs[valid]], rates[valid], lam)
  np.testing.assert_allclose(pred, fit(embed), rtol=1e-4, atol=1e-5)
  for r in range(8):
    if not valid[r]:
      assert loo[r] == 0.5
      continue
    others = valid & (np.arange(8) != r)  # Refit without reference r.
    refit = _np_ridge(embed[refs[others]], rates[others], lam)
    np.testing.assert_allclose(loo[r], refit(embed[refs[r]][None])[0],
                               rtol=1e-4, atol=1e-5)
  # Fresh references (the card's DOTS state) read out by the probe.
  dots = sel.DotsState(jnp.asarray(embed), jnp.asarray(refs),
                       jnp.asarray(rates))
  np.testing.assert_allclose(dots_lib.dots_predict(dots, ridge=lam),
                             fit(embed), rtol=1e-4, atol=1e-5)
  none = dots._replace(ref_ids=jnp.full((8,), -1, jnp.int32))
  np.testing.assert_allclose(dots_lib.dots_predict(none, ridge=lam), 0.5)


def test_weighted_ridge_readout_against_numpy_and_leave_one_out_refits():
  rng = np.random.default_rng(1)
  embed = rng.normal(size=(10, 3)).astype(np.float32)
  refs = np.array([4, 0, 7, 9, -1, 2, 5])
  valid = refs >= 0
  rates = rng.uniform(size=7).astype(np.float32)
  weight = 0.5 ** (np.arange(7) / 2.0)
  lam = 0.4
  pred, loo = dots_lib.ridge_readout(
      jnp.asarray(embed), jnp.asarray(refs), jnp.asarray(rates),
      jnp.asarray(valid), lam, jnp.asarray(weight, jnp.float32))
  fit = _np_ridge(embed[refs[valid]], rates[valid], lam, weight[valid])
  np.testing.assert_allclose(pred, fit(embed), rtol=1e-4, atol=1e-5)
  for r in np.flatnonzero(valid):
    others = valid & (np.arange(7) != r)
    refit = _np_ridge(embed[refs[others]], rates[others], lam,
                      weight[others])
    np.testing.assert_allclose(loo[r], refit(embed[refs[r]][None])[0],
                               rtol=1e-4, atol=1e-5)
  assert loo[4] == 0.5
  # Unit weights are the unweighted fit.
  unweighted = dots_lib.ridge_readout(
      jnp.asarray(embed), jnp.asarray(refs), jnp.asarray(rates),
      jnp.asarray(valid), lam)
  ones = dots_lib.ridge_readout(
      jnp.asarray(embed), jnp.asarray(refs), jnp.asarray(rates),
      jnp.asarray(valid), lam, jnp.ones(7))
  for a, b in zip(unweighted, ones):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_dots_history_ridge_half_life_weighs_recent_references():
  # Two references with the same embedding direction and opposite rates:
  # the newer one (first in ref_ids) wins as the half-life shrinks.
  embed = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], np.float32)
  alpha = jnp.array([1.0, 9.0, 1.0])  # Prompt 1: 8 of 8 right (older).
  beta = jnp.array([9.0, 1.0, 1.0])   # Prompt 0: 0 of 8 right (newer).
  stats = est.PromptStats(alpha, beta, jnp.array([1, 1, 0]),
                          jnp.array([0, 0, -1]), jnp.ones((), jnp.int32))
  dots = sel.DotsState(jnp.asarray(embed), jnp.array([0, 1], jnp.int32),
                       jnp.zeros(2))
  state = sel.CurriculumState(stats, sel.gdro_init(5), dots)
  lam, prior = 0.01, 2.0
  preds = {}
  for halflife in (0.0, 1.0, 0.25):
    got = np.asarray(dots_lib.dots_history_predict(
        state, prior=prior, ridge=lam, halflife=halflife))
    weight = None if halflife == 0 else 0.5 ** (np.arange(2) / halflife)
    fit = _np_ridge(embed[:2], np.array([0.0, 1.0]), lam, weight)
    # Prompt 2 is unseen: its prediction is the probe's.
    np.testing.assert_allclose(got[2], fit(embed[2:])[0], rtol=1e-4,
                               atol=1e-5)
    preds[halflife] = got[2]
  # Equal weights: about halfway; weights 1 : 0.5 (p ~ 1/3) and 1 : 1/16.
  np.testing.assert_allclose(preds[0.0], 0.5, atol=0.01)
  np.testing.assert_allclose(preds[1.0], 1 / 3, atol=0.01)
  np.testing.assert_allclose(preds[0.25], 1 / 17, atol=0.01)
  with pytest.raises(ValueError, match='half-life'):
    dots_lib.dots_predictor(history=True, halflife=4.0)  # Attention readout.


def test_dots_history_ridge_prediction_by_hand():
  # Prompts 0, 1, 3 seen and the references; prompt 2 unseen.
  embed = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.5]],
                   np.float32)
  alpha = jnp.array([4.0, 1.0, 1.0, 3.0])
  beta = jnp.array([2.0, 5.0, 1.0, 3.0])
  stats = est.PromptStats(alpha, beta, jnp.array([1, 1, 0, 1]),
                          jnp.array([0, 0, -1, 0]), jnp.ones((), jnp.int32))
  refs = np.array([3, 1, 0, -1])
  dots = sel.DotsState(jnp.asarray(embed), jnp.asarray(refs, jnp.int32),
                       jnp.zeros(4))
  state = sel.CurriculumState(stats, sel.gdro_init(5), dots)
  lam, prior = 0.5, 2.0
  got = np.asarray(dots_lib.dots_history_predict(state, prior=prior,
                                                 ridge=lam))
  succ, fail = np.array([3.0, 0, 0, 2]), np.array([1.0, 4, 0, 2])
  rate = {0: 0.75, 1: 0.0, 3: 0.5}
  m = []
  for i in range(4):  # A reference's prior leaves it out of the fit.
    others = [j for j in (3, 1, 0) if j != i]
    fit = _np_ridge(embed[others], np.array([rate[j] for j in others]), lam)
    m.append(fit(embed[i][None])[0])
  want = (succ + prior * np.array(m)) / (succ + fail + prior)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # A reference's own rate does not move its prior: only its evidence.
  moved = state._replace(stats=stats._replace(alpha=alpha.at[3].set(5.0)))
  got2 = np.asarray(dots_lib.dots_history_predict(moved, prior=prior,
                                                  ridge=lam))
  np.testing.assert_allclose(got2[3], (4 + prior * m[3]) / (6 + prior),
                             rtol=1e-4)


@pytest.mark.parametrize('ridge', [None, 1.0])
def test_dots_history_selector_prefers_the_middle_group(ridge):
  state = _state()
  # The references are the first prompt of each group (p = 0.5, 0.02,
  # 0.98 by their posteriors); unseen prompts inherit their group's rate.
  half = MID + (N - MID) // 2
  state = state._replace(stats=state.stats._replace(
      alpha=state.stats.alpha.at[MID + 1:half].set(1.0).at[half + 1:].set(
          1.0),
      beta=state.stats.beta.at[MID + 1:half].set(1.0)))
  state = state._replace(dots=state.dots._replace(
      ref_ids=jnp.array([0, MID, half, -1], jnp.int32)))
  readout = ({} if ridge is None else {'readout': 'ridge', 'ridge': ridge})
  select = jax.jit(_selector('dots', dots=dict(
      refs='history', similarity='cosine', cosine_scale=1.0, **readout)),
                   static_argnums=2)
  ids = np.concatenate([np.asarray(select(state, jax.random.key(i), 6))
                        for i in range(20)])
  assert np.mean(ids < MID) > 0.9


def test_likelihood_estimate_by_hand():
  # q = exp(loglik) is worth `prior` rollouts against the own evidence.
  loglik = jnp.log(jnp.array([0.3, 0.3, 1.0, 0.5], jnp.float32))
  loglik = loglik.at[3].set(-jnp.inf)  # Cannot be sampled: q = 0.
  succ = jnp.array([2.0, 0.0, 0.0, 1.0])
  fail = jnp.array([1.0, 0.0, 0.0, 3.0])
  got = np.asarray(lik.likelihood_estimate(loglik, succ, fail, 4.0))
  np.testing.assert_allclose(
      got, [(2 + 4 * 0.3) / 7, 0.3, 1.0, 1 / 8], rtol=1e-6)
  # Rounding above 0 in the log-probability is no more than certainty.
  np.testing.assert_allclose(lik.likelihood_estimate(
      jnp.array([1e-3]), jnp.zeros(1), jnp.zeros(1), 2.0), [1.0])


def test_likelihood_pick_takes_the_most_mixed_tier_by_tier():
  p_hat = jnp.array([0.05, 0.5, 0.9, 0.45, 0.99, 0.6, 0.0, 0.3])
  key = jax.random.key(0)
  pick = jax.jit(lik.likelihood_pick, static_argnums=2)
  got = np.asarray(pick(key, p_hat, 3))
  np.testing.assert_array_equal(got, [1, 3, 5])  # p(1-p) descending.
  np.testing.assert_array_equal(got, np.asarray(pick(key, p_hat, 3)))
  tiers = jnp.array([0, 1, 0, 1, 0, 0, 0, 0], jnp.int32)
  np.testing.assert_array_equal(np.asarray(pick(key, p_hat, 3, tiers)),
                                [5, 7, 2])
  # Equal scores tie exactly and go at random.
  flat = jnp.full((8,), 0.5)
  firsts = {int(pick(jax.random.key(i), flat, 1)[0]) for i in range(40)}
  assert len(firsts) > 4
