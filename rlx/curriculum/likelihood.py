"""The likelihood selector: prompts whose reference solution the policy
finds closest to even odds, scored by one forward pass each (no rollout).

Each pick draws K * n candidates uniformly within the tiers (K =
curriculum.likelihood.candidates, at most the pool), scores them by the
policy's log-probability of their reference solutions (`score_fn`),
combines that with each candidate's own evidence (`likelihood_estimate`)
and keeps the n with p_hat nearest 0.5, the tiers still first. DAPO's
refills pick the same way.
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlx import config as config_lib
from rlx import errors
from rlx.curriculum import selectors as sel
from rlx.data import task as task_lib
from rlx.types import Array


def likelihood_estimate(loglik: Array, succ: Array, fail: Array,
                        prior: float) -> Array:
  """The likelihood selector's pass-rate estimate of each candidate.

  q = exp(loglik) is the probability that the policy samples the prompt's
  reference solution (and its eos) exactly, at the sampling temperature:
  under the full softmax a lower bound on its pass rate (not with top-k or
  top-p sampling), which on a task with one canonical solution path is
  most of it. q is the prior, worth `prior` rollouts,
  of the prompt's own evidence (s successes, f failures):

    p_hat = (s + prior q) / (s + f + prior).

  Returns p_hat, the shape of `loglik`.
  """
  q = jnp.exp(jnp.minimum(loglik, 0.0))
  return (succ + prior * q) / (succ + fail + prior)


def likelihood_pick(key, p_hat: Array, k: int, tiers=None) -> Array:
  """Positions [k] of the k candidates with the largest p_hat (1 - p_hat)
  (the most mixed groups expected), tier by tier, exact ties broken by
  `key`."""
  return sel.top_scores(key, p_hat * (1.0 - p_hat), k, tiers)


@config_lib.section('curriculum.likelihood', renamed={
    'likelihood_candidates': 'candidates', 'likelihood_prior': 'prior'})
@dataclasses.dataclass(frozen=True)
class LikelihoodConfig:
  """The likelihood selector: curriculum.likelihood.*."""
  candidates: int = 16  # likelihood: K; each step draws K * B candidates
  # uniformly, scores each by one forward pass of the policy over its
  # reference solution (task.train solutions; no rollouts), and keeps the
  # B whose estimate p_hat is nearest 0.5 (DAPO refills likewise). Made
  # for large prompt sets; on a small pool it runs out of mixed prompts and
  # trains nearly solved ones (docs/BENCHMARKS.md).
  prior: float = 8.0  # likelihood: pseudo-rollouts that
  # q = exp(log-prob of the reference solution at sampling.temperature)
  # counts for against the prompt's own evidence: p_hat = (s + prior q) /
  # (s + f + prior). q is under the full softmax (sampling.top_k and top_p
  # ignored; with them q is no longer a lower bound on the pass rate).
  # p_hat is also what the allocators and the curriculum/selected_pass_*
  # metrics see for the picks (the estimator's posterior mean otherwise).


@sel.SELECTORS.register('likelihood')
class Likelihood(sel.Selector):
  """The likelihood selector (module docstring). Its `select` is the
  candidate draw (uniform); `pick` scores the candidates by the policy.
  Metrics: curriculum/likelihood_scored (candidates scored this step) and
  time/likelihood_score_s."""

  select = staticmethod(sel.uniform)

  def __init__(self, cfg, estimator, *, seed=0, score_fn=None):
    if score_fn is None:
      raise ValueError('the likelihood selector needs score_fn (the '
                       "policy's log-probability of reference solutions)")
    super().__init__(cfg, estimator, seed=seed)
    self.score_fn = score_fn
    self._top = jax.jit(likelihood_pick, static_argnums=2)

  @classmethod
  def check(cls, cfg) -> None:
    # An unknown task is named by the task registry.
    task = task_lib.TASKS.get(cfg.task.name) if (
        cfg.task.name in task_lib.TASKS) else None
    errors.require(task is None or task.has_solutions, 'curriculum.selector',
                   "'likelihood' scores each prompt's reference solution; "
                   f'task.name={cfg.task.name!r} keeps final answers only')

  def prepare(self, state, step):
    step.metrics['curriculum/likelihood_scored'] = 0
    step.metrics['time/likelihood_score_s'] = 0.0
    return state

  def pick(self, state, step, key, n, tiers):
    """The n candidates of K * n with p_hat nearest 0.5, and their p_hat."""
    k_draw, k_pick = jax.random.split(key)
    m = min(self.cfg.likelihood.candidates * n, state.stats.alpha.shape[0])
    cand = np.asarray(self._select(state, k_draw, m, tiers))
    start = time.time()
    loglik = np.asarray(self.score_fn(step.params, cand), np.float32)
    step.metrics['curriculum/likelihood_scored'] += m
    step.metrics['time/likelihood_score_s'] += time.time() - start
    succ, fail = self.estimator.evidence(state.stats)
    p_hat = np.asarray(likelihood_estimate(
        jnp.asarray(loglik), succ[cand], fail[cand],
        self.cfg.likelihood.prior))
    cand_tiers = None if tiers is None else jnp.asarray(tiers)[cand]
    pos = np.asarray(self._top(k_pick, jnp.asarray(p_hat), n, cand_tiers))
    return cand[pos], p_hat[pos]


@sel.SELECTORS.check
def _check_likelihood_knobs(cfg) -> None:
  """The curriculum.likelihood.* knobs (whichever selector is chosen)."""
  cur = cfg.curriculum
  errors.require(cur.likelihood.candidates >= 1,
                 'curriculum.likelihood.candidates', 'must be >= 1')
  errors.require(cur.likelihood.prior > 0, 'curriculum.likelihood.prior',
                 'must be > 0')
