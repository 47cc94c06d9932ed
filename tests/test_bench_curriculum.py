"""scripts/bench_curriculum.py: the seed-mean curve and its bootstrap."""

import numpy as np
import pytest

from rlx import testing


@pytest.fixture(scope='module')
def bench():
  return testing.load_script('bench_curriculum')


def _run(curve, per_step=100, train_s=3.0):
  """metrics.jsonl rows of a run evaluated after every step; each step's
  rollout and learner take train_s seconds (one third sampling), each
  step and its evaluation 10 s."""
  rows = []
  for step, p in enumerate(curve):
    if step:
      rows.append({'step': step, 'rollouts/total': per_step * step,
                   'time/rollout_s': train_s / 3,
                   'time/train_s': 2 * train_s / 3})
    rows.append({'step': step, 'eval/pass@1': p, 'time/elapsed_s': 10.0 * step})
  return rows


def test_mean_curve_reach_interpolates_the_seed_mean(bench):
  runs = [_run([0.1, 0.2, 0.3]), _run([0.1, 0.4, 0.5], train_s=5.0)]
  # Seed mean 0.1, 0.3, 0.4: 0.35 is half way from evaluation 1 to 2, where
  # the training seconds are (3 + 5) / 2 and then (6 + 10) / 2.
  np.testing.assert_allclose(bench.mean_curve_reach(runs, 0.35),
                             (150, 15, 6))
  assert bench.mean_curve_reach(runs, 0.1) == (0, 0, 0)
  assert bench.mean_curve_reach(runs, 0.5) is None
  np.testing.assert_allclose([e[3] for e in bench.evals(runs[1])],
                             [0, 5, 10])


def test_mean_curve_reach_on_seeds_evaluated_at_different_rollouts(bench):
  # Variable rollouts per step (DAPO, DARS): evaluation i falls at
  # different rollout counts per seed. Each curve is read at every
  # evaluation point (interpolated), up to the shortest run.
  a = _run([0.2, 0.3, 0.4], per_step=512)  # 0, 512, 1024
  b = _run([0.2, 0.25, 0.3, 0.35, 0.45], per_step=256)  # 0 ... 1024
  # Seed means at 0, 256, 512, 768, 1024: .2, .25, .3, .35, .425.
  got = bench.mean_curve_reach([a, b], 0.32)
  np.testing.assert_allclose(got[0], 512 + 0.4 * 256)
  np.testing.assert_allclose(bench.mean_curve_reach([a, b], 0.425)[0], 1024)
  # A longer seed's evaluations past the shortest run's end are not read.
  c = _run([0.2, 0.3, 0.4, 0.9], per_step=512)
  assert bench.mean_curve_reach([a, c], 0.5) is None


def test_a_run_without_its_final_evaluation_is_not_finished(bench):
  rows = _run([0.1, 0.2, 0.3])  # 200 rollouts at step 2, evaluated there.
  assert bench.finished(rows, 200)
  assert not bench.finished(rows[:-1], 200)  # Killed during the last eval.
  assert not bench.finished(rows, 300)


def test_bootstrap_ratio(bench):
  base = [_run([0.1, 0.2, 0.3, 0.4]) for _ in range(3)]
  fast = [_run([0.1, 0.4, 0.4, 0.4]) for _ in range(3)]
  med, lo, hi, p = bench.bootstrap(base, fast, draws=50)
  # Uniform reaches its own final 0.4 at 300 rollouts, the method at 100.
  np.testing.assert_allclose([med, lo, hi, p], [1 / 3, 1 / 3, 1 / 3, 1.0])
  never = [_run([0.1, 0.2, 0.3, 0.35]) for _ in range(3)]
  med, _, _, p = bench.bootstrap(base, never, draws=50)
  assert med == np.inf and p == 0.0
  # Seeds are drawn in pairs: a method equal to uniform seed by seed is at
  # 1.0 in every draw, though the seeds differ.
  base = [_run([0.1, 0.2, 0.3]), _run([0.1, 0.3, 0.5]), _run([0.2, 0.2, 0.6])]
  med, lo, hi, p = bench.bootstrap(base, base, draws=200)
  assert med == lo == hi == 1.0 and p == 0.0


def test_every_method_is_a_valid_config(bench):
  # A method's overrides must build (the config's checks) on both tasks.
  from rlx.configs import grpo, grpo_hardmix  # pylint: disable=g-import-not-at-top
  from rlx import config as config_lib  # pylint: disable=g-import-not-at-top
  from rlx import recipes  # pylint: disable=g-import-not-at-top
  for recipe in (grpo, grpo_hardmix):
    for name, overrides in bench.RUNNABLE.items():
      config = recipe.get_config()
      for key, value in overrides.items():
        recipes.override(config, f'curriculum.{key}', value)
      cfg = config_lib.build(config)
      for key, value in overrides.items():
        got = cfg.curriculum
        for part in key.split('.'):  # Nested method knobs: dots.refs.
          got = getattr(got, part)
        assert got == value, (name, key)
