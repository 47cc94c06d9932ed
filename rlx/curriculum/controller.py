"""One RL step's rollouts under a curriculum: select, allocate, filter.

The host side of one RL step up to the learner:

  skip (optional)  -> eligible prompts (posterior says: not all-equal)
  prepare          -> the selector's per-step work (DOTS: reference
                      rollouts, embedding refresh)
  select           -> B prompt ids (the selector, `selectors.Selector`;
                      likelihood: the B of K * B candidates whose reference
                      solution the policy finds closest to even odds)
  allocate         -> rollouts per prompt, one or two rounds
  filter (dapo)    -> all-equal groups replaced by fresh prompts (bounded)
  update           -> estimator (every rollout is evidence), then the
                      selector's own state (GDRO weights, DOTS history)

The analysis bounds (oracle.screen, oracle.free_refills) wrap the allocate
and filter phase (oracles.py). Rollouts with variable group sizes are
sampled as flat rows (one response per row, rows padded to a bucket so the
sampler compiles once per bucket) and scattered back into [B, Gc, T] with a
group mask, Gc the largest count rounded up to a multiple of 4.
"""

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rlx import errors
from rlx.curriculum import allocators as alloc_lib
from rlx.curriculum import estimators as est
from rlx.curriculum import groups as groups_lib
from rlx.curriculum import oracles
from rlx.curriculum import selectors as sel

_ROW_BUCKET = 32  # Flat rollout rows are padded to a multiple of this.
_GROUP_BUCKET = 4  # The group axis is padded to a multiple of this.
NUM_HIST_BINS = 5  # Histogram of selected prompts' estimated pass rates.

# Defined with the selectors and the groups; the rollout modes read them
# here.
epoch_order = sel.epoch_order
zero_variance = groups_lib.zero_variance


@dataclasses.dataclass
class Collected:
  """A step's training groups on the host, [B, Gc, ...] with a group mask."""
  ids: np.ndarray  # [B] prompt ids (into the pool).
  tokens: np.ndarray  # [B, Gc, T] int32.
  loss_mask: np.ndarray  # [B, Gc, T] bool.
  logp: np.ndarray  # [B, Gc, T] float32 behaviour log-probs.
  entropy: np.ndarray  # [B, Gc, T] float32.
  lengths: np.ndarray  # [B, Gc] int32.
  finish: np.ndarray  # [B, Gc] int32.
  rewards: np.ndarray  # [B, Gc] float32 verifier rewards (0 where masked).
  group_mask: np.ndarray  # [B, Gc] bool: sampled and kept for the loss.
  values: np.ndarray  # [B] posterior mean pass rate before this step.
  counts: np.ndarray  # [B] responses sampled per group.
  rollouts: int  # Responses sampled this step (references and retries in).
  decoded_tokens: int  # Tokens sampled this step.
  extras: dict = dataclasses.field(default_factory=dict)  # Per-response
  # fields a rollout carries beyond the sampler's Rollout (e.g. a tree's
  # path_ids [B, Gc, D]), -1 where no response.


def _bucket(n: int, multiple: int) -> int:
  """n (at least 1) rounded up to a multiple of `multiple`."""
  return -(-max(n, 1) // multiple) * multiple


def data_order(seed: int, start: int, count: int, n: int) -> np.ndarray:
  """Prompts at data positions [start, start + count) of n: the epoch
  permutations `epoch_order` walks, one position at a time."""
  return np.concatenate([epoch_order(seed, p, 1, n)
                         for p in range(start, start + count)])


def resolve_estimator(name: str, selector: str, needed: str = '') -> str:
  """'auto' -> the estimator each method's paper uses: `needed` (the one
  whose values the advantage reads, e.g. SPO's tracker; '' none), else the
  selector's `default_estimator`."""
  if name != 'auto':
    return name
  return needed or sel.SELECTORS.get(selector).default_estimator


class Curriculum:
  """Selection, allocation and filtering over a pool of N train prompts.

  Args:
    cfg: the curriculum config (rlx.config.CurriculumConfig).
    rl: the RL config (batch_prompts B, group_size G).
    pool: N, the number of train prompts selectable.
    embed_fn: (params, prompt ids [n]) -> [n, D] prompt embeddings (called
      only by a selector that reads them: DOTS).
    score_fn: (params, prompt ids [n]) -> [n] log-probability of each
      prompt's reference solution under the policy (called only by the
      likelihood selector, which needs it).
    values_estimator: the estimator whose per-prompt values the advantage
      reads (the objective's declaration, e.g. 'spo'); '' none.
  """

  def __init__(self, cfg, rl, pool: int, *, values_estimator: str = '',
               embed_fn: Optional[Callable] = None,
               score_fn: Optional[Callable] = None, seed: int = 0):
    self.cfg, self.rl, self.pool, self.seed = cfg, rl, pool, seed
    g = rl.group_size
    self.estimator_name = resolve_estimator(cfg.estimator, cfg.selector,
                                            values_estimator)
    self.max_group = cfg.max_group or 2 * g
    self.estimator = est.make(
        self.estimator_name, lam=cfg.discount, gamma=cfg.vade_decay,
        rho=cfg.spo_discount, alpha0=cfg.prior_alpha, beta0=cfg.prior_beta)
    self.selector = sel.make(cfg, self.estimator, seed=seed,
                             score_fn=score_fn)
    self.allocator = alloc_lib.make(
        cfg.allocator, group_size=rl.group_size, min_group=cfg.min_group,
        max_group=self.max_group,
        first_round=cfg.first_round or max(g // 2, cfg.min_group),
        dars_schedule=cfg.dars_schedule, xrpo_bonus=cfg.xrpo_bonus,
        num_bins=cfg.gdro.bins)
    self._update = jax.jit(self.estimator.update)
    self._prob_same = jax.jit(est.prob_all_same, static_argnums=2)
    self.embed_fn = embed_fn
    self.filters = set(cfg.filter.split('+')) - {'none'}
    # The allocate-and-filter phase; the analysis bounds wrap it.
    self._groups = self._allocate_and_filter
    if oracles.enabled(cfg):
      self._groups = oracles.Oracles(cfg, g, pool, self._groups)

  # State -----------------------------------------------------------------

  def init(self, params=None) -> sel.CurriculumState:
    """The initial state; a selector that reads prompt embeddings (DOTS)
    embeds the pool with `params` here."""
    return self._init(functools.partial(self.embed_pool, params))

  def abstract(self, embed_dim: int):
    """Shapes of the state, for restoring a checkpoint."""
    embed = jnp.zeros((self.pool, embed_dim))
    return jax.eval_shape(lambda: self._init(lambda: embed))

  def _init(self, embed: Callable[[], jax.Array]) -> sel.CurriculumState:
    state = sel.default_state(self.estimator.init(self.pool),
                              self.cfg.gdro.bins)
    return state._replace(**self.selector.init(embed))

  def embed_pool(self, params) -> jax.Array:
    """[N, D] float32 prompt embeddings of the whole pool by `params`."""
    if self.embed_fn is None or params is None:
      raise ValueError(f'the {self.cfg.selector} selector needs prompt '
                       'embeddings: pass embed_fn and params')
    chunk = 1024
    parts = [self.embed_fn(params, np.arange(i, min(i + chunk, self.pool)))
             for i in range(0, self.pool, chunk)]
    return jnp.concatenate(parts).astype(jnp.float32)

  def eligible(self, state) -> Optional[jax.Array]:
    """Pre-rollout skip: prompts whose group is not predicted all-equal."""
    if 'skip' not in self.filters:
      return None
    s = state.stats
    same = self._prob_same(s.alpha, s.beta, self.rl.group_size)
    return same < self.cfg.skip_threshold

  # One step --------------------------------------------------------------

  def collect(self, state, params, key, rollout_fn, step: int):
    """Samples one step's training groups.

    Args:
      state: CurriculumState.
      params: policy parameters (the selector's per-step work: DOTS'
        embedding refreshes, the likelihood selector's scores).
      key: this step's key.
      rollout_fn: (params, prompt ids [R], key, num_samples) -> (sampler
        Rollout [R, num_samples, ...], rewards [R, num_samples]); ids may
        repeat. The rollout may be any NamedTuple with the Rollout's
        fields and more (carried to `Collected.extras`); a response still
        RUNNING is no response (an unused tree slot) and is left out.
      step: the RL step (data order, embedding refresh schedule).

    Returns:
      (Collected, new state, metrics dict).
    """
    # The first round samples with `key` itself; the rest fold it in.
    k_ref, k_sel, k2, k_dapo = (jax.random.fold_in(key, i)
                                for i in range(1, 5))
    eligible = self.eligible(state)
    run = groups_lib.StepRun(
        sampler=lambda tally: functools.partial(self._sample_rows, params,
                                                rollout_fn, tally),
        keys=(key, k2, k_dapo), eligible=eligible,
        values=np.asarray(est.mean(state.stats)))
    if eligible is not None:
      run.metrics['curriculum/eligible_frac'] = float(jnp.mean(eligible))
    ctx = sel.Step(params=params, step=step, key=k_ref, eligible=eligible,
                   embed=functools.partial(self.embed_pool, params),
                   rollout=functools.partial(self._rollout, run),
                   metrics=run.metrics)
    state = self.selector.prepare(state, ctx)
    ids, p_sel = self.selector.batch(state, ctx, k_sel, self.rl.batch_prompts)
    if p_sel is None:  # The estimator's, unless the selector has its own.
      p_sel = run.values[ids]
    run.pick = lambda key, n, tiers: self.selector.pick(state, ctx, key, n,
                                                        tiers)[0]
    ids, groups, keep, p_sel = self._groups(ids, p_sel, run)
    stats_before = state.stats
    state = state._replace(stats=self._observe(state.stats, run.evidence))
    state = self.selector.observe(state, stats_before, run.evidence)
    out = self._assemble(ids, groups, keep, run.values[ids], run.spent)
    run.metrics.update(self._metrics(p_sel, out))
    return out, state, run.metrics

  def _allocate_and_filter(self, ids, p_sel, run: groups_lib.StepRun):
    """The groups of `ids`: the allocator's rounds, then DAPO's refills.

    Returns:
      (ids [B] after refills, their Groups, keep [B] bool: the groups the
      loss sees, p_sel [B]).
    """
    k1, k2, k_dapo = run.keys
    groups = groups_lib.Groups.empty(len(ids))
    counts, m = self.allocator.first(p_sel)
    run.metrics.update({f'curriculum/{k}': v for k, v in m.items()})
    groups_lib.extend(groups, ids, counts, k1, run.sample)
    if self.allocator.second is not None:
      extra, m = self.allocator.second(groups.successes(), groups.counts())
      run.metrics.update({f'curriculum/{k}': v for k, v in m.items()})
      groups_lib.extend(groups, ids, extra, k2, run.sample)
    zero = np.array([zero_variance(r) for r in groups.rewards])
    run.metrics['curriculum/zero_var_frac'] = float(zero.mean())
    run.evidence.append((ids, groups.successes(), groups.counts()))
    keep = np.ones(len(ids), bool)
    if 'dapo' in self.filters or self.cfg.allocator == 'dars':
      ids, groups, keep = self._refill(ids, groups, zero, k_dapo, run)
    return ids, groups, keep, p_sel

  def _rollout(self, run: groups_lib.StepRun, ids, key, per_id: int):
    """per_id charged responses to each of `ids`, observed as evidence:
    (successes [R], counts [R]) (`selectors.Step.rollout`)."""
    got = groups_lib.Groups.empty(len(ids))
    groups_lib.extend(got, ids, np.full(len(ids), per_id), key, run.sample)
    run.evidence.append((ids, got.successes(), got.counts()))
    return got.successes(), got.counts()

  def _sample_rows(self, params, rollout_fn, spent, ids, key, per_id=1):
    """Rolls out `per_id` responses per id, flattened id-major, charged to
    the tally `spent` ([rollouts, tokens], updated).

    With per_id == 1 (ragged groups flattened to rows) the rows are padded
    to a bucket so the sampler compiles once per bucket; equal groups are
    sampled as groups (one prefill per prompt).

    Returns:
      (rollout rows [R * per_id, ...], rewards [R * per_id]).
    """
    r = len(ids)
    padded = r if per_id > 1 else _bucket(r, _ROW_BUCKET)
    rows = np.concatenate([ids, np.full(padded - r, ids[0])]).astype(int)
    ro, rewards = rollout_fn(params, rows, key, per_id)
    flat = lambda x: np.asarray(x)[:r].reshape((r * per_id,) + x.shape[2:])
    ro = jax.tree.map(flat, ro)
    spent[0] += r * per_id
    spent[1] += int(ro.lengths.sum())
    return ro, flat(np.asarray(rewards))

  def _refill(self, ids, groups: groups_lib.Groups, zero, key,
              run: groups_lib.StepRun):
    """DAPO dynamic sampling: replace all-equal groups, bounded retries.

    Replacement prompts come from the same selector with G rollouts each,
    never a prompt already used this step (the skip filter's ineligible
    prompts only when the eligible ones run out); once every prompt of the
    pool is used, the remaining holes stay. Groups still all-equal after
    `dapo_max_retries` rounds stay in the batch with their mask off.
    With the DARS allocator (without 'dapo') no resampling happens: the
    card's merged groups with accuracy 0 or 1 are just dropped.

    Returns:
      (ids [B], Groups, keep [B] bool).
    """
    cfg, g = self.cfg, self.rl.group_size
    retries = cfg.dapo_max_retries if 'dapo' in self.filters else 0
    sample = run.refill_sample or run.sample
    used = np.zeros(self.pool, bool)
    used[ids] = True
    ids = ids.copy()
    done = 0
    for attempt in range(retries):
      holes = np.flatnonzero(zero)[:np.sum(~used)]
      if not len(holes):
        break
      done = attempt + 1
      new, fresh = groups_lib.draw_unused(
          run.pick, used, len(holes), key, attempt, g, sample, run.evidence,
          run.eligible)
      for hole, j in zip(holes, range(len(new))):
        if not zero_variance(fresh.rewards[j]):
          ids[hole] = new[j]
          groups.rows[hole] = fresh.rows[j]
          groups.rewards[hole] = fresh.rewards[j]
          zero[hole] = False
    run.metrics['curriculum/dapo_retries'] = done
    run.metrics['curriculum/dapo_bound_hit'] = float(retries > 0 and
                                                     zero.any())
    return ids, groups, ~zero

  def observe(self, state, ids, successes, counts):
    """The state after observing groups sampled outside `collect`: ids
    [n], successes [n] and responses [n] per group."""
    return state._replace(stats=self._observe(
        state.stats, [(np.asarray(ids), np.asarray(successes, float),
                       np.asarray(counts))]))

  def in_order(self, start: int, count: int) -> np.ndarray:
    """Prompts at data positions [start, start + count): the order the
    uniform selector's batches walk (APRIL admits prompts in it)."""
    return data_order(self.seed, start, count, self.pool)

  def observe_trained(self, state, ids, rewards):
    """Groups sampled outside `collect` and trained whole (APRIL's):
    ids [B], verifier rewards [B, G]. Returns (the state after observing
    them, their values [B]: the posterior mean pass rates before, and the
    curriculum/ metrics `collect` reports for its groups)."""
    values = np.asarray(est.mean(state.stats))[ids]
    zero = np.array([zero_variance(r) for r in rewards])
    metrics = {'curriculum/zero_var_frac': float(zero.mean()),
               'curriculum/selected_pass_mean': float(np.mean(values))}
    state = self.observe(state, ids, rewards.sum(-1),
                         np.full(len(ids), rewards.shape[1]))
    return state, values, metrics

  def _observe(self, stats, evidence):
    """One estimator update with every group observed this step."""
    ids = np.concatenate([e[0] for e in evidence])
    succ = np.concatenate([e[1] for e in evidence])
    cnt = np.concatenate([e[2] for e in evidence])
    uniq, inv = np.unique(ids, return_inverse=True)
    s = np.bincount(inv, succ, len(uniq))
    n = np.bincount(inv, cnt, len(uniq))
    return self._update(stats, jnp.asarray(uniq), jnp.asarray(s),
                        jnp.asarray(n))

  def _assemble(self, ids, groups: groups_lib.Groups, keep, values, spent):
    counts = groups.counts()
    gc = _bucket(int(counts.max()), _GROUP_BUCKET)
    b = len(ids)
    first = next(r[0] for r in groups.rows if r)
    t = first.tokens.shape[-1]
    arr = lambda shape, dtype: np.zeros((b, gc) + shape, dtype)
    out = Collected(
        ids=np.asarray(ids), tokens=arr((t,), np.int32),
        loss_mask=arr((t,), bool), logp=arr((t,), np.float32),
        entropy=arr((t,), np.float32), lengths=arr((), np.int32),
        finish=arr((), np.int32), rewards=arr((), np.float32),
        group_mask=arr((), bool), values=np.asarray(values, np.float32),
        counts=counts, rollouts=spent[0], decoded_tokens=spent[1])
    fields = ('tokens', 'loss_mask', 'logp', 'entropy', 'lengths', 'finish')
    extra = [f for f in first._fields if f not in fields]
    out.extras = {f: np.full((b, gc) + np.shape(getattr(first, f)), -1,
                             np.asarray(getattr(first, f)).dtype)
                  for f in extra}
    for i in range(b):
      for j, row in enumerate(groups.rows[i]):
        for name in fields:
          getattr(out, name)[i, j] = getattr(row, name)
        for name in extra:
          out.extras[name][i, j] = getattr(row, name)
        out.rewards[i, j] = groups.rewards[i][j]
        out.group_mask[i, j] = keep[i]
    return out

  def _metrics(self, p_sel, out: Collected) -> dict:
    hist = np.histogram(p_sel, bins=NUM_HIST_BINS, range=(0, 1))[0]
    kept = out.group_mask.sum(-1)
    varied = np.array([np.ptp(out.rewards[i, :max(int(c), 1)]) > 0
                       for i, c in enumerate(out.counts)])
    row = {
        'curriculum/selected_pass_mean': float(np.mean(p_sel)),
        'curriculum/rollouts': out.rollouts,
        'curriculum/effective_samples': int(kept[varied].sum()),
        'curriculum/kept_groups': int((kept > 0).sum()),
        'curriculum/group_size_max': int(out.counts.max()),
        'curriculum/group_size_min': int(out.counts.min()),
    }
    for i, h in enumerate(hist):
      row[f'curriculum/selected_pass_hist/{i}'] = int(h)
    return row


@sel.SELECTORS.check
def _check_curriculum(cfg) -> None:
  """The curriculum section's own knobs: estimator, allocator, filter and
  the rollout budget (the selectors' are checked with them)."""
  cur, g = cfg.curriculum, cfg.rl.group_size
  require = errors.require
  for key, value, known in (
      ('allocator', cur.allocator, alloc_lib.ALLOCATORS),
      ('estimator', cur.estimator, ('auto',) + est.ESTIMATORS),
      ('dars_schedule', cur.dars_schedule, ('et', 'hw'))):
    require(value in known, f'curriculum.{key}',
            f'{value!r} is not one of {list(known)}')
  parts = cur.filter.split('+')
  require(cur.filter == 'none' or (
      set(parts) <= {'dapo', 'skip'} and len(set(parts)) == len(parts)),
          'curriculum.filter', f'{cur.filter!r} is not one of [none, dapo, '
          'skip, dapo+skip]')
  max_group = cur.max_group or 2 * g
  require(1 <= cur.min_group <= g <= max_group, 'curriculum.min_group',
          f'need 1 <= min_group ({cur.min_group}) <= rl.group_size ({g}) '
          f'<= max_group ({max_group}) so the budget B * G fits')
  first = cur.first_round or max(g // 2, cur.min_group)
  require(cur.min_group <= first <= g, 'curriculum.first_round',
          f'{first} must be in [min_group={cur.min_group}, '
          f'rl.group_size={g}]')
  require(cur.pool_size == 0 or cfg.rl.batch_prompts <= cur.pool_size <=
          cfg.task.num_train, 'curriculum.pool_size',
          f'{cur.pool_size} must be 0 or in [rl.batch_prompts='
          f'{cfg.rl.batch_prompts}, task.num_train={cfg.task.num_train}]')
  require(0 < cur.spo_discount <= 1, 'curriculum.spo_discount',
          f'{cur.spo_discount} not in (0, 1] (0 would keep no evidence)')
  for key in ('discount', 'vade_decay', 'skip_threshold'):
    value = getattr(cur, key)
    require(0 <= value <= 1, f'curriculum.{key}', f'{value} not in [0, 1]')
  for key in ('prior_alpha', 'prior_beta'):
    require(getattr(cur, key) > 0, f'curriculum.{key}', 'must be > 0')
  require(cur.dapo_max_retries >= 0, 'curriculum.dapo_max_retries',
          'must be >= 0')
  require(cfg.rl.max_rollouts >= 0, 'rl.max_rollouts', 'must be >= 0')
