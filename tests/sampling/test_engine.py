"""Continuous batching engine: per-row cache, static equivalence, refills."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx.models import kv_cache
from rlx.models import transformer as tr
from rlx.sampling import engine as en
from rlx.sampling import sampler as sampler_lib
from rlx.types import FinishReason

V = 12
STOP = (2, 5, 7)  # Several stop tokens: a random model ends at varied steps.


def _model():
  cfg = tr.TransformerConfig(vocab_size=V, num_layers=2, embed_dim=32,
                             num_heads=2, num_kv_heads=1, head_dim=16,
                             mlp_dim=64)
  return tr.Transformer(cfg), tr.init_params(cfg, jax.random.key(0))


def _prompts(b, p, seed=0):
  """Left-padded prompts with 0..2 padding tokens."""
  rng = np.random.default_rng(seed)
  toks = rng.integers(3, V, (b, p)).astype(np.int32)
  mask = np.ones((b, p), bool)
  for i in range(b):
    toks[i, :i % 3], mask[i, :i % 3] = 0, False
  return toks, mask


def test_per_row_cache_write_and_mask_match_scalar_ones():
  rng = np.random.default_rng(0)
  layer = kv_cache.LayerCache(*(jnp.asarray(rng.normal(size=(3, 2, 7, 4)),
                                            jnp.float32) for _ in range(2)))
  k, v = (jnp.asarray(rng.normal(size=(3, 2, 2, 4)), jnp.float32)
          for _ in range(2))
  index = jnp.array([0, 3, 5])
  rows = kv_cache.write(layer, k, v, index)
  valid = jnp.asarray(rng.random((3, 7)) < 0.7)
  mask = kv_cache.causal_mask(valid, query_len=2, cache_index=index)
  for b in range(3):
    one = kv_cache.LayerCache(layer.k[b:b + 1], layer.v[b:b + 1])
    ref = kv_cache.write(one, k[b:b + 1], v[b:b + 1], int(index[b]))
    np.testing.assert_array_equal(rows.k[b], ref.k[0])
    np.testing.assert_array_equal(rows.v[b], ref.v[0])
    ref_mask = kv_cache.causal_mask(valid[b:b + 1], query_len=2,
                                    cache_index=int(index[b]))
    np.testing.assert_array_equal(mask[b], ref_mask[0])


def test_greedy_continuous_equals_static():
  """Same sequences and log-probs as the static sampler, through refills."""
  model, params = _model()
  b, g, p, t = 6, 3, 5, 10
  prompts, mask = _prompts(b, p)
  static = sampler_lib.transformer_sampler(model, sampler_lib.SamplerConfig(
      max_new_tokens=t, stop_tokens=STOP, top_k=1))
  ref = static(params, prompts, mask, jax.random.key(0), 1.0, 1.0,
               num_samples=g)
  # 4 slots for 18 responses, inserts of 2 rows, chunks of 3 steps; a wider
  # prompt window (7 > 5) exercises the left-padding of `pad_prompts`.
  engine = en.transformer_engine(model, en.EngineConfig(
      num_slots=4, prompt_len=7, max_new_tokens=t, stop_tokens=STOP,
      top_k=1, chunk_steps=3, insert_rows=2, insert_prompts=1))
  cont = en.ContinuousSampler(engine)
  out = cont(params, prompts, mask, jax.random.key(1), 1.0, 1.0,
             num_samples=g)
  lengths = np.asarray(ref.lengths)
  assert len(np.unique(lengths)) > 2  # Varied lengths: refills happen.
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_array_equal(out.lengths, lengths)
  np.testing.assert_array_equal(out.finish, ref.finish)
  np.testing.assert_array_equal(out.loss_mask, ref.loss_mask)
  np.testing.assert_allclose(out.logp, ref.logp, atol=1e-5)
  np.testing.assert_allclose(out.entropy, ref.entropy, atol=1e-5)
  stats = cont.last_stats
  assert stats['insert_calls'] >= 9  # 18 jobs, 2 rows per insert.
  # The first token of each response is sampled at insert, the others by
  # live slots in decode steps.
  assert stats['busy_slot_steps'] == lengths.sum() - b * g
  assert stats['slot_utilisation'] == pytest.approx(
      (lengths.sum() - b * g) / (4 * stats['decode_steps']))


def test_no_recompilation_across_refills_and_resumes():
  model, params = _model()
  # One compilation each of fresh insert, resume insert (T=6 < the resume
  # bucket: one window) and decode traces the model three times; any
  # recompilation would trace it again.
  apply = chex.assert_max_traces(
      lambda prm, *a: model.apply({'params': prm}, *a)[:2], n=3)
  init = lambda b, s: kv_cache.init_cache(num_layers=2, batch=b, length=s,
                                          num_kv_heads=1, head_dim=16)
  cfg = en.EngineConfig(num_slots=3, prompt_len=5, max_new_tokens=6,
                        stop_tokens=STOP, chunk_steps=2, insert_rows=2)
  engine = en.make_engine(apply, init, cfg)
  en.precompile(engine, params)  # Every later call reuses these programs.
  state = engine.init(jax.random.key(0))
  for i, (temp, top_p) in enumerate([(1.0, 1.0), (0.5, 0.9), (2.0, 0.3)]):
    prompts, mask = _prompts(4 + i, 5, seed=i)
    j = len(prompts)
    prefix = en.empty_tracks((j,), 6)
    # Half the jobs stop after 2 chunks; the next call resumes them.
    calls = iter(range(100))
    state, out, _ = en.run(engine, params, state, prompts, mask, prefix,
                           temperature=temp, top_p=top_p, version=i,
                           stop=lambda done, c=calls: next(c) >= 2)
    state, out, _ = en.run(engine, params, state, prompts, mask, out,
                           temperature=temp, top_p=top_p, version=i + 1)
    assert np.all(out.finish != int(FinishReason.RUNNING))
  # Same executables too (jit also keys on device placement).
  assert engine.decode._cache_size() == 1  # pylint: disable=protected-access
  assert engine.insert._cache_size() == 2  # pylint: disable=protected-access


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match='num_slots'):
    en.EngineConfig(num_slots=0, prompt_len=4, max_new_tokens=4,
                    stop_tokens=(2,))
  with pytest.raises(ValueError, match='insert_rows'):
    en.EngineConfig(num_slots=2, prompt_len=4, max_new_tokens=4,
                    stop_tokens=(2,), insert_rows=3)
  with pytest.raises(ValueError, match='prompt_len=4'):
    en.pad_prompts(np.zeros((1, 6), np.int32), np.ones((1, 6), bool), 4)
