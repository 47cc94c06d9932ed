"""Per-token policy losses, KL estimators and aggregation modes.

Every policy loss in `LOSSES` has the signature

  fn(logp, old_logp, advantages, loss_mask, *, behaviour_logp=None,
     **hparams) -> (per_token_loss [B, G, T], diag)

with `logp` / `old_logp` the `[B, G, T]` log-probs of the sampled tokens
under the current (differentiated) and the old policy, `advantages` `[B, G]`
or `[B, G, T]` (GSPO: `[B, G]` only), `loss_mask` `[B, G, T]` bool and
`behaviour_logp` the `[B, G, T]` log-probs of the sampler (mu), used by the
losses that need them. `diag` holds `[B, G, T]` arrays: `ratio` (the
importance ratio the method clips), `clipped_low` and `clipped_high` (bool:
tokens whose gradient the clip removed or bounded, on that side).

Per-token losses are not masked; `aggregate` applies `loss_mask`. All are
pure `jnp` and jit-able with the hyper-parameters as static Python numbers.

Each loss is registered in `LOSSES` (rlx/objectives/entries.py) with the
ObjectiveConfig knobs its hyper-parameters come from; the config checks of
the objective section's loss side are `LOSSES.check`s here.
"""

import dataclasses

import jax
import jax.numpy as jnp

from rlx import sections
from rlx import errors
from rlx.objectives import entries
from rlx.types import Array

LOSSES = entries.Registry('objective.loss', entries.Loss)

# The PPO-style clip: objective.clip_eps_high = 0 keeps each loss's own
# high side (clip_eps for ppo_clip, 0.28 for dapo).
_CLIP = {'clip_eps': 'clip_eps',
         'clip_eps_high': entries.unless_zero('clip_eps_high')}


@sections.section('objective.dual_clip', renamed={'dual_clip_c': 'c'})
@dataclasses.dataclass(frozen=True)
class DualClipConfig:
  c: float = 3.0  # Dual-clip bound c for negative advantages.


@sections.section('objective.gspo', renamed={
    'gspo_eps_low': 'eps_low', 'gspo_eps_high': 'eps_high',
    'gspo_variant': 'variant'})
@dataclasses.dataclass(frozen=True)
class GspoConfig:
  eps_low: float = 3e-4  # GSPO sequence-ratio clip, low side.
  eps_high: float = 4e-4  # GSPO sequence-ratio clip, high side.
  variant: str = 'seq'  # GSPO form: seq | token (same gradient).


@sections.section('objective.cispo', renamed={'cispo_clip_low': 'clip_low'})
@dataclasses.dataclass(frozen=True)
class CispoConfig:
  clip_low: float = 0.0  # CISPO lower bound on the weight.


@sections.section('objective.tis', renamed={'tis_cap': 'cap'})
@dataclasses.dataclass(frozen=True)
class TisConfig:
  cap: float = 2.0  # TIS (objective.correction=tis): weights
  # min(pi_old / mu, cap).


@sections.section('objective.icepop', renamed={'icepop_low': 'low',
                                                 'icepop_high': 'high'})
@dataclasses.dataclass(frozen=True)
class IcepopConfig:
  low: float = 0.5  # IcePop (objective.correction=icepop): tokens with
  high: float = 5.0  # pi_old / mu outside [low, high] are masked.


def _token_adv(advantages: Array, ndim: int) -> Array:
  return advantages[..., None] if advantages.ndim < ndim else advantages


def _eps_high(clip_eps, clip_eps_high):
  """`clip_eps_high`, or `clip_eps` where it is 0 (a symmetric clip)."""
  if isinstance(clip_eps_high, (int, float)):
    return clip_eps_high or clip_eps
  return jnp.where(clip_eps_high > 0, clip_eps_high, clip_eps)


def _clip_flags(ratio: Array, adv: Array, eps_low, eps_high):
  """Tokens whose PPO-clip gradient is cut: (low side, high side)."""
  return ((ratio < 1.0 - eps_low) & (adv < 0),
          (ratio > 1.0 + eps_high) & (adv > 0))


def _clipped_surrogate(ratio: Array, adv: Array, eps_low, eps_high):
  """-min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A) and its flags."""
  clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  loss = -jnp.minimum(ratio * adv, clipped * adv)
  low_c, high_c = _clip_flags(ratio, adv, eps_low, eps_high)
  return loss, {'ratio': ratio, 'clipped_low': low_c, 'clipped_high': high_c}


@LOSSES.declare('ppo_clip', knobs=_CLIP)
def ppo_clip(logp: Array, old_logp: Array, advantages: Array,
             loss_mask: Array, *, behaviour_logp: Array | None = None,
             clip_eps: float = 0.2, clip_eps_high: float = 0.0):
  """PPO clipped surrogate (Schulman et al. 2017), as used by GRPO.

  l_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) with
  rho_t = exp(logp - old_logp).

  Args:
    logp: [B, G, T] log-probs under the current policy.
    old_logp: [B, G, T] log-probs under the old policy.
    advantages: [B, G] or [B, G, T].
    loss_mask: [B, G, T] bool (unused: the loss is per token).
    behaviour_logp: unused.
    clip_eps: eps_low.
    clip_eps_high: eps_high; 0 means eps_high = eps_low.

  Returns:
    (loss [B, G, T], diag of [B, G, T] arrays: ratio, clipped_low,
    clipped_high), where clipped_* mark tokens whose gradient the clip
    removed (A < 0 below the band, A > 0 above it).
  """
  del loss_mask, behaviour_logp
  high = _eps_high(clip_eps, clip_eps_high)
  adv = _token_adv(advantages, logp.ndim)
  return _clipped_surrogate(jnp.exp(logp - old_logp), adv, clip_eps, high)


@LOSSES.declare('dapo', knobs=_CLIP)
def dapo(logp: Array, old_logp: Array, advantages: Array, loss_mask: Array,
         *, behaviour_logp: Array | None = None, clip_eps: float = 0.2,
         clip_eps_high: float = 0.28):
  """DAPO clip-higher (Yu et al. 2025): `ppo_clip` with eps_high = 0.28.

  The decoupled, larger upper bound lets low-probability tokens grow
  (against entropy collapse). The rest of the DAPO recipe lives elsewhere:
  `token-mean` aggregation, no KL term, dynamic sampling, and overlong
  reward shaping (`rlx.rewards.shaping.overlong_penalty`).

  Args and Returns: as `ppo_clip`.
  """
  return ppo_clip(logp, old_logp, advantages, loss_mask,
                  behaviour_logp=behaviour_logp, clip_eps=clip_eps,
                  clip_eps_high=clip_eps_high)


@LOSSES.declare('dual_clip',
                knobs={**_CLIP, 'dual_clip_c': 'dual_clip.c'})
def dual_clip(logp: Array, old_logp: Array, advantages: Array,
              loss_mask: Array, *, behaviour_logp: Array | None = None,
              clip_eps: float = 0.2, clip_eps_high: float = 0.0,
              dual_clip_c: float = 3.0):
  """Dual-clip PPO (Ye et al. 2020, "Mastering Complex Control in MOBA").

  With J_t = min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) the PPO
  objective, dual clip uses J'_t = max(J_t, c A) for A < 0 and J_t for
  A >= 0; l_t = -J'_t. For A < 0 and rho_t > c the loss is the constant
  -c A (no gradient), which bounds the update from a very off-policy token.

  Args:
    logp, old_logp, advantages, loss_mask, behaviour_logp, clip_eps,
      clip_eps_high: as `ppo_clip`.
    dual_clip_c: c > 1 (typically 3 to 10).

  Returns:
    As `ppo_clip`; tokens the dual bound is active on (A < 0, rho_t > c)
    are also marked `clipped_low` (a lower bound on the objective, as in
    verl's `pg_clipfrac_lower`).

  Raises:
    ValueError: if `dual_clip_c` is a number <= 1.
  """
  del behaviour_logp
  if isinstance(dual_clip_c, (int, float)) and dual_clip_c <= 1.0:
    raise ValueError(f'dual_clip_c must be > 1, got {dual_clip_c}')
  loss, diag = ppo_clip(logp, old_logp, advantages, loss_mask,
                        clip_eps=clip_eps, clip_eps_high=clip_eps_high)
  adv = _token_adv(advantages, logp.ndim)
  bound = -dual_clip_c * adv  # A loss bound: l = min(l_ppo, -c A), A < 0.
  dual = (adv < 0) & (loss > bound)
  diag['clipped_low'] = diag['clipped_low'] | dual
  return jnp.where(dual, bound, loss), diag


GSPO_VARIANTS = ('seq', 'token')


def _seq_log_ratio(logp: Array, old_logp: Array, loss_mask: Array) -> Array:
  """Masked mean over T of logp - old_logp, [B, G] (0 if no token)."""
  diff = jnp.where(loss_mask, logp - old_logp, 0.0)
  length = jnp.sum(loss_mask, -1)
  return jnp.sum(diff, -1) / jnp.maximum(length, 1)


@LOSSES.declare('gspo', knobs={'eps_low': 'gspo.eps_low',
                              'eps_high': 'gspo.eps_high',
                              'variant': 'gspo.variant'})
def gspo(logp: Array, old_logp: Array, advantages: Array, loss_mask: Array,
         *, behaviour_logp: Array | None = None, eps_low: float = 3e-4,
         eps_high: float = 4e-4, variant: str = 'seq'):
  """GSPO, group sequence policy optimisation (Zheng et al. 2025).

  Sequence ratio s_i = exp(mean_{t in y_i}(logp_t - old_logp_t)) (the
  length-normalised sequence likelihood ratio; 1 for an empty response).

  `variant='seq'`: l_{i,t} = -min(s_i A_i, clip(s_i, 1 - eps_low,
  1 + eps_high) A_i), the sequence loss broadcast to every token.
  `variant='token'` (GSPO-token): s_{i,t} = sg(s_i) exp(logp_t -
  sg(logp_t)), whose value is s_i but whose gradient flows through token t
  only; l_{i,t} = -min(s_{i,t} A_i, clip(s_{i,t}, ...) A_i). Since the clip
  decision depends on the value s_i only, the two forms have the same
  value, and the same gradient under `seq-mean-token-mean` aggregation
  (d l_i / d logp_t = -s_i A_i / |y_i| for unclipped sequences).

  GSPO recipes aggregate with `seq-mean-token-mean`, which makes the
  objective the mean over responses of the sequence objective; `token-mean`
  would weight each response's objective by its length.

  Args:
    logp, old_logp: [B, G, T].
    advantages: [B, G] sequence-level advantages only.
    loss_mask: [B, G, T] bool; defines |y_i| and the tokens in s_i.
    behaviour_logp: unused.
    eps_low, eps_high: clip range of s_i (paper: 3e-4, 4e-4).
    variant: 'seq' or 'token'.

  Returns:
    (loss [B, G, T], diag): `ratio` is s_i broadcast over T; clipped_* mark
    every token of a response whose sequence ratio was clipped.

  Raises:
    ValueError: for [B, G, T] advantages or an unknown variant.
  """
  del behaviour_logp
  if advantages.ndim != logp.ndim - 1:
    raise ValueError('gspo needs sequence-level advantages [B, G]; got '
                     f'shape {advantages.shape} for logp {logp.shape}')
  if variant not in GSPO_VARIANTS:
    raise ValueError(f"unknown gspo variant {variant!r}; known: 'seq', "
                     "'token'")
  seq_ratio = jnp.exp(_seq_log_ratio(logp, old_logp, loss_mask))[..., None]
  if variant == 'seq':
    ratio = jnp.broadcast_to(seq_ratio, logp.shape)
  else:
    ratio = (jax.lax.stop_gradient(seq_ratio) *
             jnp.exp(logp - jax.lax.stop_gradient(logp)))
  return _clipped_surrogate(ratio, advantages[..., None], eps_low, eps_high)


@LOSSES.declare('gppo', knobs=_CLIP)
def gppo(logp: Array, old_logp: Array, advantages: Array, loss_mask: Array,
         *, behaviour_logp: Array | None = None, clip_eps: float = 0.2,
         clip_eps_high: float = 0.28):
  """GPPO, gradient-preserving clipping (Klear-Reasoner, Su et al. 2025).

  l_t = -min(rho_t A, c(rho_t) A) with c(rho) = (1 - eps_low) rho / sg(rho)
  below the band, (1 + eps_high) rho / sg(rho) above it and rho inside.
  The value equals clip-higher PPO (`dapo`) exactly; clipped tokens keep a
  bounded gradient: d l_t / d logp_t = -(1 - eps_low) A (A < 0, below) or
  -(1 + eps_high) A (A > 0, above), instead of 0.

  Args and Returns: as `ppo_clip` (eps_high defaults to 0.28; 0 means
  eps_low). clipped_* mark the tokens whose gradient was bounded.
  """
  del loss_mask, behaviour_logp
  high = _eps_high(clip_eps, clip_eps_high)
  adv = _token_adv(advantages, logp.ndim)
  ratio = jnp.exp(logp - old_logp)
  # rho / sg(rho) = exp(logp - sg(logp)): value exactly 1, d/dlogp = 1
  # (written this way it stays finite where rho under- or overflows).
  unit = jnp.exp(logp - jax.lax.stop_gradient(logp))
  bounded = jnp.where(ratio < 1.0 - clip_eps, (1.0 - clip_eps) * unit,
                      jnp.where(ratio > 1.0 + high, (1.0 + high) * unit,
                                ratio))
  loss = -jnp.minimum(ratio * adv, bounded * adv)
  low_c, high_c = _clip_flags(ratio, adv, clip_eps, high)
  return loss, {'ratio': ratio, 'clipped_low': low_c, 'clipped_high': high_c}


@LOSSES.declare('cispo', knobs={
    'clip_low': 'cispo.clip_low',
    'clip_eps_high': entries.unless_zero('clip_eps_high')})
def cispo(logp: Array, old_logp: Array, advantages: Array, loss_mask: Array,
          *, behaviour_logp: Array | None = None,
          clip_eps_high: float = 0.28, clip_low: float = 0.0):
  """CISPO, clipped importance-sampling weights (MiniMax-M1, 2025).

  l_t = -sg(clip(rho_t, clip_low, 1 + eps_high)) A log pi_theta(y_t): a
  REINFORCE term weighted by the clipped, stopped ratio. No token's
  gradient is dropped: d l_t / d logp_t = -sg(clip(rho_t)) A. The paper
  aggregates with `token-mean`. Note the value is not a surrogate
  objective (it scales with logp); only its gradient is meaningful.

  Args:
    logp, old_logp, advantages, loss_mask, behaviour_logp: as `ppo_clip`.
    clip_eps_high: upper bound 1 + eps_high of the weight.
    clip_low: lower bound of the weight (0: none, as in the paper).

  Returns:
    (loss [B, G, T], diag): clipped_high / clipped_low mark tokens whose
    weight was clipped (rho > 1 + eps_high / rho < clip_low, any sign of
    A); their gradient is bounded, not removed.
  """
  del loss_mask, behaviour_logp
  adv = _token_adv(advantages, logp.ndim)
  ratio = jnp.exp(logp - old_logp)
  weight = jax.lax.stop_gradient(jnp.clip(ratio, clip_low,
                                          1.0 + clip_eps_high))
  loss = -weight * adv * logp
  return loss, {'ratio': ratio, 'clipped_low': ratio < clip_low,
                'clipped_high': ratio > 1.0 + clip_eps_high}


@LOSSES.declare('decoupled', knobs=_CLIP, off_policy=True)
def decoupled(logp: Array, old_logp: Array, advantages: Array,
              loss_mask: Array, *, behaviour_logp: Array | None = None,
              clip_eps: float = 0.2, clip_eps_high: float = 0.0):
  """Decoupled off-policy PPO clip, for replayed or partial rollouts.

  Behaviour (sampler) policy mu, proximal policy pi_old (Hilton et al.
  2021, "Batch size-invariance"; used for rollout replay in DOTS and for
  APRIL's partial rollouts): r_t = pi_theta / mu, r_old_t = pi_old / mu,
  l_t = -min(A r_t, A clip(r_t, r_old_t (1 - eps_low),
  r_old_t (1 + eps_high))) = r_old_t * ppo_clip's l_t. The clip is around
  the proximal policy; r_old corrects for sampling from mu. Equals
  `ppo_clip` when mu = pi_old. Do not also apply the TIS correction unless
  a second (pi_old / mu) weight is intended.

  Args:
    logp, old_logp, advantages, loss_mask, clip_eps, clip_eps_high: as
      `ppo_clip`.
    behaviour_logp: [B, G, T] log mu(y_t); required.

  Returns:
    (loss [B, G, T], diag): `ratio` = r / r_old = pi_theta / pi_old;
    clipped_* as `ppo_clip`.

  Raises:
    ValueError: if `behaviour_logp` is None.
  """
  del loss_mask
  if behaviour_logp is None:
    raise ValueError('decoupled needs behaviour_logp (the sampler log-probs)')
  high = _eps_high(clip_eps, clip_eps_high)
  adv = _token_adv(advantages, logp.ndim)
  r = jnp.exp(logp - behaviour_logp)
  r_old = jnp.exp(old_logp - behaviour_logp)
  clipped = jnp.clip(r, r_old * (1.0 - clip_eps), r_old * (1.0 + high))
  loss = -jnp.minimum(r * adv, clipped * adv)
  diag = {
      'ratio': r / r_old,
      'clipped_low': (r < r_old * (1.0 - clip_eps)) & (adv < 0),
      'clipped_high': (r > r_old * (1.0 + high)) & (adv > 0),
  }
  return loss, diag


CORRECTIONS = ('none', 'tis', 'icepop')


def mismatch_correction(kind: str, old_logp: Array, behaviour_logp: Array,
                        *, tis_cap: float = 2.0, icepop_low: float = 0.5,
                        icepop_high: float = 5.0):
  """Per-token factor correcting the train / sampler mismatch.

  The sampler (mu) and the learner's old policy (pi_old) hold the same
  weights but differ numerically (kernels, precision), so samples are
  slightly off-policy. With w_t = pi_old(y_t) / mu(y_t) =
  exp(old_logp - behaviour_logp):
    'tis' (truncated importance sampling; Yao et al. 2025, "Your efficient
      RL framework secretly brings you off-policy RL training"): factor
      sg(min(w_t, C)).
    'icepop' (Ling team 2025): factor 1 where icepop_low <= w_t <=
      icepop_high, else 0, i.e. tokens with a large mismatch are dropped
      from the gradient. They stay in the aggregation denominator (the
      factor multiplies the per-token loss; the mask is unchanged).
    'none': factor 1.
  Both are no-ops (w = 1) when old_logp is the sampler's own log-probs.

  Args:
    kind: one of `CORRECTIONS`.
    old_logp, behaviour_logp: [B, G, T].
    tis_cap: C.
    icepop_low, icepop_high: the kept band of w.

  Returns:
    (factor [B, G, T] to multiply the per-token loss by (no gradient),
    w [B, G, T], acted [B, G, T] bool: tokens the correction changed,
    i.e. capped by TIS or dropped by IcePop).

  Raises:
    ValueError: for an unknown kind.
  """
  if kind not in CORRECTIONS:
    raise ValueError(f'unknown correction {kind!r}; known: '
                     f'{list(CORRECTIONS)}')
  w = jax.lax.stop_gradient(jnp.exp(old_logp - behaviour_logp))
  if kind == 'tis':
    return jnp.minimum(w, tis_cap), w, w > tis_cap
  if kind == 'icepop':
    keep = (w >= icepop_low) & (w <= icepop_high)
    return keep.astype(w.dtype), w, ~keep
  return jnp.ones_like(w), w, jnp.zeros(w.shape, bool)


KL_ESTIMATORS = ('k1', 'k2', 'k3')


def kl_penalty(logp: Array, ref_logp: Array, kind: str = 'k3') -> Array:
  """Per-token KL(pi || ref) estimators from sampled tokens (Schulman 2020).

  k1 = logp - ref; k2 = (logp - ref)^2 / 2; k3 = exp(ref - logp) -
  (ref - logp) - 1 (unbiased, non-negative).
  """
  diff = ref_logp - logp
  if kind == 'k1':
    return -diff
  if kind == 'k2':
    return 0.5 * diff ** 2
  if kind == 'k3':
    return jnp.exp(diff) - diff - 1.0
  raise ValueError(f'unknown KL estimator {kind!r}; known: k1, k2, k3')


AGGREGATIONS = ('token-mean', 'seq-mean-token-mean', 'seq-mean-token-sum',
                'seq-mean-token-sum-norm')


def aggregate(values: Array, mask: Array, mode: str, *,
              total_tokens=None, total_seqs=None, norm_len: int = 1) -> Array:
  """Reduces per-token values `[..., T]` to a scalar.

  `total_tokens` / `total_seqs` are the denominators over the whole batch;
  pass them when `values` is one micro-batch of it, so that summing the
  micro-batch results gives exactly the full-batch value. By default they
  are this call's own counts.

  Modes: `token-mean` (all tokens equal: DAPO), `seq-mean-token-mean`
  (each sequence's token mean, then mean over sequences: GRPO paper),
  `seq-mean-token-sum` (sum over tokens, mean over sequences),
  `seq-mean-token-sum-norm` (sum over tokens / norm_len, mean over
  sequences: Dr.GRPO). Sequences with no valid token count in total_seqs
  only if the caller counts them (mask them out of the group otherwise).
  """
  mask = mask.astype(jnp.float32)
  values = values * mask
  lengths = jnp.sum(mask, -1)
  seqs = jnp.sum(lengths > 0) if total_seqs is None else total_seqs
  if mode == 'token-mean':
    tokens = jnp.sum(mask) if total_tokens is None else total_tokens
    return jnp.sum(values) / jnp.maximum(tokens, 1)
  if mode == 'seq-mean-token-mean':
    per_seq = jnp.sum(values, -1) / jnp.maximum(lengths, 1)
    return jnp.sum(per_seq) / jnp.maximum(seqs, 1)
  if mode == 'seq-mean-token-sum':
    return jnp.sum(values) / jnp.maximum(seqs, 1)
  if mode == 'seq-mean-token-sum-norm':
    return jnp.sum(values) / (jnp.maximum(seqs, 1) * norm_len)
  raise ValueError(f'unknown aggregation {mode!r}; known: {AGGREGATIONS}')


def masked_mean(x: Array, mask: Array) -> Array:
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_max(x: Array, mask: Array) -> Array:
  return jnp.max(jnp.where(mask, x, -jnp.inf), initial=0.0)


def token_entropy(logits: Array) -> Array:
  """Entropy of softmax(logits) per position, `[..., V] -> [...]`."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


@LOSSES.check
def _check(cfg) -> None:
  """objective.loss and the section's other names and bounds."""
  obj, s = cfg.objective, cfg.sampling
  errors.one_of(obj.kl_estimator, KL_ESTIMATORS, 'objective.kl_estimator')
  errors.one_of(obj.gspo.variant, GSPO_VARIANTS, 'objective.gspo.variant')
  errors.one_of(obj.correction, CORRECTIONS, 'objective.correction')
  # Overlong shaping is the reward's (rlx.rewards.shaping), but its knob
  # is the objective's.
  errors.require(obj.overlong_buffer >= 0 and obj.overlong_buffer <
                 s.max_new_tokens, 'objective.overlong_buffer',
                 f'must be in [0, sampling.max_new_tokens={s.max_new_tokens})')
  errors.require(obj.loss in LOSSES, 'objective.loss',
                 f'unknown {obj.loss!r}; known: {sorted(LOSSES)}')
  errors.require(obj.aggregation in AGGREGATIONS, 'objective.aggregation',
                 f'unknown {obj.aggregation!r}; known: {list(AGGREGATIONS)}')
  if obj.loss in LOSSES:
    entries.check_knobs('objective.loss', LOSSES.get(obj.loss), obj)
