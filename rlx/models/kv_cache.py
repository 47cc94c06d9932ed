"""Key/value cache and the attention masks that go with it.

The cache is a tuple with one `LayerCache` per layer, each holding keys and
values `[B, K, S, H]` (heads before slots, so decode attention
is a plain batched matmul with no per-step transpose of the cache). All rows of a batch write at the same cache index:
prompts are left-padded so that they end at the same column, and the slots
that hold padding are excluded through `kv_valid [B, S]`. Token positions
(for RoPE) are counted per row over real tokens only, so a left-padded row
sees exactly the positions it would see unpadded.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlx.types import Array


class LayerCache(NamedTuple):
  k: Array  # [B, K, S, H]
  v: Array  # [B, K, S, H]


Cache = tuple[LayerCache, ...]


def init_cache(*, num_layers: int, batch: int, length: int, num_kv_heads: int,
               head_dim: int, dtype=jnp.float32) -> Cache:
  """Returns an all-zero cache for `length` (S) slots per row."""
  shape = (batch, num_kv_heads, length, head_dim)
  return tuple(
      LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
      for _ in range(num_layers))


def write(layer: LayerCache, k: Array, v: Array, index: Array) -> LayerCache:
  """Writes `k, v [B, L, K, H]` into the cache at slots index..index+L-1."""
  start = (0, 0, index, 0)
  k = jnp.swapaxes(k, 1, 2).astype(layer.k.dtype)
  v = jnp.swapaxes(v, 1, 2).astype(layer.v.dtype)
  return LayerCache(jax.lax.dynamic_update_slice(layer.k, k, start),
                    jax.lax.dynamic_update_slice(layer.v, v, start))


def positions_from_mask(mask: Array) -> Array:
  """Per-row positions of real tokens: 0, 1, 2... skipping padding.

  Args:
    mask: [B, L] bool, True on real tokens.

  Returns:
    [B, L] int32; padding slots get the position of the next real token
    minus one (their value is irrelevant since they are never attended).
  """
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def causal_mask(kv_valid: Array, *, query_len: int, cache_index) -> Array:
  """Attention mask for `query_len` queries written at `cache_index`.

  Query i (cache slot cache_index + i) attends to slot j iff j is valid and
  j <= cache_index + i.

  Args:
    kv_valid: [B, S] bool, slots holding real tokens (including the ones
      being written now).
    query_len: number of queries L.
    cache_index: scalar slot index of the first query.

  Returns:
    [B, L, S] bool.
  """
  s = kv_valid.shape[-1]
  q_slot = cache_index + jnp.arange(query_len)[:, None]  # [L, 1]
  causal = jnp.arange(s)[None, :] <= q_slot  # [L, S]
  return causal[None] & kv_valid[:, None, :]
