"""Rollout allocators: how many responses each selected prompt gets.

Every allocator spends exactly a fixed budget (B * G rollouts for B
prompts at the configured group size G), with each prompt's count in
[min_group, max_group]. Single-round allocators decide from the posterior
before sampling; two-round ones (DARS, XRPO) give every prompt a first
round, look at its rewards, and place the rest. Group sizes then vary from
prompt to prompt: a mask over [B, Gmax] carries them through the sampler,
the advantages and the learner. Host-side numpy over [B] arrays (B is
small); formulas in ALGORITHMS.md section C.
"""

from typing import Callable, NamedTuple, Optional

import numpy as np
from scipy import stats as scipy_stats

ALLOCATORS = ('fixed', 'cures', 'rollout_gdro', 'xrpo', 'dars')


def waterfill(weights: np.ndarray, total: float, lo: np.ndarray,
              hi: np.ndarray) -> tuple[np.ndarray, float]:
  """Continuous x_i = clip(c w_i, lo_i, hi_i) with sum(x) == total.

  Returns (x, c). The scale c is the inverse square root of the shadow
  price of the budget when w_i = sqrt(variance_i) (square-root rule). When
  the weighted entries saturate before the budget is met, the remainder is
  spread evenly over the entries with room.
  """
  w = np.asarray(weights, np.float64)
  lo = np.broadcast_to(np.asarray(lo, np.float64), w.shape)
  hi = np.broadcast_to(np.asarray(hi, np.float64), w.shape)
  if not lo.sum() - 1e-9 <= total <= hi.sum() + 1e-9:
    raise ValueError(f'budget {total} is outside [{lo.sum()}, {hi.sum()}] '
                     'for these group-size bounds')
  fill = lambda c: np.clip(c * w, lo, hi)
  c_lo, c_hi = 0.0, 1.0
  while fill(c_hi).sum() < total and c_hi < 1e12:
    c_hi *= 2
  for _ in range(100):
    c = 0.5 * (c_lo + c_hi)
    c_lo, c_hi = (c, c_hi) if fill(c).sum() < total else (c_lo, c)
  x = fill(c_hi)
  short = total - x.sum()
  while short > 1e-9:  # Weighted entries saturated: spread the rest evenly.
    room = hi - x
    open_ = room > 1e-12
    add = np.minimum(room, short / open_.sum()) * open_
    x, short = x + add, short - add.sum()
  return x, c_hi


def integer_counts(x: np.ndarray, total: int, hi: np.ndarray) -> np.ndarray:
  """Rounds x to integers summing to `total` (largest remainder, <= hi)."""
  hi = np.broadcast_to(np.asarray(hi), x.shape)
  n = np.minimum(np.floor(x + 1e-9).astype(np.int64), hi)
  order = np.argsort(-(x - n), kind='stable')
  while n.sum() < total:
    progressed = False
    for i in order:
      if n.sum() == total:
        break
      if n[i] < hi[i]:
        n[i] += 1
        progressed = True
    if not progressed:
      raise ValueError(f'cannot place {total} rollouts under caps {hi}')
  return n


def proportional_counts(weights, total: int, lo, hi) -> np.ndarray:
  """Integer counts in [lo, hi] summing to total, proportional to weights."""
  x, _ = waterfill(weights, total, lo, hi)
  return integer_counts(x, total, hi)


def dars_extra(acc: np.ndarray, n: np.ndarray, *, n_max: int,
               schedule: str) -> np.ndarray:
  """DARS extra rollouts per prompt from first-round accuracy (the card).

  a = 0 is treated as 0.5 / n; a >= 0.5 gets none. With S(a) = 2a(1-a) and
  A_peak = 0.5 n: ET ceil((A_peak - n S) / S), HW ceil((2(1-a) A_peak -
  n S) / S); capped at n_max - n.
  """
  if schedule not in ('et', 'hw'):
    raise ValueError(f'DARS schedule {schedule!r} is not one of [et, hw]')
  acc = np.asarray(acc, np.float64)
  n = np.asarray(n, np.float64)
  a = np.where(acc == 0, 0.5 / n, acc)
  s = 2 * a * (1 - a)
  peak = 0.5 * n
  target = peak if schedule == 'et' else 2 * (1 - a) * peak
  with np.errstate(divide='ignore', invalid='ignore'):
    extra = np.ceil((target - n * s) / s - 1e-9)
  extra = np.where(a >= 0.5, 0, np.maximum(extra, 0))
  return np.minimum(extra, n_max - n).astype(np.int64)


def _t_quantiles(n_max: int) -> np.ndarray:
  """t_{0.975, df} for df = 0..n_max (df = 0 -> a large constant)."""
  q = [scipy_stats.t.ppf(0.975, max(df, 1)) for df in range(n_max + 1)]
  q[0] = q[1]
  return np.array(q)


class Allocator(NamedTuple):
  """`first(p [B]) -> counts [B]`; `second` places the rest after round 1.

  second(successes [B], counts [B]) -> extra [B], or None (one round).
  Both return (counts, metrics dict).
  """
  first: Callable
  second: Optional[Callable]


def make(name: str, *, group_size: int, min_group: int, max_group: int,
         first_round: int, dars_schedule: str = 'et',
         xrpo_bonus: float = 0.1, num_bins: int = 5) -> Allocator:
  """The allocator registered under `name` (see ALLOCATORS).

  Args:
    name: one of ALLOCATORS.
    group_size: G; the budget is B * G for B prompts.
    min_group, max_group: bounds on one prompt's rollouts.
    first_round: rollouts per prompt in round one (dars, xrpo).
    dars_schedule: 'et' (equal treatment) or 'hw' (hardness weighted).
    xrpo_bonus: XRPO exploration bonus c / sqrt(n).
    num_bins: pass-rate bins of rollout_gdro.
  """
  def budget(b):
    return b * group_size

  if name == 'fixed':
    return Allocator(lambda p: (np.full(len(p), group_size), {}), None)
  if name == 'cures':
    def cures(p):
      p = np.asarray(p, np.float64)
      return proportional_counts(np.sqrt(p * (1 - p)), budget(len(p)),
                                 min_group, max_group), {}
    return Allocator(cures, None)
  if name == 'rollout_gdro':
    def gdro(p):
      p = np.asarray(p, np.float64)
      bins = np.clip(np.floor(p * num_bins), 0, num_bins - 1).astype(int)
      sums = np.bincount(bins, p, num_bins)
      p_bin = (sums / np.maximum(np.bincount(bins, None, num_bins), 1))[bins]
      x, c = waterfill(np.sqrt(p_bin * (1 - p_bin)), budget(len(p)),
                       min_group, max_group)
      return integer_counts(x, budget(len(p)), max_group), {
          'shadow_price': 1.0 / max(c, 1e-12) ** 2}
    return Allocator(gdro, None)
  if name in ('dars', 'xrpo'):
    if not min_group <= first_round <= min(group_size, max_group):
      raise ValueError(f'first_round={first_round} must be in '
                       f'[{min_group}, min(group_size, max_group)]')
    first = lambda p: (np.full(len(p), first_round), {})
    if name == 'dars':
      def second(successes, counts):
        acc = np.asarray(successes) / counts
        want = dars_extra(acc, counts, n_max=max_group,
                          schedule=dars_schedule)
        rest = budget(len(counts)) - int(np.sum(counts))
        extra = proportional_counts(want, rest, 0, max_group - counts)
        return extra, {'dars_requested': int(want.sum())}
      return Allocator(first, second)
    tq = _t_quantiles(max_group + 1)

    def xrpo(successes, counts):
      acc = np.asarray(successes, np.float64) / counts
      std = np.sqrt(acc * (1 - acc) * counts / np.maximum(counts - 1, 1))
      half = lambda n: tq[n - 1] * std / np.sqrt(n)
      n = np.asarray(counts).copy()
      for _ in range(budget(len(n)) - int(n.sum())):
        gain = half(n) - half(n + 1) + xrpo_bonus / np.sqrt(n)
        gain = np.where(n < max_group, gain, -np.inf)
        n[int(np.argmax(gain))] += 1
      return n - counts, {}
    return Allocator(first, xrpo)
  raise ValueError(f'unknown allocator {name!r}; known: {list(ALLOCATORS)}')

