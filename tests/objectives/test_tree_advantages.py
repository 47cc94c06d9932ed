"""Tree advantages on sampler-made trees: TreePO ancestor groups, TreeRL."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx import objectives
from rlx.objectives import advantages as adv_lib
from rlx.sampling import tree
from rlx.sampling import tree_rules as rules

EPS = 1e-6
_X, _SELF = rules.NO_ANCESTOR, rules.SELF


def _paths(anc, lengths, leaves=None):
  """path_ids, depth_start [1, W, W] from lineage rows (as tree.py does)."""
  anc, lengths = np.asarray(anc), np.asarray(lengths)
  leaves = np.arange(len(lengths)) if leaves is None else leaves
  s = rules.shared_prefix(anc, lengths)
  path, start = rules.tree_paths(s, leaves, len(lengths))
  return path[None], start[None]


# Hand-drawn tree, one prompt, 4 leaves of 8 tokens:
#
#   root [0, 2)  shared by all              R = [1, 0, 1, 1]
#   A [2, 5) {l0, l1}     B [2, 5) {l2, l3}
#   leaves [5, 8)
#
# Slots: 1 forked from 0 at 5; 2 from 0 at 2; 3 from 2 at 5.
_HAND_ANC = [[_SELF, _X, _X, _X], [5, _SELF, _X, _X], [2, _X, _SELF, _X],
             [2, _X, 5, _SELF]]
_HAND_R = np.array([[1.0, 0.0, 1.0, 1.0]], np.float32)


def test_sampler_paths_give_the_card_tree_advantage():
  """TreePO on the hand tree (raw values from tests/objectives/
  test_advantages.py: root group of 4, subtrees of 2)."""
  path, start = _paths(_HAND_ANC, [8] * 4)
  np.testing.assert_array_equal(start[0, :, :3], [[0, 2, 5]] * 4)
  for weighting, raw, std in (
      ('size', [1 / 3, -2 / 3, 1 / 6, 1 / 6], math.sqrt(22) / 12),
      ('mean', [3 / 8, -5 / 8, 1 / 8, 1 / 8], 3 / 8)):
    got = objectives.compute_advantages(
        'tree', _HAND_R, np.ones((1, 4), bool), path_ids=path,
        weighting=weighting)
    np.testing.assert_allclose(got[0], np.array(raw) / (std + EPS),
                               rtol=1e-5)


def test_treerl_hand_tree():
  path, start = _paths(_HAND_ANC, [8] * 4)
  loss_mask = np.arange(8) < np.array([8, 8, 8, 6])[:, None]
  got = np.asarray(objectives.compute_advantages(
      'treerl', _HAND_R, np.ones((1, 4), bool), path_ids=path,
      depth_start=start, loss_mask=loss_mask[None]))[0]
  # V(root) = 3/4, V(A) = 1/2, V(B) = 1.
  a = 2 * (0.5 - 0.75) / math.sqrt(2)  # R(A): global + local, / sqrt(2).
  b = 2 * (1.0 - 0.75) / math.sqrt(2)
  l0 = (1 - 0.75) + (1 - 0.5)
  l1 = (0 - 0.75) + (0 - 0.5)
  l2 = (1 - 0.75) + 0.0  # B's leaves are all correct: no local term.
  want = np.array([[0, 0] + [a] * 3 + [l0] * 3, [0, 0] + [a] * 3 + [l1] * 3,
                   [0, 0] + [b] * 3 + [l2] * 3,
                   [0, 0] + [b] * 3 + [l2] * 1 + [0, 0]])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  # A masked leaf leaves every value: drop l2 -> V(root) = 2/3, V(B) = 1.
  mask = np.array([[True, True, False, True]])
  got = np.asarray(objectives.compute_advantages(
      'treerl', _HAND_R, mask, path_ids=path, depth_start=start,
      loss_mask=loss_mask[None]))[0]
  np.testing.assert_array_equal(got[2], 0.0)
  b = 2 * (1 - 2 / 3) / 1.0  # |L(B)| = 1 now.
  np.testing.assert_allclose(got[3, 2:5], b, rtol=1e-6)
  np.testing.assert_allclose(got[3, 5], (1 - 2 / 3) + 0.0, rtol=1e-6)


def _np_treerl(rewards, mask, path, start, loss_mask):
  """Independent reference: explicit nodes, values and parents."""
  b, g, d = path.shape
  out = np.zeros(loss_mask.shape)
  for x in range(b):
    leaves = np.flatnonzero(mask[x])
    value = lambda depth, node: np.mean(
        [rewards[x, j] for j in leaves if path[x, j, depth] == node])
    count = lambda depth, node: sum(path[x, j, depth] == node for j in leaves)
    for i in leaves:
      for t in np.flatnonzero(loss_mask[x, i]):
        depth = max(k for k in range(d) if path[x, i, k] >= 0 and
                    start[x, i, k] <= t)
        if depth == 0:
          continue
        v = value(depth, path[x, i, depth])
        root = value(0, path[x, i, 0])
        parent = value(depth - 1, path[x, i, depth - 1])
        out[x, i, t] = ((v - root) + (v - parent)) / math.sqrt(
            count(depth, path[x, i, depth]))
  return out


def _random_tree(rng, w, t):
  """Random genealogy: slot k forks from a random earlier slot."""
  anc = np.full((w, w), _X)
  lengths = rng.integers(t // 2, t + 1, w)
  for k in range(w):
    anc[k, k] = _SELF
    if k:
      p = rng.integers(0, k)
      f = rng.integers(0, min(lengths[p], lengths[k]))
      anc[k] = np.where(anc[p] >= 0, np.minimum(anc[p], f), anc[p])
      anc[k, p], anc[k, k] = f, _SELF
  return anc, lengths


@pytest.mark.parametrize('seed', range(4))
def test_treerl_matches_numpy_on_random_trees(seed):
  rng = np.random.default_rng(seed)
  b, w, t = 3, 6, 10
  paths, starts, lmask = [], [], []
  for _ in range(b):
    anc, lengths = _random_tree(rng, w, t)
    p, s = _paths(anc, lengths)
    paths.append(p[0]), starts.append(s[0])
    lmask.append(np.arange(t) < lengths[:, None])
  path, start, loss_mask = map(np.stack, (paths, starts, lmask))
  rewards = rng.integers(0, 2, (b, w)).astype(np.float32)
  rewards[0] = 1.0  # An all-correct group: exactly 0.
  mask = rng.random((b, w)) < 0.85
  fn = jax.jit(adv_lib.treerl)
  got = np.asarray(fn(rewards, mask, path_ids=path, depth_start=start,
                      loss_mask=loss_mask))
  np.testing.assert_allclose(got, _np_treerl(rewards, mask, path, start,
                                             loss_mask), atol=1e-6)
  np.testing.assert_array_equal(got[0], 0.0)
  np.testing.assert_array_equal(got[~(mask[..., None] & loss_mask)], 0.0)
  whitened = np.asarray(adv_lib.treerl(
      rewards, mask, path_ids=path, depth_start=start, loss_mask=loss_mask,
      whiten=True))
  valid = mask[..., None] & loss_mask
  assert abs(whitened[valid].mean()) < 1e-5
  # The TreePO advantage takes the same path ids.
  adv = objectives.compute_advantages('tree', rewards, mask, path_ids=path)
  assert np.all(np.isfinite(adv)) and np.all(np.asarray(adv)[~mask] == 0)


def test_advantages_of_a_sampled_treepo_rollout():
  """End to end: a TreePO rollout's path ids feed both advantages."""
  v, p, seq = 8, 2, jnp.asarray([4, 5, 6, 7, 4, 5, 6, 7, 1])

  def apply_fn(params, tokens, positions, mask, cache, index):
    del params, tokens, mask, index  # Nearly deterministic: seq, or 3.
    step = jnp.clip(positions - p + 1, 0, seq.shape[0] - 1)
    return jax.nn.one_hot(seq[step], v) * 2.0, cache

  sampler = tree.TreeSampler(apply_fn, lambda b, s: (), tree.TreeConfig(
      kind='treepo', max_new_tokens=12, stop_tokens=(1,), segment_len=3))
  out = sampler(None, np.full((2, p), 2, np.int32), np.ones((2, p), bool),
                jax.random.key(0), 1.0, num_leaves=4)
  rewards = (np.asarray(out.rollout.tokens)[..., 1] == 5).astype(np.float32)
  leaf = np.asarray(out.leaf_mask)
  adv = np.asarray(objectives.compute_advantages(
      'tree', rewards, leaf, path_ids=out.path_ids))
  tok = np.asarray(objectives.compute_advantages(
      'treerl', rewards, leaf, path_ids=out.path_ids,
      depth_start=out.depth_start, loss_mask=out.rollout.loss_mask))
  assert adv.shape == (2, 4) and tok.shape == (2, 4, 12)
  assert np.all(np.isfinite(tok))
  np.testing.assert_array_equal(tok[~np.asarray(out.rollout.loss_mask)], 0)
  # Leaves that agree on token 1 share its node's sign.
  for x in range(2):
    for i in range(4):
      if tok[x, i, 1] != 0:
        assert np.sign(tok[x, i, 1]) == np.sign(rewards[x, i] -
                                                rewards[x].mean())
