"""rlx-train: RL training from a recipe.

  rlx-train --config=grpo --workdir=runs/grpo [--config.rl.num_steps=100]
  python scripts/train.py --config=configs/grpo.py --workdir=runs/grpo

`--config` is a recipe file or a packaged recipe's name (rlx.configs);
`--config.<section>.<key>=<value>` overrides any field (rlx/config.py).
Running the same command again on the same workdir resumes from its last
checkpoint. On many hosts every process runs the same command (README.md,
"Multi-host"). The console shows rlx's own lines and a progress bar;
library logs go to WORKDIR/log.txt (--alsologtostderr also prints them,
--verbosity=1 adds debug lines).
"""

import os

from absl import app
from absl import flags
import jax

from rlx import backend
from rlx import trainer
from rlx.cli import launch
from rlx.config import Config

_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Output directory: metrics.jsonl, tb/, checkpoints/, '
    'log.txt.', required=True)
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'auto', ['auto', 'on', 'off'],
    'Multi-process JAX; see rlx.backend.initialize_distributed.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'This process, in [0, num_processes).')


def main(argv, *, cfg: Config):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}: overrides are '
                         'flags, --config.<section>.<key>=<value>')
  workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
  launch.library_logs_to(os.path.join(workdir, 'log.txt'))
  # Both before anything touches a device: XLA reads its flags, and
  # jax.distributed must start, when the backend starts.
  backend.configure(cfg.backend)
  backend.initialize_distributed(
      _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
      enabled=_DISTRIBUTED.value)
  if jax.process_index():  # One log file per process.
    launch.library_logs_to(
        os.path.join(workdir, f'log.{jax.process_index()}.txt'))
  result = trainer.train(cfg, workdir)
  if jax.process_index() == 0:
    last = result['last_eval'].get('eval/pass@1')
    print(f'done: step {result["step"]}' +
          (f', held-out pass@1 {last:.3f}' if last is not None else '') +
          f' ({workdir})')


def run():
  """The `rlx-train` entry point."""
  launch.entry(main, recipe='grpo')
