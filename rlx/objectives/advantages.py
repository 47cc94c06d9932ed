"""Advantage estimators over groups `[B, G]` with a validity mask.

Variable group sizes are a mask over `[B, Gmax]`; masked entries get zero
advantage and never contribute to a group's statistics.
"""

import jax.numpy as jnp

from rlx.types import Array


def _group_mean(x: Array, mask: Array) -> tuple[Array, Array]:
  """Masked mean over G. Returns (mean [B, 1], count [B, 1])."""
  count = jnp.sum(mask, axis=-1, keepdims=True)
  total = jnp.sum(jnp.where(mask, x, 0.0), axis=-1, keepdims=True)
  return total / jnp.maximum(count, 1), count


def grpo(rewards: Array, mask: Array, *, eps: float = 1e-6) -> Array:
  """GRPO (Shao et al. 2024, DeepSeekMath): A = (r - mean) / (std + eps).

  The std is the unbiased (ddof=1) group std, as in TRL and verl. A group
  whose rewards are all equal, or with a single valid sample, gets A = 0.

  Args:
    rewards: [B, G] float.
    mask: [B, G] bool, valid samples.
    eps: added to the std.

  Returns:
    [B, G] float32 advantages, 0 on masked entries.
  """
  rewards = rewards.astype(jnp.float32)
  mask = mask.astype(bool)
  mean, count = _group_mean(rewards, mask)
  # Exactly zero for groups whose rewards are all equal: float round-off in
  # the mean would otherwise be amplified by the tiny std (and eps=0 -> NaN).
  spread = (jnp.max(jnp.where(mask, rewards, -jnp.inf), -1, keepdims=True) -
            jnp.min(jnp.where(mask, rewards, jnp.inf), -1, keepdims=True))
  informative = mask & (spread > 0)
  centred = jnp.where(informative, rewards - mean, 0.0)
  var = jnp.sum(centred ** 2, axis=-1, keepdims=True) / jnp.maximum(
      count - 1, 1)
  return jnp.where(informative, centred / (jnp.sqrt(var) + eps), 0.0)


ADVANTAGES = {
    'grpo': grpo,
}
