"""Advantage estimators beyond GRPO vs independent numpy loop references."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx import objectives
from rlx.objectives import advantages as adv_lib

EPS = 1e-6
B, G, T, D = 7, 6, 9, 4


# ----------------------------------------------------------------- references


def _groups(rewards, mask):
  """Yields (b, valid indices, valid rewards as float64) per row."""
  rewards = np.asarray(rewards, np.float64)
  mask = np.asarray(mask, bool)
  for b in range(rewards.shape[0]):
    idx = np.flatnonzero(mask[b])
    yield b, idx, rewards[b, idx]


def _np_dr_grpo(rewards, mask):
  out = np.zeros(np.shape(rewards))
  for b, idx, r in _groups(rewards, mask):
    if r.size and r.max() > r.min():
      out[b, idx] = r - r.mean()
  return out


def _np_rloo(rewards, mask):
  out = np.zeros(np.shape(rewards))
  for b, idx, r in _groups(rewards, mask):
    if r.size < 2:
      continue
    for k, i in enumerate(idx):
      others = np.delete(r, k)
      out[b, i] = r[k] - others.mean()
  return out


def _np_grpo(rewards, mask, eps=EPS):
  out = np.zeros(np.shape(rewards))
  for b, idx, r in _groups(rewards, mask):
    if r.size >= 2 and r.max() > r.min():
      out[b, idx] = (r - r.mean()) / (r.std(ddof=1) + eps)
  return out


def _np_whiten(x, mask, eps=EPS):
  x = np.asarray(x, np.float64)
  mask = np.asarray(mask, bool)
  out = np.zeros_like(x)
  v = x[mask]
  if v.size and v.max() > v.min():
    out[mask] = (v - v.mean()) / (v.std() + eps)
  return out


def _np_pivot_index(r):
  """Position (into r) of the valid sample at sorted rank (n - 1) // 2."""
  order = sorted(range(len(r)), key=lambda k: (r[k], k))
  return order[(len(r) - 1) // 2]


def _np_mc_grpo(rewards, mask, scale='none', eps=EPS):
  out = np.zeros(np.shape(rewards))
  pivot = np.zeros(np.shape(rewards), bool)
  for b, idx, r in _groups(rewards, mask):
    if not r.size:
      continue
    p = _np_pivot_index(r)
    pivot[b, idx[p]] = True
    a = r - r[p]
    if scale == 'std':
      s = r.std(ddof=1) if r.size > 1 else 0.0
      a = a / (s + eps)
    elif scale == 'mad':
      dev = np.abs(r - r[p])
      a = a / (sorted(dev)[(r.size - 1) // 2] + eps)
    out[b, idx] = a
  return out, pivot


def _np_tree(rewards, mask, path_ids, weighting, eps=EPS):
  """Loops over leaves and depths; returns (whitened, raw)."""
  rewards = np.asarray(rewards, np.float64)
  mask = np.asarray(mask, bool)
  raw = np.zeros_like(rewards)
  for b in range(rewards.shape[0]):
    for i in range(rewards.shape[1]):
      if not mask[b, i]:
        continue
      num = den = 0.0
      for d in range(path_ids.shape[-1]):
        node = path_ids[b, i, d]
        if node == -1:
          continue
        members = [j for j in range(rewards.shape[1])
                   if mask[b, j] and path_ids[b, j, d] == node]
        if d > 0 and len(members) < 2:
          continue
        a = rewards[b, i] - np.mean(rewards[b, members])
        w = len(members) if weighting == 'size' else 1.0
        num += w * a
        den += w
      raw[b, i] = num / den if den else 0.0
  return _np_whiten(raw, mask, eps), raw


def _np_xrpo(rewards, mask, mean_logp, lam, clip, eps=EPS):
  out = _np_grpo(rewards, mask, eps)
  for b, idx, r in _groups(rewards, mask):
    if not r.size or r.max() == r.min():
      continue
    group_lp = np.mean(np.asarray(mean_logp, np.float64)[b, idx])
    for k, i in enumerate(idx):
      if r[k] > 0.5:
        gap = group_lp - float(mean_logp[b, i])
        out[b, i] += lam * min(max(gap, 0.0), clip)
  return out


def _np_keep_count(keep, n):
  k = math.floor(keep * n + 0.5)
  return min(max(k, 2), n)


def _np_d3s_kept(rewards, mask, keep):
  """Top-a plus bottom-(k - a) by reward, smallest a of maximal variance."""
  kept = np.zeros(np.shape(rewards), bool)
  for b, idx, r in _groups(rewards, mask):
    k = _np_keep_count(keep, r.size)
    desc = sorted(range(r.size), key=lambda m: (-r[m], m))
    candidates = []
    for a in range(k + 1):
      sel = desc[:a] + desc[r.size - (k - a):]
      candidates.append((np.var(r[sel]) if sel else 0.0, sel))
    best = max(v for v, _ in candidates)
    sel = next(s for v, s in candidates if v >= best - 1e-9)
    kept[b, idx[sel]] = True
  return kept


def _np_token_keep(adv, entropy, loss_mask, keep):
  out = np.zeros(np.shape(loss_mask), bool)
  for b in range(loss_mask.shape[0]):
    for g in range(loss_mask.shape[1]):
      pos = np.flatnonzero(loss_mask[b, g])
      if not pos.size:
        continue
      c = math.ceil(keep * pos.size)
      score = abs(float(adv[b, g])) * np.asarray(entropy[b, g], np.float64)
      ranked = sorted(pos, key=lambda t: (-score[t], t))
      out[b, g, ranked[:c]] = True
  return out


def _np_d3s(rewards, mask, entropy, loss_mask, sample_keep, token_keep,
            eps=EPS):
  kept = _np_d3s_kept(rewards, mask, sample_keep)
  a = _np_grpo(rewards, kept, eps)
  tokens = _np_token_keep(a, entropy, loss_mask & kept[..., None],
                          token_keep)
  return np.where(tokens, a[..., None], 0.0), kept, tokens


# --------------------------------------------------------------------- inputs


def _inputs(seed, binary, b=B, g=G):
  rng = np.random.default_rng(seed)
  if binary:
    rewards = (rng.random((b, g)) < 0.5).astype(np.float32)
  else:
    rewards = rng.uniform(0, 1, (b, g)).astype(np.float32)
  mask = rng.random((b, g)) < 0.75
  mask[0] = True
  mask[1] = False  # Fully masked row.
  mask[2] = False
  mask[2, 3] = True  # One valid sample.
  rewards[3] = 0.3  # All equal (non-binary value: float mean round-off).
  mask[3] = True
  rewards[4, :2] = 1.0
  mask[4, :2] = True  # At least two valid, so the batch has signal.
  rewards[4, 1] = 0.0
  return rewards, mask


def _random_paths(seed, b=B, g=G, d=D):
  """Prefix-consistent ancestor ids with ragged depths (-1 beyond)."""
  rng = np.random.default_rng(seed)
  paths = np.full((b, g, d), -1, np.int32)
  for bi in range(b):
    for i in range(g):
      depth = rng.integers(1, d + 1)
      node = 0
      for k in range(depth):
        if k:
          node = node * 3 + 1 + rng.integers(0, 2)
        paths[bi, i, k] = node
  return paths


def _tokens(seed, b=B, g=G, t=T):
  rng = np.random.default_rng(seed)
  entropy = rng.uniform(0, 3, (b, g, t)).astype(np.float32)
  lengths = rng.integers(0, t + 1, (b, g))
  lengths[0, 0] = t
  loss_mask = np.arange(t) < lengths[..., None]
  return entropy, loss_mask


_JITTED = {}


def _jit(fn, *args, **kwargs):
  """fn(*args, **kwargs) through a cached `jax.jit(functools.partial(...))`.

  Array and float keyword arguments are traced (one compile serves every
  eps or keep ratio); strings are bound with the partial. Everything runs
  jitted: the eager path would compile each primitive per shape, which is
  slow on a shared CPU.
  """
  arrays = {k: jnp.float32(v) if isinstance(v, float) else v
            for k, v in kwargs.items()
            if isinstance(v, (float, np.ndarray, jax.Array))}
  static = tuple(sorted((k, v) for k, v in kwargs.items() if k not in arrays))
  key = (fn, static)
  if key not in _JITTED:
    _JITTED[key] = jax.jit(functools.partial(fn, **dict(static)))
  out = _JITTED[key](*(jnp.asarray(a) for a in args), **arrays)
  return np.asarray(out)


def _call(name, rewards, mask, **kwargs):
  return _jit(objectives.ADVANTAGES.get(name), rewards, mask, **kwargs)


def _close(got, want, **kw):
  kw.setdefault('rtol', 1e-5)
  kw.setdefault('atol', 1e-5)
  np.testing.assert_allclose(got, want, **kw)


def _check_common(got, mask):
  assert got.dtype == np.float32
  assert np.all(np.isfinite(got))
  m = np.asarray(mask, bool)
  m = m if got.ndim == 2 else m[..., None] & np.ones(got.shape, bool)
  np.testing.assert_array_equal(got[~m], 0.0)


# ------------------------------------------------- random vs numpy reference

_SEEDS_KINDS = [(0, True), (1, False), (2, True), (3, False)]


@pytest.mark.parametrize('seed,binary', _SEEDS_KINDS)
def test_group_estimators_match_numpy(seed, binary):
  rewards, mask = _inputs(seed, binary)
  rng = np.random.default_rng(seed + 100)
  values = rng.uniform(0, 1, B).astype(np.float32)
  mean_logp = rng.uniform(-2, -0.1, (B, G)).astype(np.float32)
  cases = {
      'dr_grpo': ({}, _np_dr_grpo(rewards, mask)),
      'rloo': ({}, _np_rloo(rewards, mask)),
      'reinforce_pp': ({'eps': EPS},
                       _np_whiten(_np_dr_grpo(rewards, mask), mask)),
      'spo': ({'values': values},
              _np_whiten(np.where(mask, rewards - values[:, None], 0.0),
                         mask)),
      'xrpo_sharpen': ({'mean_logp': mean_logp, 'lam': 0.3, 'clip': 0.5},
                       _np_xrpo(rewards, mask, mean_logp, 0.3, 0.5)),
  }
  for scale in ('none', 'std', 'mad'):
    cases[f'mc_grpo/{scale}'] = ({'scale': scale},
                                 _np_mc_grpo(rewards, mask, scale)[0])
  for key, (kwargs, want) in cases.items():
    name = key.split('/')[0]
    got = _call(name, rewards, mask, **kwargs)
    _check_common(got, mask)
    # mad divides by eps when the MAD is 0: compare relatively.
    _close(got, want, err_msg=key, atol=1e-5 * max(1, np.abs(want).max()))
    # Masked rewards never leak into the statistics.
    poisoned = np.where(mask, rewards, 1e6).astype(np.float32)
    np.testing.assert_array_equal(_call(name, poisoned, mask, **kwargs), got,
                                  err_msg=key)


@pytest.mark.parametrize('seed,binary', _SEEDS_KINDS)
def test_mc_grpo_pivot_matches_numpy(seed, binary):
  rewards, mask = _inputs(seed, binary)
  got = _jit(adv_lib.mc_grpo_pivot, rewards, mask)
  _, want = _np_mc_grpo(rewards, mask)
  np.testing.assert_array_equal(got, want)
  counts = mask.sum(-1)
  np.testing.assert_array_equal(got.sum(-1), np.minimum(counts, 1))
  a = _call('mc_grpo', rewards, mask)
  np.testing.assert_array_equal(a[got], 0.0)


@pytest.mark.parametrize('weighting', ['size', 'mean'])
@pytest.mark.parametrize('seed,binary', _SEEDS_KINDS)
def test_tree_matches_numpy(seed, binary, weighting):
  rewards, mask = _inputs(seed, binary)
  paths = _random_paths(seed)
  got = _call('tree', rewards, mask, path_ids=jnp.asarray(paths),
              weighting=weighting)
  want, raw = _np_tree(rewards, mask, paths, weighting)
  # Inputs exercise deeper groups (sizes > 1 below the root).
  assert not np.allclose(raw, _np_dr_grpo(rewards, mask))
  _check_common(got, mask)
  _close(got, want)


@pytest.mark.parametrize('seed,binary', _SEEDS_KINDS)
def test_d3s_matches_numpy(seed, binary):
  rewards, mask = _inputs(seed, binary)
  entropy, loss_mask = _tokens(seed)
  for sample_keep, token_keep in ((0.5, 0.4), (0.6, 0.75), (1.0, 1.0)):
    got = _call('d3s', rewards, mask, token_entropy=entropy,
                loss_mask=loss_mask, sample_keep=sample_keep,
                token_keep=token_keep)
    want, kept, _ = _np_d3s(rewards, mask, entropy, loss_mask, sample_keep,
                            token_keep)
    assert got.shape == (B, G, T)
    _check_common(got, mask)
    _close(got, want, err_msg=f'{sample_keep} {token_keep}')
    got_kept = _jit(adv_lib.d3s_sample_mask, rewards, mask,
                    sample_keep=sample_keep)
    np.testing.assert_array_equal(got_kept, kept)
  # Keep ratios of 1 is plain GRPO broadcast over the loss mask.
  np.testing.assert_allclose(
      got, np.where(loss_mask, _np_grpo(rewards, mask)[..., None], 0.0),
      rtol=1e-5, atol=1e-6)


# ----------------------------------------------------- edge cases, every one


def _all_estimators():
  """(name, kwargs) for every registered estimator, on [B, G] inputs."""
  rng = np.random.default_rng(9)
  paths = np.zeros((B, G, 2), np.int32)
  paths[:, :, 1] = np.arange(G) % 2
  entropy, _ = _tokens(9)
  out = [
      ('grpo', {}), ('dr_grpo', {}), ('rloo', {}), ('reinforce_pp', {}),
      ('spo', {'values': np.full((B,), 0.2, np.float32)}),
      ('tree', {'path_ids': paths}),
      ('tree', {'path_ids': paths, 'weighting': 'mean'}),
      ('treerl', {'path_ids': paths, 'depth_start': np.zeros_like(paths),
                  'loss_mask': np.ones((B, G, T), bool)}),
      ('xrpo_sharpen', {'mean_logp': rng.uniform(-2, 0, (B, G)).astype(
          np.float32)}),
      ('d3s', {'token_entropy': entropy, 'loss_mask': np.ones((B, G, T), bool),
               'sample_keep': 0.5, 'token_keep': 0.5}),
  ]
  out += [('mc_grpo', {'scale': s}) for s in adv_lib.MC_GRPO_SCALES]
  assert {n for n, _ in out} == set(objectives.ADVANTAGES)
  return out


@pytest.mark.parametrize('value', [0.0, 1.0, 0.3, 0.7])
def test_all_equal_rewards_give_zero(value):
  rewards = np.full((B, G), value, np.float32)
  mask = np.ones((B, G), bool)
  mask[1, 3:] = False
  mask[2] = False
  for name, kwargs in _all_estimators():
    # spo: r - v = value - 0.2 is constant; whitening removes it.
    for eps in ((EPS, 0.0) if name not in ('dr_grpo', 'rloo') else (None,)):
      kw = dict(kwargs) if eps is None else dict(kwargs, eps=eps)
      got = _call(name, rewards, mask, **kw)
      np.testing.assert_array_equal(got, 0.0, err_msg=f'{name} {kw}')


def test_single_sample_and_fully_masked_groups():
  rewards = np.tile(np.array([1.0, 0.0, 1.0, 0.0, 0.4, 0.9], np.float32),
                    (B, 1))
  mask = np.zeros((B, G), bool)
  mask[0] = True  # Informative.
  mask[1, 2] = True  # One valid sample.
  # Rows 2..: fully masked.
  for name, kwargs in _all_estimators():
    got = _call(name, rewards, mask, **kwargs)
    _check_common(got, mask)
    assert np.any(got[0] != 0), name
    if name in ('spo', 'reinforce_pp', 'tree'):
      continue  # Batch whitening shifts a lone sample by the batch mean.
    np.testing.assert_array_equal(got[1:], 0.0, err_msg=name)
  # Whitened ones: zero for a batch of lone samples only.
  lone = np.zeros((B, G), bool)
  lone[:, 0] = True
  for name, kwargs in _all_estimators():
    if name in ('reinforce_pp', 'tree'):
      got = _call(name, rewards, lone, **kwargs)
      np.testing.assert_array_equal(got, 0.0, err_msg=name)


def test_spo_single_stream_g1():
  # Group-free: G = 1, the tracker's value is the only baseline.
  rewards = np.array([[1.0], [0.0], [1.0], [0.0]], np.float32)
  values = np.array([0.2, 0.6, 0.9, 0.1], np.float32)
  got = _call('spo', rewards, np.ones((4, 1), bool),
              values=jnp.asarray(values))
  raw = rewards[:, 0] - values  # [0.8, -0.6, 0.1, -0.1], mean 0.05.
  want = (raw - raw.mean()) / (raw.std() + EPS)
  _close(got[:, 0], want)
  assert np.all(np.isfinite(got))


# ------------------------------------------------------------ hand cases


def test_dr_grpo_and_rloo_hand_case():
  rewards = np.array([[1.0, 0.0, 0.0, 1.0], [2.0, 4.0, 9.0, 0.0]],
                     np.float32)
  mask = np.array([[True] * 4, [True, True, False, False]])
  # Dr.GRPO: mean 1/2 -> +-1/2; second group mean 3 -> [-1, 1].
  _close(_call('dr_grpo', rewards, mask),
         [[0.5, -0.5, -0.5, 0.5], [-1.0, 1.0, 0.0, 0.0]])
  # RLOO: A_0 = 1 - (0 + 0 + 1) / 3 = 2/3; A_1 = 0 - (1 + 0 + 1) / 3 = -2/3.
  # Second group: 2 - 4 = -2, 4 - 2 = 2.
  _close(_call('rloo', rewards, mask),
         [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [-2.0, 2.0, 0.0, 0.0]])


def test_reinforce_pp_hand_case():
  rewards = np.array([[1.0, 0.0], [1.0, 1.0]], np.float32)
  # Centred: [0.5, -0.5, 0, 0]; batch mean 0, population std sqrt(1/8).
  std = math.sqrt(0.125)
  _close(_call('reinforce_pp', rewards, np.ones((2, 2), bool)),
         np.array([[0.5, -0.5], [0.0, 0.0]]) / (std + EPS))


def test_mc_grpo_hand_cases():
  rewards = np.array([[1.0, 0.0, 1.0],  # G + 1 = 3, binary.
                      [0.2, 0.9, 0.5],
                      [1.0, 1.0, 0.0]], np.float32)
  mask = np.ones((3, 3), bool)
  pivot = _jit(adv_lib.mc_grpo_pivot, rewards, mask)
  # Sorted (value, index): row 0 (0,1) (1,0) (1,2) -> rank 1 is index 0;
  # row 1: 0.2 0.5 0.9 -> index 2; row 2: (0,2) (1,0) (1,1) -> index 0.
  np.testing.assert_array_equal(pivot, [[True, False, False],
                                        [False, False, True],
                                        [True, False, False]])
  none = _call('mc_grpo', rewards, mask)
  _close(none, [[0.0, -1.0, 0.0], [-0.3, 0.4, 0.0], [0.0, 0.0, -1.0]])
  # std (ddof=1) of [0.2, 0.9, 0.5]: mean 8/15, var = (1/9 + 0.1344.. +
  # 1/900) / 2 = 0.12333.., std 0.35119.
  std = np.std([0.2, 0.9, 0.5], ddof=1)
  got = _call('mc_grpo', rewards, mask, scale='std')
  _close(got[1], np.array([-0.3, 0.4, 0.0]) / (std + EPS))
  # MAD of row 1: |dev| = [0.3, 0.4, 0] -> median 0.3 -> [-1, 4/3, 0].
  got = _call('mc_grpo', rewards, mask, scale='mad', eps=0.0)
  _close(got[1], [-1.0, 4 / 3, 0.0])
  # Binary [1, 1, 0]: |dev| = [0, 0, 1] -> MAD 0: the minority blows up to
  # -1/eps (why 'none' is the default).
  got = _call('mc_grpo', rewards, mask, scale='mad', eps=1e-3)
  _close(got[2], [0.0, 0.0, -1e3])
  # Even count (G + 1 = 4): the lower median is the pivot.
  pivot = _jit(adv_lib.mc_grpo_pivot, np.array([[4.0, 1.0, 3.0, 2.0]]),
                np.ones((1, 4), bool))
  np.testing.assert_array_equal(pivot, [[False, False, False, True]])


def test_mc_grpo_unknown_scale():
  with pytest.raises(ValueError, match="'iqr'.*'none', 'std', 'mad'"):
    adv_lib.mc_grpo(jnp.zeros((1, 3)), jnp.ones((1, 3), bool), scale='iqr')


# Hand-drawn tree, one prompt, leaves 0..3, two subtrees:
#
#            root (0)            R = [1, 0, 1, 1]
#           /        \
#      A (1)          B (2)
#      /   \          /   \
#   l0(1) l1(0)    l2(1) l3(1)
#
# Root group: mean 3/4, |G_0| = 4. Subtree A: mean 1/2, subtree B: mean 1,
# |G_1| = 2 each.
#   leaf 0: a_0 = +1/4, a_1 = +1/2;  size: (4/4 + 2/2) / 6 = +1/3
#   leaf 1: a_0 = -3/4, a_1 = -1/2;  size: (-3 - 1) / 6   = -2/3
#   leaf 2: a_0 = +1/4, a_1 = 0;     size: (1 + 0) / 6    = +1/6
#   leaf 3: as leaf 2                                     = +1/6
# 'mean': [3/8, -5/8, 1/8, 1/8]. Both raw vectors already have mean 0.
# Population std: size sqrt((4 + 16 + 1 + 1) / 36 / 4) = sqrt(22) / 12;
# mean sqrt((9 + 25 + 1 + 1) / 64 / 4) = 3/8.
_HAND_PATHS = np.array([[[0, 1], [0, 1], [0, 2], [0, 2]]], np.int32)
_HAND_R = np.array([[1.0, 0.0, 1.0, 1.0]], np.float32)


@pytest.mark.parametrize('weighting,raw,std', [
    ('size', [1 / 3, -2 / 3, 1 / 6, 1 / 6], math.sqrt(22) / 12),
    ('mean', [3 / 8, -5 / 8, 1 / 8, 1 / 8], 3 / 8),
], ids=['size', 'mean'])
def test_tree_hand_case(weighting, raw, std):
  got = _call('tree', _HAND_R, np.ones((1, 4), bool),
              path_ids=jnp.asarray(_HAND_PATHS), weighting=weighting)
  _close(got[0], np.array(raw) / (std + EPS))


def test_tree_singleton_subgroups_are_skipped():
  # Leaf 2 has its own depth-1 and depth-2 nodes (groups of one, skipped);
  # leaf 3 stops at depth 0. All leaves then see only the root group.
  paths = np.array([[[0, 1, -1], [0, 1, -1], [0, 2, 5], [0, -1, -1]]],
                   np.int32)
  rewards = np.array([[1.0, 1.0, 0.0, 0.5]], np.float32)
  # Leaves 0, 1: a_0 = 1 - 5/8 = 3/8, subtree {0, 1} all equal -> a_1 = 0.
  # size: (4 * 3/8 + 2 * 0) / 6 = 1/4. Leaf 2: -5/8. Leaf 3: -1/8.
  raw = np.array([0.25, 0.25, -0.625, -0.125])
  got = _call('tree', rewards, np.ones((1, 4), bool),
              path_ids=jnp.asarray(paths))
  _close(got[0], _np_whiten(raw[None], np.ones((1, 4), bool))[0])


@pytest.mark.parametrize('seed,binary', _SEEDS_KINDS)
def test_tree_flat_equals_whitened_dr_grpo(seed, binary):
  rewards, mask = _inputs(seed, binary)
  for weighting in ('size', 'mean'):
    got = _call('tree', rewards, mask,
                path_ids=jnp.zeros((B, G, 1), jnp.int32), weighting=weighting)
    dr = _call('dr_grpo', rewards, mask)
    want = _jit(adv_lib.batch_whiten, dr, mask, eps=EPS)
    _close(got, want, rtol=1e-6, atol=1e-6)
    _close(got, _np_whiten(_np_dr_grpo(rewards, mask), mask))


def test_tree_unknown_weighting():
  with pytest.raises(ValueError, match="'depth'"):
    adv_lib.tree(jnp.zeros((1, 2)), jnp.ones((1, 2), bool),
                 path_ids=jnp.zeros((1, 2, 1), jnp.int32), weighting='depth')


def test_xrpo_hand_case():
  rewards = np.array([[1.0, 1.0, 0.0, 0.0]], np.float32)
  mean_logp = np.array([[-0.2, -1.4, -0.6, -1.0]], np.float32)
  # Group mean logp = -0.8. Correct 0: gap -0.6 -> 0. Correct 1: gap 0.6,
  # clipped to 0.5 -> + 0.3 * 0.5. Wrong responses get no bonus.
  got = _call('xrpo_sharpen', rewards, np.ones((1, 4), bool),
              mean_logp=jnp.asarray(mean_logp), lam=0.3, clip=0.5)
  base = _np_grpo(rewards, np.ones((1, 4), bool))
  _close(got, base + np.array([[0.0, 0.15, 0.0, 0.0]]))


# ---------------------------------------------------------------------- D^3S


def test_d3s_sample_hand_cases():
  # Binary, keep half of 6 -> k = 3: {1, 0, 0} and {1, 1, 0} tie (var 2/9);
  # the smaller a (one 1) wins; the kept 0s are the last ones.
  kept = _jit(adv_lib.d3s_sample_mask,
              np.array([[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]]),
              np.ones((1, 6), bool), sample_keep=0.5)
  np.testing.assert_array_equal(kept, [[True, False, False, False, True,
                                        True]])
  # Continuous, k = max(2, round(0.25 * 4)) = 2: the extremes 0.1 and 0.9.
  kept = _jit(adv_lib.d3s_sample_mask, np.array([[0.1, 0.5, 0.9, 0.45]]),
              np.ones((1, 4), bool), sample_keep=0.25)
  np.testing.assert_array_equal(kept, [[True, False, True, False]])
  # k rounds half up: 0.5 * 5 = 2.5 -> 3; 0.7 * 5 = 3.5 -> 4.
  for keep, k in ((0.5, 3), (0.7, 4), (0.1, 2)):
    kept = _jit(adv_lib.d3s_sample_mask,
                np.array([[0.1, 0.2, 0.3, 0.4, 0.5]]), np.ones((1, 5), bool),
                sample_keep=keep)
    assert int(np.sum(kept)) == k


@pytest.mark.parametrize('seed', range(3))
def test_d3s_sample_selection_maximises_variance(seed):
  rng = np.random.default_rng(seed)
  rewards = rng.uniform(0, 1, (8, 6)).astype(np.float32)
  rewards[4:] = rng.random((4, 6)) < 0.4  # Binary rows.
  rewards[6] = np.round(rewards[6] * 3) / 3  # Ties in a continuous row.
  mask = rng.random((8, 6)) < 0.8
  mask[0] = True
  for keep in (0.3, 0.5, 0.8):
    kept = _jit(adv_lib.d3s_sample_mask, rewards, mask, sample_keep=keep)
    assert not np.any(kept & ~mask)
    for b, idx, r in _groups(rewards, mask):
      k = _np_keep_count(keep, r.size)
      assert kept[b].sum() == k
      if k == 0:
        continue
      best = max(np.var(r[list(s)])
                 for s in itertools.combinations(range(r.size), k))
      got = np.var(np.asarray(rewards[b][kept[b]], np.float64))
      np.testing.assert_allclose(got, best, rtol=1e-6, atol=1e-12)


def test_d3s_token_selection_keeps_top_scores():
  rng = np.random.default_rng(11)
  adv = rng.normal(size=(B, G)).astype(np.float32)
  adv[0, 1] = 0.0
  entropy, loss_mask = _tokens(12)
  entropy[1, 2, :4] = 1.5  # Ties: earlier positions win.
  for keep in (0.1, 0.37, 0.5, 1.0):
    got = _jit(adv_lib.d3s_token_mask, adv, token_entropy=entropy,
               loss_mask=loss_mask, token_keep=keep)
    np.testing.assert_array_equal(
        got, _np_token_keep(adv, entropy, loss_mask, keep))
    lengths = loss_mask.sum(-1)
    np.testing.assert_array_equal(got.sum(-1),
                                  np.ceil(keep * lengths).astype(int))
    assert not np.any(got & ~loss_mask)
    score = np.abs(adv)[..., None] * entropy
    for b, g in np.ndindex(B, G):
      dropped = loss_mask[b, g] & ~got[b, g]
      if got[b, g].any() and dropped.any():
        assert score[b, g][got[b, g]].min() >= score[b, g][dropped].max()


def test_d3s_hand_case():
  rewards = np.array([[1.0, 0.0, 0.0, 0.0]], np.float32)
  entropy = np.array([[[0.1, 0.9, 0.5, 0.0]] * 4], np.float32)
  loss_mask = np.array([[[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0],
                         [1, 1, 1, 1]]], bool)
  got = _call('d3s', rewards, np.ones((1, 4), bool), token_entropy=entropy,
              loss_mask=loss_mask, sample_keep=0.5, token_keep=0.5)
  # k = 2: {1, 0} with the last 0 (index 3). GRPO on [1, 0]: mean 1/2,
  # std (ddof=1) sqrt(1/2) -> +-0.5 / (0.7071 + eps).
  a = 0.5 / (math.sqrt(0.5) + EPS)
  # Response 0: 3 tokens -> keep ceil(1.5) = 2, entropies 0.9 and 0.5.
  # Response 3: 4 tokens -> keep 2, same positions.
  want = np.zeros((1, 4, 4))
  want[0, 0, [1, 2]] = a
  want[0, 3, [1, 2]] = -a
  _close(got, want)


def test_d3s_keep_ratio():
  ratio = functools.partial(adv_lib.d3s_keep_ratio, start=0.25, end=1.0,
                            anneal_steps=100)
  for step, want in ((0, 0.25), (40, 0.55), (100, 1.0), (500, 1.0)):
    np.testing.assert_allclose(float(ratio(step)), want, rtol=1e-6)
  np.testing.assert_allclose(float(jax.jit(ratio)(jnp.asarray(40))), 0.55,
                             rtol=1e-6)
  assert float(adv_lib.d3s_keep_ratio(3, start=0.5, anneal_steps=0)) == 1.0
  with pytest.raises(ValueError, match='start'):
    adv_lib.d3s_keep_ratio(0, start=0.0, anneal_steps=10)
  with pytest.raises(ValueError, match='sample_keep'):
    adv_lib.d3s_sample_mask(jnp.zeros((1, 2)), jnp.ones((1, 2), bool),
                            sample_keep=1.5)


# ------------------------------------------------------------------------ jit


def test_everything_jits():
  # Every call in this file already goes through
  # `jax.jit(functools.partial(fn, **strings))` (see `_jit`), array and
  # float kwargs traced; here a learner-style closure binds every kwarg.
  rewards, mask = _inputs(5, False)
  r, m = jnp.asarray(rewards), jnp.asarray(mask)
  paths = _random_paths(5)
  bound = jax.jit(functools.partial(adv_lib.tree, path_ids=paths,
                                    weighting='mean', eps=1e-3))
  _close(bound(r, m), _np_tree(rewards, mask, paths, 'mean', 1e-3)[0])
  # Dispatch by name with kwargs, outside jit.
  _close(objectives.compute_advantages('rloo', r, m),
         _call('rloo', rewards, mask))
  # Traced keep ratios (annealed by the trainer without recompiling).
  entropy, loss_mask = _tokens(5)

  @jax.jit
  def d3s(sample_keep, token_keep):
    return adv_lib.d3s(r, m, token_entropy=jnp.asarray(entropy),
                       loss_mask=jnp.asarray(loss_mask),
                       sample_keep=sample_keep, token_keep=token_keep)

  for keeps in ((0.6, 0.75), (0.5, 0.4)):
    want = _np_d3s(rewards, mask, entropy, loss_mask, *keeps)[0]
    _close(np.asarray(d3s(*map(jnp.float32, keeps))), want)


def test_registry_names():
  assert set(objectives.ADVANTAGES) == {
      'grpo', 'dr_grpo', 'rloo', 'reinforce_pp', 'mc_grpo', 'spo', 'tree',
      'treerl', 'xrpo_sharpen', 'd3s'}
