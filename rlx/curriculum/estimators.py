"""Per-prompt difficulty estimators: `(init, update)` pairs over the dataset.

Every estimator keeps a Beta posterior over each prompt's pass rate p in
arrays sized to the dataset (N prompts), so all of them share one state type
and every selector can read every estimator. They differ in how evidence is
forgotten (ALGORITHMS.md section C):

  beta   MoPPS discounted Beta-Bernoulli: on an update,
         alpha <- lam*alpha + (1-lam)*alpha0 + s, beta likewise with n - s
         (s successes out of n rollouts).
  vade   VADE two-scale decay: the per-update discount above, plus a decay of
         every prompt toward the prior with the steps since it was last seen,
         alpha <- alpha0 + (alpha - alpha0) * gamma^dt. Applied eagerly (a
         factor gamma per step to all prompts), which equals gamma^dt at the
         next visit and keeps the state current for selectors.
  count  CurES counts: alpha = 1 + successes, beta = 1 + failures, no
         forgetting; the posterior mean is CurES' (acc + 1) / (all + 2).
  spo    SPO value tracker (discounted forgetting, Xu et al. 2025):
         alpha <- rho*alpha + s, beta <- rho*beta + (n - s) (no pull toward
         the prior; both floored at SPO_MIN_COUNT); v(x) = alpha / (alpha +
         beta) is SPO's baseline.

Rewards in [0, 1] count as fractional successes. All functions are pure and
jit-able; the state is a NamedTuple of arrays (saved in the checkpoint).
"""

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import betaln, digamma

from rlx.types import Array


class PromptStats(NamedTuple):
  """Beta posterior per prompt, plus visit bookkeeping."""
  alpha: Array  # [N] float32, pseudo-successes (prior included).
  beta: Array  # [N] float32, pseudo-failures (prior included).
  visits: Array  # [N] int32, rollout groups observed.
  last_step: Array  # [N] int32, step of the last update (-1: never).
  step: Array  # [] int32, updates applied so far (the estimator's clock).


class Estimator(NamedTuple):
  init: Callable[[int], PromptStats]
  update: Callable[..., PromptStats]
  # stats -> (successes [N], failures [N]): a prompt's own discounted
  # evidence, its posterior less what of the prior is left in it.
  evidence: Callable[[PromptStats], tuple[Array, Array]]


def evidence_less_prior(stats: PromptStats, alpha0: float, beta0: float
                        ) -> tuple[Array, Array]:
  """A prompt's own (discounted) successes and failures [N] under a
  posterior that keeps its prior (beta, vade, count): alpha - alpha0 and
  beta - beta0, floored at 0."""
  return (jnp.maximum(stats.alpha - alpha0, 0.0),
          jnp.maximum(stats.beta - beta0, 0.0))


def _less_prior(alpha0: float, beta0: float):
  return functools.partial(evidence_less_prior, alpha0=alpha0, beta0=beta0)


ESTIMATORS = ('beta', 'vade', 'count', 'spo')


def _init_fn(alpha0: float, beta0: float):
  def init(num_prompts: int) -> PromptStats:
    return PromptStats(
        alpha=jnp.full((num_prompts,), alpha0, jnp.float32),
        beta=jnp.full((num_prompts,), beta0, jnp.float32),
        visits=jnp.zeros((num_prompts,), jnp.int32),
        last_step=jnp.full((num_prompts,), -1, jnp.int32),
        step=jnp.zeros((), jnp.int32))
  return init


def _observe(state: PromptStats, ids: Array, new_alpha: Array,
             new_beta: Array, counts: Array) -> PromptStats:
  """Writes updated posteriors of the observed prompts (counts > 0)."""
  seen = counts > 0
  ids = jnp.where(seen, ids, state.alpha.shape[0])  # Out of range: dropped.
  return PromptStats(
      alpha=state.alpha.at[ids].set(new_alpha, mode='drop'),
      beta=state.beta.at[ids].set(new_beta, mode='drop'),
      visits=state.visits.at[ids].add(1, mode='drop'),
      last_step=state.last_step.at[ids].set(state.step, mode='drop'),
      step=state.step + 1)


def _check_ids(ids: Array, successes: Array, counts: Array):
  ids = jnp.asarray(ids, jnp.int32)
  successes = jnp.asarray(successes, jnp.float32)
  counts = jnp.asarray(counts, jnp.float32)
  return ids, successes, counts


def beta_bernoulli(*, lam: float = 0.9, alpha0: float = 1.0,
                   beta0: float = 1.0) -> Estimator:
  """MoPPS discounted Beta-Bernoulli posterior (Qu et al. 2025).

  Args:
    lam: discount of old evidence at each update of a prompt (1: none).
    alpha0, beta0: the Beta prior.

  Returns:
    `Estimator(init(N), update(state, ids [B], successes [B], counts [B]))`.
    `ids` must be distinct; rows with counts == 0 are ignored.
  """
  def update(state, ids, successes, counts):
    ids, s, n = _check_ids(ids, successes, counts)
    a = lam * state.alpha[ids] + (1 - lam) * alpha0 + s
    b = lam * state.beta[ids] + (1 - lam) * beta0 + (n - s)
    return _observe(state, ids, a, b, n)

  return Estimator(_init_fn(alpha0, beta0), update,
                   _less_prior(alpha0, beta0))


def vade(*, lam: float = 0.9, gamma: float = 0.99, alpha0: float = 1.0,
         beta0: float = 1.0) -> Estimator:
  """VADE's two-scale posterior: per-update discount + decay with time.

  Every update first moves all prompts toward the prior by a factor gamma
  (so a prompt unseen for dt steps has decayed by gamma^dt), then applies
  the discounted update of `beta_bernoulli` to the observed prompts.
  """
  inner = beta_bernoulli(lam=lam, alpha0=alpha0, beta0=beta0)

  def update(state, ids, successes, counts):
    state = state._replace(
        alpha=alpha0 + (state.alpha - alpha0) * gamma,
        beta=beta0 + (state.beta - beta0) * gamma)
    return inner.update(state, ids, successes, counts)

  return Estimator(_init_fn(alpha0, beta0), update,
                   _less_prior(alpha0, beta0))


def count() -> Estimator:
  """CurES counts: Beta(1 + successes, 1 + failures), no forgetting."""
  return beta_bernoulli(lam=1.0, alpha0=1.0, beta0=1.0)


SPO_MIN_COUNT = 1e-3  # Pseudo-count floor of the SPO tracker: forgetting
# alone would take alpha or beta to 0 (an improper Beta, NaN in the
# all-equal probability) after a long run of one outcome.


def spo_tracker(*, rho: float = 0.9, alpha0: float = 1.0,
                beta0: float = 1.0) -> Estimator:
  """SPO's value tracker with discounted forgetting (no prior pull);
  alpha and beta never fall below SPO_MIN_COUNT."""
  if not 0 < rho <= 1:
    raise ValueError(f'SPO forgetting factor rho={rho} not in (0, 1]')

  def update(state, ids, successes, counts):
    ids, s, n = _check_ids(ids, successes, counts)
    a = jnp.maximum(rho * state.alpha[ids] + s, SPO_MIN_COUNT)
    b = jnp.maximum(rho * state.beta[ids] + (n - s), SPO_MIN_COUNT)
    return _observe(state, ids, a, b, n)

  def evidence(stats):
    # The initial pseudo-counts decay by rho per visit, never pulled back.
    left = rho ** stats.visits.astype(jnp.float32)
    return (jnp.maximum(stats.alpha - alpha0 * left, 0.0),
            jnp.maximum(stats.beta - beta0 * left, 0.0))

  return Estimator(_init_fn(alpha0, beta0), update, evidence)


def make(name: str, *, lam: float, gamma: float, rho: float,
         alpha0: float, beta0: float) -> Estimator:
  """The estimator registered under `name` (see ESTIMATORS)."""
  if name == 'beta':
    return beta_bernoulli(lam=lam, alpha0=alpha0, beta0=beta0)
  if name == 'vade':
    return vade(lam=lam, gamma=gamma, alpha0=alpha0, beta0=beta0)
  if name == 'count':
    return count()
  if name == 'spo':
    return spo_tracker(rho=rho, alpha0=alpha0, beta0=beta0)
  raise ValueError(f'unknown estimator {name!r}; known: {list(ESTIMATORS)}')


# Posterior functionals shared by selectors, allocators and filters.


def mean(stats: PromptStats) -> Array:
  """Posterior mean pass rate [N]."""
  return stats.alpha / (stats.alpha + stats.beta)


def _binary_entropy(p: Array) -> Array:
  p = jnp.clip(p, 1e-12, 1 - 1e-12)
  return -(p * jnp.log(p) + (1 - p) * jnp.log1p(-p))


def insight_score(alpha: Array, beta: Array) -> Array:
  """InSight's weighted mutual information of one more outcome.

  I = H_b(mu) - E[H_b(p)] under p ~ Beta(alpha, beta), using
  E[p ln p] = mu (psi(alpha+1) - psi(alpha+beta+1)) (and the mirror term),
  weighted by mu (1 - mu).
  """
  mu = alpha / (alpha + beta)
  total = digamma(alpha + beta + 1)
  e_plogp = mu * (digamma(alpha + 1) - total)
  e_qlogq = (1 - mu) * (digamma(beta + 1) - total)
  info = _binary_entropy(mu) + e_plogp + e_qlogq
  return mu * (1 - mu) * info


def prob_all_same(alpha: Array, beta: Array, group_size: int) -> Array:
  """Posterior-predictive P(a group of `group_size` is all right or wrong).

  E[p^G] + E[(1-p)^G] = B(a+G, b)/B(a, b) + B(a, b+G)/B(a, b).
  """
  base = betaln(alpha, beta)
  return (jnp.exp(betaln(alpha + group_size, beta) - base)
          + jnp.exp(betaln(alpha, beta + group_size) - base))


def thompson(stats: PromptStats, key) -> Array:
  """One pass-rate draw per prompt from its posterior [N]."""
  return jax.random.beta(key, stats.alpha, stats.beta)
