"""Tree rollouts on a fixed slot pool: TreePO, LATR and EPTree.

A group of W independent samples decodes the same opening W times. A tree
rollout decodes shared prefixes once and forks where it pays: every prompt
owns a block of W slots (R = B * W rows of one KV cache with S = P + T
columns, the static sampler's layout: prompt left-padded in [0, P), the
response from column P), and every slot ends as one leaf, so the W leaves
of a prompt are its group and the budget can never be exceeded. A new
branch is a fork: its slot becomes a copy of the parent's up to the fork
point (tokens, log-probs, and the KV cache through `kv_cache.fork`).

Three jitted functions move the state, with static shapes (one compilation
per (B, P, W), whatever the tree does):

  start    prefills each prompt once into its block's first slot;
  advance  decodes up to `steps` tokens for every live slot in a
           `lax.while_loop` (for LATR, with branching and lookahead pruning
           inside the step);
  edit     ends slots (host stop rules) and forks slots into free ones.

The host loop between them is the tree policy (`kind`):
  treepo  TreePO (Li et al. 2025, arXiv:2508.17445): segment-wise decoding,
          the root fans out into `init_divergence` paths, at each segment
          boundary the unused budget is re-spent on live paths (at most
          `divergence` - 1 new branches each, even split or weighted by
          cumulative log-prob); paths end on a stop token, length, an
          answer (`stop_fn`) or repetition; when all paths of a prompt die
          early a finished path re-branches from a random segment boundary.
  latr    LATR (Xing et al. 2025, arXiv:2510.24302): branching and
          lookahead pruning inside the decode step (`latr_branch`,
          `latr_prune` in `make_tree_fns`); round(mix * W) slots of each
          block are tree slots, the rest plain independent samples.
  eptree  TreeRL's EPTree (Hou et al. 2025, arXiv:2506.11902): M chains per
          prompt, then L rounds that fork each tree at its N most uncertain
          tokens into T branches each (`tree_rules.fork_points`).

Every leaf gets path ids (`tree_rules.tree_paths`) for the `tree` and
`treerl` advantages of `rlx.objectives`. Forks never sample: a branch's
first new token is drawn from (or, for LATR, is the runner-up of) the same
distribution the parent saw (with EPTree's `fork_distinct`, that
distribution without the parent's token there), and every recorded
log-prob is the model's behaviour log-prob of that token, as in the
static sampler.
"""

import dataclasses
from typing import Callable, Hashable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rlx.models import kv_cache
from rlx.sampling import sampler as sampler_lib
from rlx.sampling import tree_rules as rules
from rlx.types import Array, FinishReason, Params, PRNGKey

KINDS = ('treepo', 'latr', 'eptree')
_RUNNING, _STOP, _LENGTH = (int(FinishReason.RUNNING),
                            int(FinishReason.STOP), int(FinishReason.LENGTH))


@dataclasses.dataclass(frozen=True)
class TreeConfig:
  """Tree rollout settings (static: changing one rebuilds the sampler)."""
  kind: str  # 'treepo', 'latr' or 'eptree'.
  max_new_tokens: int  # T: response budget of every leaf.
  stop_tokens: tuple[int, ...]  # Ending a response (kept in it).
  pad_id: int = 0  # Written after a response ends.
  top_k: int = 0  # 0 disables top-k filtering.
  # TreePO.
  segment_len: int = 16  # Tokens decoded between branching decisions.
  init_divergence: int = 2  # Paths the root opens with (first fan-out).
  divergence: int = 2  # Most paths a live path becomes at one boundary.
  allocation: str = 'even'  # Budget split: 'even' or 'logp' (softmax of
  # the paths' cumulative log-probs).
  fallback: bool = True  # Re-branch from a finished path when a prompt has
  # no live path but unused budget.
  repeat_ngram: int = 0  # End a path repeating an n-gram (n <= this)
  # `repeat_count` times in a row; 0 disables.
  repeat_count: int = 4
  # LATR.
  chunk_steps: int = 16  # Decode steps per jitted call (host refills).
  tau_abs: float = 0.15  # Branch iff p2 > tau_abs ...
  tau_rel: float = 0.25  # ... and p1 - p2 < tau_rel.
  lookahead: tuple[int, ...] = (20, 30, 50)  # Children are compared with
  # their parent after this many own tokens (and may branch after the last).
  prune_edit_dist: float = 0.4  # Prune a child whose normalised edit
  # distance to its parent's continuation is below this.
  max_branches: int = 0  # Cap on branch events per prompt; 0: the budget.
  refill: bool = True  # Tree slots a finished tree left unused become
  # plain samples, so every prompt returns W leaves.
  # EPTree (the card's M, N, T, L).
  num_chains: int = 6  # M: independent chains (trees) per prompt.
  fork_points: int = 2  # N: fork points per tree and round.
  fork_branches: int = 2  # T: branches per fork point.
  rounds: int = 1  # L: forking rounds.
  fork_score: str = 'entropy'  # 'entropy' (behaviour entropy) or
  # 'surprisal' (-logp of the sampled token, TreeRL's code).
  fork_distinct: bool = False  # A branch's first token is drawn from the
  # policy without the parent's token there (the branch must diverge at
  # the fork, as LATR's runner-up does); its recorded log-prob stays the
  # policy's, so the learner treats it as on-policy (biased, as LATR).

  def __post_init__(self):
    for name, known in (('kind', KINDS), ('allocation', ('even', 'logp')),
                        ('fork_score', ('entropy', 'surprisal'))):
      if getattr(self, name) not in known:
        raise ValueError(f'TreeConfig.{name}={getattr(self, name)!r} is not '
                         f'one of {list(known)}')
    for name in ('max_new_tokens', 'segment_len', 'init_divergence',
                 'divergence', 'chunk_steps', 'num_chains', 'fork_points',
                 'fork_branches'):
      if getattr(self, name) < 1:
        raise ValueError(f'TreeConfig.{name}={getattr(self, name)} must be '
                         '>= 1')
    if self.repeat_ngram and self.repeat_count < 2:
      raise ValueError(f'TreeConfig.repeat_count={self.repeat_count} must be '
                       '>= 2 with repeat_ngram (fewer repeats would end '
                       'every path at its first boundary)')
    if self.fork_distinct and self.kind != 'eptree':
      raise ValueError('TreeConfig.fork_distinct is an EPTree rule (forks '
                       'inside a path); kind is ' + repr(self.kind))
    if not self.lookahead or min(self.lookahead) < 1:
      raise ValueError(f'TreeConfig.lookahead={self.lookahead} must be '
                       'non-empty and positive')


class TreeRollout(NamedTuple):
  """A tree rollout: the static sampler's `Rollout` plus the tree."""
  rollout: sampler_lib.Rollout  # [B, W, T]; non-leaves (leaf_mask False)
  # have length 0, an empty loss mask and finish RUNNING.
  leaf_mask: Array  # [B, W] bool, the slot holds a leaf (the group).
  path_ids: Array  # [B, W, W] int32 node id per depth (branch points), -1
  # past a leaf's last node: `path_ids` of the `tree` advantage.
  depth_start: Array  # [B, W, W] int32 first token of each node, -1 past
  # the last: `depth_start` of the `treerl` advantage.
  decoded_tokens: int  # Tokens the model computed (forward passes).
  metrics: dict  # `tree/...` floats (`tree_rules.tree_metrics` and more).


class TreeState(NamedTuple):
  """R = B * W slots; prompt b owns rows [b W, (b + 1) W)."""
  tokens: Array  # [R, T] int32.
  logp: Array  # [R, T] f32 behaviour log-probs.
  entropy: Array  # [R, T] f32.
  length: Array  # [R] int32 response tokens so far.
  finish: Array  # [R] int32 FinishReason (RUNNING: live or unused).
  live: Array  # [R] bool, decoding.
  used: Array  # [R] bool, holds a path (live or a leaf).
  last: Array  # [R] int32 token fed next (token length-1, or the prompt's
  # last token when length = 0: it is fed again at cache column P - 1).
  next_pos: Array  # [R] int32 RoPE position of `last`.
  n_prompt: Array  # [R] int32 real prompt tokens.
  prompt_last: Array  # [R] int32.
  birth: Array  # [R] int32 tokens shared with the parent at the fork.
  parent: Array  # [R] int32 parent slot, -1 for roots.
  anc: Array  # [R, W] int32 lineage rows (`tree_rules` docstring).
  tree_slot: Array  # [R] bool, LATR may branch from / into it.
  branches: Array  # [B] int32 LATR branch events per prompt.
  pruned: Array  # scalar int32, LATR children pruned.
  decoded: Array  # scalar int32, forward passes of live slots.
  ban: Array  # [R] int32 token the next sampled one must differ from
  # (`fork_distinct`), -1: none.
  kv_valid: Array  # [R, S] bool.
  cache: kv_cache.Cache
  key: PRNGKey


class TreeFns(NamedTuple):
  start: Callable[..., TreeState]
  advance: Callable[..., TreeState]
  edit: Callable[..., TreeState]


def make_tree_fns(apply_fn: sampler_lib.ApplyFn,
                  init_cache_fn: sampler_lib.InitCacheFn,
                  cfg: TreeConfig) -> TreeFns:
  """The jitted `start`, `advance` and `edit` (module docstring).

  Args:
    apply_fn: `(params, tokens [R, L], positions, mask [R, L, S], cache,
      index) -> (logits [R, L, V], cache)`; index is the int 0 for the
      prefill and an int array [R] (per-row column) when decoding. The
      cache must be a `kv_cache.Cache` (a tuple of `LayerCache`s).
    init_cache_fn: `(rows, columns) -> empty cache`.
    cfg: tree settings.
  """
  t = cfg.max_new_tokens
  stop = jnp.asarray(cfg.stop_tokens, jnp.int32)

  def start(params, prompts, prompt_mask, key, tree_slot, *, num_leaves):
    b, p = prompts.shape
    w, r, s = num_leaves, b * num_leaves, p + t
    pmask = prompt_mask.astype(bool)
    valid = jnp.concatenate([pmask, jnp.zeros((b, t), bool)], 1)
    _, cache = apply_fn(params, prompts, kv_cache.positions_from_mask(pmask),
                        kv_cache.causal_mask(valid, query_len=p,
                                             cache_index=0),
                        init_cache_fn(b, s), 0)
    roots = jnp.arange(b) * w
    cache = jax.tree.map(lambda z, x: z.at[roots].set(x.astype(z.dtype)),
                         init_cache_fn(r, s), cache)
    rep = lambda x: jnp.repeat(x.astype(jnp.int32), w, axis=0)
    n_prompt = jnp.sum(pmask, -1)
    used = jnp.zeros((r,), bool).at[roots].set(True)
    return TreeState(
        tokens=jnp.full((r, t), cfg.pad_id, jnp.int32),
        logp=jnp.zeros((r, t), jnp.float32),
        entropy=jnp.zeros((r, t), jnp.float32),
        length=jnp.zeros((r,), jnp.int32),
        finish=jnp.full((r,), _RUNNING, jnp.int32), live=used, used=used,
        last=rep(prompts[:, -1]), next_pos=rep(n_prompt - 1),
        n_prompt=rep(n_prompt), prompt_last=rep(prompts[:, -1]),
        birth=jnp.zeros((r,), jnp.int32),
        parent=jnp.full((r,), -1, jnp.int32),
        anc=jnp.full((r, w), rules.NO_ANCESTOR, jnp.int32).at[roots, 0].set(
            rules.SELF),
        tree_slot=jnp.asarray(tree_slot, bool),
        branches=jnp.zeros((b,), jnp.int32), pruned=jnp.zeros((), jnp.int32),
        decoded=jnp.zeros((), jnp.int32), ban=jnp.full((r,), -1, jnp.int32),
        kv_valid=jnp.zeros((r, s), bool).at[roots].set(valid),
        cache=cache, key=key)

  def fork_rows(st: TreeState, child, parent, length, *, fed: int):
    """Child m <- parent m's first length[m] tokens (children >= R: none).

    `fed` = 1 when token length - 1 is already in the parent's cache (a
    fork inside the decode step), 0 when it is fed next (between calls).
    """
    m, w = child.shape[0], st.anc.shape[1]
    p = st.kv_valid.shape[1] - t
    cache, kv_valid = kv_cache.fork(st.cache, st.kv_valid, child=child,
                                    parent=parent, keep=p + length - 1 + fed)
    keep = jnp.arange(t)[None, :] < length[:, None]
    put = lambda x, v: x.at[child].set(v, mode='drop')
    take = lambda x, fill: jnp.where(keep, x[parent], fill)
    last = jnp.where(length > 0,
                     st.tokens[parent, jnp.maximum(length - 1, 0)],
                     st.prompt_last[parent])
    ban = jnp.full((m,), -1, jnp.int32)
    if cfg.fork_distinct and not fed:  # The parent's token at the fork.
      ban = jnp.where(length < st.length[parent],
                      st.tokens[parent, jnp.minimum(length, t - 1)], -1)
    anc = st.anc[parent]
    anc = jnp.where(anc >= 0, jnp.minimum(anc, length[:, None]), anc)
    anc = anc.at[jnp.arange(m), parent % w].set(length)
    anc = anc.at[jnp.arange(m), child % w].set(rules.SELF)
    one = jnp.ones((m,), bool)
    return st._replace(
        tokens=put(st.tokens, take(st.tokens, cfg.pad_id)),
        logp=put(st.logp, take(st.logp, 0.0)),
        entropy=put(st.entropy, take(st.entropy, 0.0)),
        length=put(st.length, length), finish=put(st.finish, _RUNNING),
        live=put(st.live, one), used=put(st.used, one),
        last=put(st.last, last),
        next_pos=put(st.next_pos, st.n_prompt[parent] + length - 1),
        birth=put(st.birth, length), parent=put(st.parent, parent),
        anc=put(st.anc, anc), ban=put(st.ban, ban), kv_valid=kv_valid,
        cache=cache)

  def record(st: TreeState, live, token, lp, ent) -> TreeState:
    rows = jnp.arange(live.shape[0])
    col = jnp.where(live, st.length, t)  # Out of range: dropped.
    put = lambda a, x: a.at[rows, col].set(x, mode='drop')
    hit_stop = live & jnp.isin(token, stop)
    hit_len = live & ~hit_stop & (st.length + 1 >= t)
    finish = jnp.where(hit_stop, _STOP, st.finish)
    return st._replace(
        tokens=put(st.tokens, token), logp=put(st.logp, lp),
        entropy=put(st.entropy, ent), length=st.length + live,
        finish=jnp.where(hit_len, _LENGTH, finish),
        live=live & ~hit_stop & ~hit_len, last=jnp.where(live, token, st.last),
        next_pos=st.next_pos + live)

  def latr_branch(st: TreeState, token, logits, hp):
    """LATR branching: a settled tree slot whose top-2 pass
    `tree_rules.latr_branch` forks into a free tree slot of its block; the
    parent takes the top-1 token and the child the top-2 one (both
    deterministic, as in LATR's code; other steps sample). Children are
    matched to free slots in slot order, within the per-prompt cap."""
    b, w = st.branches.shape[0], st.anc.shape[1]
    r = b * w
    want, top1, top2 = rules.latr_branch(logits, tau_abs=hp[0],
                                         tau_rel=hp[1])
    settled = (st.parent < 0) | (st.length - st.birth >= max(cfg.lookahead))
    want = (want & st.live & st.tree_slot & settled).reshape(b, w)
    free = (~st.used & st.tree_slot).reshape(b, w)
    cap = (cfg.max_branches - st.branches if cfg.max_branches
           else jnp.full((b,), w, jnp.int32))
    n_new = jnp.minimum(jnp.minimum(want.sum(-1), free.sum(-1)),
                        jnp.maximum(cap, 0))[:, None]  # [B, 1]
    c_rank = jnp.cumsum(want, -1) - 1
    f_rank = jnp.cumsum(free, -1) - 1
    is_parent = want & (c_rank < n_new)
    is_child = free & (f_rank < n_new)
    match = is_parent[:, None, :] & (c_rank[:, None, :] == f_rank[:, :, None])
    par = (jnp.arange(b)[:, None] * w + jnp.argmax(match, -1)).reshape(r)
    is_parent, is_child = is_parent.reshape(r), is_child.reshape(r)
    child = jnp.where(is_child, jnp.arange(r), r)
    st = jax.lax.cond(
        jnp.any(is_child),
        lambda s: fork_rows(s, child, par, s.length[par], fed=1),
        lambda s: s, st)
    token = jnp.where(is_child, top2[par], jnp.where(is_parent, top1, token))
    src = jnp.where(is_child, par, jnp.arange(r))
    return (st._replace(branches=st.branches + n_new[:, 0]),
            st.live, token, src)

  def latr_prune(st: TreeState, hp) -> TreeState:
    """LATR lookahead pruning: a live child with c own tokens (c in
    `lookahead`) is pruned, its slot freed, when the normalised edit
    distance between its tokens [birth, birth + c) and its parent's is
    below hp[2]. Skipped, as in LATR, when the parent's window is
    incomplete or holds its stop token (a child that stopped is a leaf)."""
    r = st.live.shape[0]
    par = jnp.maximum(st.parent, 0)
    plen = st.length[par]
    child = st.tree_slot & (st.parent >= 0) & st.live
    for c in sorted(set(cfg.lookahead)):
      check = child & (st.length - st.birth == c)
      ok = (plen >= st.birth + c) & ~((st.finish[par] == _STOP) &
                                      (plen == st.birth + c))

      def similar(s, c=c, check=check, ok=ok):
        cols = jnp.clip(s.birth[:, None] + jnp.arange(c), 0, t - 1)
        dist = rules.edit_distance(jnp.take_along_axis(s.tokens, cols, 1),
                                   s.tokens[par[:, None], cols])
        return check & ok & (dist < hp[2] * c)

      prune = jax.lax.cond(jnp.any(check), similar,
                           lambda s: jnp.zeros((r,), bool), st)
      st = st._replace(live=st.live & ~prune, used=st.used & ~prune,
                       pruned=st.pruned + jnp.sum(prune, dtype=jnp.int32))
    return st

  def step(params, st: TreeState, temperature, top_p, hp, latr: bool):
    rows = jnp.arange(st.live.shape[0])
    p = st.kv_valid.shape[1] - t
    index = p + st.length - 1  # Cache column of `last`.
    kv_valid = st.kv_valid.at[rows, jnp.where(st.live, index, p + t)].set(
        True, mode='drop')
    mask = kv_cache.causal_mask(kv_valid, query_len=1, cache_index=index)
    logits, cache = apply_fn(params, st.last[:, None], st.next_pos[:, None],
                             mask, st.cache, index)
    logits = logits[:, 0]
    key, sub = jax.random.split(st.key)
    sample_logp, behaviour = sampler_lib.process_logits(
        logits, temperature, top_p, top_k=cfg.top_k)
    if cfg.fork_distinct:
      sample_logp = rules.ban_token(sample_logp, st.ban)
      st = st._replace(ban=jnp.where(st.live, -1, st.ban))
    token = jax.random.categorical(sub, sample_logp, -1).astype(jnp.int32)
    st = st._replace(kv_valid=kv_valid, cache=cache, key=key,
                     decoded=st.decoded + jnp.sum(st.live, dtype=jnp.int32))
    live = st.live
    if latr:
      st, live, token, src = latr_branch(st, token, logits, hp)
      behaviour = behaviour[src]
    lp = jnp.take_along_axis(behaviour, token[:, None], -1)[:, 0]
    ent = -jnp.sum(jnp.exp(behaviour) * behaviour, -1)
    st = record(st, live, token, lp, ent)
    return latr_prune(st, hp) if latr else st

  def advance(params, st, temperature, top_p, steps, hp, *, latr: bool):
    def cond(carry):
      i, s = carry
      return (i < steps) & jnp.any(s.live)

    def body(carry):
      i, s = carry
      return i + 1, step(params, s, temperature, top_p, hp, latr)

    return jax.lax.while_loop(cond, body, (jnp.int32(0), st))[1]

  def edit(st: TreeState, end, end_length, end_finish, child, parent, length,
           child_tree) -> TreeState:
    """Ends slots `end` at end_length with end_finish, then forks."""
    new_len = jnp.where(end, end_length, st.length)
    keep = jnp.arange(t)[None, :] < new_len[:, None]
    st = st._replace(
        tokens=jnp.where(keep, st.tokens, cfg.pad_id),
        logp=jnp.where(keep, st.logp, 0.0),
        entropy=jnp.where(keep, st.entropy, 0.0), length=new_len,
        finish=jnp.where(end, end_finish, st.finish), live=st.live & ~end)
    st = fork_rows(st, child, parent, length, fed=0)
    return st._replace(tree_slot=st.tree_slot.at[child].set(child_tree,
                                                            mode='drop'))

  return TreeFns(
      start=jax.jit(start, static_argnames=('num_leaves',)),
      advance=jax.jit(advance, static_argnames=('latr',), donate_argnums=1),
      edit=jax.jit(edit, donate_argnums=0))


def _seed(key: PRNGKey) -> np.ndarray:
  """Host RNG seed words from a JAX key (new- or old-style)."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return np.asarray(key).ravel()


class TreeSampler:
  """Tree rollouts behind a sampler-like call (see the module docstring).

  `sampler(params, prompts [B, P], prompt_mask, key, temperature, top_p,
  num_leaves=W, mix=1.0) -> TreeRollout` with `rollout` shaped like the
  static sampler's `[B, W, T]`. `mix` (LATR only) is the fraction of each
  group's leaves grown as a tree, the rest being independent samples;
  anneal it toward 0 over training as LATR does. The metrics of the last
  call are also in `last_metrics`.
  """

  def __init__(self, apply_fn: sampler_lib.ApplyFn,
               init_cache_fn: sampler_lib.InitCacheFn, cfg: TreeConfig, *,
               stop_fn: Optional[Callable[[np.ndarray], int]] = None,
               answer_fn: Optional[Callable[[np.ndarray], Hashable]] = None):
    """Builds the jitted functions (compiled at the first call per shape).

    Args:
      apply_fn, init_cache_fn, cfg: as for `make_tree_fns`.
      stop_fn: TreePO's answer rule, checked at segment boundaries on each
        live path's tokens [L]: the length to cut the path at (it ends with
        finish STOP), or 0 to go on.
      answer_fn: a response's final answer from its tokens, for the
        distinct-answers metric (None: whole token sequences).
    """
    self.cfg, self.stop_fn, self.answer_fn = cfg, stop_fn, answer_fn
    self.fns = make_tree_fns(apply_fn, init_cache_fn, cfg)
    self.last_metrics: dict = {}

  def __call__(self, params: Params, prompts, prompt_mask, key: PRNGKey,
               temperature, top_p=1.0, *, num_leaves: int,
               mix: float = 1.0) -> TreeRollout:
    cfg, w = self.cfg, num_leaves
    prompts = np.asarray(prompts, np.int32)
    b = prompts.shape[0]
    n_tree = w
    if cfg.kind == 'latr':
      if not 0.0 <= mix <= 1.0:
        raise ValueError(f'mix={mix} must be in [0, 1]')
      n_tree = int(round(mix * w))
    elif cfg.kind == 'eptree' and not (
        cfg.num_chains <= w <= cfg.num_chains * (
            1 + cfg.rounds * cfg.fork_points * cfg.fork_branches)):
      raise ValueError(
          f'num_leaves={w} must be in [M, M (1 + L N T)] for EPTree with '
          f'M={cfg.num_chains}, N={cfg.fork_points}, '
          f'T={cfg.fork_branches}, L={cfg.rounds}')
    key, host_key = jax.random.split(key)
    tree_slot = np.tile(np.arange(w) < n_tree, b)
    st = self.fns.start(params, prompts, np.asarray(prompt_mask, bool), key,
                        tree_slot, num_leaves=w)
    sampling = (jnp.float32(temperature), jnp.float32(top_p))
    hp = jnp.asarray([cfg.tau_abs, cfg.tau_rel, cfg.prune_edit_dist],
                     jnp.float32)
    advance = lambda s, steps: self.fns.advance(
        params, s, *sampling, jnp.int32(steps), hp, latr=cfg.kind == 'latr')
    kw = dict(b=b, w=w, advance=advance, edit=self.fns.edit)
    if cfg.kind == 'treepo':
      st, info = rules.treepo(cfg, st, stop_fn=self.stop_fn,
                              rng=np.random.default_rng(_seed(host_key)),
                              **kw)
    elif cfg.kind == 'latr':
      st, info = rules.latr(cfg, st, n_tree=n_tree, **kw)
    else:
      st, info = rules.eptree(cfg, st, **kw)
    out = self._collect(st, b, w, info)
    self.last_metrics = out.metrics
    return out

  def _collect(self, st: TreeState, b: int, w: int, info: dict
               ) -> TreeRollout:
    t = self.cfg.max_new_tokens
    h = rules.fetch(st, 'tokens', 'logp', 'entropy', 'length', 'finish',
                    'live', 'used', 'anc', 'decoded', 'pruned', 'branches')
    leaf = h['used'] & ~h['live'] & (h['finish'] != _RUNNING)
    length = np.where(leaf, h['length'], 0)
    mask = np.arange(t) < length[:, None]
    shape = lambda x: x.reshape((b, w) + x.shape[1:])
    paths = np.full((b, w, w), -1, np.int32)
    starts = np.full((b, w, w), -1, np.int32)
    shared = np.zeros((b, w, w), np.int64)
    for i in range(b):
      sl = slice(i * w, (i + 1) * w)
      shared[i] = rules.shared_prefix(h['anc'][sl], h['length'][sl])
      paths[i], starts[i] = rules.tree_paths(
          shared[i], np.flatnonzero(leaf[sl]), w)
    rollout = sampler_lib.Rollout(
        tokens=shape(np.where(mask, h['tokens'], self.cfg.pad_id)),
        loss_mask=shape(mask), logp=shape(np.where(mask, h['logp'], 0.0)),
        entropy=shape(np.where(mask, h['entropy'], 0.0)),
        lengths=shape(length),
        finish=shape(np.where(leaf, h['finish'], _RUNNING)))
    decoded = int(h['decoded'])
    metrics = rules.tree_metrics(
        tokens=rollout.tokens, lengths=rollout.lengths,
        leaf_mask=shape(leaf), shared=shared, path_ids=paths,
        decoded=decoded, answer_fn=self.answer_fn)
    metrics.update({f'tree/{k}': float(v) for k, v in info.items()})
    metrics['tree/decoded_tokens'] = float(decoded)
    if self.cfg.kind == 'latr':
      metrics['tree/pruned'] = float(h['pruned'])
      metrics['tree/branches'] = float(h['branches'].sum())
    return TreeRollout(
        rollout=sampler_lib.Rollout(*(jnp.asarray(x) for x in rollout)),
        leaf_mask=jnp.asarray(shape(leaf)), path_ids=jnp.asarray(paths),
        depth_start=jnp.asarray(starts), decoded_tokens=decoded,
        metrics=metrics)


def transformer_tree_sampler(model, cfg: TreeConfig, **kwargs) -> TreeSampler:
  """`TreeSampler` for an `rlx.models.transformer.Transformer`."""
  return TreeSampler(*sampler_lib.transformer_fns(model), cfg, **kwargs)
