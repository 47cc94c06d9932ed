"""Allocators: exact budgets, bounds, the DARS card, the square-root rule."""

import numpy as np
import pytest

from rlx.curriculum import allocators as al

G, LO, HI = 8, 2, 16


def _make(name, **kw):
  return al.make(name, group_size=G, min_group=LO, max_group=HI,
                 first_round=4, **kw)


def _run(allocator, p, rng):
  counts, _ = allocator.first(p)
  if allocator.second is not None:
    successes = rng.binomial(counts, p).astype(float)
    extra, _ = allocator.second(successes, counts)
    assert np.all(extra >= 0)
    counts = counts + extra
  return counts


@pytest.mark.parametrize('name', al.ALLOCATORS)
def test_spends_exactly_the_budget_within_bounds(name):
  rng = np.random.default_rng(0)
  allocator = _make(name)
  for trial in range(50):
    b = int(rng.integers(1, 20))
    p = rng.choice([0.0, 1.0, 0.5, rng.uniform()], size=b) if trial % 2 else (
        rng.uniform(size=b))
    counts = _run(allocator, p, rng)
    assert counts.sum() == b * G, (name, counts)
    assert counts.min() >= (LO if name not in ('dars', 'xrpo') else 4)
    assert counts.max() <= HI


def test_fixed_gives_everyone_g():
  np.testing.assert_array_equal(_make('fixed').first(np.full(5, 0.3))[0],
                                np.full(5, G))


def test_cures_follows_the_square_root_rule_when_unclipped():
  p = np.array([0.5, 0.5, 0.1, 0.9])
  counts = _make('cures').first(p)[0]
  w = np.sqrt(p * (1 - p))
  x, _ = al.waterfill(w, 4 * G, LO, HI)
  np.testing.assert_allclose(x, w / w.sum() * 4 * G)  # No bound is active.
  np.testing.assert_array_equal(counts, [10, 10, 6, 6])


def test_waterfill_respects_caps_and_spreads_the_rest():
  x, _ = al.waterfill(np.array([1.0, 0.0, 0.0]), 10, 0, 4)
  np.testing.assert_allclose(x, [4.0, 3.0, 3.0])


def test_integer_counts_sum_and_largest_remainder():
  n = al.integer_counts(np.array([1.5, 1.2, 2.3]), 5, 10)
  np.testing.assert_array_equal(n, [2, 1, 2])


def test_rollout_gdro_pools_bins_and_reports_shadow_price():
  p = np.array([0.05, 0.1, 0.5, 0.55, 0.95])
  counts, m = _make('rollout_gdro', num_bins=5).first(p)
  # Same bin, same continuous share (integers differ by the rounding).
  assert counts.sum() == 5 * G and abs(counts[2] - counts[3]) <= 1
  assert abs(counts[0] - counts[1]) <= 1
  assert min(counts[2:4]) > max(counts[0], counts[1], counts[4])
  assert m['shadow_price'] > 0


def test_dars_extra_matches_the_card():
  n = np.full(5, 4)
  acc = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
  # a=0 -> 0.5/n=0.125: S=0.21875, ET ceil((2 - 0.875)/0.21875) = 6.
  # a=0.25: S=0.375, ET ceil((2 - 1.5)/0.375) = 2,
  #         HW ceil((2*0.75*2 - 1.5)/0.375) = 4.
  np.testing.assert_array_equal(
      al.dars_extra(acc, n, n_max=16, schedule='et'), [6, 2, 0, 0, 0])
  # HW at a=0.125: ceil((2*0.875*2 - 0.875)/0.21875) = 12.
  np.testing.assert_array_equal(
      al.dars_extra(acc, n, n_max=16, schedule='hw'), [12, 4, 0, 0, 0])
  # Capped at n_max - n.
  np.testing.assert_array_equal(
      al.dars_extra(acc, n, n_max=8, schedule='hw'), [4, 4, 0, 0, 0])


def test_dars_spends_the_rest_in_proportion_to_the_card():
  allocator = _make('dars', dars_schedule='et')
  counts = np.full(4, 4)
  extra, m = allocator.second(np.array([0.0, 1.0, 2.0, 4.0]), counts)
  assert extra.sum() == 4 * G - 16 and m['dars_requested'] == 6 + 2
  assert extra[0] > extra[1] > 0 and extra[2] == extra[3] == 0


def test_xrpo_gives_extra_rollouts_to_the_widest_intervals():
  allocator = _make('xrpo', xrpo_bonus=0.0)
  extra, _ = allocator.second(np.array([2.0, 0.0, 4.0]), np.full(3, 4))
  # All-equal groups have zero half-width: no interval to shrink.
  np.testing.assert_array_equal(extra, [HI - 4, 0, 0])


def test_bad_first_round_is_refused():
  with pytest.raises(ValueError, match='first_round'):
    al.make('dars', group_size=G, min_group=LO, max_group=HI, first_round=12)
