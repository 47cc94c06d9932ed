"""Curricula against uniform GRPO at equal rollout budgets.

  python scripts/bench_curriculum.py --tasks=grpo_hardmix,grpo \
      --seeds=0,1 --workdir=runs/bench_curriculum

For each task recipe, uniform GRPO runs --steps RL steps (B * G rollouts
each; --batch_prompts overrides B, e.g. --batch_prompts=8 --steps=32 for
the same budget in twice the optimizer steps); its final held-out pass@1
(mean over seeds) is the target. Every method then runs with the same
total rollout budget (rl.max_rollouts; rollouts spent on DOTS references
and DAPO refills count). Reported per method: rollouts and wall seconds
until the first evaluation at or above the target (mean over the seeds
that reached it; '-' if none did), the ratio of those rollouts to
uniform's, rollouts, ratio and seconds read off the seed-mean pass@1
curve instead (linear interpolation between evaluations; robust to one
seed's lucky evaluation), and there also the training seconds (rollout
and learner time only, without the held-out evaluations, which cost
differently with response lengths and across code versions), the final
pass@1, its difference to uniform's
on the same seed (mean and standard error over seeds: the paired
comparison that says whether a gap is larger than the seed-to-seed
noise), and the mean fraction of zero-variance groups among the groups
rolled out. Selection is restricted to a pool of --pool prompts so that
prompts come back (the multi-epoch regime the estimators learn in);
--pool=0 selects from every train prompt (few come back: the regime of a
large dataset, where only a predictor across prompts such as DOTS has
anything to go on). Finished runs in --workdir are read back, not
repeated.
"""

import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import jax
import numpy as np

from rlx import config as config_lib
from rlx import recipes
from rlx import trainer
from rlx.logbook import read_metrics

# name -> curriculum overrides (selector / allocator / filter).
METHODS = {
    'uniform': {},
    'vade': {'selector': 'vade'},
    'insight': {'selector': 'insight'},
    'cures': {'selector': 'cures', 'allocator': 'cures'},
    'mmr1_vas': {'selector': 'mmr1_vas'},
    'prompt_gdro': {'selector': 'prompt_gdro'},
    'spo': {'selector': 'spo'},
    'dots': {'selector': 'dots'},
    # DOTS over the training history: no reference rollouts (see
    # curriculum.dots.refs in rlx/config.py).
    'dots_history': {'selector': 'dots', 'dots.refs': 'history',
                     'dots.similarity': 'cosine'},
    # The same with a linear probe (ridge) instead of attention as the
    # readout (curriculum.dots.readout).
    'dots_ridge': {'selector': 'dots', 'dots.refs': 'history',
                   'dots.similarity': 'cosine', 'dots.readout': 'ridge'},
    # The probe fitted on recent evidence: the k-th newest of its 256
    # references weighs 0.5^(k / 64) (a half-life of 8 steps at B = 8).
    'dots_recent': {'selector': 'dots', 'dots.refs': 'history',
                    'dots.similarity': 'cosine', 'dots.readout': 'ridge',
                    'dots.ref_halflife': 64.0},
    # The probe with a quarter of each batch drawn uniformly, so that its
    # references span every difficulty (curriculum.dots.explore).
    'dots_explore': {'selector': 'dots', 'dots.refs': 'history',
                     'dots.similarity': 'cosine', 'dots.readout': 'ridge',
                     'dots.explore': 0.25},
    # The B of 16 B uniform candidates whose reference solution the policy
    # finds closest to even odds (one forward pass each, no rollouts).
    'likelihood': {'selector': 'likelihood'},
    'alloc_cures': {'allocator': 'cures'},
    'rollout_gdro': {'allocator': 'rollout_gdro'},
    'xrpo': {'allocator': 'xrpo'},
    'dars': {'allocator': 'dars'},
    'dapo': {'filter': 'dapo'},
    'skip': {'filter': 'skip'},
    'vade_skip_dars': {'selector': 'vade', 'filter': 'skip',
                       'allocator': 'dars'},
}

# Not methods: bounds to compare methods against, run only when named in
# --methods.
BOUNDS = {
    # DAPO whose refills are free (curriculum.oracle.free_refills): every
    # trained group is one that did not come back all-equal, and only the
    # trained rollouts count. What any selector that avoids all-equal
    # groups could at best save at equal rollouts (at this G).
    'dapo_oracle': {'filter': 'dapo', 'oracle.free_refills': True,
                    'dapo_max_retries': 8},
    # The B most mixed (largest reward variance) of 4 * B uniformly drawn
    # groups, only those charged (curriculum.oracle.screen): what a selector
    # that also prefers p near 0.5 could at best save.
    'screen_oracle': {'oracle.screen': 4},
    # The same 4 * B candidates, but chosen by 16 free probe rollouts each
    # (their p(1-p)) and trained on G fresh rollouts (curriculum.
    # oracle.probe): a perfect difficulty estimate, without the outcomes.
    'probe_oracle': {'oracle.screen': 4, 'oracle.probe': 16},
}

RUNNABLE = {**METHODS, **BOUNDS}

_TASKS = flags.DEFINE_list('tasks', ['grpo_hardmix', 'grpo'],
                           'Task recipes (configs/<name>.py).')
_METHODS = flags.DEFINE_list('methods', list(METHODS), 'Methods to run '
                              '(and any of BOUNDS).')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1'], 'RL seeds.')
_STEPS = flags.DEFINE_integer('steps', 16, 'RL steps of the uniform run.')
_EVAL_EVERY = flags.DEFINE_integer('eval_every', 4, 'Steps between evals.')
_EVAL_PROMPTS = flags.DEFINE_integer('eval_prompts', 256,
                                     'Held-out prompts per evaluation.')
_POOL = flags.DEFINE_integer('pool', 128, 'curriculum.pool_size (0: every '
                             'train prompt); runs of another pool go to '
                             '<folder>_p<pool>/.')
_BATCH = flags.DEFINE_integer('batch_prompts', 0, 'rl.batch_prompts for '
                              "every run (0: the recipe's); runs go to "
                              'WORKDIR/<task>_b<B>/ when set (and '
                              '<task>[_b<B>]_r<rollouts>/ for a budget '
                              "other than 16 of the recipe's steps).")
_WORKDIR = flags.DEFINE_string('workdir', 'runs/bench_curriculum',
                               'Where runs are written.')
_BOOTSTRAP = flags.DEFINE_integer(
    'bootstrap', 0, 'If > 0: this many draws of the seeds with replacement '
    "(paired with uniform's), printing each method's seed-mean curve ratio "
    'median, 90% interval and P(ratio <= 0.5).')
_SET = flags.DEFINE_multi_string('set', [], 'Extra override for every run, '
                                 'key=value (e.g. optim.packing=False); give '
                                 'such runs their own --workdir.')


def run_one(task: str, method: str, seed: int) -> list[dict]:
  config = importlib.import_module(f'configs.{task}').get_config()
  config.seed = seed
  rl = config.rl
  # Budget of the recipe's B at the default --steps; runs of another budget
  # get their own folder (they could not resume a finished run of another).
  default_budget = _STEPS.default * rl.batch_prompts * rl.group_size
  if _BATCH.value:
    rl.batch_prompts = _BATCH.value
  budget = _STEPS.value * rl.batch_prompts * rl.group_size
  rl.num_steps = 4 * _STEPS.value  # The budget stops it first.
  rl.max_rollouts = budget
  config.eval.every = _EVAL_EVERY.value
  config.eval.num_prompts = _EVAL_PROMPTS.value
  config.curriculum.pool_size = _POOL.value
  for key, value in RUNNABLE[method].items():
    recipes.override(config, f'curriculum.{key}', value)
  config.log.progress = False
  config.log.tensorboard = False
  config.log.checkpoint_every = 1000
  recipes.apply_overrides(config, _SET.value)  # Last: --set wins.
  cfg = config_lib.build(config)
  folder = f'{task}_b{_BATCH.value}' if _BATCH.value else task
  if budget != default_budget:
    folder += f'_r{budget}'
  if _POOL.value != _POOL.default:
    folder += f'_p{_POOL.value}'
  workdir = os.path.join(_WORKDIR.value, f'{folder}/{method}_seed{seed}')
  metrics = os.path.join(workdir, 'metrics.jsonl')
  rows = read_metrics(metrics) if os.path.exists(metrics) else []
  if not finished(rows, budget):  # New, or stopped early: resume.
    trainer.train(cfg, workdir)
    rows = read_metrics(metrics)
  if not finished(rows, budget):
    raise RuntimeError(f'{workdir}: the run ended without its final '
                       f'evaluation at {budget} rollouts')
  return rows


def finished(rows: list[dict], budget: int) -> bool:
  """The run reached `budget` rollouts and wrote its final evaluation at
  that step (a run killed during it is not finished)."""
  last = next((r['step'] for r in rows
               if r.get('rollouts/total', 0) >= budget), None)
  return last is not None and any(
      r['step'] == last and 'eval/pass@1' in r for r in rows)


def evals(rows: list[dict]) -> list[tuple[int, float, float, float]]:
  """(rollouts so far, seconds so far, pass@1, training seconds so far) at
  every evaluation. Seconds are the run's wall time after its first
  evaluation, held-out evaluations included; training seconds count only
  the steps' rollout and learner time (time/rollout_s + time/train_s,
  curriculum scoring included), so they compare runs whose evaluations
  cost differently."""
  spent, trained, total = {0: 0}, {0: 0.0}, 0.0
  for r in rows:
    if 'rollouts/total' in r:
      spent[r['step']] = r['rollouts/total']
      total += r.get('time/rollout_s', 0.0) + r.get('time/train_s', 0.0)
      trained[r['step']] = total
  t0 = next(r['time/elapsed_s'] for r in rows if 'eval/pass@1' in r)
  return [(spent[r['step']], r['time/elapsed_s'] - t0, r['eval/pass@1'],
           trained[r['step']]) for r in rows if 'eval/pass@1' in r]


def reach(rows, target):
  for rollouts, seconds, p, _ in evals(rows):
    if p >= target - 1e-9:
      return rollouts, seconds
  return None


def mean_curve_reach(runs, target):
  """(rollouts, seconds, training seconds) at which the seed-mean pass@1 curve first reaches
  `target`, interpolated linearly between evaluations (None if never).

  Each seed's pass@1 and seconds are read, linearly interpolated, at every
  rollout count where some seed evaluated (up to the shortest run), and
  averaged there, so the crossing does not hinge on one seed's lucky
  evaluation. With the same evaluation points on every seed (fixed
  rollouts per step) this is the mean of evaluation i over seeds.
  """
  return curve_reach([evals(r) for r in runs], target)


def curve_reach(curves, target):
  """`mean_curve_reach` over the runs' `evals` lists."""
  curves = [np.asarray(c, float) for c in curves]  # [n_k, 4] each
  end = min(c[-1, 0] for c in curves)
  grid = np.unique(np.concatenate([c[c[:, 0] <= end, 0] for c in curves]))
  at = lambda c, col: np.interp(grid, c[:, 0], c[:, col])
  # [n, 4]: rollouts, seconds, pass@1, training seconds (seed means).
  mean = np.stack([grid] + [np.mean([at(c, col) for c in curves], 0)
                            for col in (1, 2, 3)], -1)
  cols = [0, 1, 3]  # What is returned.
  for i in range(len(grid)):
    if mean[i, 2] >= target - 1e-9:
      if i == 0:
        return tuple(mean[0, cols])
      frac = (target - mean[i - 1, 2]) / (mean[i, 2] - mean[i - 1, 2])
      return tuple(mean[i - 1, cols] + frac * (mean[i, cols] -
                                                mean[i - 1, cols]))
  return None


def bootstrap(base, runs, draws: int, seed: int = 0):
  """The seed-mean curve ratio under resampling of the seeds.

  Each draw picks len(base) seed indices with replacement, the same for
  uniform (`base`) and the method (`runs`, paired by seed); uniform's
  target is recomputed from the drawn seeds' finals, then the method's
  curve reach is divided by uniform's (infinite where the method's curve
  never reaches the target). Returns (median, 5th and 95th percentiles,
  P(ratio <= 0.5)).
  """
  base_c, run_c = [evals(r) for r in base], [evals(r) for r in runs]
  rng = np.random.default_rng(seed)
  ratios = []
  for _ in range(draws):
    idx = rng.integers(len(base_c), size=len(base_c))
    target = float(np.mean([base_c[i][-1][2] for i in idx]))
    got = curve_reach([run_c[i] for i in idx], target)
    ref = curve_reach([base_c[i] for i in idx], target)
    ratios.append(np.inf if got is None else got[0] / ref[0])
  ratios = np.array(ratios)
  # 'nearest': no interpolation between finite and infinite draws.
  lo, med, hi = np.percentile(ratios, [5, 50, 95], method='nearest')
  return med, lo, hi, float(np.mean(ratios <= 0.5))


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  # Runs share compiled executables through the persistent cache.
  jax.config.update('jax_compilation_cache_dir',
                    os.path.join(_WORKDIR.value, 'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  unknown = sorted(set(_METHODS.value) - set(RUNNABLE))
  if unknown:
    raise app.UsageError(f'--methods: unknown {unknown}; known: '
                         f'{sorted(RUNNABLE)}')
  seeds = [int(s) for s in _SEEDS.value]
  for task in _TASKS.value:
    runs = {m: [run_one(task, m, s) for s in seeds] for m in _METHODS.value}
    base = runs.get('uniform') or [run_one(task, 'uniform', s)
                                   for s in seeds]
    base_final = np.array([evals(r)[-1][2] for r in base])
    target = float(base_final.mean())
    base_reach = [reach(r, target) for r in base]
    base_rollouts = np.mean([x[0] for x in base_reach if x])
    # Uniform's curve ends at its seeds' mean final, the target itself.
    base_curve = (mean_curve_reach(base, target) or (None,))[0]
    print(f'\n{task}: target pass@1 {target:.3f} (uniform, final, mean of '
          f'{len(seeds)} seeds); start {evals(base[0])[0][2]:.3f}')
    print('| method | seeds reaching | rollouts to target | vs uniform | '
          's to target | seed-mean curve: rollouts to target | vs uniform '
          '| s to target | training s to target | final pass@1 | final - '
          'uniform (same seed), mean +- s.e. | zero-var groups |')
    print('|---|---|---|---|---|---|---|---|---|---|---|---|')
    for method, rs in runs.items():
      hits = [x for x in (reach(r, target) for r in rs) if x]
      roll = np.mean([h[0] for h in hits]) if hits else None
      secs = np.mean([h[1] for h in hits]) if hits else None
      finals = np.array([evals(r)[-1][2] for r in rs])
      final, gap = finals.mean(), finals - base_final
      gap_se = gap.std(ddof=1) / np.sqrt(len(gap)) if len(gap) > 1 else 0
      zero = np.mean([r['curriculum/zero_var_frac'] for run in rs
                      for r in run if 'curriculum/zero_var_frac' in r])
      curve, curve_s, curve_train = (mean_curve_reach(rs, target) or
                                     (None, None, None))
      cell = lambda v, f: '-' if v is None else f.format(v)
      print(f'| {method} | {len(hits)}/{len(rs)} | {cell(roll, "{:.0f}")} | '
            f'{cell(roll and roll / base_rollouts, "{:.2f}")} | '
            f'{cell(secs, "{:.0f}")} | {cell(curve, "{:.0f}")} | '
            f'{cell(curve and base_curve and curve / base_curve, "{:.2f}")} | '
            f'{cell(curve_s, "{:.0f}")} | {cell(curve_train, "{:.0f}")} | '
            f'{final:.3f} | '
            f'{gap.mean():+.3f} +- {gap_se:.3f} | {zero:.2f} |',
            flush=True)
    if _BOOTSTRAP.value:
      print(f'\nseed-mean curve ratio over {_BOOTSTRAP.value} paired draws '
            'of the seeds (target recomputed per draw; inf: never reached)')
      print('| method | median | 90% interval | P(ratio <= 0.5) |')
      print('|---|---|---|---|')
      for method, rs in runs.items():
        if method == 'uniform':
          continue
        med, lo, hi, p = bootstrap(base, rs, _BOOTSTRAP.value)
        num = lambda v: 'never' if v == np.inf else f'{v:.2f}'
        print(f'| {method} | {num(med)} | {num(lo)}-{num(hi)} | {p:.2f} |',
              flush=True)


if __name__ == '__main__':
  app.run(main)
