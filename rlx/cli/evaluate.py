r"""Evaluate a run's policy on held-out prompts: pass@1, pass@k, maj@k.

  rlx-evaluate --workdir=runs/grpo [--step=20] [--samples=8] \
      [--num_prompts=100] [--test_files=data/test.jsonl] [--out=FILE]

Prints one JSON line (step, k, num_prompts, pass@1, pass@<k>, maj@<k>,
best_of_<k>, response_len, truncated_frac, out) and writes the generations
to JSONL, one line per prompt (`rlx.evaluation.vote_metrics`' records),
by default to WORKDIR/eval/step_<N>.jsonl.

With the defaults it repeats the trainer's evaluation of that checkpoint:
the same prompts, key and k (eval.samples_per_prompt), hence the same
samples and the same pass@1 as the run's eval/pass@1 row of that step
(computed here unsharded, on one device: a run that sampled on a mesh of
several devices may differ where float rounding tips a draw). Another
--samples draws other samples for every prompt; another --num_prompts
keeps each prompt's samples. --test_files (math_files runs) evaluates on
all problems of those files (that fit task.prompt_len), or the first
--num_prompts.

maj@k: the k samples' final answers (the task's verifier reads them;
equivalent ones, e.g. \frac12 and 0.5, count as one) vote; a tie goes to
the answer that appears first among the samples; samples without an
answer do not vote; a prompt none of whose samples has one counts as
wrong. best_of_k: some sample of the k is correct (the verifier picks),
which is pass@k with n = k samples.
"""

import dataclasses
import errno
import json
import os
from typing import Any

from absl import app
from absl import flags

from rlx import evaluation
from rlx import runs
from rlx.actor import Actor
from rlx.cli import launch
from rlx.config import ConfigError
from rlx.data import task as task_lib

_WORKDIR = flags.DEFINE_string('workdir', None, "The run's directory.",
                               required=True)
_STEP = flags.DEFINE_integer('step', 0, 'Checkpoint step; 0: the newest.',
                             lower_bound=0)
_SAMPLES = flags.DEFINE_integer(
    'samples', None, "k, samples per prompt; default: the run's "
    'eval.samples_per_prompt (another k draws other samples).',
    lower_bound=1)
_TEST_FILES = flags.DEFINE_string(
    'test_files', None, 'math_files runs: evaluate on these .jsonl/.json/'
    '.parquet files (comma-separated, globs) instead of the held-out split.')
_NUM_PROMPTS = flags.DEFINE_integer(
    'num_prompts', None, "Evaluate the first n prompts; default: the run's "
    'eval.num_prompts (with --test_files: all of them).', lower_bound=1)
_OUT = flags.DEFINE_string('out', None, 'Generations (JSONL); default: '
                           'WORKDIR/eval/step_<N>.jsonl.')

# task.num_test with --test_files: no limit on the problems read.
_ALL = 2**31 - 1


def load_run(workdir: str, *, step: int = 0,
             test_files: str | None = None) -> runs.SavedRun:
  """Checkpoint `step` (0: the newest) of the run in `workdir`; with
  `test_files` (math_files runs only), its task's test split is every
  problem of those files.

  Raises:
    CheckpointError: no such run or step.
    ConfigError: test files for a chain_arith run, or unreadable ones
      (named as --test_files).
  """
  if test_files is None:
    return runs.load(workdir, step=step)
  cfg, _, _ = runs.saved_config(workdir, step)
  if not task_lib.TASKS.get(cfg.task.name).reads_test_files:
    raise ConfigError(f"--test_files: the run's task is {cfg.task.name}, "
                      'whose test prompts are generated; test files are '
                      'for task.name=math_files runs')
  try:
    return runs.load(workdir, step=step, overrides={
        'task.test_files': test_files, 'task.num_test': _ALL})
  except ConfigError as e:
    raise ConfigError(str(e).replace('task.test_files', '--test_files')
                      ) from e


def evaluate_run(run: runs.SavedRun, *, samples: int | None = None,
                 num_prompts: int | None = None
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """Evaluates a run's policy as its trainer did (see the module docstring).

  Args:
    run: the loaded run.
    samples: k; None: the run's eval.samples_per_prompt.
    num_prompts: the first n test prompts; None: the run's
      eval.num_prompts (or all, if the task has fewer).

  Returns:
    (summary, records): summary holds step, k, num_prompts and
    `evaluation.vote_metrics`' metrics; records one dict per prompt.

  Raises:
    ConfigError: more prompts asked for than the task holds.
  """
  cfg = run.cfg
  available = len(run.task.test.prompts)
  if num_prompts is not None and num_prompts > available:
    raise ConfigError(f'--num_prompts={num_prompts}: the task has '
                      f'{available} test prompts')
  # (math_files may hold fewer than eval.num_prompts: too long ones drop.)
  n = num_prompts or min(cfg.eval.num_prompts, available)
  k = samples or cfg.eval.samples_per_prompt
  actor = Actor(run.model, run.task, cfg.sampling.max_new_tokens,
                top_k=cfg.sampling.top_k)
  eval_cfg = dataclasses.replace(cfg.eval, num_prompts=n,
                                 samples_per_prompt=k)
  drawn = evaluation.sample(actor, run.params, eval_cfg,
                            evaluation.eval_key(cfg.seed))
  scores, records = evaluation.vote_metrics(drawn, run.task)
  return {'step': run.step, 'k': k, 'num_prompts': n, **scores}, records


def write_jsonl(path: str, records: list[dict[str, Any]]) -> None:
  """Writes one JSON object per line (folders made as needed)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + '\n')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  workdir = _WORKDIR.value
  if not os.path.isdir(workdir):  # Before the log file would create it.
    raise FileNotFoundError(errno.ENOENT, 'no such run directory (--workdir)',
                            workdir)
  launch.library_logs_to(os.path.join(workdir, 'log.txt'))
  run = load_run(workdir, step=_STEP.value, test_files=_TEST_FILES.value)
  num_prompts = _NUM_PROMPTS.value
  if num_prompts is None and _TEST_FILES.value is not None:
    num_prompts = len(run.task.test.prompts)
  summary, records = evaluate_run(run, samples=_SAMPLES.value,
                                  num_prompts=num_prompts)
  out = _OUT.value or os.path.join(workdir, 'eval',
                                   f'step_{run.step}.jsonl')
  write_jsonl(out, records)
  print(json.dumps({**summary, 'out': out}), flush=True)


def run():
  """The `rlx-evaluate` console entry point."""
  launch.entry(main)
