"""Analysis bounds around the curriculum (ANALYSIS ONLY, not methods).

Each knob wraps the controller's groups phase (allocation and filter) and
moves rollouts it should not be charged for to an uncharged tally
(curriculum/uncharged_rollouts); every rollout is still evidence:

  oracle.free_refills  DAPO's refills are free: an upper bound on what
                     choosing prompts can save at equal rollouts.
  oracle.screen K    the outcome oracle: of K * B groups (the selector's B
                     and (K - 1) * B more), the B with the largest reward
                     variance are trained on, and only they are charged.
  oracle.probe n     with oracle.screen: the difficulty oracle instead:
                     every candidate gets n free probes, the B most mixed
                     are chosen and sampled afresh (charged).

The Curriculum wraps its groups phase only when one of them is on
(`enabled`).
"""

import dataclasses
import functools
from typing import Callable

import jax
import numpy as np

from rlx import config as config_lib
from rlx import errors
from rlx.curriculum import groups as groups_lib
from rlx.curriculum import selectors as sel


@config_lib.section('curriculum.oracle', renamed={
    'oracle_screen': 'screen', 'oracle_probe': 'probe',
    'dapo_free_refills': 'free_refills'})
@dataclasses.dataclass(frozen=True)
class OracleConfig:
  """The analysis bounds (not methods): curriculum.oracle.*."""
  screen: int = 0  # ANALYSIS ONLY (not a method): K > 1 draws
  # (K - 1) * B more candidate prompts besides the first B (the selector's
  # draws, G rollouts each) and trains on the B groups, of all K * B, with
  # the largest reward variance (ties at random); only those B groups'
  # rollouts are charged (the rest in curriculum/uncharged_rollouts). The
  # bound of a selector that knows each group's outcome in advance and
  # prefers the most mixed (p near 0.5), beyond avoiding all-equal ones.
  # Needs allocator 'fixed', filter 'none' and rollout.mode static or
  # continuous. 0 or 1: off.
  probe: int = 0  # oracle.screen, ANALYSIS ONLY: 0: the outcome
  # oracle above. n >= 2: the difficulty oracle: every candidate gets n
  # uncharged probe rollouts instead, the B with the largest probe variance
  # p(1-p) are chosen, and their G training rollouts are sampled afresh
  # (charged): what a perfect per-prompt difficulty estimate could save,
  # without knowing the training groups' outcomes.
  free_refills: bool = False  # dapo, ANALYSIS ONLY (not a method):
  # refill rollouts are not charged (left out of rollouts/total,
  # tokens/decoded_total and rl.max_rollouts; counted in
  # curriculum/uncharged_rollouts). The filter then knows for free which
  # groups come back all-equal: an upper bound on what choosing prompts
  # can save at equal rollouts, to compare selectors against.


def enabled(cfg) -> bool:
  """Whether curriculum config `cfg` turns an analysis bound on."""
  return cfg.oracle.screen > 1 or cfg.oracle.free_refills


class Oracles:
  """The controller's groups phase with the bounds `cfg` turns on.

  Args:
    cfg: the curriculum config.
    group_size: G, rollouts per screened group (without oracle.probe).
    pool: N, the prompts selectable.
    inner: the groups phase, (ids [B], p_sel [B], StepRun) -> (ids [B],
      Groups, keep [B] bool, p_sel [B]).
  """

  def __init__(self, cfg, group_size: int, pool: int, inner: Callable):
    self.cfg, self.group_size, self.pool, self.inner = (cfg, group_size, pool,
                                                        inner)

  def __call__(self, ids, p_sel, run: groups_lib.StepRun):
    """`inner`'s groups under the bounds; the same signature."""
    cfg = self.cfg
    free = [0, 0]  # Rollouts and tokens sampled uncharged.
    free_sample = run.sampler(free)
    screen = functools.partial(self._screen, run.pick, key=run.keys[2],
                               sample=free_sample, evidence=run.evidence,
                               metrics=run.metrics)
    if cfg.oracle.screen > 1 and cfg.oracle.probe:
      # Difficulty oracle: choose by free probes, then roll out afresh.
      ids, _ = screen(ids, None)
      p_sel = run.values[ids]
    if cfg.oracle.free_refills:
      run.refill_sample = free_sample
    ids, groups, keep, p_sel = self.inner(ids, p_sel, run)
    if cfg.oracle.screen > 1 and not cfg.oracle.probe:
      # Outcome oracle: train on the most mixed of the groups themselves.
      ids, groups = screen(ids, groups)
      p_sel = run.values[ids]  # Of the trained ids.
      run.metrics['curriculum/screen_zero_frac'] = float(np.mean(
          [groups_lib.zero_variance(r) for r in groups.rewards]))
      # Only the trained groups are charged; the rest moves to `free`.
      trained = [int(groups.counts().sum()),
                 sum(int(r.lengths) for rows in groups.rows for r in rows)]
      free[:] = [f + s - t for f, s, t in zip(free, run.spent, trained)]
      run.spent[:] = trained
    run.metrics['curriculum/uncharged_rollouts'] = free[0]
    return ids, groups, keep, p_sel

  def _screen(self, pick, ids, first, *, key, sample, evidence, metrics):
    """The oracle screen: the B most mixed of K * B groups.

    (K - 1) * B more prompts, never one already drawn this step, get G
    rollouts each (curriculum.oracle.probe > 0: that many; and so do `ids`
    when `first`, their groups, is None); of all K * B groups the B with
    the largest reward variance are kept, ties broken at random. Every
    group is evidence.

    Returns:
      (ids [B], their Groups).
    """
    b, k = len(ids), self.cfg.oracle.screen
    g = self.cfg.oracle.probe or self.group_size
    if first is None:
      first = groups_lib.Groups.empty(b)
      groups_lib.extend(first, ids, np.full(b, g),
                        jax.random.fold_in(key, 3000), sample)
      evidence.append((np.asarray(ids), first.successes(), first.counts()))
    used = np.zeros(self.pool, bool)
    used[ids] = True
    cand_ids, cand = [np.asarray(ids)], [first]
    for r in range(k - 1):
      if used.all():
        break
      new, fresh = groups_lib.draw_unused(
          pick, used, min(b, int(np.sum(~used))), key, r, g, sample,
          evidence)
      cand_ids.append(new)
      cand.append(fresh)
    all_ids = np.concatenate(cand_ids)
    rows = [x for c in cand for x in c.rows]
    rewards = [x for c in cand for x in c.rewards]
    # Sorted: groups with the same rewards get bit-equal variances (a tie).
    var = np.array([np.var(np.sort(r)) if r else -1.0 for r in rewards])
    tie = np.asarray(jax.random.uniform(jax.random.fold_in(key, 2000),
                                        (len(var),)))
    best = np.lexsort((tie, -var))[:b]  # Largest variance first.
    metrics['curriculum/screen_candidates'] = len(var)
    metrics['curriculum/screen_var_mean'] = float(np.mean(var[best]))
    return all_ids[best], groups_lib.Groups([rows[i] for i in best],
                                            [rewards[i] for i in best])


@sel.SELECTORS.check
def _check_oracles(cfg) -> None:
  """The analysis knobs and what they need of the curriculum."""
  cur = cfg.curriculum
  parts = cur.filter.split('+')
  errors.require(not cur.oracle.free_refills or 'dapo' in parts,
                 'curriculum.oracle.free_refills', 'needs curriculum.filter '
                 f'to include dapo (it is {cur.filter!r})')
  errors.require(cur.oracle.screen >= 0, 'curriculum.oracle.screen',
                 f'{cur.oracle.screen} must be >= 0')
  errors.require(cur.oracle.screen <= 1 or (
      cur.allocator == 'fixed' and cur.filter == 'none'),
                 'curriculum.oracle.screen', f'{cur.oracle.screen} needs '
                 "allocator 'fixed' and filter 'none' (it chooses the "
                 f'groups itself); got {cur.allocator!r} and {cur.filter!r}')
  errors.require(cur.oracle.probe == 0 or (
      cur.oracle.probe >= 2 and cur.oracle.screen > 1),
                 'curriculum.oracle.probe', f'{cur.oracle.probe} must be 0 '
                 'or, with curriculum.oracle.screen > 1, at least 2 (one '
                 'probe has no variance)')
