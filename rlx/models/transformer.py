"""Decoder-only transformer in Flax linen.

RoPE, grouped-query attention, RMSNorm, SwiGLU MLP, optional QK-norm, tied
or untied embeddings. One module for every size, from a ~1M-parameter CPU
model to billions; all sizes come from `TransformerConfig`.

Every weight carries logical axis names (`vocab`, `embed`, `q_heads`,
`kv_heads`, `head_dim`, `mlp`), which `rlx/sharding.py` maps to mesh axes.
Shape letters follow `rlx/types.py`; inside attention L is the query length.
"""

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlx.models import kv_cache
from rlx.types import Array

_NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Architecture hyper-parameters."""
  vocab_size: int  # V: rows of the embedding table.
  num_layers: int = 4  # L: transformer blocks.
  embed_dim: int = 128  # D: residual stream width.
  num_heads: int = 4  # N: query heads.
  num_kv_heads: int = 2  # K: key/value heads; N % K == 0 (GQA).
  head_dim: int = 32  # H: width of one head.
  mlp_dim: int = 384  # Hidden width of the SwiGLU MLP.
  rope_theta: float = 10_000.0  # RoPE base frequency.
  norm_eps: float = 1e-6  # RMSNorm epsilon.
  qk_norm: bool = False  # RMSNorm on queries and keys per head.
  tie_embeddings: bool = True  # Output projection = embedding transpose.
  dtype: str = 'float32'  # Activation / matmul dtype.
  param_dtype: str = 'float32'  # Parameter storage dtype.

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f'model.num_heads={self.num_heads} is not a multiple of '
          f'model.num_kv_heads={self.num_kv_heads}')
    if self.head_dim % 2:
      raise ValueError(f'model.head_dim={self.head_dim} must be even (RoPE)')


def _init(init_fn, *names):
  return nn.with_logical_partitioning(init_fn, names)


class RMSNorm(nn.Module):
  eps: float
  axis_name: str = 'embed'
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param('scale', _init(nn.initializers.ones, self.axis_name),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
    return (x32 * scale).astype(x.dtype)


def apply_rope(x: Array, positions: Array, theta: float) -> Array:
  """Rotary embedding, half-split convention (as Llama / HF).

  Args:
    x: [B, L, heads, H].
    positions: [B, L] int.
    theta: base frequency.

  Returns:
    x rotated, same shape and dtype.
  """
  h = x.shape[-1]
  freq = theta ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)  # [H/2]
  angle = positions[..., None].astype(jnp.float32) * freq  # [B, L, H/2]
  sin = jnp.sin(angle)[:, :, None, :]
  cos = jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Attention(nn.Module):
  """Grouped-query self-attention with an optional KV cache."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x, positions, mask, layer_cache, cache_index):
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    dense = lambda feats, axes, names, name: nn.DenseGeneral(  # pylint: disable=g-long-lambda
        feats, axis=axes, use_bias=False, dtype=dtype, param_dtype=pdtype,
        kernel_init=_init(nn.initializers.lecun_normal(), *names), name=name)
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = dense((n, h), -1, ('embed', 'q_heads', 'head_dim'), 'q')(x)
    key = dense((k, h), -1, ('embed', 'kv_heads', 'head_dim'), 'k')(x)
    val = dense((k, h), -1, ('embed', 'kv_heads', 'head_dim'), 'v')(x)
    if cfg.qk_norm:
      q = RMSNorm(cfg.norm_eps, 'head_dim', pdtype, name='q_norm')(q)
      key = RMSNorm(cfg.norm_eps, 'head_dim', pdtype, name='k_norm')(key)
    q = apply_rope(q, positions, cfg.rope_theta)
    key = apply_rope(key, positions, cfg.rope_theta)

    new_cache = None
    if layer_cache is not None:
      new_cache = kv_cache.write(layer_cache, key, val, cache_index)
      key, val = new_cache.k.astype(dtype), new_cache.v.astype(dtype)
    else:
      key, val = jnp.swapaxes(key, 1, 2), jnp.swapaxes(val, 1, 2)  # [B,K,S,H]

    # Group query heads by the kv head they share: N = K * R.
    b, l = q.shape[:2]
    q = q.reshape(b, l, k, n // k, h) * (h ** -0.5)
    logits = jnp.einsum('blkrh,bksh->bkrls', q, key,
                        preferred_element_type=jnp.float32)
    logits = jnp.where(mask[:, None, None], logits, _NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    out = jnp.einsum('bkrls,bksh->blkrh', probs, val).reshape(b, l, n, h)
    out = dense(cfg.embed_dim, (-2, -1), ('q_heads', 'head_dim', 'embed'),
                'o')(out)
    return out, new_cache


class MLP(nn.Module):
  """SwiGLU feed-forward block."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    def dense(feats, names, name):
      return nn.Dense(feats, use_bias=False, dtype=dtype, param_dtype=pdtype,
                      kernel_init=_init(nn.initializers.lecun_normal(), *names),
                      name=name)
    gate = dense(cfg.mlp_dim, ('embed', 'mlp'), 'gate')(x)
    up = dense(cfg.mlp_dim, ('embed', 'mlp'), 'up')(x)
    return dense(cfg.embed_dim, ('mlp', 'embed'), 'down')(nn.silu(gate) * up)


class Block(nn.Module):
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x, positions, mask, layer_cache, cache_index):
    cfg = self.cfg
    pdtype = jnp.dtype(cfg.param_dtype)
    h, new_cache = Attention(cfg, name='attn')(
        RMSNorm(cfg.norm_eps, param_dtype=pdtype, name='attn_norm')(x),
        positions, mask, layer_cache, cache_index)
    x = x + h
    x = x + MLP(cfg, name='mlp')(
        RMSNorm(cfg.norm_eps, param_dtype=pdtype, name='mlp_norm')(x))
    return x, new_cache


class Transformer(nn.Module):
  """Decoder-only LM.

  Call with tokens [B, L], positions [B, L], an attention mask [B, L, S]
  (S = L without a cache, the cache length with one), and optionally a
  cache plus the slot index at which these L tokens are written.
  Returns (logits [B, L, V] float32, new cache or None, hidden [B, L, D]).
  """
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, tokens: Array, positions: Array, mask: Array,
               cache: Optional[kv_cache.Cache] = None, cache_index=0):
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    embed = nn.Embed(
        cfg.vocab_size, cfg.embed_dim, dtype=dtype, param_dtype=pdtype,
        # std 1/sqrt(D): with tied output the initial logits are ~N(0, 1).
        embedding_init=_init(nn.initializers.normal(cfg.embed_dim ** -0.5),
                             'vocab', 'embed'),
        name='embed')
    x = embed(tokens)
    new_cache = []
    for i in range(cfg.num_layers):
      layer_cache = None if cache is None else cache[i]
      x, c = Block(cfg, name=f'layer_{i}')(x, positions, mask, layer_cache,
                                           cache_index)
      new_cache.append(c)
    hidden = RMSNorm(cfg.norm_eps, param_dtype=pdtype, name='final_norm')(x)
    if cfg.tie_embeddings:
      logits = embed.attend(hidden)
    else:
      logits = nn.Dense(
          cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=pdtype,
          kernel_init=_init(nn.initializers.lecun_normal(), 'embed', 'vocab'),
          name='unembed')(hidden)
    return (logits.astype(jnp.float32),
            None if cache is None else tuple(new_cache), hidden)


def init_params(cfg: TransformerConfig, key) -> dict:
  """Initialises unboxed parameters (logical names: see `logical_specs`)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  variables = Transformer(cfg).init(key, tokens, tokens,
                                    jnp.ones((1, 1, 1), bool))
  return nn.meta.unbox(variables['params'])


def logical_specs(cfg: TransformerConfig):
  """Pytree of logical axis-name tuples matching `init_params`' output."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  abstract = jax.eval_shape(
      lambda: Transformer(cfg).init(jax.random.key(0), tokens, tokens,
                                    jnp.ones((1, 1, 1), bool)))
  return nn.get_partition_spec(abstract)['params']


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
