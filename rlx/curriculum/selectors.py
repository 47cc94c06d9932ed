"""Prompt selectors: pure `(state, key, k, eligible) -> prompt ids [k]`.

Each selector turns the curriculum state into either per-prompt sampling
weights (drawn without replacement by the Gumbel-top-k trick, which equals
sequential weighted sampling) or per-prompt scores (the k best, ties broken
by the key). `eligible [N] bool` removes prompts (the pre-rollout skip); when
fewer than k are eligible the rest are drawn from the ineligible ones by the
same rule (weights or scores, randomised by the key), so a selector always
returns k distinct ids. `eligible` may instead be int tiers [N] (0 first, then
1, ...): DAPO's refills put the prompts already used in a step last, so they
come back only when nothing else is left. Same state and key, same ids.
Formulas: ALGORITHMS.md section C; the choices the cards leave open are in
each docstring.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from rlx.curriculum import estimators as est
from rlx.types import Array

SELECTORS = ('uniform', 'vade', 'insight', 'cures', 'mmr1_vas', 'prompt_gdro',
             'spo', 'dots', 'likelihood')

_TAKEN = 1 << 20  # Tier of ids already drawn: after every other tier.


class GdroState(NamedTuple):
  """Prompt-GDRO multiplicative weights over pass-rate bins."""
  log_q: Array  # [bins] float32, log weights (normalised).
  ema: Array  # [bins] float32, EMA of each bin's failure rate (biased).
  updates: Array  # [bins] int32, EMA updates per bin (for the debiasing).


class DotsState(NamedTuple):
  """DOTS: prompt embeddings and the reference prompts."""
  embed: Array  # [N, D] float32 (D = 0 when DOTS is off).
  ref_ids: Array  # [R] int32 reference prompts (-1: none yet): this step's
  # reference set, or (dots_refs=history) the prompts trained on most
  # recently, newest first.
  ref_rates: Array  # [R] float32 the reference set's measured pass rates
  # (history: unused, the estimator's evidence is read live).


class CurriculumState(NamedTuple):
  stats: est.PromptStats
  gdro: GdroState
  dots: DotsState


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


def uniform(state: CurriculumState, key, k: int, eligible=None) -> Array:
  """k distinct prompts uniformly at random."""
  return sample_weighted(key, jnp.ones_like(state.stats.alpha), k, eligible)


def vade(state: CurriculumState, key, k: int, eligible=None) -> Array:
  """VADE: Thompson draw p ~ Beta, the k largest p (1 - p)."""
  k1, k2 = jax.random.split(key)
  p = est.thompson(state.stats, k1)
  return top_scores(k2, p * (1 - p), k, eligible)


def insight(state: CurriculumState, key, k: int, eligible=None) -> Array:
  """InSight: the k largest weighted mutual informations (posterior mean)."""
  s = state.stats
  return top_scores(key, est.insight_score(s.alpha, s.beta), k, eligible)


def cures(state: CurriculumState, key, k: int, eligible=None) -> Array:
  """CurES: P(prompt) proportional to sqrt(p_hat (1 - p_hat))."""
  p = est.mean(state.stats)
  return sample_weighted(key, jnp.sqrt(p * (1 - p)), k, eligible)


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


def make_mmr1_vas(mix: float) -> Callable:
  """MMR1-VAS: round(mix * k) drawn by VPS = p (1 - p), the rest uniform."""
  def select(state, key, k, eligible=None):
    p = est.mean(state.stats)
    return weighted_then_uniform(key, p * (1 - p), k, int(round(mix * k)),
                                 eligible)
  return select


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


def make_spo(floor: float) -> Callable:
  """SPO priority sampling: P proportional to sqrt(v (1 - v)) + floor."""
  def select(state, key, k, eligible=None):
    v = est.mean(state.stats)
    return sample_weighted(key, jnp.sqrt(v * (1 - v)) + floor, k, eligible)
  return select


def dots_predict(dots: DotsState, scale: float | None = None, *,
                 ridge: float | None = None) -> Array:
  """DOTS pass-rate prediction [N] from the reference set.

  The card's readout (ridge None) is attention: p_hat_i = sum_r softmax_r(
  scale <e_i, e_r>) rate_r over the valid references (ref_ids >= 0); scale
  defaults to 1 / sqrt(D). With ridge = lambda the readout is a linear probe
  instead (`ridge_readout`). With no references yet, 0.5 everywhere.
  """
  valid = dots.ref_ids >= 0
  if ridge is not None:
    return ridge_readout(dots.embed, dots.ref_ids, dots.ref_rates, valid,
                         ridge)[0]
  attn = _attention(dots.embed, dots.ref_ids, valid[None], scale)
  return jnp.where(jnp.any(valid), attn @ dots.ref_rates, 0.5)


def centre_and_normalise(embed: Array) -> Array:
  """Embeddings centred over the pool and scaled to unit norm
  (`dots_similarity=cosine`; the ridge readout's lambda is on this
  scale)."""
  embed = embed - jnp.mean(embed, axis=0)
  return embed / jnp.maximum(
      jnp.linalg.norm(embed, axis=-1, keepdims=True), 1e-6)


def _attention(embed: Array, refs: Array, valid: Array, scale) -> Array:
  """[N, R] softmax over the valid references of scale <e_i, e_r> (scale
  None: 1 / sqrt(D)); a row with no valid reference is all zero."""
  keys = embed[jnp.maximum(refs, 0)]  # [R, D]
  if scale is None:
    scale = 1.0 / jnp.sqrt(embed.shape[-1])
  logits = jnp.where(valid, embed @ keys.T * scale, -jnp.inf)
  return jnp.nan_to_num(jax.nn.softmax(logits, axis=-1))


def ridge_readout(embed: Array, refs: Array, rates: Array, valid: Array,
                  lam: float, weight: Array | None = None
                  ) -> tuple[Array, Array]:
  """A linear probe of pass rates on prompt embeddings (`dots_readout=ridge`).

  Ridge regression of the valid references' rates, centred at 0.5, on
  [e_r, 1]: w = (X^T X + lam I)^-1 X^T (y - 0.5), so that little evidence
  shrinks every prediction toward 0.5 (the uninformed value). Returns
  0.5 + x_i^T w for every prompt [N] and each reference's leave-one-out
  prediction [R] (the fit without that reference: 0.5 + (x_r^T w - h_r
  (y_r - 0.5)) / (1 - h_r), h_r = x_r^T (X^T X + lam I)^-1 x_r its
  leverage; 0.5 for invalid slots), both clipped to [0, 1]. The references
  must be distinct prompts for the leave-one-out value to leave the prompt
  out entirely.

  `weight` [R] (optional, > 0) makes it weighted least squares: reference r's
  squared error counts weight_r times, w = (X^T W X + lam I)^-1 X^T W (y -
  0.5), and its leverage is weight_r x_r^T (X^T W X + lam I)^-1 x_r (the
  leave-one-out formula is unchanged).
  """
  x = jnp.concatenate([embed, jnp.ones_like(embed[:, :1])], axis=-1)
  xr = x[jnp.maximum(refs, 0)] * valid[:, None]  # [R, D + 1], invalid: 0.
  y = jnp.where(valid, rates - 0.5, 0.0)
  wr = xr if weight is None else xr * weight[:, None]  # W X
  gram = wr.T @ xr + lam * jnp.eye(x.shape[-1], dtype=x.dtype)
  factor = jax.scipy.linalg.cho_factor(gram)
  w = jax.scipy.linalg.cho_solve(factor, wr.T @ y)
  lever = jnp.sum(wr * jax.scipy.linalg.cho_solve(factor, xr.T).T, -1)
  loo = (xr @ w - lever * y) / (1.0 - lever)
  return (jnp.clip(0.5 + x @ w, 0.0, 1.0),
          jnp.where(valid, jnp.clip(0.5 + loo, 0.0, 1.0), 0.5))


def dots_history_predict(state: CurriculumState, scale: float | None = None,
                         *, prior: float = 2.0, alpha0: float = 1.0,
                         beta0: float = 1.0, ridge: float | None = None,
                         halflife: float = 0.0) -> Array:
  """DOTS over the training history (`curriculum.dots_refs=history`).

  The references are the prompts trained on most recently (`dots.ref_ids`,
  -1: empty slot); no extra rollouts. With s_i = alpha_i - alpha0 and
  f_i = beta_i - beta0 the estimator's (discounted) successes and failures,
  a reference's rate is s / (s + f) (0.5 with no evidence left). Every
  prompt gets an embedding prediction m_i by attention over the references
  other than itself (0.5 with none), which then serves as the prior of its
  own evidence:

    p_hat_i = (s_i + prior m_i) / (s_i + f_i + prior).

  An unseen prompt is predicted from similar prompts; a prompt with many
  observations by its own pass rate. With ridge = lambda, m_i is the linear
  probe's prediction (`ridge_readout` over the references' rates; a
  reference's own m_i is its leave-one-out prediction, so its evidence is
  not counted twice). With halflife > 0 the probe is fitted on recent
  evidence: the k-th newest reference (k = 0, 1, ...) weighs 0.5^(k /
  halflife) in its least squares, so that rates measured many policy
  updates ago count less.
  """
  s, dots = state.stats, state.dots
  n = s.alpha.shape[0]
  refs = dots.ref_ids
  succ, fail = est.evidence_less_prior(s, alpha0, beta0)
  seen = succ + fail
  rate = jnp.where(seen > 0, succ / jnp.maximum(seen, 1e-9), 0.5)
  ref_rate = rate[jnp.maximum(refs, 0)]
  if ridge is not None:
    is_ref = refs >= 0
    weight = None
    if halflife > 0:
      weight = 0.5 ** (jnp.arange(refs.shape[0]) / halflife)
    pred, loo = ridge_readout(dots.embed, refs, ref_rate, is_ref, ridge,
                              weight)
    # A reference takes its leave-one-out prediction (0.5 when it is the
    # only one; every prediction is 0.5 with no references).
    m = pred.at[jnp.where(is_ref, refs, n)].set(loo, mode='drop')
  else:
    own = refs[None, :] == jnp.arange(n)[:, None]  # [N, R]
    valid = (refs >= 0)[None] & ~own
    attn = _attention(dots.embed, refs, valid, scale)
    m = jnp.where(jnp.any(valid, -1), attn @ ref_rate, 0.5)
  return (succ + prior * m) / (succ + fail + prior)


def dots_predictor(*, history: bool = False, scale: float | None = None,
                   prior: float = 2.0, alpha0: float = 1.0,
                   beta0: float = 1.0, ridge: float | None = None,
                   halflife: float = 0.0) -> Callable:
  """state -> DOTS' p_hat [N]: from fresh reference rollouts
  (`dots_predict`) or the history (`dots_history_predict`, whose ridge
  probe weighs references by recency when halflife > 0), read out by
  attention (ridge None, the card's) or by a ridge probe with that
  lambda."""
  if halflife > 0 and not (history and ridge is not None):
    raise ValueError('a reference half-life needs the history references '
                     'and the ridge readout')

  def predict(state):
    if history:
      return dots_history_predict(state, scale, prior=prior, alpha0=alpha0,
                                  beta0=beta0, ridge=ridge,
                                  halflife=halflife)
    return dots_predict(state.dots, scale, ridge=ridge)
  return predict


def make_dots(tau: float, explore: float = 0.0, **predictor) -> Callable:
  """DOTS: P proportional to exp(-|p_hat - 0.5| / tau), p_hat from
  `dots_predictor(**predictor)`. With explore > 0, round(explore * k) of
  the k prompts are drawn uniformly from the rest instead (with history
  references, so that they span every difficulty, not only the band DOTS
  already picks)."""
  predict = dots_predictor(**predictor)

  def select(state, key, k, eligible=None):
    p = predict(state)
    weight = jnp.exp(-jnp.abs(p - 0.5) / tau)
    n_uniform = int(round(explore * k))
    if not n_uniform:  # The same draws as before the option existed.
      return sample_weighted(key, weight, k, eligible)
    return weighted_then_uniform(key, weight, k, k - n_uniform, eligible)
  return select


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
  """
  q = jnp.exp(jnp.minimum(loglik, 0.0))
  return (succ + prior * q) / (succ + fail + prior)


def likelihood_pick(key, p_hat: Array, k: int, tiers=None) -> Array:
  """Positions of the k candidates with the largest p_hat (1 - p_hat) (the
  most mixed groups expected), tier by tier (`_tiers`), exact ties broken
  by `key`."""
  return top_scores(key, p_hat * (1.0 - p_hat), k, tiers)


def make(name: str, *, mmr1_mix: float, spo_floor: float,
         dots_tau: float, dots_explore: float = 0.0,
         **dots_kwargs) -> Callable:
  """The selector registered under `name` (see SELECTORS). For
  'likelihood' it is the candidate draw (uniform; the controller scores the
  candidates by the policy and keeps the best, `likelihood_pick`)."""
  fixed = {'uniform': uniform, 'vade': vade, 'insight': insight,
           'cures': cures, 'prompt_gdro': prompt_gdro, 'likelihood': uniform}
  if name in fixed:
    return fixed[name]
  if name == 'mmr1_vas':
    return make_mmr1_vas(mmr1_mix)
  if name == 'spo':
    return make_spo(spo_floor)
  if name == 'dots':
    return make_dots(dots_tau, dots_explore, **dots_kwargs)
  raise ValueError(f'unknown selector {name!r}; known: {list(SELECTORS)}')
