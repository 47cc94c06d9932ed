"""Prompt selectors: the protocol, its registry and the posterior selectors.

A selector is a `Selector` subclass registered in SELECTORS under its
`curriculum.selector` name where it is implemented (here; DOTS in dots.py,
the likelihood selector in likelihood.py). The controller builds one per
run and calls, each step:

  prepare(state, step)          per-step work before selecting that uses
                                the policy or rollouts (DOTS' references)
  batch(state, step, key, B)    the step's B prompts (host side)
  pick(state, step, key, n, t)  n more (DAPO's refills), tier by tier
  observe(state, before, ev)    its part of the state after the step's
                                evidence (GDRO's weights, DOTS' history)

Its state is its part of the curriculum state (`init`); the object holds
configuration only. Behind `pick` is the pure `select`, `(state, key, k,
eligible) -> prompt ids [k]` (jitted, k static): it turns the curriculum
state into either per-prompt sampling weights (drawn without replacement by
the Gumbel-top-k trick, which equals sequential weighted sampling) or
per-prompt scores (the k best, ties broken by the key). `eligible [N] bool`
removes prompts (the pre-rollout skip); when fewer than k are eligible the
rest are drawn from the ineligible ones by the same rule (weights or scores,
randomised by the key), so a selector always returns k distinct ids.
`eligible` may instead be int tiers [N] (0 first, then 1, ...): DAPO's
refills put the prompts already used in a step last, so they come back only
when nothing else is left. Same state and key, same ids. Formulas:
ALGORITHMS.md section C; the choices the cards leave open are in each
docstring.
"""

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rlx import config as config_lib
from rlx import errors
from rlx import registry
from rlx.curriculum import estimators as est
from rlx.types import Array

# Name -> Selector subclass. An unknown curriculum.selector is reported
# with the known names; the chosen selector's own `check` runs too.
SELECTORS = registry.Registry('curriculum.selector',
                              selected='curriculum.selector')

_TAKEN = 1 << 20  # Tier of ids already drawn: after every other tier.


class GdroState(NamedTuple):
  """Prompt-GDRO multiplicative weights over pass-rate bins."""
  log_q: Array  # [bins] float32, log weights (normalised).
  ema: Array  # [bins] float32, EMA of each bin's failure rate (biased).
  updates: Array  # [bins] int32, EMA updates per bin (for the debiasing).


class DotsState(NamedTuple):
  """DOTS: prompt embeddings and the reference prompts."""
  embed: Array  # [N, D] float32 ([1, 1] zeros when DOTS is off).
  ref_ids: Array  # [R] int32 reference prompts (-1: none yet): this step's
  # reference set, or (dots.refs=history) the prompts trained on most
  # recently, newest first.
  ref_rates: Array  # [R] float32 the reference set's measured pass rates
  # (history: unused, the estimator's evidence is read live).


class CurriculumState(NamedTuple):
  """The curriculum's checkpointed state. Every selector's has every part
  (a selector's `init` replaces its own), so that the structure of a
  checkpoint does not depend on the selector."""
  stats: est.PromptStats
  gdro: GdroState
  dots: DotsState


def default_state(stats: est.PromptStats, num_bins: int) -> CurriculumState:
  """The state of a selector that owns no part: `stats`, uniform GDRO
  weights over num_bins bins and an empty [1, 1] DOTS part."""
  dots = DotsState(embed=jnp.zeros((1, 1)),
                   ref_ids=jnp.full((1,), -1, jnp.int32),
                   ref_rates=jnp.zeros((1,)))
  return CurriculumState(stats=stats, gdro=gdro_init(num_bins), dots=dots)


# Evidence: one (ids [n], successes [n], responses [n]) per batch of groups
# observed in a step, in the order they were sampled.
Evidence = list[tuple[np.ndarray, np.ndarray, np.ndarray]]


class Step(NamedTuple):
  """What a selector may use of one RL step (host side)."""
  params: Any  # The policy's parameters.
  step: int  # The RL step.
  key: jax.Array  # The selector's own key of the step (for `prepare`).
  eligible: Optional[Array]  # [N] bool, the skip filter's mask, or None.
  embed: Callable[[], Array]  # () -> [N, D] float32 prompt embeddings of
  # the pool by `params` (raises without an embed_fn).
  rollout: Callable  # (ids [R], key, per_id) -> (successes [R], counts
  # [R]): per_id responses to each id, charged to the step and observed by
  # the estimator.
  metrics: dict  # The step's metrics, to which a selector adds its own.


class Selector:
  """A prompt selector (see the module docstring); subclasses override
  `select` and whichever other parts they need.

  Args:
    cfg: the curriculum config (rlx.config.CurriculumConfig).
    estimator: the curriculum's estimator (its `evidence` for selectors
      that read a prompt's own outcomes).
    seed: the run's seed (the data order).
    score_fn: (params, prompt ids [n]) -> [n] log-probability of each
      prompt's reference solution (used by the likelihood selector only).
  """

  # The posterior its paper keeps: curriculum.estimator='auto' uses it.
  default_estimator = 'beta'

  def __init__(self, cfg, estimator: est.Estimator, *, seed: int = 0,
               score_fn: Optional[Callable] = None):
    del score_fn  # Unused but by the likelihood selector.
    self.cfg, self.estimator, self.seed = cfg, estimator, seed
    self._select = jax.jit(self.select, static_argnums=2)

  @classmethod
  def check(cls, cfg) -> None:
    """Config checks of this selector when it is the one chosen
    (`errors.require`); `cfg` is the whole rlx Config."""
    del cfg

  @classmethod
  def group_sizes(cls, cfg) -> list[tuple[str, int]]:
    """(config key, responses per group) of the groups it rolls out itself
    in `prepare`, beyond the curriculum's rl.group_size ones."""
    del cfg
    return []

  def init(self, embed: Callable[[], Array]) -> dict:
    """Its parts of the initial CurriculumState, {field: value} (the
    others stay `default_state`'s); `embed()` gives the pool's [N, D]
    prompt embeddings."""
    del embed
    return {}

  def select(self, state: CurriculumState, key, k: int,
             eligible=None) -> Array:
    """k distinct prompt ids [k] int32, tier by tier (pure, jit-able)."""
    raise NotImplementedError

  def prepare(self, state: CurriculumState, step: Step) -> CurriculumState:
    """The state to select from this step (after per-step work)."""
    del step
    return state

  def pick(self, state: CurriculumState, step: Step, key, n: int, tiers
           ) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """n distinct prompt ids [n] by the selector, tier by tier (`tiers`:
    the skip filter's eligible mask, a refill's int tiers, or None), and
    the selector's own estimate of their pass rates [n] (None: the
    estimator's posterior mean is used)."""
    del step
    return np.asarray(self._select(state, key, n, tiers)), None

  def batch(self, state: CurriculumState, step: Step, key, b: int
            ) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """The step's b prompts, as `pick` returns them."""
    return self.pick(state, step, key, b, step.eligible)

  def observe(self, state: CurriculumState, stats_before: est.PromptStats,
              evidence: Evidence) -> CurriculumState:
    """Its part of the state after the step. `state.stats` has seen the
    evidence already; `stats_before` is what the step selected with."""
    del stats_before, evidence
    return state


def make(cfg, estimator: est.Estimator, *, seed: int = 0,
         score_fn: Optional[Callable] = None) -> Selector:
  """The selector `cfg.selector` names (cfg: the CurriculumConfig).

  Raises:
    ConfigError: an unknown name, listing the known ones.
  """
  return SELECTORS.get(cfg.selector)(cfg, estimator, seed=seed,
                                     score_fn=score_fn)


def group_sizes(cfg) -> list[tuple[str, int]]:
  """(config key, responses per group) of every group size the curriculum
  asks a rollout for: ('rl.group_size', G), then the selector's own (DOTS'
  fresh references: ('curriculum.dots.ref_samples', n)). `cfg` is the
  whole rlx Config; an unknown selector adds none (the registry's check
  names it)."""
  name = cfg.curriculum.selector
  own = SELECTORS.get(name).group_sizes(cfg) if name in SELECTORS else []
  return [('rl.group_size', cfg.rl.group_size)] + own


# Drawing ids -------------------------------------------------------------


def _tiers(eligible, n: int) -> Array:
  """[N] int32 priority tiers, lower drawn first: 0 for eligible prompts
  and 1 for the rest (`eligible` bool), or the given tiers (int)."""
  if eligible is None:
    return jnp.zeros((n,), jnp.int32)
  eligible = jnp.asarray(eligible)
  if eligible.dtype == jnp.bool_:
    return jnp.where(eligible, 0, 1).astype(jnp.int32)
  return eligible.astype(jnp.int32)


def sample_weighted(key, weights: Array, k: int, eligible=None,
                    taken=None) -> Array:
  """k distinct ids drawn without replacement with P proportional to weights.

  Gumbel-top-k: the k largest log w + Gumbel are exactly sequential
  sampling without replacement. Zero weights come (in effect) after
  positive ones; tier by tier (`_tiers`): ineligible prompts only once the
  eligible ones run out, drawn the same way among themselves, and
  `taken [N] bool` ones never while others remain.
  """
  n = weights.shape[0]
  tier = _tiers(eligible, n)
  if taken is not None:
    tier = jnp.where(taken, _TAKEN, tier)
  perturbed = (jnp.log(jnp.maximum(weights, 1e-30)) +
               jax.random.gumbel(key, (n,)))
  return jnp.lexsort((-perturbed, tier))[:k].astype(jnp.int32)


def top_scores(key, scores: Array, k: int, eligible=None) -> Array:
  """The k highest scores, tier by tier (`_tiers`); exact ties are broken
  uniformly by `key`."""
  n = scores.shape[0]
  # Rank by tier, then score, then a random permutation among equal scores.
  order = jnp.lexsort((jax.random.permutation(key, n), -scores,
                       _tiers(eligible, n)))
  return order[:k].astype(jnp.int32)


def weighted_then_uniform(key, weights: Array, k: int, n_weighted: int,
                          eligible=None) -> Array:
  """k distinct ids: n_weighted drawn with P proportional to `weights`, the
  rest uniformly from the prompts not drawn (MMR1-VAS, DOTS' explore)."""
  k1, k2 = jax.random.split(key)
  first = sample_weighted(k1, weights, n_weighted, eligible)
  taken = jnp.zeros(weights.shape, bool).at[first].set(True)
  second = sample_weighted(k2, jnp.ones_like(weights), k - n_weighted,
                           eligible, taken)
  return jnp.concatenate([first, second])


@functools.lru_cache(maxsize=8)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


def epoch_order(seed: int, step: int, batch: int, n: int) -> np.ndarray:
  """Prompts of step `step` in data order: slices of per-epoch permutations
  of the n prompts (each prompt once per epoch), a function of (seed, step).
  When `batch` does not divide n, a batch that spans two epochs can hold a
  prompt twice (the end of one permutation and the start of the next; about
  a (batch - a) / n repeats for a split at a), as with any
  shuffle-and-repeat loader; the uniform baselines of every benchmark walk
  this order, so it is kept.
  """
  pos = np.arange(step * batch, (step + 1) * batch)
  return np.array([_epoch_permutation(seed, int(p // n), n)[p % n]
                   for p in pos])


# The selectors -----------------------------------------------------------


def uniform(state: CurriculumState, key, k: int, eligible=None) -> Array:
  """k distinct prompts uniformly at random."""
  return sample_weighted(key, jnp.ones_like(state.stats.alpha), k, eligible)


@SELECTORS.register('uniform')
class Uniform(Selector):
  """Uniform: a step's batch walks the data order (`epoch_order`); with the
  skip filter, and for refills, prompts are drawn uniformly at random."""

  select = staticmethod(uniform)

  def batch(self, state, step, key, b):
    if step.eligible is not None:
      return super().batch(state, step, key, b)
    # Plain data order: a seeded permutation of the pool per epoch.
    pool = state.stats.alpha.shape[0]
    return epoch_order(self.seed, step.step, b, pool), None


def vade(state: CurriculumState, key, k: int, eligible=None) -> Array:
  """VADE: Thompson draw p ~ Beta, the k largest p (1 - p)."""
  k1, k2 = jax.random.split(key)
  p = est.thompson(state.stats, k1)
  return top_scores(k2, p * (1 - p), k, eligible)


@SELECTORS.register('vade')
class Vade(Selector):
  """VADE (`vade`), over VADE's two-scale posterior by default."""

  default_estimator = 'vade'
  select = staticmethod(vade)


def insight(state: CurriculumState, key, k: int, eligible=None) -> Array:
  """InSight: the k largest weighted mutual informations (posterior mean)."""
  s = state.stats
  return top_scores(key, est.insight_score(s.alpha, s.beta), k, eligible)


@SELECTORS.register('insight')
class Insight(Selector):
  """InSight (`insight`)."""

  select = staticmethod(insight)


def cures(state: CurriculumState, key, k: int, eligible=None) -> Array:
  """CurES: P(prompt) proportional to sqrt(p_hat (1 - p_hat))."""
  p = est.mean(state.stats)
  return sample_weighted(key, jnp.sqrt(p * (1 - p)), k, eligible)


@SELECTORS.register('cures')
class Cures(Selector):
  """CurES (`cures`), over CurES' counts by default."""

  default_estimator = 'count'
  select = staticmethod(cures)


@SELECTORS.register('mmr1_vas')
class Mmr1Vas(Selector):
  """MMR1-VAS: round(mix * k) drawn by VPS = p (1 - p), the rest uniform
  (mix: curriculum.mmr1_mix)."""

  def select(self, state, key, k, eligible=None):
    p = est.mean(state.stats)
    return weighted_then_uniform(key, p * (1 - p), k,
                                 int(round(self.cfg.mmr1_mix * k)), eligible)


@config_lib.section('curriculum.gdro', renamed={
    'gdro_bins': 'bins', 'gdro_eta': 'eta', 'gdro_ema': 'ema',
    'gdro_explore': 'explore'})
@dataclasses.dataclass(frozen=True)
class GdroConfig:
  """prompt_gdro (and rollout_gdro's bins): curriculum.gdro.*."""
  bins: int = 5  # prompt_gdro/rollout_gdro: pass-rate bins.
  eta: float = 1.0  # prompt_gdro: multiplicative-weights step size.
  ema: float = 0.9  # prompt_gdro: EMA decay of bin hardness.
  explore: float = 0.1  # prompt_gdro: uniform share mixed into q.


def gdro_bins(stats: est.PromptStats, num_bins: int) -> Array:
  """Pass-rate bin [N] of each prompt: floor(mean * bins), clipped."""
  return jnp.clip(jnp.floor(est.mean(stats) * num_bins).astype(jnp.int32),
                  0, num_bins - 1)


def prompt_gdro(state: CurriculumState, key, k: int, eligible=None) -> Array:
  """Prompt-GDRO: a bin by its weight q_b, then a prompt uniformly in it.

  Drawn jointly without replacement with per-prompt weight q_b / n_b (n_b:
  eligible prompts in bin b).
  """
  num_bins = state.gdro.log_q.shape[0]
  bins = gdro_bins(state.stats, num_bins)
  elig = _tiers(eligible, bins.shape[0]) == 0
  size = jnp.zeros((num_bins,), jnp.float32).at[bins].add(
      elig.astype(jnp.float32))
  w = jnp.exp(state.gdro.log_q)[bins] / jnp.maximum(size[bins], 1.0)
  return sample_weighted(key, w, k, eligible)


def gdro_init(num_bins: int) -> GdroState:
  """Uniform weights over num_bins bins, no hardness observed yet."""
  return GdroState(log_q=jnp.full((num_bins,), -jnp.log(num_bins)),
                   ema=jnp.zeros((num_bins,), jnp.float32),
                   updates=jnp.zeros((num_bins,), jnp.int32))


def gdro_update(gdro: GdroState, stats_before: est.PromptStats, ids: Array,
                fail_rate: Array, *, eta: float, decay: float,
                explore: float) -> GdroState:
  """Multiplicative-weights step q_b <- q_b exp(eta s_b).

  s_b is the bias-corrected EMA of the failure rate of bin b's prompts
  (Adam-style correction 1 - decay^t), centred over the bins so only
  relative hardness moves the weights; q is then mixed with `explore` of the
  uniform distribution so no bin starves. Bins are taken before the update
  (the bins the prompts were selected from).

  Args:
    gdro: current state.
    stats_before: the estimator state the prompts were selected with.
    ids: [B] selected prompt ids.
    fail_rate: [B] 1 - mean reward of each prompt's group.
    eta, decay, explore: step size, EMA decay, uniform mix.

  Returns:
    The new GdroState ([bins] arrays).
  """
  num_bins = gdro.log_q.shape[0]
  bins = gdro_bins(stats_before, num_bins)[ids]
  total = jnp.zeros((num_bins,)).at[bins].add(fail_rate)
  seen = jnp.zeros((num_bins,)).at[bins].add(1.0)
  obs = total / jnp.maximum(seen, 1.0)
  hit = seen > 0
  ema = jnp.where(hit, decay * gdro.ema + (1 - decay) * obs, gdro.ema)
  updates = gdro.updates + hit.astype(jnp.int32)
  debiased = ema / jnp.maximum(1 - decay ** updates, 1e-6)
  known = updates > 0
  centre = jnp.sum(jnp.where(known, debiased, 0)) / jnp.maximum(
      jnp.sum(known), 1)
  score = jnp.where(known, debiased - centre, 0.0)
  q = jax.nn.softmax(gdro.log_q + eta * score)
  q = (1 - explore) * q + explore / num_bins
  return GdroState(log_q=jnp.log(q), ema=ema, updates=updates)


@SELECTORS.register('prompt_gdro')
class PromptGdro(Selector):
  """Prompt-GDRO (`prompt_gdro`); its state is the bins' weights, moved by
  `gdro_update` after each step (curriculum.gdro.*)."""

  select = staticmethod(prompt_gdro)

  def init(self, embed):
    del embed
    return {'gdro': gdro_init(self.cfg.gdro.bins)}

  def observe(self, state, stats_before, evidence):
    # Every group the selector drew this step, the all-equal ones DAPO
    # replaced included (they are the bins' hardest and easiest evidence).
    drawn = np.concatenate([i for i, _, _ in evidence])
    succ = np.concatenate([s for _, s, _ in evidence])
    cnt = np.concatenate([np.asarray(n) for _, _, n in evidence])
    rolled = cnt > 0
    fail = 1.0 - succ[rolled] / cnt[rolled]
    cfg = self.cfg
    return state._replace(gdro=gdro_update(
        state.gdro, stats_before, jnp.asarray(drawn[rolled]),
        jnp.asarray(fail), eta=cfg.gdro.eta, decay=cfg.gdro.ema,
        explore=cfg.gdro.explore))


@SELECTORS.register('spo')
class Spo(Selector):
  """SPO priority sampling: P proportional to sqrt(v (1 - v)) + floor
  (curriculum.spo_floor), v from SPO's value tracker by default."""

  default_estimator = 'spo'

  def select(self, state, key, k, eligible=None):
    v = est.mean(state.stats)
    return sample_weighted(key, jnp.sqrt(v * (1 - v)) + self.cfg.spo_floor,
                           k, eligible)


@SELECTORS.check
def _check_selector_knobs(cfg) -> None:
  """The knobs of the selectors above (checked whichever is chosen)."""
  cur = cfg.curriculum
  for key, value in (('mmr1_mix', cur.mmr1_mix), ('gdro.ema', cur.gdro.ema),
                     ('gdro.explore', cur.gdro.explore)):
    errors.require(0 <= value <= 1, f'curriculum.{key}',
                   f'{value} not in [0, 1]')
  errors.require(cur.gdro.bins >= 1, 'curriculum.gdro.bins', 'must be >= 1')
