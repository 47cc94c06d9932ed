"""Per-token policy losses, KL estimators and aggregation modes.

A policy loss maps log-probs `[B, G, T]` under the current policy, the old
policy's log-probs and advantages (`[B, G]` or `[B, G, T]`) to a per-token
loss `[B, G, T]` plus per-token diagnostics; `aggregate` reduces it.
"""

import jax
import jax.numpy as jnp

from rlx.types import Array


def _token_adv(advantages: Array, ndim: int) -> Array:
  return advantages[..., None] if advantages.ndim < ndim else advantages


def ppo_clip(logp: Array, old_logp: Array, advantages: Array, *,
             clip_eps: float = 0.2, clip_eps_high: float = 0.0):
  """PPO clipped surrogate (Schulman et al. 2017), as used by GRPO.

  l_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) with
  rho_t = exp(logp - old_logp). `clip_eps_high=0` means eps_high = eps_low.

  Returns:
    (loss [B, G, T], diagnostics dict of [B, G, T] arrays: ratio,
    clipped_low, clipped_high), where clipped_* mark tokens whose gradient
    the clip removed.
  """
  high = clip_eps_high or clip_eps
  adv = _token_adv(advantages, logp.ndim)
  ratio = jnp.exp(logp - old_logp)
  clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + high)
  loss = -jnp.minimum(ratio * adv, clipped * adv)
  diag = {
      'ratio': ratio,
      'clipped_low': (ratio < 1.0 - clip_eps) & (adv < 0),
      'clipped_high': (ratio > 1.0 + high) & (adv > 0),
  }
  return loss, diag


LOSSES = {
    'ppo_clip': ppo_clip,
}


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
