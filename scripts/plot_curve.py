"""Plots a run's learning curve: `python scripts/plot_curve.py
--workdir=runs/grpo [--out=curve.png] [--title=GRPO]`.

Left: training reward/mean per RL step (raw, faint, and a moving average of
5 steps). Right: held-out eval/pass@1, with the warm-start (step 0) and
final values written next to their points.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from rlx import logbook

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (holds '
                               'metrics.jsonl).', required=True)
_OUT = flags.DEFINE_string('out', None, 'Output image; default '
                           'WORKDIR/curve.png.')
_TITLE = flags.DEFINE_string('title', None, 'Figure title.')

WINDOW = 5  # Moving-average window of the reward curve, in logged rows.


def moving_average(values, window: int = WINDOW) -> np.ndarray:
  """Trailing mean over up to `window` values (shorter at the start)."""
  values = np.asarray(values, float)
  sums = np.cumsum(np.concatenate([[0.0], values]))
  hi = np.arange(1, len(values) + 1)
  lo = np.maximum(hi - window, 0)
  return (sums[hi] - sums[lo]) / (hi - lo)


def plot(rows: list[dict], out_path: str, title: str | None = None) -> None:
  """Writes the two-panel learning curve of metric `rows` to `out_path`."""
  train = [r for r in rows if 'reward/mean' in r]
  evals = [r for r in rows if 'eval/pass@1' in r]
  if not evals:
    raise ValueError('no eval rows (with eval/pass@1) in the metrics; '
                     'nothing to plot')
  fig, (ax_r, ax_e) = plt.subplots(1, 2, figsize=(10, 4))
  if train:
    steps = [r['step'] for r in train]
    reward = [r['reward/mean'] for r in train]
    ax_r.plot(steps, reward, color='C0', alpha=0.3, label='raw')
    ax_r.plot(steps, moving_average(reward), color='C0',
              label=f'moving avg ({WINDOW})')
    ax_r.legend(loc='lower right')
  ax_r.set(xlabel='RL step', ylabel='reward/mean', title='training reward')
  steps = [r['step'] for r in evals]
  pass1 = [r['eval/pass@1'] for r in evals]
  ax_e.plot(steps, pass1, 'o-', color='C1')
  ax_e.margins(x=0.05, y=0.15)  # Room for the labels above the points.
  ax_e.set(xlabel='RL step', ylabel='eval/pass@1', title='held-out pass@1')
  ends = [(0, 'warm start' if steps[0] == 0 else f'step {steps[0]}')]
  if len(evals) > 1:
    ends.append((-1, 'final'))
  for i, name in ends:
    ax_e.annotate(f'{name}: {pass1[i]:.3f}', (steps[i], pass1[i]),
                  textcoords='offset points', xytext=(0, 8),
                  ha='left' if i == 0 else 'right')
  for ax in (ax_r, ax_e):
    ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(out_path, dpi=100)
  plt.close(fig)


def main(argv):
  del argv
  path = os.path.join(_WORKDIR.value, 'metrics.jsonl')
  if not os.path.exists(path):
    sys.exit(f'no metrics file at {path}; is --workdir a training run?')
  out = _OUT.value or os.path.join(_WORKDIR.value, 'curve.png')
  try:
    plot(logbook.read_metrics(path), out, _TITLE.value)
  except ValueError as e:
    sys.exit(f'{path}: {e}')
  print(f'wrote {out}')


if __name__ == '__main__':
  app.run(main)
