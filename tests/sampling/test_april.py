"""APRIL: exactly-once completion, resumed prefixes, versions, checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx import checkpoint
from rlx import learner
from rlx.models import transformer as tr
from rlx.replay import partial_buffer as pb
from rlx.sampling import engine as en
from rlx.sampling import partial
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
    if not isinstance(index, jax.Array):  # Prefill (fresh or resume).
      cache = (tokens[:, :1],)
    return _fake_logits(cache[0], positions), cache

  return apply_fn, lambda b, s: (jnp.zeros((b, 1), jnp.int32),)


def _sampler(num_slots=5, target=3, inflight=0, chunk=3):
  engine = en.make_engine(*_fake_model(), en.EngineConfig(
      num_slots=num_slots, prompt_len=P, max_new_tokens=T,
      stop_tokens=(EOS,), chunk_steps=chunk, insert_rows=2,
      insert_prompts=1))
  return partial.AprilSampler(
      engine, partial.AprilConfig(target, inflight), group_size=G)


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


def test_every_prompt_completes_exactly_once_and_prefixes_are_kept():
  """Property test: random lengths over many steps."""
  sampler = _sampler()
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
    batch, buf, metrics = sampler(None, buf, prompts, mask, ids,
                                  jax.random.key(step), 1.0, version=step)
    batch = jax.device_get(batch)
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
    held, _ = pb.take(buf)
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


def test_resume_under_new_weights_keeps_old_logprobs():
  """Real transformer: tokens of version v have the log-probs of weights v."""
  cfg = tr.TransformerConfig(vocab_size=V, num_layers=2, embed_dim=32,
                             num_heads=2, num_kv_heads=1, head_dim=16,
                             mlp_dim=64)
  model = tr.Transformer(cfg)
  p0 = tr.init_params(cfg, jax.random.key(0))
  params = [p0, jax.tree.map(lambda x: x * 1.5, p0)]  # New weights.
  engine = en.transformer_engine(model, en.EngineConfig(
      num_slots=4, prompt_len=P, max_new_tokens=T, stop_tokens=(EOS, 5, 7),
      chunk_steps=2, insert_rows=3, insert_prompts=2,
      resume_bucket=4))  # Resume windows P + 4, 8, 10.
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
