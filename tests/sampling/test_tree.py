"""Tree rollouts: KV forking, leaf budgets, prefixes, LATR rules, counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx import learner
from rlx.models import kv_cache
from rlx.models import transformer as tr
from rlx.sampling import sampler as sampler_lib
from rlx.sampling import tree
from rlx.sampling import tree_rules as rules
from rlx.types import FinishReason

V = 12
STOP = 1
_STOP, _LENGTH = int(FinishReason.STOP), int(FinishReason.LENGTH)


# ------------------------------------------------------------- fake models

def _sequence_model(seq, prompt_len, sharpness=40.0):
  """Emits seq[i] at response step i (unpadded prompts of prompt_len)."""
  seq = jnp.asarray(seq)

  def apply_fn(params, tokens, positions, mask, cache, index):
    del params, tokens, mask, index
    step = jnp.clip(positions - prompt_len + 1, 0, seq.shape[0] - 1)
    return jax.nn.one_hot(seq[step], V) * sharpness, cache

  return apply_fn, lambda b, s: ()


def _markov_model(logits_table):
  """Next-token logits depend only on the last token: table[last]."""
  table = jnp.asarray(logits_table, jnp.float32)

  def apply_fn(params, tokens, positions, mask, cache, index):
    del params, positions, mask, index
    return table[tokens], cache

  return apply_fn, lambda b, s: ()


_HASH = 997
_HASH_TABLE = np.random.default_rng(0).normal(size=(_HASH, V)).astype(
    np.float32) * 1.5


def _hash_model():
  """Logits = table[hash(every attended cached token and its position)]:
  a stale, missing or leaked cache column changes the output."""
  table = jnp.asarray(_HASH_TABLE)

  def apply_fn(params, tokens, positions, mask, cache, index):
    del params
    (layer,) = cache
    f = lambda x: x[..., None, None].astype(jnp.float32)  # [R, L, 1, 1]
    layer = kv_cache.write(layer, f(tokens), f(positions), index)
    tok = layer.k[:, 0, :, 0].astype(jnp.int32)
    pos = layer.v[:, 0, :, 0].astype(jnp.int32)
    terms = (tok + 1) * (pos * 7 + 3)  # [R, S]
    h = jnp.sum(jnp.where(mask, terms[:, None, :], 0), -1) % _HASH
    return table[h], (layer,)

  def init_cache_fn(b, s):
    return kv_cache.init_cache(num_layers=1, batch=b, length=s,
                               num_kv_heads=1, head_dim=1)

  return apply_fn, init_cache_fn


def _hash_logp(prompt, prompt_mask, response, temperature):
  """Host teacher forcing of `_hash_model`: [T] log-probs of response."""
  real = prompt[prompt_mask]
  seq = np.concatenate([real, response])
  terms = (seq + 1) * (np.arange(len(seq)) * 7 + 3)
  out = []
  for i in range(len(response)):
    logits = _HASH_TABLE[int(terms[:len(real) + i].sum() % _HASH)]
    logits = logits / temperature
    lse = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
    out.append(logits[response[i]] - lse)
  return np.array(out)


def _prompts(b, p, seed=0, pad=True):
  rng = np.random.default_rng(seed)
  toks = rng.integers(2, V, (b, p)).astype(np.int32)
  mask = np.ones((b, p), bool)
  for i in range(b) if pad else ():
    toks[i, :i % 3], mask[i, :i % 3] = 0, False
  return toks, mask


def _cfg(kind, t, **kw):
  base = dict(kind=kind, max_new_tokens=t, stop_tokens=(STOP,),
              segment_len=4, lookahead=(3,), num_chains=2, fork_points=1,
              fork_branches=2)
  base.update(kw)
  return tree.TreeConfig(**base)


def _shared(out):
  """[B, W, W] shared prefixes implied by path_ids / depth_start."""
  path, start = np.asarray(out.path_ids), np.asarray(out.depth_start)
  b, w, _ = path.shape
  s = np.zeros((b, w, w), np.int64)
  for i in range(b):
    for x in range(w):
      for y in range(w):
        differ = np.flatnonzero(path[i, x] != path[i, y])
        s[i, x, y] = start[i, x, differ[0]] if len(differ) else -1
  return s


def _check_tree(out, w):
  """Invariants every tree rollout satisfies."""
  leaf = np.asarray(out.leaf_mask)
  r = out.rollout
  lengths, tokens = np.asarray(r.lengths), np.asarray(r.tokens)
  assert np.all(leaf.sum(-1) <= w)
  assert np.all(lengths[leaf] >= 1)
  assert np.all(np.isin(np.asarray(r.finish)[leaf], [_STOP, _LENGTH]))
  np.testing.assert_array_equal(
      r.loss_mask, np.arange(tokens.shape[-1]) < lengths[..., None])
  s = _shared(out)
  for i in range(leaf.shape[0]):
    leaves = np.flatnonzero(leaf[i])
    for x in leaves:
      for y in leaves:
        if x != y:  # A branch equals its relatives up to the fork point.
          assert 0 <= s[i, x, y] < min(lengths[i, x], lengths[i, y])
          np.testing.assert_array_equal(tokens[i, x, :s[i, x, y]],
                                        tokens[i, y, :s[i, x, y]])


# ------------------------------------------------------------- KV forking

def _tiny():
  cfg = tr.TransformerConfig(vocab_size=V, num_layers=2, embed_dim=32,
                             num_heads=2, num_kv_heads=1, head_dim=16,
                             mlp_dim=64)
  model = tr.Transformer(cfg)
  return model, tr.init_params(cfg, jax.random.key(0))


def _prefill(model, params, tokens, valid, s):
  """A fresh prefill of `tokens [N, L]` into an S-slot cache (jitted: the
  eager path compiles every op)."""
  apply_fn, init_cache = sampler_lib.transformer_fns(model)
  n, width = tokens.shape
  valid = np.concatenate([valid, np.zeros((n, s - width), bool)], 1)

  @jax.jit
  def run(params, tokens, valid):
    _, cache = apply_fn(
        params, tokens, kv_cache.positions_from_mask(valid[:, :width]),
        kv_cache.causal_mask(valid, query_len=width, cache_index=0),
        init_cache(n, s), 0)
    return cache

  return run(params, tokens, valid), jnp.asarray(valid)


def test_fork_equals_fresh_prefill_of_the_prefix():
  model, params = _tiny()
  b, p, t = 3, 5, 8
  prompts, pmask = _prompts(b, p)
  response = np.random.default_rng(1).integers(2, V, (b, t)).astype(np.int32)
  s = p + t
  full = np.concatenate([prompts, response], 1)
  # Rows 0..2: parents with the whole response cached; rows 3..5: garbage
  # (other rows' contents) that the forks overwrite.
  cache, valid = _prefill(model, params, np.concatenate([full, full[::-1]]),
                          np.concatenate([np.concatenate(
                              [pmask, np.ones((b, t), bool)], 1)] * 2), s)
  f = np.array([0, 3, 6])  # Response tokens kept by each child.
  keep = p + f - 1  # Token f - 1 is fed next (the tree sampler's layout).
  child, parent = np.array([3, 4, 5, 6]), np.array([0, 1, 2, 0])  # 6: pad.
  forked, fvalid = jax.jit(kv_cache.fork)(
      cache, valid, child=child, parent=parent,
      keep=np.concatenate([keep, [s]]))
  for m in range(b):
    width = p + f[m] - 1
    ref, ref_valid = _prefill(model, params, full[m:m + 1, :width],
                              np.asarray(valid[m:m + 1, :width]), s)
    np.testing.assert_array_equal(fvalid[3 + m], ref_valid[0])
    for layer, ref_layer in zip(forked, ref):
      for x, y in ((layer.k, ref_layer.k), (layer.v, ref_layer.v)):
        got, want = np.asarray(x[3 + m]), np.asarray(y[0])
        on = np.asarray(ref_valid[0])
        np.testing.assert_allclose(got[:, on], want[:, on], atol=1e-5)
        assert np.all(got[:, width:] == 0)  # Nothing past the fork leaks.
  # The parents are untouched.
  for layer, orig in zip(forked, cache):
    np.testing.assert_array_equal(layer.k[:3], orig.k[:3])


# --------------------------------------------- budgets, prefixes, log-probs

_KINDS = ('treepo', 'latr', 'eptree')


@pytest.mark.parametrize('kind', _KINDS)
def test_leaf_logprobs_match_teacher_forcing_of_the_transformer(kind):
  model, params = _tiny()
  b, p, t, w, temp = 3, 5, 12, 6, 0.8
  prompts, pmask = _prompts(b, p)
  cfg = _cfg(kind, t, stop_tokens=(STOP, 4), tau_abs=0.05, tau_rel=0.5,
             lookahead=(2, 3), fork_branches=2)
  sampler = tree.transformer_tree_sampler(model, cfg)
  for seed in range(2):  # The second call must not recompile.
    out = sampler(params, prompts, pmask, jax.random.key(seed), temp,
                  num_leaves=w, mix=0.7)
    _check_tree(out, w)
    logits_fn = lambda prm, *a: model.apply({'params': prm}, *a)[0]
    rows = lambda x: np.asarray(x).reshape((b * w,) + x.shape[2:])
    want, _ = learner.response_logprobs(
        logits_fn, params, np.repeat(prompts, w, 0), np.repeat(pmask, w, 0),
        rows(out.rollout.tokens), temperature=temp)
    mask = rows(out.rollout.loss_mask)
    np.testing.assert_allclose(rows(out.rollout.logp)[mask],
                               np.asarray(want)[mask], atol=2e-5)
    assert out.metrics['tree/leaves_per_prompt'] == w
  for fn in sampler.fns:  # No recompilation across segments, steps, calls.
    assert fn._cache_size() == 1


@pytest.mark.parametrize('kind', _KINDS)
@pytest.mark.parametrize('w', [4, 6])
def test_leaf_counts_respect_the_budget_and_cached_prefixes_are_exact(kind,
                                                                      w):
  """Property test: random stop positions (a random model with a likely
  stop token); every leaf's log-probs equal a host recomputation from its
  full prefix, so no fork lost or leaked a cache column."""
  b, p, t, temp = 3, 4, 12, 1.0
  apply_fn, init_cache = _hash_model()
  sampler = tree.TreeSampler(apply_fn, init_cache,
                             _cfg(kind, t, stop_tokens=(STOP, 3),
                                  tau_abs=0.1, tau_rel=0.6, lookahead=(2,)))
  for seed in range(4):
    prompts, pmask = _prompts(b, p, seed=seed)
    out = sampler(None, prompts, pmask, jax.random.key(seed), temp,
                  num_leaves=w, mix=0.75)
    _check_tree(out, w)
    # TreePO (fallback), LATR (refill) and EPTree fill the budget exactly.
    np.testing.assert_array_equal(np.asarray(out.leaf_mask).sum(-1), w)
    r = out.rollout
    for i in range(b):
      for j in range(w):
        n = int(r.lengths[i, j])
        np.testing.assert_allclose(
            np.asarray(r.logp[i, j, :n]),
            _hash_logp(prompts[i], pmask[i], np.asarray(r.tokens[i, j, :n]),
                       temp), atol=1e-5)


def test_treepo_decodes_fewer_tokens_per_leaf_than_independent_sampling():
  b, p, w, t, n = 2, 3, 4, 16, 10
  seq = [5, 6, 7, 8, 9, 5, 6, 7, 8, STOP]  # Every response is seq (n = 10).
  apply_fn, init_cache = _sequence_model(seq, p)
  prompts, pmask = _prompts(b, p, pad=False)
  sampler = tree.TreeSampler(apply_fn, init_cache, _cfg(
      'treepo', t, segment_len=4, init_divergence=2, divergence=2))
  out = sampler(None, prompts, pmask, jax.random.key(0), 1.0, num_leaves=w)
  static = sampler_lib.make_sampler(apply_fn, init_cache,
                                    sampler_lib.SamplerConfig(
                                        max_new_tokens=t, stop_tokens=(STOP,)))
  ind = static(None, prompts, pmask, jax.random.key(0), 1.0, 1.0,
               num_samples=w)
  np.testing.assert_array_equal(out.rollout.tokens, ind.tokens)
  # Independent: 4 x 10 per prompt. Tree: 2 paths x 4 tokens, then 4 paths
  # (each forked at 4) x 4, then 4 x 2: 32 per prompt.
  assert int(np.asarray(ind.lengths).sum()) == b * 40
  assert out.decoded_tokens == b * 32
  m = out.metrics
  assert m['tree/decoded_tokens_per_leaf'] == 8.0
  assert m['tree/leaf_tokens_per_leaf'] == 10.0
  assert m['tree/shared_prefix_frac'] == pytest.approx(0.4)  # 4 of 10.
  assert m['tree/depth_max'] == m['tree/depth_mean'] == 2.0
  assert m['tree/distinct_answers'] == 1.0
  # Root (empty) -> 2 paths split at token 0 -> 4 leaves split at token 4.
  np.testing.assert_array_equal(out.depth_start[0, :, :3],
                                [[0, 0, 4]] * 4)
  path = np.asarray(out.path_ids[0])
  assert path[0, 1] == path[2, 1] != path[1, 1] == path[3, 1]
  assert len(set(path[:, 2])) == 4 and np.all(path[:, 3:] == -1)


def test_treepo_stop_rules_and_fallback():
  b, p, w, t = 1, 3, 4, 16
  prompts, pmask = _prompts(b, p, pad=False)
  # Answer marker 9 at index 2: stop_fn cuts after it at the first boundary.
  apply_fn, init_cache = _sequence_model([5, 6, 9, 7, 7, 7, 7, 7], p)
  sampler = tree.TreeSampler(
      apply_fn, init_cache, _cfg('treepo', t, segment_len=4),
      stop_fn=lambda x: int(np.argmax(x == 9)) + 1 if 9 in x else 0)
  out = sampler(None, prompts, pmask, jax.random.key(0), 1.0, num_leaves=w)
  np.testing.assert_array_equal(out.rollout.lengths, [[3] * 4])
  np.testing.assert_array_equal(out.rollout.finish, [[_STOP] * 4])
  assert out.metrics['tree/ended_answer'] > 0
  # Paths that end inside a segment, by the length limit or by EOS after
  # more text, are cut after the answer too, like those still live at a
  # boundary; EOS right after the answer stays.
  stop_fn = lambda x: int(np.argmax(x == 9)) + 1 if 9 in x else 0
  for seq, t_max, want in (([5, 6, 9, 7, 7, 7, 7, 7], 6, 3),
                           ([5, 6, 9, 7, STOP], 16, 3),
                           ([5, 6, 9, STOP], 16, 4)):
    apply_fn, init_cache = _sequence_model(seq, p)
    sampler = tree.TreeSampler(
        apply_fn, init_cache, _cfg('treepo', t_max, segment_len=8),
        stop_fn=stop_fn)
    out = sampler(None, prompts, pmask, jax.random.key(0), 1.0,
                  num_leaves=w)
    np.testing.assert_array_equal(out.rollout.lengths, [[want] * 4])
    np.testing.assert_array_equal(out.rollout.finish, [[_STOP] * 4])
  # Repetition: (5, 6) three times in a row ends the path at a boundary.
  apply_fn, init_cache = _sequence_model([5, 6] * 8, p)
  sampler = tree.TreeSampler(apply_fn, init_cache, _cfg(
      'treepo', t, segment_len=4, repeat_ngram=2, repeat_count=3))
  out = sampler(None, prompts, pmask, jax.random.key(0), 1.0, num_leaves=w)
  np.testing.assert_array_equal(out.rollout.lengths, [[8] * 4])
  np.testing.assert_array_equal(out.rollout.finish, [[_LENGTH] * 4])
  # Fallback: one path; it forks once at 4, both stop at 6 with 2 slots
  # unused, so a finished path re-branches at a boundary (0 or 4).
  apply_fn, init_cache = _sequence_model([5, 6, 7, 8, 9, STOP], p)
  sampler = tree.TreeSampler(apply_fn, init_cache, _cfg(
      'treepo', t, segment_len=4, init_divergence=1))
  out = sampler(None, prompts, pmask, jax.random.key(3), 1.0, num_leaves=w)
  assert out.metrics['tree/fallbacks'] == 1
  np.testing.assert_array_equal(out.leaf_mask, [[True] * 4])
  assert out.decoded_tokens in (4 + 2 * 2 + 2 * 6, 4 + 2 * 2 + 2 * 2)


# ------------------------------------------------------------------- LATR

def test_latr_branch_rule_on_hand_made_distributions():
  probs = np.array([
      [0.40, 0.35, 0.25],  # p2 > 0.15, gap 0.05 < 0.25: branch.
      [0.60, 0.30, 0.10],  # gap 0.30: no.
      [0.80, 0.12, 0.08],  # p2 < 0.15: no.
      [0.30, 0.45, 0.25],  # Top-2 in any order: branch, top1 = 1.
      [0.55, 0.15, 0.30],  # p2 = 0.30 (index 2), gap 0.25: no (strict).
      [0.425, 0.15, 0.425],  # Gap 0; p2 = 0.425: branch.
  ])
  branch, top1, top2 = rules.latr_branch(jnp.log(jnp.asarray(probs)),
                                         tau_abs=0.15, tau_rel=0.25)
  np.testing.assert_array_equal(branch, [1, 0, 0, 1, 0, 1])
  np.testing.assert_array_equal(top1[:4], [0, 0, 0, 1])
  np.testing.assert_array_equal(top2[:4], [1, 1, 1, 0])


def _levenshtein(a, b):
  d = np.arange(len(b) + 1)
  for i, x in enumerate(a, 1):
    prev, d[0] = d.copy(), i
    for j, y in enumerate(b, 1):
      d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (x != y))
  return d[-1]


def test_edit_distance_matches_reference():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 3, (64, 7))
  b = np.where(rng.random((64, 7)) < 0.5, a, rng.integers(0, 3, (64, 7)))
  got = jax.jit(rules.edit_distance)(jnp.asarray(a), jnp.asarray(b))
  np.testing.assert_array_equal(got, [_levenshtein(x, y)
                                      for x, y in zip(a, b)])
  kitten = np.array([[10, 8, 19, 19, 4, 13, 0]])  # 'kitten_' / 'sitting'
  sitting = np.array([[18, 8, 19, 19, 8, 13, 6]])
  assert int(rules.edit_distance(kitten, sitting)[0]) == 3


# Tokens: 2 'a' (the prompt's last), 3 'b', 4 'c', 5 'd', 6 'e', 7 'f'.
def _table(rows):
  """Logit table from {token: {next: prob}} (the rest share 1e-6)."""
  table = np.full((V, V), np.log(1e-6), np.float32)
  for tok, nxt in rows.items():
    for k, prob in nxt.items():
      table[tok, k] = np.log(prob)
  return table


def _latr(rows, w=4, t=8, mix=1.0, **kw):
  apply_fn, init_cache = _markov_model(_table(rows))
  cfg = _cfg('latr', t, stop_tokens=(STOP,), chunk_steps=3, **kw)
  sampler = tree.TreeSampler(apply_fn, init_cache, cfg)
  prompts = np.array([[6, 2], [7, 2]], np.int32)
  return sampler(None, prompts, np.ones_like(prompts, bool),
                 jax.random.key(0), 1.0, num_leaves=w, mix=mix)


def test_latr_prunes_a_child_that_repeats_its_parent():
  # a: b 0.5 / c 0.45 branches (root takes b, child c); both then emit d:
  # windows 'c d d' vs 'b d d', edit distance 1/3 < 0.4: pruned.
  rows = {2: {3: 0.5, 4: 0.45}, 3: {5: 1.0}, 4: {5: 1.0}, 5: {5: 1.0}}
  out = _latr(rows, lookahead=(3,), refill=False)
  np.testing.assert_array_equal(out.leaf_mask, [[1, 0, 0, 0]] * 2)
  np.testing.assert_array_equal(out.rollout.tokens[:, 0],
                                [[3, 5, 5, 5, 5, 5, 5, 5]] * 2)
  assert out.metrics['tree/pruned'] == 2 and out.metrics['tree/branches'] == 2
  # With refill the freed and unused slots become plain samples of 'a'.
  out = _latr(rows, lookahead=(3,))
  np.testing.assert_array_equal(out.leaf_mask, np.ones((2, 4), bool))
  assert np.all(np.isin(out.rollout.tokens[:, 1:, 0], [3, 4]))
  assert out.metrics['tree/refilled'] == 6


def test_latr_keeps_a_divergent_child_and_records_its_logprob():
  rows = {2: {3: 0.5, 4: 0.45}, 3: {5: 1.0}, 4: {6: 1.0}, 5: {5: 1.0},
          6: {6: 1.0}}
  out = _latr(rows, lookahead=(3,), refill=False)
  np.testing.assert_array_equal(out.leaf_mask, [[1, 1, 0, 0]] * 2)
  np.testing.assert_array_equal(out.rollout.tokens[:, :2],
                                [[[3] + [5] * 7, [4] + [6] * 7]] * 2)
  row = jax.nn.log_softmax(_table(rows)[2])  # The probs sum to ~0.95.
  np.testing.assert_allclose(out.rollout.logp[:, :2, 0],
                             [[row[3], row[4]]] * 2, atol=1e-5)
  np.testing.assert_array_equal(out.depth_start[0, :2, :2], [[0, 0]] * 2)
  assert out.metrics['tree/pruned'] == 0


def test_latr_per_root_cap_and_mix():
  # The root branches at every step (b: b 0.5 / f 0.45); children go to 'e'
  # and are kept (they differ from 'b b').
  rows = {2: {3: 0.5, 4: 0.45}, 3: {3: 0.5, 7: 0.45}, 4: {6: 1.0},
          7: {6: 1.0}, 6: {6: 1.0}}
  out = _latr(rows, w=6, lookahead=(2,), max_branches=2, refill=False)
  np.testing.assert_array_equal(np.asarray(out.leaf_mask).sum(-1), [3, 3])
  assert out.metrics['tree/branches'] == 4  # 2 per prompt.
  tokens = np.asarray(out.rollout.tokens[0, :3, :3])
  # Branch steps take the top-2 (root 'b', children 'c' then 'f'); once
  # capped, the root samples again ('b' or 'f').
  np.testing.assert_array_equal(tokens[1:], [[4, 6, 6], [3, 7, 6]])
  assert list(tokens[0, :2]) == [3, 3] and tokens[0, 2] in (3, 7)
  # mix = 0.5: 2 tree slots (one branch fills them) + 2 plain samples.
  out = _latr(rows, w=4, mix=0.5, lookahead=(2,), refill=False)
  assert out.metrics['tree/branches'] == 2
  np.testing.assert_array_equal(out.leaf_mask, np.ones((2, 4), bool))
  # mix = 0: independent samples only.
  out = _latr(rows, w=4, mix=0.0, lookahead=(2,))
  assert out.metrics['tree/branches'] == 0
  assert out.metrics['tree/depth_max'] == 1.0


# ---------------------------------------------------------------- EPTree

def test_eptree_forks_at_the_highest_entropy_token():
  # The chain is deterministic except after 'd' (index 2): uniform over
  # {e, f}, the only high-entropy position, where every fork happens.
  rows = {2: {3: 1.0}, 3: {4: 1.0}, 4: {5: 1.0}, 5: {6: 0.5, 7: 0.5},
          6: {STOP: 1.0}, 7: {STOP: 1.0}}
  apply_fn, init_cache = _markov_model(_table(rows))
  sampler = tree.TreeSampler(apply_fn, init_cache, _cfg(
      'eptree', 8, num_chains=2, fork_points=1, fork_branches=2))
  prompts = np.array([[2]], np.int32)
  out = sampler(None, prompts, np.ones_like(prompts, bool),
                jax.random.key(0), 1.0, num_leaves=6)
  _check_tree(out, 6)
  np.testing.assert_array_equal(out.rollout.lengths, [[5] * 6])
  s = _shared(out)[0]
  # Chains 0, 1 share nothing; forks 2, 3 (of 0) and 4, 5 (of 1) share the
  # 3 low-entropy tokens with their chain.
  assert s[0, 1] == 0 and s[0, 2] == s[0, 3] == s[1, 4] == s[1, 5] == 3
  assert s[2, 4] == 0
  assert out.decoded_tokens == 2 * 5 + 4 * 2


@pytest.mark.parametrize('seed', range(3))
def test_eptree_fork_distinct_branches_diverge_at_the_fork(seed):
  # Position 3 (after 'd') is a three-way tie; every fork is there. With
  # fork_distinct a branch never repeats its parent's token at the fork,
  # and its recorded log-prob is still the policy's log(1/3).
  rows = {2: {3: 1.0}, 3: {4: 1.0}, 4: {5: 1.0},
          5: {6: 1 / 3, 7: 1 / 3, 8: 1 / 3}, 6: {STOP: 1.0},
          7: {STOP: 1.0}, 8: {STOP: 1.0}}
  apply_fn, init_cache = _markov_model(_table(rows))
  sampler = tree.TreeSampler(apply_fn, init_cache, _cfg(
      'eptree', 8, num_chains=2, fork_points=1, fork_branches=2,
      fork_distinct=True))
  prompts = np.array([[2], [2]], np.int32)
  out = sampler(None, prompts, np.ones_like(prompts, bool),
                jax.random.key(seed), 1.0, num_leaves=6)
  _check_tree(out, 6)
  tok = np.asarray(out.rollout.tokens)[:, :, 3]
  for i in range(2):  # Slots 2, 3 fork chain 0; slots 4, 5 chain 1.
    assert tok[i, 0] not in tok[i, 2:4] and tok[i, 1] not in tok[i, 4:6]
  np.testing.assert_allclose(np.asarray(out.rollout.logp)[:, :, 3],
                             np.log(1 / 3), atol=1e-5)


def test_ban_token_matches_a_numpy_reference():
  rng = np.random.default_rng(0)
  logp = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(4, V)),
                                        jnp.float32))
  logp = logp.at[3].set(jnp.where(jnp.arange(V) == 5, 0.0, -jnp.inf))
  ban = jnp.asarray([2, -1, 0, 5], jnp.int32)
  got = rules.ban_token(logp, ban)
  want = np.asarray(logp).copy()
  want[0, 2], want[2, 0] = -np.inf, -np.inf  # Row 3: nothing else left.
  np.testing.assert_array_equal(np.asarray(got), want)
  # Sampling draws from the renormalised rest.
  draws = jax.random.categorical(jax.random.key(0),
                                 jnp.broadcast_to(got[0], (20000, V)))
  freq = np.bincount(np.asarray(draws), minlength=V) / 20000
  p = np.exp(want[0])
  np.testing.assert_allclose(freq, p / p.sum(), atol=0.015)


def test_config_and_budget_errors():
  with pytest.raises(ValueError, match='kind'):
    tree.TreeConfig(kind='mcts', max_new_tokens=4, stop_tokens=())
  with pytest.raises(ValueError, match='repeat_count=1 must be >= 2'):
    tree.TreeConfig(kind='treepo', max_new_tokens=4, stop_tokens=(),
                    repeat_ngram=2, repeat_count=1)
  with pytest.raises(ValueError, match='fork_distinct.*treepo'):
    tree.TreeConfig(kind='treepo', max_new_tokens=4, stop_tokens=(),
                    fork_distinct=True)
  apply_fn, init_cache = _markov_model(np.zeros((V, V)))
  sampler = tree.TreeSampler(apply_fn, init_cache, _cfg('eptree', 4))
  with pytest.raises(ValueError, match='num_leaves=7.*M=2, N=1, T=2, L=1'):
    sampler(None, np.ones((1, 2), np.int32), np.ones((1, 2), bool),
            jax.random.key(0), 1.0, num_leaves=7)


# --------------------------------------------------------- rules (host)

def test_allocate_and_repetition_rules():
  np.testing.assert_array_equal(rules.allocate(3, np.ones(2), 1), [1, 1])
  np.testing.assert_array_equal(rules.allocate(5, np.ones(3), 3), [2, 2, 1])
  np.testing.assert_array_equal(
      rules.allocate(4, np.array([3.0, 1.0]), 4), [3, 1])
  np.testing.assert_array_equal(rules.allocate(0, np.ones(2), 1), [0, 0])
  assert rules.is_repeating(np.array([9, 1, 2, 1, 2, 1, 2]), max_ngram=2,
                            count=3)
  assert not rules.is_repeating(np.array([1, 2, 1, 2, 1, 3]), max_ngram=2,
                                count=3)
  assert rules.is_repeating(np.array([4, 4, 4]), max_ngram=1, count=3)


def test_text_stop_fn_cuts_at_the_fewest_tokens_holding_the_answer():
  # Tokens are characters; the answer is found once '}' closes a box.
  words = np.array([ord(c) for c in 'ab{cd}ef}'])
  decode = lambda x: ''.join(map(chr, x))
  found = lambda t: (t.index('}') + 1) if '{' in t and '}' in t else None
  calls = []
  stop = rules.text_stop_fn(lambda x: calls.append(1) or decode(x), found)
  assert stop(words) == 6  # 'ab{cd}'.
  assert len(calls) <= 1 + int(np.ceil(np.log2(len(words))))
  assert stop(words[:5]) == 0
  assert stop(words[:6]) == 6


def test_tree_paths_from_a_hand_genealogy():
  # Slot 0 root; 1 forked from 0 at 2; 2 from 1 at 5; 3 from 0 at 0.
  x, self_ = rules.NO_ANCESTOR, rules.SELF
  anc = np.array([[self_, x, x, x], [2, self_, x, x], [2, 5, self_, x],
                  [0, x, x, self_]])
  s = rules.shared_prefix(anc, np.array([8, 9, 7, 4]))
  np.testing.assert_array_equal(s, [[8, 2, 2, 0], [2, 9, 5, 0],
                                    [2, 5, 7, 0], [0, 0, 0, 4]])
  path, start = rules.tree_paths(s, np.arange(4), 4)
  # Root splits at 0 into {3} and {0, 1, 2}; that splits at 2 into {0} and
  # {1, 2}; which splits at 5.
  np.testing.assert_array_equal(start, [[0, 0, 2, -1], [0, 0, 2, 5],
                                        [0, 0, 2, 5], [0, 0, -1, -1]])
  assert path[0, 1] == path[1, 1] == path[2, 1] != path[3, 1]
  assert path[1, 2] == path[2, 2] != path[0, 2]
  assert path[1, 3] != path[2, 3] and path[0, 3] == path[3, 2] == -1
