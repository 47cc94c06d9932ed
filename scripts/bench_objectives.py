"""Every objective recipe on the default task, same steps, several seeds.

  python scripts/bench_objectives.py --steps=30 --seeds=0,1 \
      --workdir=runs/bench_objectives

All runs share one warm start (warmstart.seed=0, cached), so they differ
only in the objective and the RL seed. Prints a markdown table: held-out
pass@1 at step 0 and after --steps (mean and per seed), and seconds per RL
step (rollout + learner, mean over steps 2.., i.e. without compilation).
Runs already finished in --workdir are read back, not repeated.
"""

import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import numpy as np

from rlx import config as config_lib
from rlx import recipes
from rlx import trainer
from rlx.logbook import read_metrics

RECIPES = ('grpo', 'dr_grpo', 'dapo', 'gspo', 'gppo', 'cispo', 'mc_grpo',
           'rloo', 'reinforce_pp')

_STEPS = flags.DEFINE_integer('steps', 30, 'RL steps per run.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1'], 'RL seeds.')
_RECIPES = flags.DEFINE_list('recipes', list(RECIPES), 'Recipes to run.')
_MINIBATCHES = flags.DEFINE_integer(
    'num_minibatches', 1, 'rl.num_minibatches for every run (>1 makes the '
    'later updates of a batch off-policy, so clipping matters).')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/bench_objectives',
                               'Where runs are written.')
_SET = flags.DEFINE_multi_string('set', [], 'Extra override for every run, '
                                 'key=value (e.g. optim.packing=False); give '
                                 'such runs their own --workdir.')


def run_one(recipe: str, seed: int) -> dict:
  config = importlib.import_module(f'configs.{recipe}').get_config()
  config.seed = seed
  config.rl.num_steps = _STEPS.value
  config.rl.num_minibatches = _MINIBATCHES.value
  config.eval.every = _STEPS.value
  config.log.progress = False
  config.log.tensorboard = False
  recipes.apply_overrides(config, _SET.value)  # Last: --set wins.
  cfg = config_lib.build(config)
  workdir = os.path.join(_WORKDIR.value, f'{recipe}_seed{seed}')
  metrics = os.path.join(workdir, 'metrics.jsonl')
  done = os.path.exists(metrics) and any(
      r.get('step') == _STEPS.value and 'eval/pass@1' in r
      for r in read_metrics(metrics))
  if not done:
    trainer.train(cfg, workdir)
  rows = read_metrics(metrics)
  evals = {r['step']: r['eval/pass@1'] for r in rows if 'eval/pass@1' in r}
  steps = [r for r in rows if 'reward/mean' in r and r['step'] > 1]
  return {'start': evals[0], 'end': evals[_STEPS.value],
          'step_s': float(np.mean([r['time/rollout_s'] + r['time/train_s']
                                   for r in steps]))}


def main(argv):
  del argv
  seeds = [int(s) for s in _SEEDS.value]
  print(f'| recipe | pass@1 step 0 | pass@1 step {_STEPS.value} (mean) | '
        'per seed | s / RL step |')
  print('|---|---|---|---|---|')
  for recipe in _RECIPES.value:
    res = [run_one(recipe, seed) for seed in seeds]
    ends = [r['end'] for r in res]
    print(f'| {recipe} | {np.mean([r["start"] for r in res]):.3f} | '
          f'{np.mean(ends):.3f} | {" / ".join(f"{e:.3f}" for e in ends)} | '
          f'{np.mean([r["step_s"] for r in res]):.2f} |', flush=True)


if __name__ == '__main__':
  app.run(main)
