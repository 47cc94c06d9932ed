"""DOTS (ALGORITHMS.md section C): select prompts whose pass rate, predicted
from prompt embeddings, is near 0.5.

The prediction p_hat [N] reads the pass rates of reference prompts out by
their embeddings' similarity: fresh references (the card's, dots.refs=
fresh: a random set rolled out every step, `Dots.prepare`) or the prompts
trained on most recently (dots.refs=history: no extra rollouts, their
rates from the estimator's evidence, `Dots.observe` keeps the list), read
out by attention (the card's) or a ridge probe (dots.readout=ridge). The
embeddings are the policy's (`Step.embed`), taken at init and every
dots.embed_every steps.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rlx import config as config_lib
from rlx import errors
from rlx.curriculum import estimators as est
from rlx.curriculum import selectors as sel
from rlx.types import Array


@config_lib.section('curriculum.dots', renamed={
    f'dots_{k}': k for k in (
        'refs', 'ref_prompts', 'ref_samples', 'history_refs', 'prior',
        'similarity', 'cosine_scale', 'readout', 'ridge', 'ref_halflife',
        'tau', 'explore', 'embed_every')})
@dataclasses.dataclass(frozen=True)
class DotsConfig:
  """The dots selector: curriculum.dots.*."""
  refs: str = 'fresh'  # dots: fresh | history. fresh (the card): a
  # random reference set rolled out every step (ref_prompts x
  # ref_samples; their rollouts count as spent, they are not trained
  # on). history: no extra rollouts; the references are the last
  # history_refs prompts trained on (their pass rates in the
  # estimator's evidence), and the attention prediction is each prompt's
  # prior (weight prior) under its own evidence.
  ref_prompts: int = 16  # dots (fresh): reference prompts per step.
  ref_samples: int = 4  # dots (fresh): rollouts per reference prompt.
  history_refs: int = 256  # dots (history): references kept.
  prior: float = 2.0  # dots (history): pseudo-rollouts the embedding
  # prediction counts for against a prompt's own evidence.
  similarity: str = 'dot'  # dots: dot (the card's <e_i, e_r> /
  # sqrt(D)) | cosine (embeddings centred over the pool and normalised,
  # times cosine_scale).
  cosine_scale: float = 20.0  # dots (cosine): inverse temperature.
  readout: str = 'attention'  # dots: attention (the card's, over the
  # references) | ridge: a linear probe, ridge regression of the references'
  # pass rates on their embeddings (and a bias), shrunk toward 0.5 by
  # ridge; a history reference is predicted leave-one-out. Needs
  # similarity=cosine (centred, unit-norm embeddings).
  ridge: float = 1.0  # dots (ridge): the L2 penalty lambda.
  ref_halflife: float = 0.0  # dots (history, ridge): fit the probe on
  # recent evidence, the k-th newest reference weighing 0.5^(k / this) in
  # its least squares (in references: at B prompts per step, B * n is a
  # half-life of n steps); 0: every reference weighs the same.
  tau: float = 0.1  # dots: P ~ exp(-|p_hat - 0.5| / tau).
  explore: float = 0.0  # dots: share of each batch drawn uniformly
  # instead (round(share * B) prompts), so that history references span
  # every difficulty; 0: none.
  embed_every: int = 0  # dots: recompute prompt embeddings every this
  # many steps; 0: once, from the warm start.


# The DOTS part of the curriculum state (defined with the other parts).
DotsState = sel.DotsState


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
  (`dots.similarity=cosine`; the ridge readout's lambda is on this
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
  """A linear probe of pass rates on prompt embeddings (`dots.readout=ridge`).

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


def dots_history_predict(state: sel.CurriculumState,
                         scale: float | None = None, *, prior: float = 2.0,
                         alpha0: float = 1.0, beta0: float = 1.0,
                         ridge: float | None = None,
                         halflife: float = 0.0) -> Array:
  """DOTS over the training history (`curriculum.dots.refs=history`).

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


def remember(dots: DotsState, ids) -> DotsState:
  """DOTS history: `ids` (this step's prompts) become the newest
  references; older copies of them and the oldest beyond the buffer go.
  Returns the DotsState with the new ref_ids [R] (-1: empty slots)."""
  ids = np.unique(np.asarray(ids, np.int32))
  old = np.asarray(dots.ref_ids)
  old = old[(old >= 0) & ~np.isin(old, ids)]
  refs = np.concatenate([ids, old])[:len(dots.ref_ids)]
  refs = np.pad(refs, (0, len(dots.ref_ids) - len(refs)), constant_values=-1)
  return dots._replace(ref_ids=jnp.asarray(refs, jnp.int32))


@sel.SELECTORS.register('dots')
class Dots(sel.Selector):
  """DOTS: P proportional to exp(-|p_hat - 0.5| / tau), p_hat from
  `dots_predictor` as the curriculum.dots.* knobs configure it. With
  explore > 0, round(explore * k) of the k prompts are drawn uniformly from
  the rest instead (with history references, so that they span every
  difficulty, not only the band DOTS already picks)."""

  def __init__(self, cfg, estimator, **kwargs):
    self.history = cfg.dots.refs == 'history'
    cosine = cfg.dots.similarity == 'cosine'
    self._predict = dots_predictor(
        history=self.history,
        # Attention inverse temperature (None: the card's 1 / sqrt(D)).
        scale=cfg.dots.cosine_scale if cosine else None,
        prior=cfg.dots.prior, alpha0=cfg.prior_alpha, beta0=cfg.prior_beta,
        ridge=cfg.dots.ridge if cfg.dots.readout == 'ridge' else None,
        halflife=cfg.dots.ref_halflife if self.history else 0.0)
    # state -> p_hat [N], what DOTS predicts for every prompt.
    self.predict = jax.jit(self._predict)
    super().__init__(cfg, estimator, **kwargs)

  @classmethod
  def check(cls, cfg) -> None:
    cur = cfg.curriculum
    errors.require(cur.dots.ref_halflife == 0 or (
        cur.dots.refs == 'history' and cur.dots.readout == 'ridge'),
                   'curriculum.dots.ref_halflife', 'weighs history '
                   "references in the ridge probe: it needs dots.refs="
                   "'history' and dots.readout='ridge'")

  @classmethod
  def group_sizes(cls, cfg) -> list[tuple[str, int]]:
    cur = cfg.curriculum
    if cur.dots.refs != 'fresh':
      return []
    return [('curriculum.dots.ref_samples', cur.dots.ref_samples)]

  def init(self, embed):
    refs = (self.cfg.dots.history_refs if self.history
            else self.cfg.dots.ref_prompts)
    return {'dots': DotsState(embed=self._embed(embed),
                              ref_ids=jnp.full((refs,), -1, jnp.int32),
                              ref_rates=jnp.zeros((refs,)))}

  def _embed(self, embed) -> Array:
    """[N, D] float32 embeddings as DOTS reads them (`embed()`, centred
    and normalised for dots.similarity=cosine)."""
    out = embed()
    if self.cfg.dots.similarity == 'cosine':
      out = centre_and_normalise(out)
    return out

  def select(self, state, key, k, eligible=None):
    p = self._predict(state)
    weight = jnp.exp(-jnp.abs(p - 0.5) / self.cfg.dots.tau)
    n_uniform = int(round(self.cfg.dots.explore * k))
    if not n_uniform:  # The same draws as before the option existed.
      return sel.sample_weighted(key, weight, k, eligible)
    return sel.weighted_then_uniform(key, weight, k, k - n_uniform,
                                     eligible)

  def prepare(self, state, step):
    """Refreshes the embeddings on schedule; with fresh references, rolls
    out a random reference set and stores its pass rates."""
    cfg, dots = self.cfg, state.dots
    every = cfg.dots.embed_every
    if every and step.step and step.step % every == 0:
      dots = dots._replace(embed=self._embed(step.embed))
    if self.history:  # The references are the trained prompts.
      return state._replace(dots=dots)
    k1, k2 = jax.random.split(step.key)
    ref = np.asarray(sel.uniform(state, k1, cfg.dots.ref_prompts,
                                 step.eligible))
    successes, counts = step.rollout(ref, k2, cfg.dots.ref_samples)
    rates = successes / counts
    dots = dots._replace(ref_ids=jnp.asarray(ref, jnp.int32),
                         ref_rates=jnp.asarray(rates, jnp.float32))
    step.metrics['curriculum/dots_ref_pass_mean'] = float(rates.mean())
    return state._replace(dots=dots)

  def batch(self, state, step, key, b):
    ids, p_hat = super().batch(state, step, key, b)
    # What DOTS predicted for its picks.
    step.metrics['curriculum/dots_pred_mean'] = float(
        np.mean(np.asarray(self.predict(state))[ids]))
    return ids, p_hat

  def observe(self, state, stats_before, evidence):
    del stats_before
    if not self.history:
      return state
    # Every prompt rolled out this step is the newest reference.
    seen = np.concatenate([i[np.asarray(n) > 0] for i, _, n in evidence])
    return state._replace(dots=remember(state.dots, seen))


@sel.SELECTORS.check
def _check_dots_knobs(cfg) -> None:
  """The curriculum.dots.* knobs (checked whichever selector is chosen)."""
  cur, dots = cfg.curriculum, cfg.curriculum.dots
  for key, value, known in (
      ('dots.refs', dots.refs, ('fresh', 'history')),
      ('dots.similarity', dots.similarity, ('dot', 'cosine')),
      ('dots.readout', dots.readout, ('attention', 'ridge'))):
    errors.require(value in known, f'curriculum.{key}',
                   f'{value!r} is not one of {list(known)}')
  errors.require(0 <= cur.dots.explore <= 1, 'curriculum.dots.explore',
                 f'{cur.dots.explore} not in [0, 1]')
  errors.require(cur.dots.readout != 'ridge' or
                 cur.dots.similarity == 'cosine', 'curriculum.dots.readout',
                 "ridge needs dots.similarity='cosine' (centred, unit-norm "
                 'embeddings: dots.ridge is on their scale)')
  errors.require(cur.dots.ref_halflife >= 0, 'curriculum.dots.ref_halflife',
                 'must be >= 0')
  for key in ('tau', 'prior', 'cosine_scale', 'ridge'):
    errors.require(getattr(dots, key) > 0, f'curriculum.dots.{key}',
                   'must be > 0')
  for key in ('ref_prompts', 'ref_samples', 'history_refs'):
    errors.require(getattr(dots, key) >= 1, f'curriculum.dots.{key}',
                   'must be >= 1')
