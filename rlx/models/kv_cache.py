"""Key/value cache and the attention masks that go with it.

The cache is a tuple with one `LayerCache` per layer, each holding keys and
values `[B, K, S, H]` (heads before slots, so decode attention
is a plain batched matmul with no per-step transpose of the cache). In the
static sampler all rows of a batch write at the same (scalar) cache index:
prompts are left-padded so that they end at the same column, and the slots
that hold padding are excluded through `kv_valid [B, S]`. The continuous
batching engine gives every row its own index (an int array `[B]`): rows
then advance independently. Token positions (for RoPE) are counted per row
over real tokens only, so a left-padded row sees exactly the positions it
would see unpadded.
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


def write(layer: LayerCache, k: Array, v: Array, index) -> LayerCache:
  """Writes `k, v [B, L, K, H]` into the cache at slots index..index+L-1.

  Args:
    layer: the layer's cache, `[B, K, S, H]` keys and values.
    k, v: `[B, L, K, H]` new keys and values.
    index: a scalar (every row writes at the same slot) or an int array
      `[B]` (row b writes at slots index[b]..index[b]+L-1).

  Returns:
    The updated `LayerCache`.
  """
  k = jnp.swapaxes(k, 1, 2).astype(layer.k.dtype)
  v = jnp.swapaxes(v, 1, 2).astype(layer.v.dtype)
  if jnp.ndim(index) == 0:
    start = (0, 0, index, 0)
    return LayerCache(jax.lax.dynamic_update_slice(layer.k, k, start),
                      jax.lax.dynamic_update_slice(layer.v, v, start))
  # Per-row index: a batched dynamic_update_slice (an in-place scatter).
  row_write = jax.vmap(
      lambda c, x, i: jax.lax.dynamic_update_slice(c, x, (0, i, 0)))
  return LayerCache(row_write(layer.k, k, index), row_write(layer.v, v, index))


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
    cache_index: slot index of the first query: a scalar, or an int array
      `[B]` with one index per row.

  Returns:
    [B, L, S] bool.
  """
  s = kv_valid.shape[-1]
  index = jnp.reshape(jnp.asarray(cache_index), (-1, 1, 1))  # [1 or B, 1, 1]
  q_slot = index + jnp.arange(query_len)[None, :, None]  # [1 or B, L, 1]
  causal = jnp.arange(s)[None, None, :] <= q_slot  # [1 or B, L, S]
  return causal & kv_valid[:, None, :]


def fork(cache: Cache, kv_valid: Array, *, child: Array, parent: Array,
         keep: Array) -> tuple[Cache, Array]:
  """Forks cache rows: child row m becomes parent row m's first keep[m] slots.

  The KV-forking primitive of tree rollouts (TreePO, LATR, EPTree): a new
  branch shares its parent's prefix, so its cache row is a copy (gather) of
  the parent's up to the fork point. Slots at and beyond keep[m] are zeroed
  and marked invalid, so nothing the parent wrote after the fork (or a
  stale value of the reused row) can leak into the child. Static shapes:
  M is fixed, padding entries name a child row >= R and are dropped.

  Args:
    cache: R rows of S slots (`LayerCache` keys and values `[R, K, S, H]`).
    kv_valid: [R, S] bool, slots holding real tokens.
    child: [M] int, destination rows, distinct; entries >= R are padding.
    parent: [M] int, source rows (in [0, R)). All reads happen before any
      write, so a row may be a parent and, for another entry, a child.
    keep: [M] int in [0, S], leading slots copied: for a response fork at
      token f with the prompt in slots [0, P), keep = P + f - 1 when token
      f - 1 is fed next (the sampler's layout), P + f once it was fed.

  Returns:
    (cache, kv_valid) with the child rows replaced.
  """
  s = kv_valid.shape[-1]
  cols = jnp.arange(s)[None, :] < jnp.asarray(keep)[:, None]  # [M, S]

  def copy(x, colmask):
    src = jnp.where(colmask, x[parent], jnp.zeros((), x.dtype))
    return x.at[child].set(src, mode='drop')

  kv_cols = cols[:, None, :, None]  # [M, 1, S, 1] against [M, K, S, H].
  new_cache = tuple(LayerCache(copy(layer.k, kv_cols), copy(layer.v, kv_cols))
                    for layer in cache)
  return new_cache, copy(kv_valid.astype(bool), cols)
