"""Rules of tree rollouts: when to branch, prune or stop, and tree bookkeeping.

Split from the slot machinery in `rlx/sampling/tree.py`: the jnp rules
run inside the jitted decode step (LATR branching and lookahead pruning),
the numpy ones on the host between segments (TreePO budget and
repetition, EPTree fork points); the host policy loops of each kind
(`treepo`, `latr`, `eptree`) call them and hand their decisions to the
jitted `edit` as one `Edits` batch; at the end the slot genealogy becomes
per-leaf path ids for the tree advantages, and the `tree/` metrics.

Genealogy. Each slot of a prompt's block of W slots keeps a lineage row
`anc [W]`: anc[k] is the number of response tokens its path shares with the
path that occupies slot k (the position where it left k's path), SELF for
itself and NO_ANCESTOR for slots that are not its ancestors. Forking child
c from parent p at shared length f sets anc_c = min(anc_p, f) (an ancestor
of p is left no later than p itself is), anc_c[p] = f, anc_c[c] = SELF.
Two leaves then share max_k min(anc_i[k], anc_j[k]) tokens
(`shared_prefix`), which is exact as long as no ancestor slot is reused,
and tree.py never reuses one (only LATR children still inside their
lookahead window are pruned, and those cannot branch).
"""

from typing import Callable, Hashable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlx.types import Array, FinishReason

_STOP, _LENGTH = int(FinishReason.STOP), int(FinishReason.LENGTH)
NO_ANCESTOR = -1
SELF = 2 ** 30  # anc[i, i]: a path never leaves itself.


# ----------------------------------------------------------------- LATR (jit)

def latr_branch(logits: Array, *, tau_abs, tau_rel
                ) -> tuple[Array, Array, Array]:
  """LATR's branching test (Xing et al. 2025, arXiv:2510.24302).

  With p1 >= p2 the top-2 probabilities of the untempered, unfiltered
  distribution softmax(logits), a row may open a branch iff p2 > tau_abs
  and p1 - p2 < tau_rel (math defaults 0.15 / 0.25).

  Args:
    logits: [R, V] float.
    tau_abs: scalar (array or float), absolute floor on p2.
    tau_rel: scalar, ceiling on the gap p1 - p2.

  Returns:
    (branch [R] bool, top1 [R] int32, top2 [R] int32).
  """
  probs, idx = jax.lax.top_k(jax.nn.softmax(logits.astype(jnp.float32), -1), 2)
  branch = (probs[:, 1] > tau_abs) & (probs[:, 0] - probs[:, 1] < tau_rel)
  return branch, idx[:, 0].astype(jnp.int32), idx[:, 1].astype(jnp.int32)


def ban_token(logp: Array, ban: Array) -> Array:
  """Sampling log-probs [R, V] with token ban[r] removed from row r (jit).

  EPTree's `fork_distinct`: a branch's first token differs from its
  parent's. Rows with ban -1, and rows whose only remaining token is the
  banned one (nothing else left after top-p/top-k), are unchanged.
  Categorical sampling from the result draws from the distribution
  renormalised without the banned token.
  """
  hit = jnp.arange(logp.shape[-1])[None, :] == ban[:, None]
  out = jnp.where(hit, -jnp.inf, logp)
  return jnp.where(jnp.any(out > -jnp.inf, -1, keepdims=True), out, logp)


def edit_distance(a: Array, b: Array) -> Array:
  """Levenshtein distance between the rows of a and b, in jit.

  The row-by-row dynamic programme, with the in-row insertion chain
  D[i, j] = min_k<=j (E[k] + j - k) computed as a cumulative minimum, so
  one row costs a few vector ops: O(C) sequential steps for C-token rows.

  Args:
    a, b: [R, C] int token windows.

  Returns:
    [R] int32 edit distances (insertions, deletions, substitutions cost 1).
  """
  r, c = a.shape
  j = jnp.arange(c + 1, dtype=jnp.int32)
  first = jnp.broadcast_to(j, (r, c + 1))

  def row(prev, inputs):
    i, a_i = inputs  # scalar, [R]
    cost = (a_i[:, None] != b).astype(jnp.int32)  # [R, C]
    e = jnp.minimum(prev[:, 1:] + 1, prev[:, :-1] + cost)
    e = jnp.concatenate([jnp.full((r, 1), i, jnp.int32), e], axis=1)
    return j + jax.lax.cummin(e - j, axis=1), None

  last, _ = jax.lax.scan(row, first, (jnp.arange(1, c + 1, dtype=jnp.int32),
                                      jnp.swapaxes(a, 0, 1)))
  return last[:, c]


# ------------------------------------------------------- TreePO / EPTree (host)

def is_repeating(tokens: np.ndarray, *, max_ngram: int, count: int) -> bool:
  """TreePO's repetition stop (open in the card; our rule): True iff the
  sequence ends with `count` consecutive copies of some n-gram, n <=
  max_ngram (e.g. 'ab ab ab'); max_ngram = 0 disables it.

  Args:
    tokens: [L] the response so far.
    max_ngram: longest repeated unit checked.
    count: copies needed (>= 2).
  """
  for n in range(1, max_ngram + 1):
    span = n * count
    if span <= len(tokens):
      tail = tokens[len(tokens) - span:]
      if np.all(tail == np.tile(tail[:n], count)):
        return True
  return False


def text_stop_fn(decode: Callable[[np.ndarray], str],
                 found: Callable[[str], Optional[int]]
                 ) -> Callable[[np.ndarray], int]:
  """A token-level answer rule (`stop_fn` of TreePO's loop) from a text one.

  Args:
    decode: token ids [L] -> text.
    found: text -> None while no answer is complete, else a position; it
      must be monotone (once found in a prefix, found in every extension).

  Returns:
    stop_fn(tokens [L]) -> the fewest leading tokens whose text has the
    answer (binary search, O(log L) decodes), or 0 if there is none.
  """
  def stop_fn(tokens: np.ndarray) -> int:
    if found(decode(tokens)) is None:
      return 0
    lo, hi = 1, len(tokens)  # found(decode(tokens[:hi])) holds.
    while lo < hi:
      mid = (lo + hi) // 2
      if found(decode(tokens[:mid])) is None:
        lo = mid + 1
      else:
        hi = mid
    return hi
  return stop_fn


def allocate(free: int, weights: np.ndarray, cap: int) -> np.ndarray:
  """Splits `free` new branches among live paths in proportion to weights.

  D'Hondt apportionment: each branch in turn goes to the path with the
  largest weight / (branches so far + 1) among those below `cap`; ties go
  to the lower index. weights = 1 is TreePO's even split.

  Args:
    free: branches to hand out (unused slots of the prompt's budget).
    weights: [N] > 0, one per live path.
    cap: most new branches per path at one segment boundary.

  Returns:
    [N] int, new branches per path (sum <= free).
  """
  quota = np.zeros(len(weights), np.int64)
  for _ in range(free):
    score = np.where(quota < cap, weights / (quota + 1), -np.inf)
    if not len(score) or not np.isfinite(score.max()):
      break
    quota[int(np.argmax(score))] += 1
  return quota


def fork_points(score: np.ndarray, length: np.ndarray, birth: np.ndarray,
                used: np.ndarray, slots: Sequence[int], n: int
                ) -> list[tuple[int, int]]:
  """EPTree's fork points of one tree: its n highest-scoring token positions.

  TreeRL (Hou et al. 2025, arXiv:2506.11902) forks where the policy is most
  uncertain. Leaf i owns positions [birth_i, length_i) (earlier ones belong
  to its ancestors, where they are candidates already); positions that
  were fork points before are excluded. If fewer than n candidates remain
  they are cycled, as TreeRL does.

  Args:
    score: [R, T] per-token uncertainty (entropy or -logp).
    length, birth: [R] int.
    used: [R, T] bool, positions already forked at (updated in place).
    slots: the tree's slots (its leaves).
    n: points wanted.

  Returns:
    [(slot, position)] * n, best first (ties: lower slot, then position).
  """
  cands = [(-float(score[i, t]), i, t) for i in slots
           for t in range(int(birth[i]), int(length[i])) if not used[i, t]]
  cands.sort()
  chosen = [(i, t) for _, i, t in cands[:n]]
  chosen = [chosen[k % len(chosen)] for k in range(n)] if chosen else []
  for i, t in chosen:
    used[i, t] = True
  return chosen


# ------------------------------------------------- host policies (per kind)

class Edits:
  """A batch of ends and forks for one jitted `edit` call (R rows each;
  unused fork rows name child R, which the fork drops)."""

  def __init__(self, r: int):
    self.n_forks = 0
    self.end = np.zeros(r, bool)
    self.end_length = np.zeros(r, np.int32)
    self.end_finish = np.zeros(r, np.int32)
    self.child = np.full(r, r, np.int32)
    self.parent = np.zeros(r, np.int32)
    self.length = np.zeros(r, np.int32)
    self.tree = np.zeros(r, bool)

  def fork(self, child: int, parent: int, length: int, tree: bool = False):
    """Slot `child` becomes `parent`'s first `length` tokens (a LATR tree
    slot iff `tree`)."""
    k = self.n_forks
    self.child[k], self.parent[k], self.length[k] = child, parent, length
    self.tree[k] = tree
    self.n_forks += 1

  def stop(self, slot: int, length: int, finish: int):
    """Ends `slot`, cut to `length` tokens, with FinishReason `finish`."""
    self.end[slot], self.end_length[slot] = True, length
    self.end_finish[slot] = finish

  def apply(self, edit_fn: Callable, st):
    if not (self.n_forks or self.end.any()):
      return st  # Nothing to do: skip a full copy of the cache rows.
    return edit_fn(st, self.end, self.end_length, self.end_finish,
                   self.child, self.parent, self.length, self.tree)


def fetch(st, *names) -> dict:
  """The named fields of a slot state, on the host."""
  return {k: np.asarray(v) for k, v in
          zip(names, jax.device_get([getattr(st, n) for n in names]))}


def treepo(cfg, st, *, b: int, w: int, advance: Callable, edit: Callable,
           stop_fn: Optional[Callable[[np.ndarray], int]],
           rng: np.random.Generator):
  """TreePO's host loop (Li et al. 2025, arXiv:2508.17445); see tree.py.

  Returns (final state, counters)."""
  ed = Edits(b * w)
  for i in range(b):
    for k in range(1, min(cfg.init_divergence, w)):
      ed.fork(i * w + k, i * w, 0)
  st = ed.apply(edit, st)
  info = {'segments': 0, 'fallbacks': 0, 'ended_answer': 0,
          'ended_repeat': 0}
  need_tokens = stop_fn is not None or cfg.repeat_ngram > 0
  settled = np.zeros(b * w, bool)  # Ended paths the rules have seen.
  while True:
    st = advance(st, cfg.segment_len)
    info['segments'] += 1
    h = fetch(st, 'length', 'live', 'used', *(
        ('tokens',) if need_tokens else ()), *(
            ('finish',) if stop_fn else ()), *(
            ('logp',) if cfg.allocation == 'logp' else ()))
    live, length, ed = h['live'].copy(), h['length'].copy(), Edits(b * w)
    # Paths that ended inside this segment get the answer rule too: cut
    # after the answer when the length limit stopped them or text follows
    # it (a stop token right after the answer stays, to be learned).
    ended_now = h['used'] & ~live & ~settled
    for i in np.flatnonzero(live | ended_now) if need_tokens else ():
      toks = h['tokens'][i, :length[i]]
      cut = stop_fn(toks) if stop_fn else 0
      if cut and not live[i] and h['finish'][i] == _STOP and (
          cut >= length[i] - 1):
        cut = 0
      if cut:
        length[i], live[i] = min(cut, length[i]), False
        ed.stop(i, length[i], _STOP)
        info['ended_answer'] += 1
      elif live[i] and cfg.repeat_ngram and is_repeating(
          toks, max_ngram=cfg.repeat_ngram, count=cfg.repeat_count):
        live[i] = False
        ed.stop(i, length[i], _LENGTH)
        info['ended_repeat'] += 1
    settled |= h['used'] & ~live
    for i in range(b):
      block = np.arange(i * w, (i + 1) * w)
      free, paths = block[~h['used'][block]], block[live[block]]
      if len(free) and len(paths):  # Re-spend the budget on live paths.
        weights = np.ones(len(paths))
        if cfg.allocation == 'logp':
          cum = np.array([h['logp'][j, :length[j]].sum() for j in paths])
          weights = np.exp(cum - cum.max())
        quota = allocate(len(free), weights, cfg.divergence - 1)
        for c, j in zip(free, np.repeat(paths, quota)):
          ed.fork(c, j, length[j])
      elif len(free) and cfg.fallback:  # No live path: re-branch.
        j = int(rng.choice(block[h['used'][block]]))
        f = int(rng.choice(np.arange(0, length[j], cfg.segment_len)))
        for c in free[:cfg.divergence]:
          ed.fork(c, j, f)
        info['fallbacks'] += 1
    st = ed.apply(edit, st)
    if not (ed.n_forks or live.any()):
      return st, info


def latr(cfg, st, *, b: int, w: int, n_tree: int, advance: Callable,
         edit: Callable):
  """LATR's host loop: the W - n_tree plain samples start as forks of the
  root at token 0; branching and pruning happen inside `advance`; with
  `cfg.refill`, tree slots left unused by a finished tree become plain
  samples. Returns (final state, counters)."""
  ed = Edits(b * w)
  for i in range(b):
    for k in range(max(n_tree, 1), w):
      ed.fork(i * w + k, i * w, 0)
  st = ed.apply(edit, st)
  info = {'refilled': 0}
  while True:
    st = advance(st, cfg.chunk_steps)
    h = fetch(st, 'live', 'used', 'tree_slot')
    ed = Edits(b * w)
    for i in range(b) if cfg.refill else ():
      block = np.arange(i * w, (i + 1) * w)
      if not (h['live'][block] & h['tree_slot'][block]).any():
        for c in block[~h['used'][block]]:
          ed.fork(c, i * w, 0)
          info['refilled'] += 1
    if not (ed.n_forks or h['live'].any()):
      return st, info
    st = ed.apply(edit, st)


def eptree(cfg, st, *, b: int, w: int, advance: Callable, edit: Callable):
  """EPTree's host loop (TreeRL, Hou et al. 2025): M chains, then L rounds
  forking each tree at its N best `fork_points` into T branches; forks go
  to free slots point-rank first, round-robin over trees, until the budget
  W is spent. A fork point is used once, so very short chains can run out
  of points and leave slots unused: fewer than W leaves (the leaf mask and
  the curriculum's variable groups carry that). Returns (final state,
  counters)."""
  t, m = cfg.max_new_tokens, cfg.num_chains
  ed = Edits(b * w)
  tree_of = np.tile(np.arange(w), b)  # The chain each slot descends from.
  for i in range(b):
    for k in range(1, m):
      ed.fork(i * w + k, i * w, 0)
  st = advance(ed.apply(edit, st), t)
  forked = np.zeros((b * w, t), bool)
  info = {'forks': 0}
  for _ in range(cfg.rounds):
    h = fetch(st, 'length', 'birth', 'used', 'logp', 'entropy')
    score = h['entropy'] if cfg.fork_score == 'entropy' else -h['logp']
    ed = Edits(b * w)
    for i in range(b):
      block = np.arange(i * w, (i + 1) * w)
      free = list(block[~h['used'][block]])
      points = [fork_points(score, h['length'], h['birth'], forked,
                            block[h['used'][block] & (tree_of[block] == k)],
                            cfg.fork_points) for k in range(m)]
      for rank in range(cfg.fork_points):
        for k in range(m):
          for _ in range(cfg.fork_branches):
            if free and rank < len(points[k]):
              (j, pos), c = points[k][rank], free.pop(0)
              ed.fork(c, j, pos)
              tree_of[c], forked[c, pos] = k, True
              info['forks'] += 1
    st = advance(ed.apply(edit, st), t)
  return st, info


# ----------------------------------------------------- genealogy -> path ids

def shared_prefix(anc: np.ndarray, length: np.ndarray) -> np.ndarray:
  """Response tokens each pair of paths shares, from the lineage rows.

  Args:
    anc: [W, W] int lineage rows of one prompt's slots (module docstring).
    length: [W] int path lengths (the diagonal).

  Returns:
    [W, W] int, s[i, j] = shared tokens (0 when only the prompt is shared).
  """
  both = np.minimum(anc[:, None, :], anc[None, :, :])  # [i, j, k]
  s = np.maximum(both.max(-1), 0)
  np.fill_diagonal(s, length)
  return s


def tree_paths(s: np.ndarray, leaves: np.ndarray, depth: int
               ) -> tuple[np.ndarray, np.ndarray]:
  """Path ids of the compressed tree over the given leaves.

  A node is a maximal token span shared by the same set of leaves; depth
  counts branch points (depth 0: the prompt's root, common to all leaves,
  holding the prefix they all share). A node with leaves L and start a
  splits at p = min_{i != j in L} s[i, j] into the classes of
  s[i, j] > p (an equivalence: s is an ultrametric); each class is a child
  node starting at p. A leaf's last node holds only it.

  Args:
    s: [W, W] shared prefixes (`shared_prefix`).
    leaves: indices of the valid leaves.
    depth: D, the depth axis size (W always suffices).

  Returns:
    path_ids [W, D] int32 (node ids unique within the prompt; -1 past a
    leaf's last node and for non-leaves), depth_start [W, D] int32 (first
    token of the node at each depth; -1 likewise).
  """
  w = s.shape[0]
  path_ids = np.full((w, depth), -1, np.int32)
  start = np.full((w, depth), -1, np.int32)
  next_id = 0
  stack = [(list(leaves), 0, 0)]
  while stack:
    members, d, a = stack.pop()
    path_ids[members, d], start[members, d] = next_id, a
    next_id += 1
    if len(members) < 2:
      continue
    sub = s[np.ix_(members, members)]
    p = int(sub[~np.eye(len(members), dtype=bool)].min())
    seen = set()
    for i in members:
      if i not in seen:
        cls = [j for j in members if j == i or s[i, j] > p]
        seen.update(cls)
        stack.append((cls, d + 1, p))
  return path_ids, start


# ------------------------------------------------------------------- metrics

def tree_metrics(*, tokens: np.ndarray, lengths: np.ndarray,
                 leaf_mask: np.ndarray, shared: np.ndarray,
                 path_ids: np.ndarray, decoded: int,
                 answer_fn: Optional[Callable[[np.ndarray], Hashable]] = None
                 ) -> dict:
  """The `tree/` metrics of one tree rollout.

  Args:
    tokens: [B, W, T]; lengths: [B, W]; leaf_mask: [B, W] bool.
    shared: [B, W, W] shared prefixes; path_ids: [B, W, D].
    decoded: tokens the model computed (forward passes) for the batch.
    answer_fn: the final answer of a response's tokens (e.g. decode, then
      extract); None compares whole token sequences.

  Returns:
    {'tree/decoded_tokens_per_leaf', 'tree/leaf_tokens_per_leaf',
    'tree/shared_prefix_frac' (leaf tokens inside a prefix shared with
    another leaf of the group), 'tree/depth_max', 'tree/depth_mean'
    (branch points on a leaf's path), 'tree/distinct_answers' (per group,
    mean), 'tree/leaves_per_prompt'} as Python floats.
  """
  n_leaves = max(int(leaf_mask.sum()), 1)
  own = np.where(np.eye(shared.shape[-1], dtype=bool), 0, shared)
  own = np.where(leaf_mask[:, None, :], own, 0).max(-1)  # [B, W]
  depth = (path_ids >= 0).sum(-1) - 1
  distinct = []
  for b in range(tokens.shape[0]):
    leaves = np.flatnonzero(leaf_mask[b])
    key = answer_fn or (lambda x: tuple(x.tolist()))
    distinct.append(len({key(tokens[b, i, :lengths[b, i]]) for i in leaves}))
  leaf_tokens = float(np.sum(np.where(leaf_mask, lengths, 0)))
  return {
      'tree/decoded_tokens_per_leaf': decoded / n_leaves,
      'tree/leaf_tokens_per_leaf': leaf_tokens / n_leaves,
      'tree/shared_prefix_frac': float(np.sum(np.where(leaf_mask, own, 0)))
                                 / max(leaf_tokens, 1.0),
      'tree/depth_max': float(np.max(np.where(leaf_mask, depth, 0))),
      'tree/depth_mean': float(np.sum(np.where(leaf_mask, depth, 0))
                               / n_leaves),
      'tree/distinct_answers': float(np.mean(distinct)),
      'tree/leaves_per_prompt': n_leaves / tokens.shape[0],
  }
