"""Advantage estimators over groups `[B, G]` with a validity mask.

Variable group sizes are a mask over `[B, Gmax]`; masked entries get zero
advantage and never contribute to a group's (or the batch's) statistics.
Every estimator is a pure jnp function (jit-able; its static arguments are
strings and Python numbers) and returns float32, never NaN. Groups whose
valid rewards are all equal, groups with a single valid sample and fully
masked rows get exactly 0 from the group-relative estimators; the
batch-whitened ones (`reinforce_pp`, `spo`, `tree`) give exactly 0 when no
valid entry of the batch differs from another, and otherwise shift such
groups by the batch mean like any other entry.

Registry: each estimator is registered in `ADVANTAGES` (rlx/objectives/
entries.py) with what it takes: `ADVANTAGES.get(name)` is an `Advantage`
called as `(rewards [B, G], mask [B, G] bool, **kwargs) -> [B, G]`
(`[B, G, T]` for the token-level `d3s` and `treerl`), whose declarations
say which Batch fields and ObjectiveConfig knobs become those keyword
arguments, whether it is group-relative or whitened over the batch, and
which samples and tokens enter the loss. Each estimator takes exactly its
documented keyword arguments. The config checks of the estimators are
`ADVANTAGES.check`s here.
"""

import dataclasses

import jax.numpy as jnp

from rlx import sections
from rlx import errors
from rlx.objectives import entries
from rlx.types import Array

ADVANTAGES = entries.Registry('objective.advantage', entries.Advantage)

_EPS = {'eps': 'adv_eps'}  # The knob of every estimator with a std eps.


@sections.section('objective.mc_grpo', renamed={'mc_scale': 'scale'})
@dataclasses.dataclass(frozen=True)
class McGrpoConfig:
  scale: str = 'none'  # MC-GRPO scaling: none | std | mad.


@sections.section('objective.xrpo', renamed={'xrpo_lam': 'lam',
                                               'xrpo_clip': 'clip'})
@dataclasses.dataclass(frozen=True)
class XrpoConfig:
  lam: float = 0.1  # XRPO novelty boost weight.
  clip: float = 1.0  # XRPO novelty boost cap (nats).


@sections.section('objective.d3s', renamed={
    'd3s_sample_keep': 'sample_keep', 'd3s_token_keep': 'token_keep',
    'd3s_anneal_steps': 'anneal_steps'})
@dataclasses.dataclass(frozen=True)
class D3sConfig:
  sample_keep: float = 0.5  # D3S: initial fraction of samples kept.
  token_keep: float = 0.5  # D3S: initial fraction of tokens kept.
  anneal_steps: int = 50  # D3S: updates over which keeps anneal to 1.

# Slack against float32 round-off in `keep * count` before round/ceil: a
# product that is mathematically an integer (or a .5) may land a few ulps on
# the wrong side. Exact for counts up to ~8k tokens.
_COUNT_SLACK = 1e-3


def _check_choice(method: str, arg: str, value: str, known) -> None:
  """Rejects an unknown static string option, listing the known ones."""
  if value not in known:
    raise ValueError(f'{method}: unknown {arg} {value!r}; known: '
                     f'{list(known)}')


def _group_mean(x: Array, mask: Array) -> tuple[Array, Array]:
  """Masked mean over G. Returns (mean [B, 1], count [B, 1])."""
  count = jnp.sum(mask, axis=-1, keepdims=True)
  total = jnp.sum(jnp.where(mask, x, 0.0), axis=-1, keepdims=True)
  return total / jnp.maximum(count, 1), count


def _spread(x: Array, mask: Array, axis=-1) -> Array:
  """max - min of the masked entries along `axis` (keepdims); <= 0 if none."""
  hi = jnp.max(jnp.where(mask, x, -jnp.inf), axis=axis, keepdims=True)
  lo = jnp.min(jnp.where(mask, x, jnp.inf), axis=axis, keepdims=True)
  return hi - lo


def _centre(rewards: Array, mask: Array) -> Array:
  """r - mean_group(r) on valid entries, exactly 0 for equal-reward groups.

  Float round-off in the mean would otherwise leave ~1e-8 residues that a
  later normalisation by a tiny std amplifies.
  """
  mean, _ = _group_mean(rewards, mask)
  informative = mask & (_spread(rewards, mask) > 0)
  return jnp.where(informative, rewards - mean, 0.0)


def _inputs(rewards: Array, mask: Array) -> tuple[Array, Array]:
  return rewards.astype(jnp.float32), mask.astype(bool)


def _lower_median_mask(x: Array, mask: Array) -> Array:
  """True at the valid entry of sorted rank floor((n - 1) / 2) in each row.

  Ranks sort by value, ties broken by the lower index. n = number of valid
  entries in the row; a row with n = 0 has no True.

  Args:
    x: [B, G] float.
    mask: [B, G] bool.

  Returns:
    [B, G] bool, at most one True per row.
  """
  x = jnp.where(mask, x, 0.0)
  xi, xj = x[..., :, None], x[..., None, :]
  g = x.shape[-1]
  lower_index = jnp.arange(g)[None, :] < jnp.arange(g)[:, None]  # [i, j]
  before = mask[..., None, :] & ((xj < xi) | ((xj == xi) & lower_index))
  rank = jnp.sum(before, axis=-1)
  count = jnp.sum(mask, axis=-1, keepdims=True)
  return mask & (rank == (count - 1) // 2)


def batch_whiten(x: Array, mask: Array, *, eps: float = 1e-6) -> Array:
  """(x - mean) / (std + eps) over all valid entries of the whole batch.

  Population (ddof=0) std, masked mean and std. If all valid entries are
  equal (e.g. all 0) the result is exactly 0.

  Args:
    x: [B, G] (or any shape) float.
    mask: bool, same shape as x.
    eps: added to the std.

  Returns:
    float32, same shape as x, 0 on masked entries.
  """
  x = x.astype(jnp.float32)
  mask = mask.astype(bool)
  count = jnp.maximum(jnp.sum(mask), 1)
  mean = jnp.sum(jnp.where(mask, x, 0.0)) / count
  centred = jnp.where(mask, x - mean, 0.0)
  std = jnp.sqrt(jnp.sum(centred ** 2) / count)
  informative = mask & (_spread(x.reshape(-1), mask.reshape(-1))[0] > 0)
  return jnp.where(informative, centred / (std + eps), 0.0)


@ADVANTAGES.declare('grpo', knobs=_EPS, group_relative=True)
def grpo(rewards: Array, mask: Array, *, eps: float = 1e-6) -> Array:
  """GRPO (Shao et al. 2024, DeepSeekMath): A = (r - mean) / (std + eps).

  The std is the unbiased (ddof=1) group std, as in TRL and verl. A group
  whose rewards are all equal, or with a single valid sample, gets A = 0.

  Args:
    rewards: [B, G] float.
    mask: [B, G] bool, valid samples.
    eps: added to the std.

  Returns:
    [B, G] float32 advantages, 0 on masked entries.
  """
  rewards = rewards.astype(jnp.float32)
  mask = mask.astype(bool)
  mean, count = _group_mean(rewards, mask)
  # Exactly zero for groups whose rewards are all equal: float round-off in
  # the mean would otherwise be amplified by the tiny std (and eps=0 -> NaN).
  spread = (jnp.max(jnp.where(mask, rewards, -jnp.inf), -1, keepdims=True) -
            jnp.min(jnp.where(mask, rewards, jnp.inf), -1, keepdims=True))
  informative = mask & (spread > 0)
  centred = jnp.where(informative, rewards - mean, 0.0)
  var = jnp.sum(centred ** 2, axis=-1, keepdims=True) / jnp.maximum(
      count - 1, 1)
  return jnp.where(informative, centred / (jnp.sqrt(var) + eps), 0.0)


@ADVANTAGES.declare('dr_grpo', group_relative=True)
def dr_grpo(rewards: Array, mask: Array) -> Array:
  """Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training").

  A_i = r_i - mean_group(r): GRPO without the std division (pair it with the
  `seq-mean-token-sum-norm` aggregation).

  Args:
    rewards: [B, G] float.
    mask: [B, G] bool, valid samples.

  Returns:
    [B, G] float32 advantages, 0 on masked entries.
  """
  return _centre(*_inputs(rewards, mask))


@ADVANTAGES.declare('rloo', group_relative=True)
def rloo(rewards: Array, mask: Array) -> Array:
  """RLOO (Ahmadian et al. 2024, "Back to Basics"): leave-one-out baseline.

  A_i = r_i - mean_{j != i, valid} r_j. A group with a single valid sample
  has no baseline and gets A = 0.

  Args:
    rewards: [B, G] float.
    mask: [B, G] bool, valid samples.

  Returns:
    [B, G] float32 advantages, 0 on masked entries.
  """
  rewards, mask = _inputs(rewards, mask)
  total = jnp.sum(jnp.where(mask, rewards, 0.0), axis=-1, keepdims=True)
  count = jnp.sum(mask, axis=-1, keepdims=True)
  baseline = (total - rewards) / jnp.maximum(count - 1, 1)
  informative = mask & (_spread(rewards, mask) > 0) & (count > 1)
  return jnp.where(informative, rewards - baseline, 0.0)


@ADVANTAGES.declare('reinforce_pp', knobs=_EPS, group_relative=True,
                    whole_batch=True)
def reinforce_pp(rewards: Array, mask: Array, *, eps: float = 1e-6) -> Array:
  """REINFORCE++-baseline (Hu 2025, REINFORCE++).

  Group-mean baseline, A'_i = r_i - mean_group(r), then whitened over all
  valid entries of the whole batch: (A' - mean) / (std + eps), population
  std. If every centred value is 0 the result is 0.

  Args:
    rewards: [B, G] float.
    mask: [B, G] bool, valid samples.
    eps: added to the batch std.

  Returns:
    [B, G] float32 advantages, 0 on masked entries.
  """
  rewards, mask = _inputs(rewards, mask)
  return batch_whiten(_centre(rewards, mask), mask, eps=eps)


def mc_grpo_pivot(rewards: Array, mask: Array) -> Array:
  """The MC-GRPO pivot of each group (the learner drops it from the loss).

  The pivot is the valid sample at sorted rank floor((n - 1) / 2), ties
  broken by the lower index; for odd n (the G + 1 design) it is the median,
  for even n the lower median.

  Args:
    rewards: [B, G] float.
    mask: [B, G] bool, valid samples.

  Returns:
    [B, G] bool, True at each non-empty group's single pivot.
  """
  return _lower_median_mask(*_inputs(rewards, mask))


def _mc_grpo_loss_masks(rewards: Array, group_mask: Array,
                        loss_mask: Array, kwargs: dict):
  """MC-GRPO's `LossMasks` hook: the pivot leaves the group mask.

  Its advantage is 0 by construction, but as a member of the group mask it
  would still count in the loss's token and sequence denominators.

  Returns:
    (group_mask [B, G] without each group's pivot, loss_mask unchanged).
  """
  del kwargs
  return group_mask & ~mc_grpo_pivot(rewards, group_mask), loss_mask


MC_GRPO_SCALES = ('none', 'std', 'mad')


@ADVANTAGES.declare('mc_grpo', knobs={'scale': 'mc_grpo.scale', **_EPS},
                    group_relative=True, loss_masks=_mc_grpo_loss_masks)
def mc_grpo(rewards: Array, mask: Array, *, scale: str = 'none',
            eps: float = 1e-6) -> Array:
  """MC-GRPO (Kim 2026, Median-Centered GRPO for small rollout budgets).

  Each group holds G + 1 samples; the baseline is the reward of the pivot
  (see `mc_grpo_pivot`), A_i = r_i - r_pivot, so the pivot gets A = 0 and is
  excluded from the loss by the learner, leaving G samples with gradient.
  Optional scaling:
    'none' (default): no scaling.
    'std': divide by the group std of the valid samples (ddof=1) + eps.
    'mad': divide by the median absolute deviation |r - r_pivot| (lower
      median, as for the pivot) + eps.
  The default is 'none' because with binary rewards the MAD is often 0
  (e.g. [1, 1, 0]: MAD = 0), so 'mad' divides by eps and blows the minority
  sample's advantage up to ~1/eps. A single-sample group gets A = 0.

  Args:
    rewards: [B, G] float.
    mask: [B, G] bool, valid samples.
    scale: 'none', 'std' or 'mad' (a static string).
    eps: added to the scale.

  Returns:
    [B, G] float32 advantages, 0 on masked entries and at the pivot.

  Raises:
    ValueError: unknown `scale`.
  """
  _check_choice('mc_grpo', 'scale', scale, MC_GRPO_SCALES)
  rewards, mask = _inputs(rewards, mask)
  pivot = _lower_median_mask(rewards, mask)
  baseline = jnp.sum(jnp.where(pivot, rewards, 0.0), axis=-1, keepdims=True)
  adv = jnp.where(mask, rewards - baseline, 0.0)
  if scale == 'none':
    return adv
  if scale == 'std':
    mean, count = _group_mean(rewards, mask)
    dev = jnp.where(mask, rewards - mean, 0.0)
    denom = jnp.sqrt(jnp.sum(dev ** 2, axis=-1, keepdims=True) /
                     jnp.maximum(count - 1, 1))
  else:
    dev = jnp.abs(adv)
    mad_at = _lower_median_mask(dev, mask)
    denom = jnp.sum(jnp.where(mad_at, dev, 0.0), axis=-1, keepdims=True)
  denom = denom + eps
  # adv == 0 (all-equal group, pivot) stays 0 even when denom == 0; with
  # eps = 0 a zero MAD leaves A unscaled rather than infinite.
  return jnp.where(adv != 0, adv / jnp.where(denom > 0, denom, 1.0), 0.0)


@ADVANTAGES.declare('spo', inputs={'values': 'values'}, knobs=_EPS,
                    whole_batch=True, estimator='spo',
                    hint="the curriculum's per-prompt value tracker")
def spo(rewards: Array, mask: Array, *, values: Array,
        eps: float = 1e-6) -> Array:
  """Single-stream SPO (Xu et al. 2025, Single-stream Policy Optimization).

  A_i = r_i - v(x) with a persistent per-prompt baseline v(x) (supplied by
  a value tracker), then whitened over all valid entries of the batch
  (population std + eps). Works for any G, including the group-free G = 1.

  Args:
    rewards: [B, G] float.
    mask: [B, G] bool, valid samples.
    values: [B] float, the baseline v(x) of each prompt.
    eps: added to the batch std.

  Returns:
    [B, G] float32 advantages, 0 on masked entries.
  """
  rewards, mask = _inputs(rewards, mask)
  values = jnp.asarray(values, jnp.float32)
  raw = jnp.where(mask, rewards - values[:, None], 0.0)
  return batch_whiten(raw, mask, eps=eps)


TREE_WEIGHTINGS = ('size', 'mean')


@ADVANTAGES.declare('tree', inputs={'path_ids': 'path_ids'}, knobs=_EPS,
                    whole_batch=True, hint='tree rollouts')
def tree(rewards: Array, mask: Array, *, path_ids: Array,
         weighting: str = 'size', eps: float = 1e-6) -> Array:
  """TreePO ancestor-group advantage (Li et al. 2025, TreePO).

  Leaves of a sampling tree share ancestor segments. For leaf i and depth d,
  G_d(i) = valid leaves j of the same prompt with path_ids[b, j, d] ==
  path_ids[b, i, d] != -1; depth d counts for leaf i if d == 0 (the prompt
  group) or |G_d(i)| > 1. With a_{i,d} = R_i - mean_{G_d(i)} R:
    'size': A_i = sum_d |G_d(i)| a_{i,d} / sum_d |G_d(i)|,
    'mean': A_i = mean over the counted depths of a_{i,d};
  then A is whitened over all valid leaves of the batch (population std +
  eps). With D = 1 this is `batch_whiten(dr_grpo(...))`. Memory is
  O(B G^2 D). The depths are those of the compressed tree the samplers
  write (`tree_rules.tree_paths`: one depth per branch point, not per
  segment), so a stretch of segments without a fork is one ancestor group,
  counted once; the card leaves that reading open.

  Args:
    rewards: [B, G] float, leaf rewards R.
    mask: [B, G] bool, valid leaves.
    path_ids: [B, G, D] int, path_ids[b, i, d] = id of leaf i's ancestor at
      depth d (d = 0: the prompt root, equal for all leaves of a prompt);
      -1 beyond the leaf's depth. Ids only need to be unique within a
      prompt and depth.
    weighting: 'size' or 'mean' (a static string).
    eps: added to the batch std.

  Returns:
    [B, G] float32 advantages, 0 on masked entries.

  Raises:
    ValueError: unknown `weighting`.
  """
  _check_choice('tree', 'weighting', weighting, TREE_WEIGHTINGS)
  rewards, mask = _inputs(rewards, mask)
  path_ids = jnp.asarray(path_ids)
  pi = path_ids[:, :, None, :]  # [B, i, 1, D]
  pj = path_ids[:, None, :, :]  # [B, 1, j, D]
  same = (pi == pj) & (pi != -1) & mask[:, None, :, None]  # [B, i, j, D]
  r_j = rewards[:, None, :, None]
  size = jnp.sum(same, axis=2)  # [B, i, D]
  mean = jnp.sum(jnp.where(same, r_j, 0.0), axis=2) / jnp.maximum(size, 1)
  spread = _spread(jnp.broadcast_to(r_j, same.shape), same, axis=2)[:, :, 0]
  a = jnp.where(spread > 0, rewards[..., None] - mean, 0.0)
  depth = jnp.arange(path_ids.shape[-1])
  counted = (mask[..., None] & (path_ids != -1) &
             ((depth == 0) | (size > 1)))
  weight = jnp.where(counted, size if weighting == 'size' else 1, 0)
  weight = weight.astype(jnp.float32)
  total = jnp.sum(weight, axis=-1)
  raw = jnp.sum(weight * a, axis=-1) / jnp.maximum(total, 1.0)
  return batch_whiten(jnp.where(total > 0, raw, 0.0), mask, eps=eps)


@ADVANTAGES.declare('treerl', inputs={
    'path_ids': 'path_ids', 'depth_start': 'depth_start',
    'loss_mask': 'loss_mask'}, knobs=_EPS, hint='tree rollouts')
def treerl(rewards: Array, mask: Array, *, path_ids: Array,
           depth_start: Array, loss_mask: Array, whiten: bool = False,
           eps: float = 1e-6) -> Array:
  """TreeRL process reward per segment (Hou et al. 2025, TreeRL).

  The nodes of a sampling tree are the token spans between branch points
  (`rlx.sampling.tree` returns them as path ids). With V(s) the mean reward
  of the valid leaves under node s, a node s at depth d >= 1 with parent s'
  gets the global plus the local advantage, scaled down for nodes shared
  by many leaves (their tokens recur once per leaf in the batch):
    R(s) = ((V(s) - V(root)) + (V(s) - V(s'))) / sqrt(|L(s)|);
  the root's own tokens (the prefix every leaf shares) get 0. Token t of
  leaf i gets R of the deepest node on its path starting at or before t.
  A difference is exactly 0 where the rewards it compares are all equal
  (no round-off residue). Optionally (not in the paper's formula) the token
  advantages are whitened over all valid tokens of the batch.

  Args:
    rewards: [B, G] float, leaf rewards (correctness).
    mask: [B, G] bool, valid leaves.
    path_ids: [B, G, D] int, node id of leaf i's ancestor at depth d (as
      for `tree`; d = 0 the root), -1 past the leaf's last node.
    depth_start: [B, G, D] int, first response token of that node; non-
      decreasing in d; -1 where path_ids is -1.
    loss_mask: [B, G, T] bool, response tokens.
    whiten: whiten the token advantages over the valid tokens.
    eps: added to the std when whitening.

  Returns:
    [B, G, T] float32 token advantages, 0 outside mask & loss_mask.
  """
  rewards, mask = _inputs(rewards, mask)
  path_ids = jnp.asarray(path_ids)
  pi = path_ids[:, :, None, :]  # [B, i, 1, D]
  same = ((pi == path_ids[:, None, :, :]) & (pi != -1) &
          mask[:, None, :, None])  # [B, i, j, D]
  r_j = jnp.broadcast_to(rewards[:, None, :, None], same.shape)
  size = jnp.sum(same, axis=2)  # [B, i, D]
  value = jnp.sum(jnp.where(same, r_j, 0.0), axis=2) / jnp.maximum(size, 1)
  varied = _spread(r_j, same, axis=2)[:, :, 0] > 0  # [B, i, D]
  shift = lambda x: jnp.concatenate([x[..., :1], x[..., :-1]], axis=-1)
  glob = jnp.where(varied[..., :1], value - value[..., :1], 0.0)
  local = jnp.where(shift(varied), value - shift(value), 0.0)
  depth = jnp.arange(path_ids.shape[-1])
  node = jnp.where((depth > 0) & (size > 0),
                   (glob + local) / jnp.sqrt(jnp.maximum(size, 1)), 0.0)
  t = jnp.arange(loss_mask.shape[-1])
  started = ((path_ids != -1)[..., None, :] &
             (jnp.asarray(depth_start)[..., None, :] <= t[:, None]))
  token_depth = jnp.maximum(jnp.sum(started, axis=-1) - 1, 0)  # [B, G, T]
  adv = jnp.take_along_axis(node, token_depth, axis=-1)
  valid = loss_mask.astype(bool) & mask[..., None]
  adv = jnp.where(valid, adv, 0.0)
  return batch_whiten(adv, valid, eps=eps) if whiten else adv


def mean_sampler_logp(old_logp: Array, behaviour_logp: Array | None,
                      loss_mask: Array) -> Array:
  """Each response's mean log-prob under the sampler, `[B, G]`.

  Args:
    old_logp: [B, G, T] log-probs of the policy that sampled.
    behaviour_logp: [B, G, T] sampler log-probs, or None (= old_logp).
    loss_mask: [B, G, T] bool, response tokens.

  Returns:
    [B, G] float32 masked mean over T (0 for an empty response).
  """
  mask = loss_mask.astype(jnp.float32)
  logp = old_logp if behaviour_logp is None else behaviour_logp
  return jnp.sum(logp * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)


@ADVANTAGES.declare('xrpo_sharpen', inputs={'mean_logp': entries.Derived(
    ('old_logp', 'behaviour_logp', 'loss_mask'), mean_sampler_logp)},
                    knobs={'lam': 'xrpo.lam', 'clip': 'xrpo.clip', **_EPS},
                    group_relative=True)
def xrpo_sharpen(rewards: Array, mask: Array, *, mean_logp: Array,
                 lam: float = 0.1, clip: float = 1.0,
                 eps: float = 1e-6) -> Array:
  """GRPO plus XRPO novelty sharpening (Bamba et al. 2025, XRPO).

  A_i = grpo_i + lam * clip(mean_group(mean_logp) - mean_logp_i, 0, clip)
  for correct responses (r_i > 0.5): a correct response that is less likely
  than its group's average gets a bounded boost. Choices (open card): the
  group mean of mean_logp is over all valid samples (correct or not); the
  bonus is given only in groups whose rewards are not all equal, so an
  all-correct group keeps A = 0 as in GRPO (no one-sided push without a
  contrasting failure).

  Args:
    rewards: [B, G] float.
    mask: [B, G] bool, valid samples.
    mean_logp: [B, G] float, each response's length-normalised
      log-likelihood under the sampling policy.
    lam: bonus scale.
    clip: cap of the log-likelihood gap before scaling by lam.
    eps: GRPO's std epsilon.

  Returns:
    [B, G] float32 advantages, 0 on masked entries.
  """
  rewards, mask = _inputs(rewards, mask)
  mean_logp = jnp.asarray(mean_logp, jnp.float32)
  base = grpo(rewards, mask, eps=eps)
  group_lp, _ = _group_mean(mean_logp, mask)
  gap = jnp.clip(group_lp - jnp.where(mask, mean_logp, 0.0), 0.0, clip)
  boosted = mask & (rewards > 0.5) & (_spread(rewards, mask) > 0)
  return base + jnp.where(boosted, lam * gap, 0.0)


def _check_ratio(name: str, value) -> None:
  if isinstance(value, (int, float)) and not 0 < value <= 1:
    raise ValueError(f'{name} must be in (0, 1], got {value}')


def d3s_sample_mask(rewards: Array, mask: Array, *, sample_keep) -> Array:
  """D^3S sample level: the kept subset of each group (max reward variance).

  k = max(2, round(sample_keep * n)) (round half up, capped at n; n < 2
  keeps all n) of the n valid samples are kept, chosen to maximise the
  variance of the kept rewards (so of their GRPO advantages). A maximum-
  variance k-subset is always top-a plus bottom-(k - a) by reward; we scan
  a in 0..k and take the smallest a whose variance is within 1e-5
  (relative) of the best. Within equal rewards the lower index ranks
  higher. For binary rewards this keeps as many 1s as 0s as possible.

  Args:
    rewards: [B, G] float.
    mask: [B, G] bool, valid samples.
    sample_keep: float in (0, 1] (may be a traced scalar).

  Returns:
    [B, G] bool, kept samples (a subset of mask).
  """
  _check_ratio('sample_keep', sample_keep)
  rewards, mask = _inputs(rewards, mask)
  g = rewards.shape[-1]
  r = jnp.where(mask, rewards, 0.0)
  n = jnp.sum(mask, axis=-1, keepdims=True)  # [B, 1]
  k = jnp.floor(jnp.asarray(sample_keep, jnp.float32) * n + 0.5 +
                _COUNT_SLACK).astype(jnp.int32)
  k = jnp.minimum(jnp.maximum(k, 2), n)
  # Descending rank: #valid j with r_j > r_i, or r_j == r_i and j < i.
  ri, rj = r[..., :, None], r[..., None, :]
  lower_index = jnp.arange(g)[None, :] < jnp.arange(g)[:, None]
  above = mask[..., None, :] & ((rj > ri) | ((rj == ri) & lower_index))
  rank = jnp.sum(above, axis=-1)[:, None, :]  # [B, 1, G]
  a = jnp.arange(g + 1)[None, :, None]  # [1, A, 1]
  k3, n3 = k[..., None], n[..., None]  # [B, 1, 1]
  keep = mask[:, None, :] & ((rank < a) | (rank >= n3 - (k3 - a)))
  r3 = r[:, None, :]
  kf = jnp.maximum(k3, 1).astype(jnp.float32)
  mean = jnp.sum(jnp.where(keep, r3, 0.0), -1, keepdims=True) / kf
  var = jnp.sum(jnp.where(keep, (r3 - mean) ** 2, 0.0), -1) / kf[..., 0]
  feasible = a[..., 0] <= k  # [B, A]
  var = jnp.where(feasible, var, -jnp.inf)
  best = jnp.max(var, axis=-1, keepdims=True)
  near_best = feasible & (var >= best - 1e-5 * jnp.abs(best))
  a_star = jnp.argmax(near_best, axis=-1)  # First (smallest) a.
  return jnp.take_along_axis(keep, a_star[:, None, None], axis=1)[:, 0]


def d3s_token_mask(advantages: Array, *, token_entropy: Array,
                   loss_mask: Array, token_keep) -> Array:
  """D^3S token level: per response, the tokens with the largest |A| * H.

  Keeps c_i = ceil(token_keep * len_i) of the len_i loss-mask tokens of
  response i (at least 1 if len_i >= 1), ranked by |A_i| * H_{i,t}, ties
  broken by the earlier position.

  Args:
    advantages: [B, G] float, sequence advantages A_i.
    token_entropy: [B, G, T] float, policy entropy H_{i,t} (>= 0).
    loss_mask: [B, G, T] bool.
    token_keep: float in (0, 1] (may be a traced scalar).

  Returns:
    [B, G, T] bool, kept tokens (a subset of loss_mask).
  """
  _check_ratio('token_keep', token_keep)
  loss_mask = loss_mask.astype(bool)
  score = (jnp.abs(advantages.astype(jnp.float32))[..., None] *
           token_entropy.astype(jnp.float32))
  key = jnp.where(loss_mask, -score, jnp.inf)
  order = jnp.argsort(key, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1)
  length = jnp.sum(loss_mask, axis=-1, keepdims=True)
  count = jnp.ceil(jnp.asarray(token_keep, jnp.float32) * length -
                   _COUNT_SLACK).astype(jnp.int32)
  count = jnp.clip(count, jnp.minimum(length, 1), length)
  return loss_mask & (rank < count)


def _d3s_loss_masks(rewards: Array, group_mask: Array, loss_mask: Array,
                    kwargs: dict):
  """D^3S's `LossMasks` hook: the unselected samples and tokens leave the
  loss (`d3s` gives them A = 0; here they also leave the denominators).

  Args:
    rewards, group_mask: [B, G].
    loss_mask: [B, G, T] bool.
    kwargs: `d3s`'s keyword arguments (token_entropy, the keep ratios of
      this step, eps).

  Returns:
    (kept samples [B, G], kept tokens [B, G, T]), as `d3s` selects them.
  """
  kept = d3s_sample_mask(rewards, group_mask,
                         sample_keep=kwargs['sample_keep'])
  seq_adv = grpo(rewards, kept, eps=kwargs['eps'])
  return kept, d3s_token_mask(
      seq_adv, token_entropy=kwargs['token_entropy'], loss_mask=loss_mask,
      token_keep=kwargs['token_keep'])


def _annealed(field: str):
  """A knob: objective.`field`'s keep ratio annealed to 1 over
  objective.d3s.anneal_steps (`d3s_keep_ratio` at the step)."""
  def knob(obj, step):
    return d3s_keep_ratio(step, start=entries.knob_value(obj, field),
                          end=1.0, anneal_steps=obj.d3s.anneal_steps)
  knob.fields = (field, 'd3s.anneal_steps')
  return knob


@ADVANTAGES.declare(
    'd3s', inputs={'token_entropy': 'entropy', 'loss_mask': 'loss_mask'},
    knobs={'sample_keep': _annealed('d3s.sample_keep'),
           'token_keep': _annealed('d3s.token_keep'), **_EPS},
    group_relative=True, loss_masks=_d3s_loss_masks,
    hint="the sampler's token entropies")
def d3s(rewards: Array, mask: Array, *, token_entropy: Array,
        loss_mask: Array, sample_keep, token_keep,
        eps: float = 1e-6) -> Array:
  """D^3S dual-level down-sampling (Wang et al. 2025, arXiv:2509.22115).

  Sample level (`d3s_sample_mask`): each group keeps the max(2,
  round(sample_keep * n)) valid samples maximising the variance of their
  rewards; GRPO advantages (ddof=1 std + eps) are computed over the kept
  samples only; dropped samples get 0. Token level (`d3s_token_mask`): each
  response keeps the ceil(token_keep * len) loss-mask tokens with the
  largest |A_i| * H_{i,t}. Annealing the ratios toward 1 is the trainer's
  job (`d3s_keep_ratio`). Choices (open card): variance of rewards (equal to
  maximising Var(A) before std scaling), round half up for k, minimum k = 2,
  lower-index / earlier-position tie-breaks. Dropped samples and tokens
  carry A = 0 but remain in `loss_mask`; use the masks to also drop them
  from a token-mean denominator.

  Args:
    rewards: [B, G] float.
    mask: [B, G] bool, valid samples.
    token_entropy: [B, G, T] float, policy entropy per response token.
    loss_mask: [B, G, T] bool.
    sample_keep: float in (0, 1], fraction of samples kept per group.
    token_keep: float in (0, 1], fraction of tokens kept per response.
    eps: GRPO's std epsilon.

  Returns:
    [B, G, T] float32 token advantages: A_i on kept tokens, else 0.
  """
  rewards, mask = _inputs(rewards, mask)
  kept = d3s_sample_mask(rewards, mask, sample_keep=sample_keep)
  adv = grpo(rewards, kept, eps=eps)
  loss_mask = loss_mask.astype(bool) & kept[..., None]
  tokens = d3s_token_mask(adv, token_entropy=token_entropy,
                          loss_mask=loss_mask, token_keep=token_keep)
  return jnp.where(tokens, adv[..., None], 0.0)


def d3s_keep_ratio(step, *, start: float, end: float = 1.0,
                   anneal_steps: int):
  """Linear D^3S keep-ratio schedule: `start` at step 0, `end` afterwards.

  ratio = start + (end - start) * min(step / anneal_steps, 1); anneal_steps
  <= 0 gives `end` at once.

  Args:
    step: int or int array, the training step (>= 0).
    start: the aggressive initial ratio, in (0, 1].
    end: the final ratio, in (0, 1] (usually 1).
    anneal_steps: steps to go from start to end.

  Returns:
    float32 scalar array.
  """
  _check_ratio('start', start)
  _check_ratio('end', end)
  if anneal_steps <= 0:
    return jnp.asarray(end, jnp.float32)
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / anneal_steps, 0.0, 1.0)
  return start + (end - start) * frac


def reads(name: str) -> frozenset[str]:
  """The Batch fields advantage `name` reads beyond rewards and group_mask
  (e.g. 'path_ids' for the tree estimators); empty for an unknown name,
  which the config check names."""
  return ADVANTAGES.get(name).reads if name in ADVANTAGES else frozenset()


@ADVANTAGES.check
def _check(cfg) -> None:
  """objective.advantage and what the chosen estimator needs of the rest
  of the config."""
  obj, name = cfg.objective, cfg.objective.advantage
  errors.one_of(obj.mc_grpo.scale, MC_GRPO_SCALES, 'objective.mc_grpo.scale')
  errors.require(name in ADVANTAGES, 'objective.advantage',
                 f'unknown {name!r}; known: {sorted(ADVANTAGES)}')
  if name not in ADVANTAGES:
    return
  entry = ADVANTAGES.get(name)
  errors.require(cfg.rl.group_size >= 2 or not entry.group_relative,
                 'rl.group_size', f'is {cfg.rl.group_size}; the group-'
                 f'relative advantage {name!r} needs at least 2')
  errors.require(not (obj.kl_beta and obj.kl_in_reward and
                      cfg.rl.num_minibatches > 1 and entry.whole_batch),
                 'objective.kl_in_reward', f'{name!r} whitens over the '
                 'whole batch, which is split before the step that shapes '
                 'the rewards (rl.num_minibatches > 1): use kl_in_reward='
                 'False (the KL in the loss) or one minibatch')
  errors.require(not entry.needs, 'objective.advantage',
                 f'{name!r} needs {entry.needs}, which the trainer does '
                 'not produce yet; it is available as a library function '
                 '(rlx.objectives.compute_advantages)')
  entries.check_knobs('objective.advantage', entry, obj)
