"""Decoder-only transformer in Flax linen.

RoPE, grouped-query attention, RMSNorm, SwiGLU MLP, optional QK-norm, tied
or untied embeddings. One module for every size, from a ~1M-parameter CPU
model to billions; all sizes come from `TransformerConfig`. A few switches
(q/k/v biases, RMSNorm by 1 + w, scaled embeddings, GeGLU, RoPE scaling)
let it reproduce Llama, Qwen2/3 and Gemma checkpoints (rlx/models/hf).

Every weight carries logical axis names (`vocab`, `embed`, `q_heads`,
`kv_heads`, `head_dim`, `mlp`), which `rlx/sharding.py` maps to mesh axes.
Shape letters follow `rlx/types.py`; inside attention L is the query length.
"""

import dataclasses
import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlx.models import kv_cache
from rlx.types import Array

_NEG_INF = -1e30
# 'einsum': rlx's own grouped-query attention, the reference. 'xla' and
# 'cudnn': jax.nn.dot_product_attention with that implementation.
ATTENTION_IMPLS = ('einsum', 'xla', 'cudnn')
_ACTIVATIONS = {
    'silu': nn.silu,
    # tanh-approximated GELU (HF's gelu_pytorch_tanh).
    'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True),
}


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
  # Pretrained-family switches (rlx/models/hf); the defaults are rlx's own.
  qkv_bias: bool = False  # Biases on the q/k/v projections (Qwen2).
  norm_plus_one: bool = False  # RMSNorm scales by 1 + w, w init 0 (Gemma).
  embed_scale: bool = False  # Embeddings times sqrt(D) (Gemma).
  activation: str = 'silu'  # MLP gate: 'silu' or 'gelu_tanh' (Gemma).
  rope_scaling: str = 'none'  # 'none', 'linear' or 'llama3'.
  rope_factor: float = 1.0  # Scaling factor (linear, llama3).
  rope_low_freq_factor: float = 1.0  # llama3 only.
  rope_high_freq_factor: float = 4.0  # llama3 only.
  rope_original_max_len: int = 8192  # llama3: pre-scaling context length.
  attention: str = 'einsum'  # Kernel (ATTENTION_IMPLS; see `attend`): a
  # runtime choice that leaves the parameters unchanged. rlx/backend.py
  # picks it per platform for the trainer.
  attention_chunk: int = 0  # Queries per block in full-sequence attention
  # (`attend`'s query_chunk; calls with a cache ignore it). A runtime
  # choice, like `attention`.
  causal_block: int = 0  # > 0: full-sequence attention runs this many
  # queries at a time over the keys up to each block's end (`attend`'s
  # causal_block; calls with a cache ignore it). Full-sequence masks must
  # then be causal, as every caller's in rlx is. A runtime choice.

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f'model.num_heads={self.num_heads} is not a multiple of '
          f'model.num_kv_heads={self.num_kv_heads}')
    if self.head_dim % 2:
      raise ValueError(f'model.head_dim={self.head_dim} must be even (RoPE)')
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f'model.activation={self.activation!r} is not one of '
                       f'{sorted(_ACTIVATIONS)}')
    if self.rope_scaling not in ('none', 'linear', 'llama3'):
      raise ValueError(f'model.rope_scaling={self.rope_scaling!r} is not one '
                       "of 'none', 'linear', 'llama3'")
    if self.attention_chunk < 0:
      raise ValueError(f'attention_chunk={self.attention_chunk} must be >= 0')
    if self.causal_block < 0:
      raise ValueError(f'causal_block={self.causal_block} must be >= 0')
    if self.attention not in ATTENTION_IMPLS:
      raise ValueError(f'model.attention={self.attention!r} is not one of '
                       f'{list(ATTENTION_IMPLS)}')


def _init(init_fn, *names):
  return nn.with_logical_partitioning(init_fn, names)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis; scales by `scale` or, Gemma-style, by
  `1 + scale` (`plus_one`, with `scale` initialised to 0)."""
  eps: float
  axis_name: str = 'embed'
  param_dtype: jnp.dtype = jnp.float32
  plus_one: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
    scale = self.param('scale', _init(init, self.axis_name),
                       (x.shape[-1],), self.param_dtype)
    scale = scale.astype(jnp.float32) + (1.0 if self.plus_one else 0.0)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
    return (x32 * scale).astype(x.dtype)


def rope_frequencies(cfg: TransformerConfig) -> Array:
  """RoPE inverse frequencies [H/2] float32, with the config's scaling.

  'linear' divides every frequency by `rope_factor` (position
  interpolation); 'llama3' divides only the low frequencies, blending
  smoothly between `rope_low_freq_factor` and `rope_high_freq_factor`
  wavelengths (as Llama 3.1 and HF's `_compute_llama3_parameters`).
  """
  h = cfg.head_dim
  freq = cfg.rope_theta ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)
  if cfg.rope_scaling == 'linear':
    return freq / cfg.rope_factor
  if cfg.rope_scaling == 'llama3':
    factor, old_len = cfg.rope_factor, cfg.rope_original_max_len
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelen = 2 * jnp.pi / freq
    scaled = jnp.where(wavelen > old_len / low, freq / factor, freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return jnp.where(medium, smoothed, scaled)
  return freq


def apply_rope(x: Array, positions: Array, theta: float, *,
               inv_freq: Optional[Array] = None) -> Array:
  """Rotary embedding, half-split convention (as Llama / HF).

  Args:
    x: [B, L, heads, H].
    positions: [B, L] int.
    theta: base frequency.
    inv_freq: [H/2] frequencies overriding theta (see `rope_frequencies`).

  Returns:
    x rotated, same shape and dtype.
  """
  h = x.shape[-1]
  freq = (theta ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)
          if inv_freq is None else inv_freq)  # [H/2]
  angle = positions[..., None].astype(jnp.float32) * freq  # [B, L, H/2]
  sin = jnp.sin(angle)[:, :, None, :]
  cos = jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _einsum_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """The reference: keys and values stay heads-first, as in the cache.

  One query per row (a decode step) is a broadcast product summed over the
  head dimension rather than a batched matmul: the same numbers, and XLA
  on CPU decodes about 1.5x faster that way (its batched dot loops over
  tiny matrices); `scripts/bench_rollout.py` measures it.
  """
  b, l, n, h = q.shape
  kv = k.shape[1]
  # Group query heads by the kv head they share: N = K * R.
  q = q.reshape(b, l, kv, n // kv, h) * (h ** -0.5)
  if l == 1:
    f32 = jnp.float32
    logits = jnp.sum(q[:, 0, :, :, None].astype(f32) *
                     k[:, :, None].astype(f32), -1)  # [B, K, R, S]
    logits = jnp.where(mask[:, 0, None, None], logits, _NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    out = jnp.sum(probs[..., None].astype(f32) * v[:, :, None].astype(f32),
                  -2)  # [B, K, R, H]
    return out.astype(q.dtype).reshape(b, 1, n, h)
  logits = jnp.einsum('blkrh,bksh->bkrls', q, k,
                      preferred_element_type=jnp.float32)
  logits = jnp.where(mask[:, None, None], logits, _NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
  return jnp.einsum('bkrls,bksh->blkrh', probs, v).reshape(b, l, n, h)


def _even_lengths(q: Array, k: Array, v: Array, mask: Array):
  """Pads odd L and S by one masked query row / key slot.

  cuDNN refuses odd lengths when it differentiates through a mask (which it
  turns into an additive bias), and the learner's forward has length
  P + T - 1. A padded slot is masked for every query and a padded query row
  is dropped afterwards, so the result is unchanged.
  """
  pad_l, pad_s = q.shape[1] % 2, k.shape[1] % 2
  if not (pad_l or pad_s):
    return q, k, v, mask
  seq = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))
  mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad_l), (0, pad_s)))
  return seq(q, pad_l), seq(k, pad_s), seq(v, pad_s), mask


def _in_query_blocks(fn, q: Array, k: Array, v: Array, mask: Array,
                     chunk: int) -> Array:
  """`fn(q, k, v, mask)` on `chunk` queries at a time under
  `jax.checkpoint`: the `[B, heads, chunk, S]` scores of one block are the
  largest temporary, in the backward pass too (each block is recomputed).
  Every query still sees all S keys, so the result is `fn`'s up to float
  rounding. Padded queries (masked everywhere) are dropped."""
  b, l, n, h = q.shape
  pad = -l % chunk
  q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
  mask = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)))
  blocks = lambda x: jnp.swapaxes(
      x.reshape(b, (l + pad) // chunk, chunk, *x.shape[2:]), 0, 1)
  out = jax.lax.map(jax.checkpoint(lambda qm: fn(qm[0], k, v, qm[1])),
                    (blocks(q), blocks(mask)))
  return jnp.swapaxes(out, 0, 1).reshape(b, l + pad, n, h)[:, :l]


def _in_causal_blocks(fn, q: Array, k: Array, v: Array, mask: Array,
                      size: int) -> Array:
  """`fn(q, k, v, mask)` for a causal mask (query l never sees key s > l)
  with the keys after each block of `size` queries left out: block [a, b)
  attends keys [0, b) only. Those keys are masked anyway, so the result is
  `fn`'s up to float rounding, at about (n + 1) / 2n of the score and value
  FLOPs for n blocks. Static slices, unrolled: one program per length."""
  l = q.shape[1]
  out = [fn(q[:, a:a + size], k[:, :, :a + size], v[:, :, :a + size],
            mask[:, a:a + size, :a + size]) for a in range(0, l, size)]
  return jnp.concatenate(out, axis=1)


def attend(q: Array, k: Array, v: Array, mask: Array, *,
           implementation: str = 'einsum', query_chunk: int = 0,
           causal_block: int = 0) -> Array:
  """Grouped-query attention; softmax in float32 whatever the dtype.

  'xla' and 'cudnn' call jax.nn.dot_product_attention, which wants keys
  sequence-major [B, S, K, H]; for 'xla' XLA folds that transpose into the
  matmuls. cuDNN (flash attention) takes float16/bfloat16 only, a head dim
  that is a multiple of 8 (see rlx.backend.cudnn_limitation), turns the
  boolean mask into a [B, 1, L, S] bias, and needs even lengths when
  differentiated (padded here).

  Args:
    q: [B, L, N, H] queries, RoPE applied, not scaled.
    k: [B, K, S, H] keys (the KV cache layout); N % K == 0.
    v: [B, K, S, H] values.
    mask: [B, L, S] bool, True where query l may attend slot s. A row with
      no True entry (a padding query) gets finite, unused output.
    implementation: one of ATTENTION_IMPLS.
    query_chunk: > 0: 'einsum' and 'xla' run that many queries at a time
      (`_in_query_blocks`); cuDNN's fused kernel holds no scores anyway.
    causal_block: > 0, for a full-sequence call (S == L > causal_block)
      whose mask is causal: 'einsum' and 'xla' run that many queries at a
      time, each block attending only the keys up to its last query
      (`_in_causal_blocks`). The caller guarantees causality: keys after a
      query that the mask allows would be silently dropped.

  Returns:
    [B, L, N, H] in the dtype of q.
  """
  l, s = q.shape[1], k.shape[2]
  if (0 < causal_block < l and l == s and
      implementation in ('einsum', 'xla')):
    return _in_causal_blocks(functools.partial(
        attend, implementation=implementation, query_chunk=query_chunk),
                             q, k, v, mask, causal_block)
  if (query_chunk and q.shape[1] > query_chunk and
      implementation in ('einsum', 'xla')):
    return _in_query_blocks(functools.partial(
        attend, implementation=implementation), q, k, v, mask, query_chunk)
  if implementation == 'einsum':
    return _einsum_attention(q, k, v, mask)
  if implementation not in ATTENTION_IMPLS:
    raise ValueError(f'attention implementation {implementation!r} is not '
                     f'one of {list(ATTENTION_IMPLS)}')
  l = q.shape[1]
  k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, S, K, H]
  mask = mask[:, None]  # [B, 1, L, S]: one mask for every head.
  if implementation == 'cudnn':
    q, k, v, mask = _even_lengths(q, k, v, mask)
  out = jax.nn.dot_product_attention(q, k, v, mask=mask,
                                     scale=q.shape[-1] ** -0.5,
                                     implementation=implementation)
  return out[:, :l]


class Attention(nn.Module):
  """Grouped-query self-attention with an optional KV cache."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x, positions, mask, layer_cache, cache_index):
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    dense = lambda feats, axes, names, name, bias=False: nn.DenseGeneral(  # pylint: disable=g-long-lambda
        feats, axis=axes, use_bias=bias, dtype=dtype, param_dtype=pdtype,
        kernel_init=_init(nn.initializers.lecun_normal(), *names),
        bias_init=_init(nn.initializers.zeros, *names[1:]), name=name)
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    bias = cfg.qkv_bias
    q = dense((n, h), -1, ('embed', 'q_heads', 'head_dim'), 'q', bias)(x)
    key = dense((k, h), -1, ('embed', 'kv_heads', 'head_dim'), 'k', bias)(x)
    val = dense((k, h), -1, ('embed', 'kv_heads', 'head_dim'), 'v', bias)(x)
    if cfg.qk_norm:
      norm = functools.partial(RMSNorm, cfg.norm_eps, 'head_dim', pdtype,
                               cfg.norm_plus_one)
      q, key = norm(name='q_norm')(q), norm(name='k_norm')(key)
    freq = rope_frequencies(cfg)
    q = apply_rope(q, positions, cfg.rope_theta, inv_freq=freq)
    key = apply_rope(key, positions, cfg.rope_theta, inv_freq=freq)

    new_cache, impl = None, cfg.attention
    if layer_cache is not None:
      new_cache = kv_cache.write(layer_cache, key, val, cache_index)
      key, val = new_cache.k.astype(dtype), new_cache.v.astype(dtype)
      # cuDNN would need the heads-first cache transposed (a full copy per
      # layer per decode step) and a one-token query gains nothing from a
      # fused kernel: cached calls (the sampler) take XLA's path.
      impl = 'xla' if impl == 'cudnn' else impl
    else:
      key, val = jnp.swapaxes(key, 1, 2), jnp.swapaxes(val, 1, 2)  # [B,K,S,H]
    full = layer_cache is None  # Full sequence: causal masks only.
    out = attend(q, key, val, mask, implementation=impl,
                 query_chunk=cfg.attention_chunk if full else 0,
                 causal_block=cfg.causal_block if full else 0)
    out = dense(cfg.embed_dim, (-2, -1), ('q_heads', 'head_dim', 'embed'),
                'o')(out)
    return out, new_cache


class MLP(nn.Module):
  """Gated feed-forward block: SwiGLU, or GeGLU with `gelu_tanh`."""
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
    act = _ACTIVATIONS[cfg.activation]
    return dense(cfg.embed_dim, ('mlp', 'embed'), 'down')(act(gate) * up)


class Block(nn.Module):
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x, positions, mask, layer_cache, cache_index):
    cfg = self.cfg
    norm = functools.partial(RMSNorm, cfg.norm_eps, 'embed',
                             jnp.dtype(cfg.param_dtype), cfg.norm_plus_one)
    h, new_cache = Attention(cfg, name='attn')(
        norm(name='attn_norm')(x), positions, mask, layer_cache, cache_index)
    x = x + h
    x = x + MLP(cfg, name='mlp')(norm(name='mlp_norm')(x))
    return x, new_cache


class Transformer(nn.Module):
  """Decoder-only LM.

  Call with tokens [B, L], positions [B, L], an attention mask [B, L, S]
  (S = L without a cache, the cache length with one), and optionally a
  cache plus the slot index at which these L tokens are written (a scalar,
  or an int array [B] when every row writes at its own slot).
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
    if cfg.embed_scale:
      # Gemma rounds the normalizer to the activation dtype first.
      x = x * jnp.asarray(cfg.embed_dim ** 0.5, dtype)
    new_cache = []
    for i in range(cfg.num_layers):
      layer_cache = None if cache is None else cache[i]
      x, c = Block(cfg, name=f'layer_{i}')(x, positions, mask, layer_cache,
                                           cache_index)
      new_cache.append(c)
    hidden = RMSNorm(cfg.norm_eps, param_dtype=pdtype,
                     plus_one=cfg.norm_plus_one, name='final_norm')(x)
    if cfg.tie_embeddings:
      logits = embed.attend(hidden)
    else:
      logits = nn.Dense(
          cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=pdtype,
          kernel_init=_init(nn.initializers.lecun_normal(), 'embed', 'vocab'),
          name='unembed')(hidden)
    return (logits.astype(jnp.float32),
            None if cache is None else tuple(new_cache), hidden)


def unembedding(cfg: TransformerConfig, params) -> Array:
  """`[V, D]` output embeddings: `Transformer`'s logits are
  `hidden @ unembedding(cfg, params).T`, computed in `cfg.dtype` and then
  cast to float32 (the tied embedding table, or the untied kernel's
  transpose)."""
  if cfg.tie_embeddings:
    return params['embed']['embedding']
  return params['unembed']['kernel'].T


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
