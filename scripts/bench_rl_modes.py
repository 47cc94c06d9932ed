"""RL steps under each rollout mode: wall time per step, tokens, pass@1.

  python scripts/bench_rl_modes.py --rl_steps=14 --seeds=0,1 \
      --modes=static,continuous,april --eval_prompts=256

Runs the trainer (rlx.trainer.train) on the default recipe (configs/grpo.py)
for --rl_steps steps per mode and seed, from the same cached warm start,
and evaluates held-out pass@1 at step 0 and at the end (the same
evaluation draws in every mode: evaluation always uses the static
sampler). Modes (`MODES`): static, continuous, april (keep), april_mask,
april_tis (keep + TIS on recomputed old log-probs), april_kv (unfinished
responses keep their slot and KV cache across the update:
rollout.april.resume=keep_kv), static_overlap / april_overlap /
april_kv_overlap (rollout.overlap: the next step sampled during this
step's update, one policy version stale), and the tree kinds
treepo, latr, eptree (GRPO advantages over the W = G leaves) plus
treepo_tree (TreePO's own ancestor-group advantage) and eptree_treerl
(EPTree with TreeRL's process-reward advantage, as in the TreeRL paper)
and eptree_n3t1 (each chain forked once at each of its 3 most uncertain
tokens instead of 3 times at the most uncertain one) and eptree_distinct
(every branch's first token differs from its parent's there:
rollout.tree.eptree.fork_distinct).
Runs go seed-major (all modes of seed 0, then seed 1), so machine load
drifts hit every mode.

Reports per mode, over the seeds: seconds per RL step (rollout + learner,
the median over steps 2..N: step 1 compiles; with rollout.overlap the
rollout part is the wait for it, and `time/rollout_busy_s` its own
duration), its ratio to static,
decoded tokens per leaf (tokens the model sampled, shared tree prefixes
once, over the responses trained on) and its ratio, and final pass@1 per
seed; then each mode's final pass@1 minus the first mode's, paired by
seed, and (with --set eval.every=K for intermediate evaluations) the
seed-mean pass@1 at every evaluated step. Issue 5 asks for >= 25% less
wall time per step than static at equal or better pass@1 (APRIL); issue 6
for >= 40% fewer decoded tokens per leaf than independent sampling at the
same or better pass@1 (trees).
"""

import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
import jax
import numpy as np

from rlx.configs import grpo
from rlx import config as config_lib
from rlx import recipes
from rlx import trainer
from rlx.logbook import read_metrics

MODES = {
    'static': {},
    'continuous': {'rollout.mode': 'continuous'},
    'april': {'rollout.mode': 'april'},
    'april_mask': {'rollout.mode': 'april', 'rollout.april.off_policy': 'mask'},
    'april_tis': {'rollout.mode': 'april', 'objective.correction': 'tis',
                  'rl.recompute_old_logp': True},
    'april_kv': {'rollout.mode': 'april', 'rollout.april.resume': 'keep_kv'},
    'static_overlap': {'rollout.overlap': True},
    'april_overlap': {'rollout.mode': 'april', 'rollout.overlap': True},
    'april_kv_overlap': {'rollout.mode': 'april',
                         'rollout.april.resume': 'keep_kv',
                         'rollout.overlap': True},
    'treepo': {'rollout.mode': 'tree', 'rollout.tree.kind': 'treepo'},
    'treepo_tree': {'rollout.mode': 'tree', 'rollout.tree.kind': 'treepo',
                    'objective.advantage': 'tree'},
    'latr': {'rollout.mode': 'tree', 'rollout.tree.kind': 'latr'},
    'eptree': {'rollout.mode': 'tree', 'rollout.tree.kind': 'eptree'},
    'eptree_treerl': {'rollout.mode': 'tree', 'rollout.tree.kind': 'eptree',
                      'objective.advantage': 'treerl'},
    'eptree_n3t1': {'rollout.mode': 'tree', 'rollout.tree.kind': 'eptree',
                    'rollout.tree.eptree.fork_points': 3,
                    'rollout.tree.eptree.fork_branches': 1},
    'eptree_distinct': {'rollout.mode': 'tree', 'rollout.tree.kind': 'eptree',
                        'rollout.tree.eptree.fork_distinct': True},
}

_MODES = flags.DEFINE_list('modes', ['static', 'continuous', 'april'],
                           f'Rollout modes to run, from {list(MODES)}.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1'], 'RL seeds (config.seed).')
_RL_STEPS = flags.DEFINE_integer('rl_steps', 14, 'RL steps per run.')
_EVAL_PROMPTS = flags.DEFINE_integer('eval_prompts', 256, 'Held-out '
                                     'prompts evaluated at 0 and the end.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/bench_rl_modes', 'Runs go '
                               'to WORKDIR/<mode>_s<seed> (replaced).')
_REPORT_ONLY = flags.DEFINE_bool('report_only', False, 'Only print the '
                                 'tables of runs already in --workdir.')
_SET = flags.DEFINE_multi_string('set', [], 'Extra override for every run, '
                                 'key=value (e.g. '
                                 'rollout.engine.num_slots=32).')


def _config(mode: str, seed: int) -> config_lib.Config:
  c = grpo.get_config()
  c.seed = seed
  c.rl.num_steps = _RL_STEPS.value
  c.eval.every = _RL_STEPS.value  # Step 0 and the end only.
  c.eval.num_prompts = _EVAL_PROMPTS.value
  c.log.progress, c.log.memory_stats = False, False
  for key, value in MODES[mode].items():
    recipes.override(c, key, value)
  recipes.apply_overrides(c, _SET.value)  # Last: --set wins.
  if c.log.every != 1:  # The medians below read one row per step.
    raise app.UsageError(f'--set log.every={c.log.every}: this bench reads '
                         'every step (log.every=1)')
  return config_lib.build(c)


def run_one(mode: str, seed: int) -> dict:
  """Trains one run (or, with --report_only, reads it); its summary."""
  workdir = os.path.join(_WORKDIR.value, f'{mode}_s{seed}')
  wall = 0.0
  if not _REPORT_ONLY.value:
    shutil.rmtree(workdir, ignore_errors=True)
    start = time.time()
    trainer.train(_config(mode, seed), workdir)
    wall = time.time() - start
  rows = read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  steps = [r for r in rows if 'reward/mean' in r]
  evals = [r for r in rows if 'eval/pass@1' in r]
  per_step = [r['time/rollout_s'] + r['time/train_s'] for r in steps]
  last = steps[-1]
  out = {
      'mode': mode, 'seed': seed, 'wall_s': wall,
      's_step': float(np.median(per_step[1:])),
      'rollout_s': float(np.median([r['time/rollout_s'] for r in steps[1:]])),
      'tok_leaf': last['tokens/decoded_total'] / last['rollouts/total'],
      'pass0': evals[0]['eval/pass@1'], 'pass1': evals[-1]['eval/pass@1'],
      'curve': {int(r['step']): r['eval/pass@1'] for r in evals},
      'reward': float(np.mean([r['reward/mean'] for r in steps])),
  }
  for key in ('rollout/off_policy_token_frac', 'rollout/slot_utilisation',
              'rollout/policy_lag', 'time/rollout_busy_s',
              'tree/shared_prefix_frac', 'tree/depth_mean',
              'tree/distinct_answers'):
    # Steps 2.. like the seconds (APRIL's step 1 resumes nothing).
    vals = [r[key] for r in steps[1:] if key in r]
    if vals:
      out[key] = float(np.mean(vals))
  print(f"{mode} seed {seed}: {out['s_step']:.2f} s/step, "
        f"{out['tok_leaf']:.1f} tok/leaf, pass@1 {out['pass0']:.3f} -> "
        f"{out['pass1']:.3f} ({wall:.0f} s)", flush=True)
  return out


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  unknown = sorted(set(_MODES.value) - set(MODES))
  if unknown:
    sys.exit(f'unknown --modes {unknown}; known: {list(MODES)}')
  seeds = [int(s) for s in _SEEDS.value]
  print(f'device: {jax.devices()[0].device_kind}; {_RL_STEPS.value} RL '
        f'steps; seeds {seeds}; eval on {_EVAL_PROMPTS.value} held-out '
        'prompts', flush=True)
  runs = {m: [] for m in _MODES.value}
  for seed in seeds:
    for mode in _MODES.value:
      runs[mode].append(run_one(mode, seed))
  base = _MODES.value[0]
  ref = {k: np.mean([r[k] for r in runs[base]]) for k in ('s_step',
                                                          'tok_leaf')}
  ref['rollout_s'] = np.mean([r['rollout_s'] for r in runs[base]])
  print(f'\n| mode | s/step (median) | x {base} | rollout s/step | '
        f'x {base} | decoded tok/leaf | x {base} | pass@1 start | '
        'pass@1 end, per seed | mean |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for mode, rs in runs.items():
    mean = lambda k, rs=rs: np.mean([r[k] for r in rs])
    s, ro, tok = mean('s_step'), mean('rollout_s'), mean('tok_leaf')
    ends = ' / '.join(f"{r['pass1']:.3f}" for r in rs)
    starts = ' / '.join(f"{r['pass0']:.3f}" for r in rs)
    print(f"| {mode} | {s:.2f} | {s / ref['s_step']:.2f} | {ro:.2f} | "
          f"{ro / ref['rollout_s']:.2f} | {tok:.1f} | "
          f"{tok / ref['tok_leaf']:.2f} | {starts} | {ends} | "
          f"{mean('pass1'):.3f} |")
  print(f'\npass@1 end minus {base}\'s, paired by seed (mean +- standard '
        f'error over seeds; seeds at or above {base}):')
  for mode, rs in runs.items():
    if mode != base:
      gap = [r['pass1'] - q['pass1'] for r, q in zip(rs, runs[base])]
      se = np.std(gap, ddof=1) / np.sqrt(len(gap)) if len(gap) > 1 else 0.0
      print(f'{mode}: {np.mean(gap):+.3f} +- {se:.3f} '
            f'({sum(g >= 0 for g in gap)}/{len(gap)})')
  steps = sorted(set.intersection(*(set(r['curve']) for rs in runs.values()
                                    for r in rs)))
  if len(steps) > 2:
    print('\nseed-mean pass@1 by RL step:\n')
    print('| mode | ' + ' | '.join(str(s) for s in steps) + ' |')
    print('|---|' + '---|' * len(steps))
    for mode, rs in runs.items():
      print(f'| {mode} | ' + ' | '.join(
          f"{np.mean([r['curve'][s] for r in rs]):.3f}" for s in steps)
            + ' |')
  for mode, rs in runs.items():
    extra = {k: np.mean([r[k] for r in rs]) for k in rs[0]
             if k.startswith(('rollout/', 'tree/', 'time/'))}
    if extra:
      print(f'{mode}: ' + ', '.join(f'{k} {v:.2f}' for k, v in extra.items()))


if __name__ == '__main__':
  app.run(main)
