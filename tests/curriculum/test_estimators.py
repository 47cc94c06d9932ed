"""Estimators: posterior updates and decay by hand, functionals by quadrature."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate
from scipy import stats

from rlx.curriculum import estimators as est


def test_beta_bernoulli_discounted_update_by_hand():
  e = est.beta_bernoulli(lam=0.5)
  s = e.init(3)
  s = e.update(s, jnp.array([0, 2]), jnp.array([3.0, 0.0]),
               jnp.array([4.0, 4.0]))
  # alpha <- 0.5 * 1 + 0.5 * 1 + s, beta <- 0.5 * 1 + 0.5 * 1 + (n - s).
  np.testing.assert_allclose(s.alpha, [4.0, 1.0, 1.0])
  np.testing.assert_allclose(s.beta, [2.0, 1.0, 5.0])
  s = e.update(s, jnp.array([0]), jnp.array([1.0]), jnp.array([2.0]))
  np.testing.assert_allclose(s.alpha, [0.5 * 4 + 0.5 + 1, 1.0, 1.0])
  np.testing.assert_allclose(s.beta, [0.5 * 2 + 0.5 + 1, 1.0, 5.0])
  np.testing.assert_array_equal(s.visits, [2, 0, 1])
  np.testing.assert_array_equal(s.last_step, [1, -1, 0])
  assert int(s.step) == 2


def test_zero_count_rows_are_ignored():
  e = est.beta_bernoulli(lam=0.5)
  s = e.update(e.init(2), jnp.array([0, 1]), jnp.array([0.0, 1.0]),
               jnp.array([0.0, 2.0]))
  np.testing.assert_allclose(s.alpha, [1.0, 2.0])
  np.testing.assert_array_equal(s.visits, [0, 1])


def test_vade_decays_unseen_prompts_toward_prior_by_gamma_power_dt():
  gamma = 0.5
  e = est.vade(lam=1.0, gamma=gamma)
  s = e.update(e.init(2), jnp.array([1]), jnp.array([4.0]), jnp.array([4.0]))
  np.testing.assert_allclose([s.alpha[1], s.beta[1]], [5.0, 1.0])
  for _ in range(2):  # Two steps in which prompt 1 is not seen.
    s = e.update(s, jnp.array([0]), jnp.array([0.0]), jnp.array([2.0]))
  np.testing.assert_allclose(s.alpha[1], 1 + (5 - 1) * gamma ** 2)
  np.testing.assert_allclose(s.beta[1], 1.0)
  # Prompt 0: decayed once between its two visits, then updated.
  a0 = 1 + (1 - 1) * gamma
  b0 = 1 + ((1 + 2) - 1) * gamma + 2
  np.testing.assert_allclose([s.alpha[0], s.beta[0]], [a0, b0])


def test_count_estimator_mean_is_cures_laplace_rate():
  e = est.count()
  s = e.init(2)
  for succ, n in ((3, 4), (1, 4), (0, 8)):
    s = e.update(s, jnp.array([0]), jnp.array([float(succ)]),
                 jnp.array([float(n)]))
  np.testing.assert_allclose(est.mean(s)[0], (4 + 1) / (16 + 2), rtol=1e-6)


def test_spo_tracker_discounts_without_prior_pull():
  e = est.spo_tracker(rho=0.5)
  s = e.update(e.init(1), jnp.array([0]), jnp.array([1.0]), jnp.array([1.0]))
  s = e.update(s, jnp.array([0]), jnp.array([0.0]), jnp.array([1.0]))
  np.testing.assert_allclose([s.alpha[0], s.beta[0]],
                             [0.5 * (0.5 + 1), 0.5 * 0.5 + 1])


def test_spo_tracker_stays_a_proper_beta_after_a_long_run_of_one_outcome():
  # 0.5^k underflows float32 after ~150 all-correct visits; the floor keeps
  # beta at SPO_MIN_COUNT and the all-equal probability finite.
  e = est.spo_tracker(rho=0.5)
  s = e.init(1)
  for _ in range(200):
    s = e.update(s, jnp.array([0]), jnp.array([8.0]), jnp.array([8.0]))
  assert float(s.beta[0]) == pytest.approx(est.SPO_MIN_COUNT)
  np.testing.assert_allclose(float(s.alpha[0]), 16.0, rtol=1e-6)
  p = float(est.prob_all_same(s.alpha, s.beta, 8)[0])
  assert np.isfinite(p) and 0.99 < p <= 1.0
  with pytest.raises(ValueError, match='rho=0'):
    est.spo_tracker(rho=0.0)


def test_update_is_jittable_and_matches_eager():
  e = est.vade()
  args = (e.init(5), jnp.array([1, 3]), jnp.array([2.0, 1.0]),
          jnp.array([4.0, 2.0]))
  jax.tree.map(np.testing.assert_allclose, jax.jit(e.update)(*args),
               e.update(*args))


def _expect(fn, a, b):
  return integrate.quad(lambda p: fn(p) * stats.beta.pdf(p, a, b), 0, 1,
                        limit=200)[0]


def _h(p):
  return 0.0 if p in (0.0, 1.0) else -(p * np.log(p) + (1 - p) * np.log1p(-p))


@pytest.mark.parametrize('a,b', [(1, 1), (5, 5), (2, 9), (30, 3), (0.7, 1.4)])
def test_insight_score_against_numerical_integration(a, b):
  mu = a / (a + b)
  want = mu * (1 - mu) * (_h(mu) - _expect(_h, a, b))
  got = float(est.insight_score(jnp.float32(a), jnp.float32(b)))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('a,b,g', [(1, 1, 8), (1, 9, 8), (4, 2, 4),
                                   (20, 1, 8)])
def test_prob_all_same_against_numerical_integration(a, b, g):
  want = _expect(lambda p: p ** g + (1 - p) ** g, a, b)
  got = float(est.prob_all_same(jnp.float32(a), jnp.float32(b), g))
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_insight_prefers_uncertain_half_and_ranks_evidence():
  # Same mean 0.5: less evidence -> more information.
  weak, strong = est.insight_score(jnp.array([2.0, 50.0]),
                                   jnp.array([2.0, 50.0]))
  assert weak > strong
  # Same evidence: near 0.5 beats near 0.
  mid, low = est.insight_score(jnp.array([5.0, 1.0]), jnp.array([5.0, 9.0]))
  assert mid > low


def test_evidence_is_the_posterior_less_what_is_left_of_the_prior():
  ids = jnp.array([0, 1])
  # beta (prior 2, 3; lam 0.5): two updates of prompt 0 with 3/4, then 1/4.
  b = est.beta_bernoulli(lam=0.5, alpha0=2.0, beta0=3.0)
  s = b.update(b.init(3), ids[:1], jnp.array([3.0]), jnp.array([4.0]))
  s = b.update(s, ids[:1], jnp.array([1.0]), jnp.array([4.0]))
  succ, fail = b.evidence(s)
  # alpha - alpha0 = 0.5 (0.5 * 3) + 1 and likewise for failures.
  np.testing.assert_allclose(succ, [2.5, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(fail, [3.5, 0, 0], rtol=1e-6)
  # count keeps its own Beta(1, 1) whatever the config's prior.
  c = est.make('count', lam=0.9, gamma=0.99, rho=0.9, alpha0=5.0, beta0=5.0)
  s = c.update(c.init(2), ids, jnp.array([2.0, 0.0]), jnp.array([3.0, 1.0]))
  np.testing.assert_allclose(np.stack(c.evidence(s)), [[2, 0], [1, 1]])
  # spo: the initial pseudo-counts decay by rho per visit (no prior pull).
  t = est.spo_tracker(rho=0.5, alpha0=1.0, beta0=1.0)
  s = t.update(t.init(2), ids[:1], jnp.array([2.0]), jnp.array([2.0]))
  s = t.update(s, ids[:1], jnp.array([0.0]), jnp.array([2.0]))
  # alpha = 0.25 * 1 + 0.5 * 2 + 0; beta = 0.25 * 1 + 0 + 2.
  np.testing.assert_allclose(s.alpha[0], 1.25)
  np.testing.assert_allclose(np.stack(t.evidence(s))[:, 0], [1.0, 2.0])
  np.testing.assert_allclose(np.stack(t.evidence(s))[:, 1], [0.0, 0.0])
