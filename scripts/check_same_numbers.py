r"""Short fixed-seed runs whose metrics must not change under a refactor.

Each case is a recipe, overrides and a step count; every row of its
metrics.jsonl, less the wall-clock fields (time/*), is compared for exact
equality with a record made before the change:

  python scripts/check_same_numbers.py --record=scripts/same_numbers.json
  python scripts/check_same_numbers.py --check=scripts/same_numbers.json \
      [--cases=default,april]

The first writes the record (runs every case); the second reruns the cases
and prints each field that differs (exit status 1 when any does). The runs
share one warm-start cache (--cache, trained on first use) and run on the
CPU, one device, as the record was made (float results depend on the
machine: record and check on the same one). scripts/same_numbers.json was
recorded before the stage registries (at 5ea9419) on the 2-core Xeon VM
that runs CI, in about 11 minutes.
"""

import json
import math
import os
import sys
import tempfile
import time

from absl import app
from absl import flags

# The checkout this script is in, before any installed rlx (its configs/
# as rlx.configs, as the install maps it).
_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, _ROOT)


def _use_checkout_recipes() -> None:
  import importlib.util  # pylint: disable=g-import-not-at-top
  import rlx  # pylint: disable=g-import-not-at-top
  folder = os.path.join(_ROOT, 'configs')
  spec = importlib.util.spec_from_file_location(
      'rlx.configs', os.path.join(folder, '__init__.py'),
      submodule_search_locations=[folder])
  module = importlib.util.module_from_spec(spec)
  sys.modules['rlx.configs'] = rlx.configs = module
  spec.loader.exec_module(module)

_RECORD = flags.DEFINE_string('record', None, 'Write the record here.')
_CHECK = flags.DEFINE_string('check', None, 'Compare with this record.')
_CASES = flags.DEFINE_list('cases', None, 'Only these cases (default: all).')
_CACHE = flags.DEFINE_string('cache', '~/.cache/rlx/warmstart',
                             'warmstart.cache_dir of the runs.')

QWEN3 = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..',
                     'tests', 'fixtures', 'hf', 'qwen3')

# name -> (recipe, overrides, RL steps). The overrides use today's keys;
# eight steps are enough to exercise each path (curriculum state, buffers,
# schedules) several times.
CASES = {
    'default': ('configs/grpo.py', {}, 50),
    'april': ('configs/grpo.py', {'rollout.mode': 'april'}, 8),
    'eptree': ('configs/grpo_eptree.py', {}, 8),
    'likelihood_dapo': ('configs/grpo.py', {
        'curriculum.selector': 'likelihood', 'curriculum.filter': 'dapo'}, 8),
    'vade_dars': ('configs/grpo.py', {
        'curriculum.selector': 'vade', 'curriculum.allocator': 'dars'}, 8),
    'dots_history_ridge': ('configs/grpo.py', {
        'curriculum.selector': 'dots', 'curriculum.dots.refs': 'history',
        'curriculum.dots.similarity': 'cosine',
        'curriculum.dots.readout': 'ridge'}, 8),
    'mc_grpo': ('configs/mc_grpo.py', {}, 8),
    'd3s': ('configs/grpo.py', {'objective.advantage': 'd3s'}, 8),
    'lora_qwen3': ('configs/grpo.py', {
        'model.hf_dir': QWEN3, 'task.name': 'math_files',
        'task.answer_field': 'solution', 'task.answer_extract': 'boxed',
        'task.num_train': 64, 'task.num_test': 8, 'task.prompt_len': 96,
        'warmstart.num_steps': 0, 'lora.rank': 4, 'lora.alpha': 8.0,
        'sampling.max_new_tokens': 16, 'objective.entropy_coef': 0.01,
        'optim.warmup_steps': 0, 'rl.batch_prompts': 8, 'rl.group_size': 4,
        'eval.num_prompts': 8, 'eval.batch_prompts': 8, 'eval.every': 4,
        'mesh.shape': (1, 1, 1)}, 8),
}

_UNTIMED = ('time/',)


def _math_file(path: str, n: int) -> str:
  """n distinct problems with MATH-style boxed solutions."""
  with open(path, 'w') as f:
    for i in range(n):
      a, b = i % 7, (3 * i) % 5
      f.write(json.dumps({'problem': f'{i}. What is {a}+{b}?',
                          'solution': f'{a}+{b}=\\boxed{{{a + b}}}'}) + '\n')
  return path


def run_case(name: str, tmp: str) -> list[dict]:
  """The metrics rows of case `name`, run in a fresh workdir under tmp."""
  from rlx import recipes  # pylint: disable=g-import-not-at-top
  from rlx import trainer  # pylint: disable=g-import-not-at-top
  from rlx.logbook import read_metrics  # pylint: disable=g-import-not-at-top
  recipe, overrides, steps = CASES[name]
  config = recipes.load(os.path.join(_ROOT, recipe))
  settings = {**overrides, 'rl.num_steps': steps, 'log.progress': False,
              'log.tensorboard': False, 'warmstart.cache_dir': _CACHE.value}
  if 'task.name' in overrides and overrides['task.name'] == 'math_files':
    data = os.path.join(tmp, f'{name}-data')
    os.makedirs(data, exist_ok=True)
    settings['task.train_files'] = _math_file(
        os.path.join(data, 'train.jsonl'), 80)
    settings['task.data_dir'] = data
  for key, value in settings.items():
    recipes.override(config, key, value)
  cfg = recipes.build(config)
  workdir = os.path.join(tmp, name)
  trainer.train(cfg, workdir)
  rows = read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  return [{k: v for k, v in r.items() if not k.startswith(_UNTIMED)}
          for r in rows]


def _same(a, b) -> bool:
  if isinstance(a, float) and isinstance(b, float):
    return a == b or (math.isnan(a) and math.isnan(b))
  return a == b


def differences(recorded: list[dict], now: list[dict]) -> list[str]:
  """One line per field that differs (missing rows and keys included)."""
  out = []
  if len(recorded) != len(now):
    out.append(f'{len(recorded)} rows recorded, {len(now)} now')
  for i, (r, n) in enumerate(zip(recorded, now)):
    for key in sorted(set(r) | set(n)):
      if key not in n or key not in r or not _same(r[key], n[key]):
        out.append(f'row {i} (step {r.get("step")}): {key}: recorded '
                   f'{r.get(key, "<absent>")!r}, now {n.get(key, "<absent>")!r}')
  return out


def main(argv):
  del argv
  if bool(_RECORD.value) == bool(_CHECK.value):
    sys.exit('give exactly one of --record and --check')
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  _use_checkout_recipes()
  names = _CASES.value or list(CASES)
  unknown = [n for n in names if n not in CASES]
  if unknown:
    sys.exit(f'--cases: unknown {unknown}; known: {", ".join(CASES)}')
  record = {}
  if _CHECK.value:
    with open(_CHECK.value) as f:
      record = json.load(f)
  results, failed = {}, []
  with tempfile.TemporaryDirectory() as tmp:
    for name in names:
      start = time.time()
      rows = run_case(name, tmp)
      results[name] = rows
      if _CHECK.value:
        diff = differences(record.get(name, []), rows)
        verdict = 'identical' if not diff else f'{len(diff)} differences'
        if diff:
          failed.append(name)
        print(f'{name}: {len(rows)} rows, {verdict} '
              f'({time.time() - start:.0f} s)', flush=True)
        for line in diff[:20]:
          print('  ' + line)
      else:
        print(f'{name}: {len(rows)} rows recorded '
              f'({time.time() - start:.0f} s)', flush=True)
  if _RECORD.value:
    with open(_RECORD.value, 'w') as f:
      json.dump(results, f, indent=0, sort_keys=True)
  if failed:
    sys.exit(f'differ: {", ".join(failed)}')


if __name__ == '__main__':
  app.run(main)
