"""APRIL: exactly-once completion, resumed prefixes, versions, checkpoints."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx import checkpoint
from rlx import learner
from rlx.models import kv_cache
from rlx.models import transformer as tr
from rlx.sampling import partial_buffer as pb
from rlx.sampling import engine as en
from rlx.sampling import partial
from rlx.sampling import sampler as sampler_lib
from rlx.types import FinishReason

V, EOS, P, T, G = 16, 2, 4, 10, 3
STOP, LENGTH = int(FinishReason.STOP), int(FinishReason.LENGTH)
# Fake logits per response index i (rows), EOS and pad never sampled.
_TABLE = np.random.default_rng(0).normal(size=(T, V)).astype(np.float32)
_TABLE[:, [0, EOS]] = -1e9


def _fake_logits(target, positions):
  """[B, 1] target lengths, [B, L] positions -> [B, L, V] logits.

  The logits predicting response token i (fed at position P - 1 + i: prompts
  fill the whole window) are row i of a fixed table, except that EOS is
  certain at i = target - 1: responses have length min(target, T).
  """
  i = positions - (P - 1)
  logits = jnp.asarray(_TABLE)[jnp.clip(i, 0, T - 1)]
  eos = jax.nn.one_hot(EOS, V) * 2e9
  return jnp.where((i == target - 1)[..., None], logits + eos, logits)


def _fake_model():
  """apply_fn / init_cache_fn; the prompt's first token is the target
  length, kept in a one-column cache (tokens are otherwise ignored)."""

  def apply_fn(params, tokens, positions, mask, cache, index):
    del params, mask
    if not isinstance(index, jax.Array) and index == 0:  # Prompt prefill.
      cache = (tokens[:, :1],)
    return _fake_logits(cache[0], positions), cache

  return apply_fn, lambda b, s: (jnp.zeros((b, 1), jnp.int32),)


def _sampler(num_slots=5, target=3, inflight=0, chunk=3, keep_kv=False):
  engine = en.make_engine(*_fake_model(), en.EngineConfig(
      num_slots=num_slots, prompt_len=P, max_new_tokens=T,
      stop_tokens=(EOS,), chunk_steps=chunk, insert_rows=2,
      prefill_prompts=1))
  return partial.AprilSampler(
      engine, partial.AprilConfig(target, inflight, keep_kv=keep_kv),
      group_size=G)


def _new_prompts(rng, ids):
  """Prompts whose first token is the target length (1 .. T + 3)."""
  prompts = rng.integers(3, V, (len(ids), P)).astype(np.int32)
  prompts[:, 0] = rng.integers(1, T + 4, len(ids))
  return prompts, np.ones_like(prompts, bool)


def _check_group(batch, g, prompt, admitted, step):
  """Lengths, tokens, log-probs and versions of returned group g."""
  target = int(prompt[0])
  ro = jax.tree.map(lambda x: x[g], batch.rollout)
  version = batch.version[g]
  n = min(target, T)
  np.testing.assert_array_equal(ro.lengths, n)
  np.testing.assert_array_equal(ro.finish, STOP if target <= T else LENGTH)
  x = _TABLE[:n].astype(np.float64)
  ref = x - x.max(-1, keepdims=True)
  ref -= np.log(np.exp(ref).sum(-1, keepdims=True))
  for s in range(G):
    toks, lp = ro.tokens[s, :n], ro.logp[s, :n]
    if target <= T:
      assert toks[-1] == EOS and lp[-1] == pytest.approx(0.0, abs=1e-5)
      toks, lp, ref_s = toks[:-1], lp[:-1], ref[:n - 1]
    else:
      ref_s = ref
    np.testing.assert_allclose(lp, np.take_along_axis(
        ref_s, toks[:, None], 1)[:, 0], atol=1e-5)
    v = version[s, :n]
    assert np.all(np.diff(v) >= 0) and admitted <= v[0] and v[-1] <= step
    np.testing.assert_array_equal(version[s, n:], -1)
    np.testing.assert_array_equal(ro.tokens[s, n:], 0)


@pytest.mark.parametrize('keep_kv', [False, True])
def test_every_prompt_completes_exactly_once_and_prefixes_are_kept(keep_kv):
  """Property test: random lengths over many steps (partial responses
  re-prefilled, or continued in the slot that holds their cache)."""
  sampler = _sampler(keep_kv=keep_kv)
  partial_rows = 0  # Unfinished responses with tokens in the buffer.
  rng = np.random.default_rng(1)
  buf = sampler.init_buffer()
  prompts_by_id, admitted_at, returned, next_id = {}, {}, [], 0
  carried = {}  # (prompt id, sample) -> (tokens, logp, version) so far.
  for step in range(12):
    n = sampler.prompts_needed(buf)
    assert n == (6 if step == 0 else 3)
    ids = np.arange(next_id, next_id + n)
    next_id += n
    prompts, mask = _new_prompts(rng, ids)
    for i, pid in enumerate(ids):
      prompts_by_id[pid], admitted_at[pid] = prompts[i], step
    lengths_before = pb.take(buf)[0].tracks.length.sum()
    batch, buf, metrics = sampler(None, buf, prompts, mask, ids,
                                  jax.random.key(step), 1.0, version=step)
    batch = jax.device_get(batch)
    if keep_kv:  # Every one of them went on in its slot: no re-prefill.
      assert metrics['rollout/kept_kv_rows'] == partial_rows
    else:
      assert 'rollout/kept_kv_rows' not in metrics
    assert metrics['rollout/sampled_tokens'] == (
        batch.rollout.lengths.sum() + pb.take(buf)[0].tracks.length.sum()
        - lengths_before)
    for g, pid in enumerate(batch.prompt_id):
      np.testing.assert_array_equal(batch.prompt[g], prompts_by_id[pid])
      _check_group(batch, g, prompts_by_id[pid], admitted_at[pid], step)
      for s in range(G):  # Resumed responses kept their earlier tokens.
        if (pid, s) in carried:
          toks, lp, ver = carried.pop((pid, s))
          k = len(toks)
          np.testing.assert_array_equal(batch.rollout.tokens[g, s, :k], toks)
          np.testing.assert_array_equal(batch.rollout.logp[g, s, :k], lp)
          np.testing.assert_array_equal(batch.version[g, s, :k], ver)
    returned += batch.prompt_id.tolist()
    assert pb.size(buf) == 3 and metrics['rollout/buffer_groups'] == 3
    pb.validate(buf, max_new_tokens=T)  # What a resume would check.
    held, _ = pb.take(buf)
    partial_rows = int(np.sum((held.tracks.length > 0) &
                              (held.tracks.finish == int(
                                  FinishReason.RUNNING))))
    for c, pid in enumerate(held.prompt_id):
      for s in range(G):
        k = held.tracks.length[c, s]
        carried[(int(pid), s)] = (held.tracks.tokens[c, s, :k],
                                  held.tracks.logp[c, s, :k],
                                  held.tracks.version[c, s, :k])
  in_buffer = pb.take(buf)[0].prompt_id.tolist()
  assert len(returned) == len(set(returned)) == 12 * 3  # No duplicates.
  assert sorted(returned + in_buffer) == list(range(next_id))  # None lost.
  assert not set(carried) - {(p, s) for p in in_buffer for s in range(G)}
  if keep_kv:
    assert partial_rows > 0


def _real_model():
  cfg = tr.TransformerConfig(vocab_size=V, num_layers=2, embed_dim=32,
                             num_heads=2, num_kv_heads=1, head_dim=16,
                             mlp_dim=64)
  return tr.Transformer(cfg), tr.init_params(cfg, jax.random.key(0))


def test_resume_under_new_weights_keeps_old_logprobs():
  """Real transformer: tokens of version v have the log-probs of weights v."""
  model, p0 = _real_model()
  params = [p0, jax.tree.map(lambda x: x * 1.5, p0)]  # New weights.
  engine = en.transformer_engine(model, en.EngineConfig(
      num_slots=4, prompt_len=P, max_new_tokens=T, stop_tokens=(EOS, 5, 7),
      chunk_steps=2, insert_rows=3, prefill_prompts=2,
      prefill_bucket=4))  # Several prefill widths.
  sampler = partial.AprilSampler(engine, partial.AprilConfig(2),
                                 group_size=G)
  rng = np.random.default_rng(0)
  buf = sampler.init_buffer()
  logits_fn = lambda prm, *a: model.apply({'params': prm}, *a)[0]
  logprobs = jax.jit(lambda prm, *a: learner.response_logprobs(
      logits_fn, prm, *a, temperature=0.9)[0])
  for step in range(2):
    n = sampler.prompts_needed(buf)
    prompts, mask = _new_prompts(rng, range(n))
    batch, buf, metrics = sampler(params[step], buf, prompts, mask,
                                  np.arange(n) + 10 * step,
                                  jax.random.key(step), 0.9, 0.95,
                                  version=step)
  version = np.asarray(batch.version)
  lm = np.asarray(batch.rollout.loss_mask)
  assert np.any(lm & (version == 0)) and np.any(lm & (version == 1))
  for v in (0, 1):
    logp = logprobs(params[v], jnp.repeat(batch.prompt, G, 0),
                    jnp.repeat(batch.prompt_mask, G, 0),
                    batch.rollout.tokens.reshape(-1, T))
    sel = (lm & (version == v)).reshape(-1, T)
    np.testing.assert_allclose(np.asarray(logp)[sel],
                               np.asarray(batch.rollout.logp).reshape(
                                   -1, T)[sel], atol=1e-4)
  frac = np.sum(lm & (version == 0)) / np.sum(lm)
  assert metrics['rollout/off_policy_token_frac'] == pytest.approx(frac)
  assert metrics['rollout/staleness/1'] == pytest.approx(frac)


def test_validate_names_what_is_wrong_with_a_buffer():
  sampler = _sampler()
  buf = sampler.init_buffer()
  ids = np.arange(6)
  _, buf, _ = sampler(None, buf, *_new_prompts(np.random.default_rng(3),
                                                ids), ids,
                      jax.random.key(0), 1.0, version=0)
  pb.validate(buf, max_new_tokens=T)
  tr = buf.groups.tracks
  g, i = np.argwhere(tr.finish[:3] == int(FinishReason.RUNNING))[0]

  def broken(**fields):
    new = {k: np.array(v) for k, v in tr._asdict().items()}
    for name, value in fields.items():
      new[name][g, i] = value
    return buf._replace(groups=buf.groups._replace(
        tracks=type(tr)(**new)))

  with pytest.raises(ValueError, match=f'group {g} sample {i} has length '
                     f'{T} and finish'):
    pb.validate(broken(length=T), max_new_tokens=T)
  with pytest.raises(ValueError, match='finish 7'):
    pb.validate(broken(finish=7), max_new_tokens=T)
  versions = np.array(tr.version[g, i])
  versions[tr.length[g, i]] = 0  # One past the length.
  with pytest.raises(ValueError, match='versions'):
    pb.validate(broken(version=versions), max_new_tokens=T)
  with pytest.raises(ValueError, match='count 9'):
    pb.validate(buf._replace(count=np.asarray(9, np.int32)),
                max_new_tokens=T)
  with pytest.raises(ValueError, match='max_new_tokens is 5'):
    pb.validate(buf, max_new_tokens=5)


def test_buffer_checkpoint_round_trip_resumes_identically(tmp_path):
  sampler = _sampler()
  rng = np.random.default_rng(2)
  buf = sampler.init_buffer()
  ids = np.arange(6)
  _, buf, _ = sampler(None, buf, *_new_prompts(rng, ids), ids,
                      jax.random.key(0), 1.0, version=0)
  assert pb.size(buf) == 3 and np.any(buf.groups.tracks.length > 0)
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'ckpt'))
  ckpt.save(1, {'partial': buf}, {'step': 1})
  abstract = {'partial': jax.eval_shape(sampler.init_buffer)}
  restored, _ = ckpt.restore(1, abstract)
  restored = restored['partial']
  ckpt.close()
  assert isinstance(restored, pb.PartialBuffer)
  jax.tree.map(np.testing.assert_array_equal, restored, buf)
  ids = np.arange(6, 9)
  new = _new_prompts(rng, ids)
  outs = [sampler(None, b, *new, ids, jax.random.key(1), 1.0, version=1)
          for b in (buf, restored)]
  jax.tree.map(np.testing.assert_array_equal, outs[0][:2], outs[1][:2])


def test_off_policy_mask_and_metrics_match_numpy():
  rng = np.random.default_rng(0)
  version = rng.integers(0, 6, (2, 3, 5)).astype(np.int32)
  lm = rng.random((2, 3, 5)) < 0.7
  ro = en.to_rollout(en.Tracks(
      tokens=np.zeros((6, 5), np.int32), logp=np.zeros((6, 5), np.float32),
      entropy=np.zeros((6, 5), np.float32), version=version.reshape(6, 5),
      length=np.full((6,), 5, np.int32), finish=np.ones((6,), np.int32)), 3)
  batch = partial.AprilBatch(ro._replace(loss_mask=jnp.asarray(lm)),
                             jnp.asarray(version), *([None] * 3))
  keep = partial.off_policy_loss_mask(batch, current_version=5, mode='keep')
  masked = partial.off_policy_loss_mask(batch, current_version=5,
                                        mode='mask')
  np.testing.assert_array_equal(keep, lm)
  np.testing.assert_array_equal(masked, lm & (version >= 5))
  m = partial.rollout_metrics(version, lm, current_version=5)
  age = 5 - version[lm]
  assert m['rollout/off_policy_token_frac'] == pytest.approx(np.mean(age > 0))
  for k, ref in (('0', age == 0), ('1', age == 1), ('2', age == 2),
                 ('3+', age >= 3)):
    assert m[f'rollout/staleness/{k}'] == pytest.approx(np.mean(ref))
  with pytest.raises(ValueError, match='off-policy mode'):
    partial.off_policy_loss_mask(batch, current_version=5, mode='tis')


def test_errors():
  with pytest.raises(ValueError, match='inflight_groups=2'):
    partial.AprilConfig(target_groups=3, inflight_groups=2)
  sampler = _sampler()
  buf = sampler.init_buffer()
  with pytest.raises(ValueError, match='needs 6 new prompts'):
    sampler(None, buf, *_new_prompts(np.random.default_rng(0), range(3)),
            np.arange(3), jax.random.key(0), 1.0, version=0)
  groups = pb.empty_groups(4, group_size=G, prompt_len=P, max_new_tokens=T)
  with pytest.raises(ValueError, match='overflow: 0 held \\+ 4 new > '
                     'capacity 3'):
    pb.put(buf, groups)


# ------------------------------------------------ keep_kv (in-flight update)


def _real_sampler(model, *, keep_kv, top_k=0, target=2):
  engine = en.transformer_engine(model, en.EngineConfig(
      num_slots=4, prompt_len=P, max_new_tokens=T, stop_tokens=(EOS, 5, 7),
      top_k=top_k, chunk_steps=2, insert_rows=3, prefill_prompts=2,
      prefill_bucket=4))
  return partial.AprilSampler(
      engine, partial.AprilConfig(target, keep_kv=keep_kv), group_size=G)


@functools.lru_cache
def _jitted_fns(model):
  apply_fn, init_cache = sampler_lib.transformer_fns(model)
  return jax.jit(apply_fn), init_cache


def _cached_logprobs(model, params_at, prompt, prompt_mask, tokens, history,
                     temperature):
  """Reference behaviour log-probs of one response decoded on one cache.

  `history` is [(step, length at the end of that step)]: in each step the
  tokens fed then (the prompt, then every sampled token but the last) are
  written to the cache by that step's weights `params_at[step]`, as one
  multi-token forward over the cache so far. Returns the log-probs of
  response tokens [0, last length).
  """
  apply_fn, init_cache = _jitted_fns(model)
  s = P + T
  valid = np.zeros((1, s), bool)
  valid[0, :P] = prompt_mask
  valid[0, P:] = True
  positions = kv_cache.positions_from_mask(jnp.asarray(valid))
  seq = jnp.asarray(np.concatenate([prompt, tokens])[None], jnp.int32)
  cache, col, done, out = init_cache(1, s), 0, 0, []
  for step, length in history:
    end = P + length - 1  # Columns [col, end) are fed in this step.
    if end == col:
      continue
    seen = valid & (np.arange(s) < end)
    index = jnp.array([col])
    logits, cache = apply_fn(
        params_at[step], seq[:, col:end], positions[:, col:end],
        kv_cache.causal_mask(jnp.asarray(seen), query_len=end - col,
                             cache_index=index), cache, index)
    logp = np.asarray(jax.nn.log_softmax(logits[0] / temperature, -1))
    for i in range(done, length):  # Token i is predicted at column P+i-1.
      out.append(logp[P + i - 1 - col, tokens[i]])
    col, done = end, length
  return np.array(out)


def test_keep_kv_tokens_follow_the_kept_cache_and_carry_its_version():
  """Weights change every step. A response kept in its slot goes on under
  the new weights over the cache that earlier weights wrote: its log-probs
  are those of that mixed cache (a reference fed step by step), and all of
  its tokens carry the version of the step it started in."""
  model, p0 = _real_model()
  params_at = [jax.tree.map(lambda x, v=v: x * (1 + 0.25 * v), p0)
               for v in range(3)]
  sampler = _real_sampler(model, keep_kv=True)
  rng = np.random.default_rng(0)
  buf = sampler.init_buffer()
  history = {}  # (prompt id, sample) -> [(step, length at its end)].
  multi = kept = 0
  for step in range(3):
    n = sampler.prompts_needed(buf)
    prompts, mask = _new_prompts(rng, range(n))
    ids = np.arange(n) + 10 * step
    batch, buf, metrics = sampler(params_at[step], buf, prompts, mask, ids,
                                  jax.random.key(step), 0.9, 0.95,
                                  version=step)
    kept += metrics['rollout/kept_kv_rows']
    batch = jax.device_get(batch)
    held, _ = pb.take(buf)
    for grp, tracks in ((held.prompt_id, held.tracks),
                        (batch.prompt_id, en.Tracks(
                            *(np.asarray(x) for x in (
                                batch.rollout.tokens, batch.rollout.logp,
                                batch.rollout.entropy, batch.version,
                                batch.rollout.lengths,
                                batch.rollout.finish))))):
      for c, pid in enumerate(grp):
        for s in range(G):
          rows = history.setdefault((int(pid), s), [])
          length = int(tracks.length[c, s])
          if length and (not rows or rows[-1][1] < length):
            rows.append((step, length))
    for g, pid in enumerate(batch.prompt_id):
      for s in range(G):
        hist, n = history[(int(pid), s)], int(batch.rollout.lengths[g, s])
        ref = _cached_logprobs(model, params_at, batch.prompt[g],
                               batch.prompt_mask[g],
                               batch.rollout.tokens[g, s], hist, 0.9)
        np.testing.assert_allclose(batch.rollout.logp[g, s, :n], ref,
                                   atol=1e-4)
        np.testing.assert_array_equal(batch.version[g, s, :n], hist[0][0])
        if len(hist) > 1:  # Not what the latest weights alone would give.
          alone = _cached_logprobs(model, params_at, batch.prompt[g],
                                   batch.prompt_mask[g],
                                   batch.rollout.tokens[g, s],
                                   [(step, n)], 0.9)
          assert np.max(np.abs(alone - ref)) > 1e-3
          multi += 1
    lm = np.asarray(batch.rollout.loss_mask)
    assert metrics['rollout/off_policy_token_frac'] == pytest.approx(
        np.sum(lm & (batch.version < step)) / np.sum(lm))
  assert multi > 0 and kept > 0


@pytest.mark.parametrize('keep_kv', [False, True])
def test_greedy_april_equals_static_decoding(keep_kv):
  """Unchanged weights, greedy: re-prefilled and kept caches both give each
  prompt exactly the static sampler's responses and log-probs."""
  model, params = _real_model()
  sampler = _real_sampler(model, keep_kv=keep_kv, top_k=1)
  static = sampler_lib.transformer_sampler(model, sampler_lib.SamplerConfig(
      max_new_tokens=T, stop_tokens=(EOS, 5, 7), top_k=1))
  rng = np.random.default_rng(3)
  buf, kept, next_id = sampler.init_buffer(), 0, 0
  for step in range(4):
    n = sampler.prompts_needed(buf)
    prompts, mask = _new_prompts(rng, range(n))
    prompts[:, :1] = rng.integers(3, V, (n, 1))  # No special first token.
    batch, buf, metrics = sampler(params, buf, prompts, mask,
                                  np.arange(next_id, next_id + n),
                                  jax.random.key(step), 1.0, version=step)
    next_id += n
    kept += metrics.get('rollout/kept_kv_rows', 0)
    batch = jax.device_get(batch)
    ref = static(params, batch.prompt, batch.prompt_mask,
                 jax.random.key(0), 1.0, 1.0, num_samples=G)
    np.testing.assert_array_equal(batch.rollout.tokens, ref.tokens)
    np.testing.assert_array_equal(batch.rollout.lengths, ref.lengths)
    np.testing.assert_allclose(batch.rollout.logp, ref.logp, atol=1e-5)
  assert (kept > 0) == keep_kv


def test_keep_kv_falls_back_to_prefill_for_another_buffer():
  """Kept caches are used only for the buffer the sampler returned: a
  restored copy in a new sampler (a restarted run), or a different buffer,
  is re-prefilled; nothing is lost either way."""
  sampler = _sampler(keep_kv=True)
  rng = np.random.default_rng(4)
  ids = np.arange(6)
  _, buf, _ = sampler(None, sampler.init_buffer(), *_new_prompts(rng, ids),
                      ids, jax.random.key(0), 1.0, version=0)
  held, _ = pb.take(buf)
  running = (held.tracks.finish == int(FinishReason.RUNNING)) & (
      held.tracks.length > 0)
  assert np.any(running)
  ids = np.arange(6, 9)
  new = _new_prompts(rng, ids)
  # A restarted run: a new sampler (no kept slots) and the restored buffer.
  fresh = _sampler(keep_kv=True)
  batch, _, metrics = fresh(None, buf, *new, ids, jax.random.key(1), 1.0,
                            version=1)
  assert metrics['rollout/kept_kv_rows'] == 0
  # A buffer that is not the returned one: the kept slots are freed.
  edited = buf._replace(groups=buf.groups._replace(
      tracks=buf.groups.tracks._replace(
          length=np.where(running, 1, buf.groups.tracks.length))))
  edited_held, _ = pb.take(edited)
  batch, _, metrics = sampler(None, edited, *new, ids, jax.random.key(1),
                              1.0, version=1)
  assert metrics['rollout/kept_kv_rows'] == 0
  batch = jax.device_get(batch)
  for g, pid in enumerate(batch.prompt_id):  # Resumed from the edited rows.
    c = np.flatnonzero(edited_held.prompt_id == pid)
    for s in range(G):
      if len(c) and running[c[0], s]:
        assert batch.rollout.tokens[g, s, 0] == held.tracks.tokens[c[0], s, 0]


def test_resident_map_is_checked():
  engine = _sampler().engine
  state = engine.init(jax.random.key(0))
  prompts, mask = _new_prompts(np.random.default_rng(0), range(2))
  prefix = en.empty_tracks((2,), T)
  with pytest.raises(ValueError, match='shape'):
    en.run(engine, None, state, prompts, mask, prefix, temperature=1.0,
           top_p=1.0, version=0, resident=np.array([0, -1]))
  with pytest.raises(ValueError, match=r'slots \[1\] are not live'):
    en.run(engine, None, state, prompts, mask, prefix, temperature=1.0,
           top_p=1.0, version=0, resident=np.array([-1, 0, -1, -1, -1]))
  with pytest.raises(ValueError, match='not in the queue of 2'):
    en.run(engine, None, state, prompts, mask, prefix, temperature=1.0,
           top_p=1.0, version=0, resident=np.array([-1, 5, -1, -1, -1]))
