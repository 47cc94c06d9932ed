"""Transformer: cache equivalence, GQA, RoPE, logical axis names, attention
implementations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx.models import kv_cache
from rlx.models import transformer as tr


def _cfg(**kw):
  base = dict(vocab_size=23, num_layers=2, embed_dim=32, num_heads=4,
              num_kv_heads=2, head_dim=8, mlp_dim=48)
  base.update(kw)
  return tr.TransformerConfig(**base)


@pytest.mark.parametrize('kw', [{}, {'qk_norm': True},
                                {'tie_embeddings': False},
                                {'num_kv_heads': 1}, {'num_kv_heads': 4}])
def test_cached_decode_equals_full_forward(kw):
  cfg = _cfg(**kw)
  model = tr.Transformer(cfg)
  params = tr.init_params(cfg, jax.random.key(0))
  b, p, extra = 3, 6, 5
  tokens = jax.random.randint(jax.random.key(1), (b, p + extra), 3, 23)
  pmask = jnp.array([[0, 0, 1, 1, 1, 1], [1] * 6, [0, 0, 0, 0, 0, 1]], bool)
  valid = jnp.concatenate([pmask, jnp.ones((b, extra), bool)], 1)
  pos = kv_cache.positions_from_mask(valid)
  full, _, _ = model.apply(
      {'params': params}, tokens, pos,
      kv_cache.causal_mask(valid, query_len=p + extra, cache_index=0))

  cached, _ = _cached_logits(cfg, params, tokens, pmask, p, extra)
  np.testing.assert_allclose(np.where(valid[..., None], cached, 0),
                             np.where(valid[..., None], full, 0),
                             atol=1e-4, rtol=1e-4)


def test_left_padding_does_not_change_logits():
  cfg = _cfg()
  model = tr.Transformer(cfg)
  params = tr.init_params(cfg, jax.random.key(0))
  seq = jnp.array([[5, 7, 9, 11]])
  def run(tokens, mask):
    pos = kv_cache.positions_from_mask(mask)
    return model.apply({'params': params}, tokens, pos,
                       kv_cache.causal_mask(mask, query_len=tokens.shape[1],
                                            cache_index=0))[0]
  plain = run(seq, jnp.ones((1, 4), bool))
  padded = run(jnp.array([[0, 0, 5, 7, 9, 11]]),
               jnp.array([[0, 0, 1, 1, 1, 1]], bool))
  np.testing.assert_allclose(padded[:, 2:], plain, atol=1e-5)


def test_rope_is_relative():
  """<rope(q, m), rope(k, n)> depends only on m - n."""
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))
  dot = lambda m, n: jnp.sum(tr.apply_rope(q, jnp.array([[m]]), 1e4) *
                             tr.apply_rope(k, jnp.array([[n]]), 1e4))
  np.testing.assert_allclose(dot(7, 3), dot(14, 10), rtol=1e-5)
  assert abs(float(dot(7, 3)) - float(dot(7, 4))) > 1e-4


def test_gqa_equals_mha_with_repeated_kv_heads():
  """K=1 GQA equals N-head attention whose k/v weights are all copies."""
  g_cfg = _cfg(num_kv_heads=1)
  m_cfg = _cfg(num_kv_heads=4)
  g_params = tr.init_params(g_cfg, jax.random.key(0))
  m_params = jax.tree.map(lambda x: x, tr.init_params(m_cfg, jax.random.key(0)))
  for i in range(2):
    ga, ma = g_params[f'layer_{i}']['attn'], m_params[f'layer_{i}']['attn']
    for name in ('k', 'v'):
      ma[name]['kernel'] = jnp.repeat(ga[name]['kernel'], 4, axis=1)
    for name in ('q', 'o'):
      ma[name]['kernel'] = ga[name]['kernel']
    m_params[f'layer_{i}']['mlp'] = g_params[f'layer_{i}']['mlp']
  m_params['embed'] = g_params['embed']
  tokens = jnp.array([[3, 4, 5, 6]])
  mask = kv_cache.causal_mask(jnp.ones((1, 4), bool), query_len=4,
                              cache_index=0)
  pos = jnp.arange(4)[None]
  g = tr.Transformer(g_cfg).apply({'params': g_params}, tokens, pos, mask)[0]
  m = tr.Transformer(m_cfg).apply({'params': m_params}, tokens, pos, mask)[0]
  np.testing.assert_allclose(g, m, atol=1e-5)


def test_logical_axis_names_cover_every_weight():
  cfg = _cfg(qk_norm=True, tie_embeddings=False)
  specs = tr.logical_specs(cfg)
  params = tr.init_params(cfg, jax.random.key(0))
  flat_p = jax.tree_util.tree_leaves_with_path(params)
  flat_s = jax.tree.leaves(specs, is_leaf=lambda x: x is not None and
                           not isinstance(x, dict))
  assert len(flat_p) == len(flat_s)
  att = specs['layer_0']['attn']
  assert tuple(att['q']['kernel']) == ('embed', 'q_heads', 'head_dim')
  assert tuple(att['k']['kernel']) == ('embed', 'kv_heads', 'head_dim')
  assert tuple(specs['embed']['embedding']) == ('vocab', 'embed')
  assert tuple(specs['unembed']['kernel']) == ('embed', 'vocab')


def test_param_count_matches_formula():
  cfg = _cfg()
  d, n, k, h, f, v = 32, 4, 2, 8, 48, 23
  per_layer = d * n * h * 2 + d * k * h * 2 + 3 * d * f + 2 * d
  expected = v * d + 2 * per_layer + d
  assert tr.count_params(tr.init_params(cfg, jax.random.key(0))) == expected


def test_bad_head_config_is_rejected():
  with pytest.raises(ValueError, match='num_kv_heads'):
    _cfg(num_heads=4, num_kv_heads=3)


# --- Attention implementations (rlx/backend.py picks one per platform) ---


def _padded_batch(b=3, p=6, extra=5, vocab=23):
  tokens = jax.random.randint(jax.random.key(1), (b, p + extra), 3, vocab)
  pmask = jnp.array([[0, 0, 1, 1, 1, 1], [1] * 6, [0, 0, 0, 0, 0, 1]], bool)
  return tokens, pmask, p, extra


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(cfg, params, tokens, valid):
  pos = kv_cache.positions_from_mask(valid)
  mask = kv_cache.causal_mask(valid, query_len=tokens.shape[1], cache_index=0)
  return tr.Transformer(cfg).apply({'params': params}, tokens, pos, mask)[0]


def _cached_logits(cfg, params, tokens, pmask, p, extra):
  """Prefill p left-padded tokens, then decode `extra` one at a time."""
  model, b = tr.Transformer(cfg), tokens.shape[0]
  valid = jnp.concatenate([pmask, jnp.ones((b, extra), bool)], 1)
  pos = kv_cache.positions_from_mask(valid)
  cache = kv_cache.init_cache(num_layers=cfg.num_layers, batch=b,
                              length=p + extra, head_dim=cfg.head_dim,
                              num_kv_heads=cfg.num_kv_heads)
  kvv = jnp.concatenate([pmask, jnp.zeros((b, extra), bool)], 1)
  out, cache, _ = model.apply(
      {'params': params}, tokens[:, :p], pos[:, :p],
      kv_cache.causal_mask(kvv, query_len=p, cache_index=0), cache, 0)
  outs = [out]
  for i in range(p, p + extra):
    kvv = kvv.at[:, i].set(True)
    out, cache, _ = model.apply(
        {'params': params}, tokens[:, i:i + 1], pos[:, i:i + 1],
        kv_cache.causal_mask(kvv, query_len=1, cache_index=i), cache, i)
    outs.append(out)
  return jnp.concatenate(outs, 1), valid


@pytest.mark.parametrize('l', [1, 3])
def test_einsum_attention_against_numpy(l):
  """Grouped-query attention by hand (l = 1 is the decode path, a product
  and a sum; l = 3 the batched matmul), including a masked-out slot per
  row and a query row that sees nothing (finite output)."""
  rng = np.random.default_rng(0)
  b, n, kv, s, h = 3, 4, 2, 6, 8
  q = rng.normal(size=(b, l, n, h)).astype(np.float32)
  k = rng.normal(size=(b, kv, s, h)).astype(np.float32)
  v = rng.normal(size=(b, kv, s, h)).astype(np.float32)
  mask = rng.random((b, l, s)) < 0.7
  mask[:, :, 0] = True
  mask[2, 0] = False  # Attends nowhere.
  got = np.asarray(tr.attend(q, k, v, mask, implementation='einsum'))
  want = np.zeros_like(q)
  for bi in range(b):
    for li in range(l):
      for ni in range(n):
        g = ni // (n // kv)  # The kv head query head ni shares.
        logits = k[bi, g] @ q[bi, li, ni] / np.sqrt(h)
        if mask[bi, li].any():
          w = np.exp(logits - logits[mask[bi, li]].max()) * mask[bi, li]
          want[bi, li, ni] = (w / w.sum()) @ v[bi, g]
  ok = mask.any(-1)
  np.testing.assert_allclose(got[ok], want[ok], atol=1e-5)
  assert np.isfinite(got).all()


@pytest.mark.parametrize('kw', [{}, {'num_kv_heads': 1}, {'qk_norm': True}])
def test_xla_attention_matches_einsum_without_cache(kw):
  ref_cfg = _cfg(**kw)
  params = tr.init_params(ref_cfg, jax.random.key(0))
  tokens, pmask, p, extra = _padded_batch()
  valid = jnp.concatenate([pmask, jnp.ones((3, extra), bool)], 1)
  ref = _full_logits(ref_cfg, params, tokens, valid)
  got = _full_logits(_cfg(attention='xla', **kw), params, tokens, valid)
  np.testing.assert_allclose(np.where(valid[..., None], got, 0),
                             np.where(valid[..., None], ref, 0), atol=1e-5)
  # Padding queries attend to nothing: finite, never NaN.
  assert np.isfinite(np.asarray(got)).all()


@pytest.mark.parametrize('kw', [{}, {'num_kv_heads': 1}])
def test_xla_attention_matches_einsum_with_cache(kw):
  ref_cfg = _cfg(**kw)
  params = tr.init_params(ref_cfg, jax.random.key(0))
  tokens, pmask, p, extra = _padded_batch()
  ref, valid = _cached_logits(ref_cfg, params, tokens, pmask, p, extra)
  got, _ = _cached_logits(_cfg(attention='xla', **kw), params, tokens, pmask,
                          p, extra)
  np.testing.assert_allclose(np.where(valid[..., None], got, 0),
                             np.where(valid[..., None], ref, 0), atol=1e-5)


def test_xla_attention_matches_einsum_with_per_row_cache_index():
  """Engine-style decode: every row writes at its own slot."""
  ref_cfg = _cfg()
  params = tr.init_params(ref_cfg, jax.random.key(0))
  b, s = 3, 8
  kvs = [jax.random.normal(jax.random.key(i), (b, 2, s, 8)) for i in (2, 3)]
  index = jnp.array([2, 5, 7])
  kv_valid = jnp.arange(s)[None] <= index[:, None]  # Slots written so far.
  kv_valid = kv_valid.at[1, :3].set(False)  # Row 1 starts with padding.
  tokens = jnp.array([[4], [9], [11]])
  mask = kv_cache.causal_mask(kv_valid, query_len=1, cache_index=index)
  outs = {}
  for impl in ('einsum', 'xla'):
    cache = tuple(kv_cache.LayerCache(*kvs) for _ in range(2))
    logits, new_cache, _ = tr.Transformer(_cfg(attention=impl)).apply(
        {'params': params}, tokens, index[:, None], mask, cache, index)
    outs[impl] = (logits, new_cache)
  np.testing.assert_allclose(outs['xla'][0], outs['einsum'][0], atol=1e-5)
  np.testing.assert_allclose(outs['xla'][1][1].k, outs['einsum'][1][1].k,
                             atol=1e-6)


def test_xla_attention_gradients_match_einsum():
  ref_cfg = _cfg()
  params = tr.init_params(ref_cfg, jax.random.key(0))
  tokens, pmask, _, extra = _padded_batch()
  valid = jnp.concatenate([pmask, jnp.ones((3, extra), bool)], 1)
  def loss(params, cfg):
    logits = _full_logits(cfg, params, tokens, valid)
    return jnp.sum(jnp.where(valid[..., None], jax.nn.log_softmax(logits), 0))
  grad = jax.jit(jax.grad(loss), static_argnums=1)
  ref, got = grad(params, ref_cfg), grad(params, _cfg(attention='xla'))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('impl,chunk', [('einsum', 4), ('einsum', 3),
                                        ('xla', 4), ('einsum', 64)])
def _assert_full_pass_matches(impl, tokens, valid, **runtime):
  """Logits and gradients of the full-sequence forward with the runtime
  choices `runtime` equal those of plain `impl` attention; cached calls
  (prefill + decode) are untouched by them."""
  ref_cfg = _cfg(attention=impl)
  params = tr.init_params(ref_cfg, jax.random.key(0))
  cfg = _cfg(attention=impl, **runtime)
  def loss(params, cfg):
    logits = _full_logits(cfg, params, tokens, valid)
    return jnp.sum(jnp.where(valid[..., None], jax.nn.log_softmax(logits),
                             0)), logits
  grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
  (ref_g, ref), (got_g, got) = grad(params, ref_cfg), grad(params, cfg)
  np.testing.assert_allclose(np.where(valid[..., None], got, 0),
                             np.where(valid[..., None], ref, 0), atol=1e-5)
  assert np.isfinite(np.asarray(got)).all()
  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(ref_g)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
  tokens, pmask, p, extra = _padded_batch()
  cached, _ = _cached_logits(cfg, params, tokens, pmask, p, extra)
  ref_cached, _ = _cached_logits(ref_cfg, params, tokens, pmask, p, extra)
  np.testing.assert_array_equal(cached, ref_cached)


@pytest.mark.parametrize('impl,chunk', [('einsum', 4), ('einsum', 3),
                                        ('xla', 4), ('einsum', 64)])
def test_attention_in_query_blocks_equals_all_at_once(impl, chunk):
  """backend.attention_chunk (L = 11: blocks of 4 and 3 leave a padded
  last block; 64 > L is one block)."""
  tokens, pmask, _, extra = _padded_batch()
  valid = jnp.concatenate([pmask, jnp.ones((3, extra), bool)], 1)
  _assert_full_pass_matches(impl, tokens, valid, attention_chunk=chunk)


def test_attention_chunk_is_validated():
  with pytest.raises(ValueError, match='attention_chunk=-1 must be >= 0'):
    _cfg(attention_chunk=-1)
  with pytest.raises(ValueError, match='causal_block=-1 must be >= 0'):
    _cfg(causal_block=-1)


@pytest.mark.parametrize('impl,block,chunk', [
    ('einsum', 8, 0), ('einsum', 16, 3), ('xla', 10, 0), ('einsum', 1, 0),
    ('einsum', 29, 0)])
def test_causal_blocks_equal_all_keys(impl, block, chunk):
  """backend.causal_block (L = 29, three left paddings: blocks of 8 leave
  one of 5), also with query chunks inside the blocks; a block of L is no
  split."""
  b, length = 3, 29
  tokens = jax.random.randint(jax.random.key(1), (b, length), 3, 23)
  valid = jnp.arange(length)[None] >= jnp.array([[0], [5], [20]])
  _assert_full_pass_matches(impl, tokens, valid, causal_block=block,
                            attention_chunk=chunk)


def test_causal_blocks_skip_only_keys_after_the_block():
  """`attend` with causal blocks under a packed-rows mask (bundles and
  branches, rlx/packing.py) equals all keys; under a mask that lets an
  early query see a later key it differs, which is the documented
  contract (full-sequence masks must be causal), not a silent pass."""
  from rlx import packing  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  r, l, n, k, h = 2, 37, 4, 2, 8
  q = jnp.asarray(rng.normal(size=(r, l, n, h)), jnp.float32)
  key = jnp.asarray(rng.normal(size=(r, k, l, h)), jnp.float32)
  val = jnp.asarray(rng.normal(size=(r, k, l, h)), jnp.float32)
  # Row 0: a prompt of 5, two responses; a second bundle; padding.
  bundle = np.zeros((r, l), np.int32)
  branch = np.zeros((r, l), np.int32)
  bundle[0, :20], branch[0, 5:12], branch[0, 12:20] = 1, 1, 2
  bundle[0, 20:33], branch[0, 26:33] = 2, 3
  bundle[1, :37], branch[1, 9:37] = 1, 1
  mask = packing.attention_mask(jnp.asarray(bundle), jnp.asarray(branch))
  ref = tr.attend(q, key, val, mask)
  got = tr.attend(q, key, val, mask, causal_block=8)
  real = np.asarray(bundle > 0)[..., None, None]
  np.testing.assert_allclose(np.where(real, got, 0), np.where(real, ref, 0),
                             atol=1e-5)
  everything = jnp.ones((r, l, l), bool)  # Not causal.
  assert not np.allclose(tr.attend(q, key, val, everything, causal_block=8),
                         tr.attend(q, key, val, everything), atol=1e-3)


def test_xla_attention_close_to_einsum_in_bfloat16():
  ref_cfg = _cfg(dtype='bfloat16')
  params = tr.init_params(ref_cfg, jax.random.key(0))
  tokens, pmask, _, extra = _padded_batch()
  valid = jnp.concatenate([pmask, jnp.ones((3, extra), bool)], 1)
  ref = _full_logits(ref_cfg, params, tokens, valid)
  got = _full_logits(_cfg(dtype='bfloat16', attention='xla'), params, tokens,
                     valid)
  assert got.dtype == jnp.float32  # Logits stay float32.
  np.testing.assert_allclose(np.where(valid[..., None], got, 0),
                             np.where(valid[..., None], ref, 0), atol=5e-2)


def test_cudnn_path_pads_odd_lengths_and_skips_the_cache(monkeypatch):
  """The cuDNN branch, run on CPU by handing its call to XLA."""
  calls = []
  xla = jax.nn.dot_product_attention
  def fake(q, k, v, *, mask, scale, implementation):
    calls.append((implementation, q.shape[1], k.shape[1]))
    assert k.shape[2] == 2 and mask.shape == (q.shape[0], 1) + (
        q.shape[1], k.shape[1])
    return xla(q, k, v, mask=mask, scale=scale, implementation='xla')
  monkeypatch.setattr(jax.nn, 'dot_product_attention', fake)
  ref_cfg = _cfg()
  params = tr.init_params(ref_cfg, jax.random.key(0))
  tokens, pmask, p, extra = _padded_batch()
  valid = jnp.concatenate([pmask, jnp.ones((3, extra), bool)], 1)
  assert tokens.shape[1] % 2 == 1  # As the learner's P + T - 1 often is.
  got = _full_logits(_cfg(attention='cudnn'), params, tokens, valid)
  ref = _full_logits(ref_cfg, params, tokens, valid)
  np.testing.assert_allclose(np.where(valid[..., None], got, 0),
                             np.where(valid[..., None], ref, 0), atol=1e-5)
  assert {c[0] for c in calls} == {'cudnn'}
  assert all(l % 2 == 0 and s % 2 == 0 for _, l, s in calls)
  calls.clear()
  _cached_logits(_cfg(attention='cudnn'), params, tokens, pmask, p, extra)
  assert calls and {c[0] for c in calls} == {'xla'}


def test_unknown_attention_is_rejected():
  with pytest.raises(ValueError, match='model.attention'):
    _cfg(attention='pallas')
