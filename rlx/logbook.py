"""Run logging: metrics.jsonl, TensorBoard event files, a progress bar.

`metrics.jsonl` holds one JSON object per logged row. On resume from a
checkpoint at step k, rows with step > k (written after that checkpoint by
the interrupted run) are moved to `metrics.jsonl.dropped` and recomputed, so
the file reads exactly like an uninterrupted run.
"""

import json
import os
import sys

import numpy as np
import tqdm


def read_metrics(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _jsonable(value):
  if isinstance(value, (np.generic, np.ndarray)):
    return value.tolist()
  if hasattr(value, 'tolist'):  # jax arrays
    return value.tolist()
  return value


class Logbook:
  """Writes metric rows; `resume_step` trims rows past the checkpoint.

  On many hosts only the primary process (index 0) writes; the others get a
  Logbook that drops everything, so the shared workdir has one writer.
  """

  def __init__(self, workdir: str, *, total_steps: int, resume_step: int,
               tensorboard: bool = True, progress: bool = True,
               primary: bool = True):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.primary = primary
    self._file = self._tb = None
    self._bar = tqdm.tqdm(total=total_steps, initial=resume_step,
                          disable=not (progress and primary), desc='rl',
                          dynamic_ncols=True, file=sys.stderr)
    if not primary:
      return
    if resume_step and os.path.exists(self.path):
      rows = read_metrics(self.path)
      keep = [r for r in rows if r['step'] <= resume_step]
      dropped = [r for r in rows if r['step'] > resume_step]
      if dropped:
        with open(self.path + '.dropped', 'a') as f:
          f.writelines(json.dumps(r) + '\n' for r in dropped)
      with open(self.path + '.tmp', 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in keep)
      os.replace(self.path + '.tmp', self.path)
    self._file = open(self.path, 'a')
    if tensorboard:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tb'),
                                            purge_step=resume_step or None)

  def write(self, row: dict) -> None:
    if not self.primary:
      return
    row = {k: _jsonable(v) for k, v in row.items()}
    self._file.write(json.dumps(row) + '\n')
    self._file.flush()
    if self._tb is not None:
      for key, value in row.items():
        if key != 'step' and isinstance(value, (int, float)):
          # TensorBoard tags allow [A-Za-z0-9_./-]: pass@1 -> pass_at_1.
          self._tb.add_scalar(key.replace('@', '_at_'), value, row['step'])

  def advance(self, reward: float, pass1: float | None) -> None:
    post = {'reward': f'{reward:.3f}'}
    if pass1 is not None:
      post['pass@1'] = f'{pass1:.3f}'
    self._bar.set_postfix(post, refresh=False)
    self._bar.update(1)

  def message(self, text: str) -> None:
    if self.primary:
      self._bar.write(text, file=sys.stderr)

  def close(self) -> None:
    self._bar.close()
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()
