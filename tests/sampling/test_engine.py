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
      top_k=1, chunk_steps=3, insert_rows=2, prefill_prompts=1,
      prefill_bucket=2))  # Prefills narrower than the window.
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


@pytest.mark.parametrize('resume', [False, True])
def test_insert_equals_prefilling_each_row_whole(resume):
  """A prompt prefill (two prompts over their real tokens only) and an
  insert of four rows from it (resumed rows prefilling partial responses
  of 1 to 6 tokens over a copy of their prompt's cache) leave each slot as
  prefilling that row's whole window at once would: the same keys and
  values at every valid column, validity, next position, and greedy token
  with its log-prob."""
  model, params = _model()
  p, t, m = 7, 10, 4
  cfg = en.EngineConfig(num_slots=5, prompt_len=p, max_new_tokens=t,
                        stop_tokens=(), insert_rows=m, prefill_prompts=2,
                        top_k=1, prefill_bucket=2)
  engine = en.transformer_engine(model, cfg)
  rng = np.random.default_rng(1)
  prompts = rng.integers(3, V, (2, p)).astype(np.int32)
  mask = np.arange(p)[None] >= np.array([[4], [3]])  # 3 and 4 real tokens.
  prompts[~mask] = 0
  source = np.array([0, 1, 1, 0], np.int32)
  length = np.array([6, 1, 3, 2] if resume else [0] * m, np.int32)
  tokens = rng.integers(3, V, (m, t)).astype(np.int32)
  tokens[np.arange(t)[None] >= length[:, None]] = 0
  prefix = en.empty_tracks((m,), t)._replace(tokens=tokens, length=length)
  slot = np.array([4, 0, 2, 1], np.int32)
  prompt_width = cfg.width(4, resume=False)
  width = cfg.width(int(length.max()), resume=True) if resume else 0
  assert prompt_width < p and width < t  # Narrower than the whole window.
  pool = engine.prefill(params, prompts, mask, width=prompt_width)
  got = jax.device_get(engine.insert(
      params, engine.init(jax.random.key(3)), pool,
      en.Requests(slot=slot, source=source, prefix=prefix),
      jnp.float32(1.0), jnp.float32(1.0), jnp.int32(0), width=width))
  # Reference: every row's prompt and prefix in one prefill of P + T.
  full = np.concatenate([prompts[source], tokens], 1)
  valid = np.concatenate([mask[source],
                          np.arange(t)[None] < length[:, None]], 1)
  positions = kv_cache.positions_from_mask(jnp.asarray(valid))
  logits, _, _ = model.apply(
      {'params': params}, jnp.asarray(full), positions,
      kv_cache.causal_mask(jnp.asarray(valid), query_len=p + t,
                           cache_index=0),
      kv_cache.init_cache(num_layers=2, batch=m, length=p + t,
                          num_kv_heads=1, head_dim=16), 0)
  last = p - 1 + length
  ref_logp = np.asarray(jax.nn.log_softmax(logits[np.arange(m), last]))
  ref_cache = model.apply({'params': params}, jnp.asarray(full), positions,
                          kv_cache.causal_mask(jnp.asarray(valid),
                                               query_len=p + t,
                                               cache_index=0),
                          kv_cache.init_cache(num_layers=2, batch=m,
                                              length=p + t, num_kv_heads=1,
                                              head_dim=16), 0)[1]
  np.testing.assert_array_equal(got.kv_valid[slot], valid)
  np.testing.assert_array_equal(got.next_pos[slot],
                                np.asarray(positions)[np.arange(m), last] + 1)
  tr_got = jax.tree.map(lambda x: x[slot], got.tracks)
  np.testing.assert_array_equal(tr_got.length, length + 1)
  token = tr_got.tokens[np.arange(m), length]
  np.testing.assert_array_equal(token, ref_logp.argmax(-1))
  np.testing.assert_allclose(tr_got.logp[np.arange(m), length],
                             ref_logp[np.arange(m), token], atol=1e-5)
  kept = np.arange(t)[None] < length[:, None]  # The partial responses.
  np.testing.assert_array_equal(tr_got.tokens[kept], tokens[kept])
  v = valid[:, None, :, None]  # Over [M, K, S, H].
  for lg, lr in zip(got.cache, ref_cache):
    for x, y in ((lg.k[slot], lr.k), (lg.v[slot], lr.v)):
      np.testing.assert_allclose(np.where(v, x, 0), np.where(v, y, 0),
                                 atol=1e-5)


def test_resumed_padded_prompts_continue_as_static_greedy():
  """Responses stopped after two chunks and resumed by re-prefill (blocks
  narrower than window plus prefix: prompts have 0 to 2 padding columns
  in a window of 7) end exactly as the static sampler's greedy ones."""
  model, params = _model()
  b, g, p, t = 6, 3, 5, 10
  prompts, mask = _prompts(b, p)
  static = sampler_lib.transformer_sampler(model, sampler_lib.SamplerConfig(
      max_new_tokens=t, stop_tokens=STOP, top_k=1))
  ref = jax.device_get(static(params, prompts, mask, jax.random.key(0), 1.0,
                              1.0, num_samples=g))
  engine = en.transformer_engine(model, en.EngineConfig(
      num_slots=4, prompt_len=7, max_new_tokens=t, stop_tokens=STOP,
      top_k=1, chunk_steps=3, insert_rows=2, prefill_prompts=1,
      prefill_bucket=2))
  wide, wide_mask = en.pad_prompts(prompts, mask, 7)
  state = engine.init(jax.random.key(1))
  job_prompt = np.repeat(np.arange(b), g)
  out = en.empty_tracks((b * g,), t)
  calls = iter(range(1000))
  state, out, _ = en.run(engine, params, state, wide, wide_mask, out,
                         temperature=1.0, top_p=1.0, version=0,
                         job_prompt=job_prompt,
                         stop=lambda done: next(calls) >= 2)
  resumed = (out.finish == int(FinishReason.RUNNING)) & (out.length > 0)
  assert resumed.sum() >= 2
  state, out, stats = en.run(engine, params, state, wide, wide_mask, out,
                             temperature=1.0, top_p=1.0, version=1,
                             job_prompt=job_prompt)
  np.testing.assert_array_equal(out.tokens, ref.tokens.reshape(b * g, t))
  np.testing.assert_array_equal(out.length, ref.lengths.reshape(-1))
  np.testing.assert_allclose(out.logp, ref.logp.reshape(b * g, t),
                             atol=1e-5)


def test_no_recompilation_across_refills_and_resumes():
  model, params = _model()
  # One compilation each of the prompt prefill, the resume insert (P and T
  # are below the prefill bucket: one width each) and decode traces the
  # model three times (a fresh insert only copies caches); any
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
  assert engine.prefill._cache_size() == 1  # pylint: disable=protected-access


def test_precompile_without_resume_covers_every_fresh_rollout():
  """What continuous mode compiles up front (prompt widths 2, 4 and 5 and
  the fresh insert) serves rollouts of prompts of any length."""
  model, params = _model()
  cfg = en.EngineConfig(num_slots=3, prompt_len=5, max_new_tokens=6,
                        stop_tokens=STOP, chunk_steps=2, insert_rows=2,
                        prefill_prompts=1, prefill_bucket=2)
  engine = en.transformer_engine(model, cfg)
  en.precompile(engine, params, resume=False)
  sizes = lambda: (engine.prefill._cache_size(), engine.insert._cache_size())  # pylint: disable=protected-access
  assert sizes() == (3, 1)
  state = engine.init(jax.random.key(0))
  for i in range(3):
    prompts, mask = _prompts(4 + i, 5, seed=i)
    state, out, _ = en.run(engine, params, state, prompts, mask,
                           en.empty_tracks((len(prompts),), 6),
                           temperature=1.0, top_p=1.0, version=i)
    assert np.all(out.finish != int(FinishReason.RUNNING))
  assert sizes() == (3, 1)


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match='num_slots'):
    en.EngineConfig(num_slots=0, prompt_len=4, max_new_tokens=4,
                    stop_tokens=(2,))
  with pytest.raises(ValueError, match='insert_rows'):
    en.EngineConfig(num_slots=2, prompt_len=4, max_new_tokens=4,
                    stop_tokens=(2,), insert_rows=3)
  with pytest.raises(ValueError, match='prompt_len=4'):
    en.pad_prompts(np.zeros((1, 6), np.int32), np.ones((1, 6), bool), 4)
