"""Dimension vocabulary and array aliases shared across rlx.

Shape letters used in aliases, einsum strings and shape comments:
  B prompts, G samples per prompt, T response tokens, P prompt tokens,
  S cache length, V vocab, D width, N query heads, K kv heads, H head dim,
  L layers (or query length inside attention, where said).
"""

import enum
from typing import Any

import jax

Array = jax.Array
PRNGKey = jax.Array
PyTree = Any
Params = Any  # A pytree of parameter arrays.


class FinishReason(enum.IntEnum):
  """Why a sampled response ended (stored as int32 in rollouts)."""
  RUNNING = 0  # Still decoding; never present in a returned rollout.
  STOP = 1  # Emitted a stop token (kept in the response and the loss mask).
  LENGTH = 2  # Hit max_new_tokens.
