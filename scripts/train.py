"""Train with RL: `python scripts/train.py --config=configs/grpo.py
--workdir=runs/grpo [--config.rl.num_steps=100 ...]`.

Running the same command again on the same workdir resumes from its last
checkpoint. On many hosts every process runs the same command (README.md,
"Multi-host").
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from ml_collections import config_flags

from rlx import backend
from rlx import checkpoint
from rlx import config as config_lib
from rlx import trainer

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/grpo.py', 'Recipe file (get_config()).',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory.',
                               required=True)
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'auto', ['auto', 'on', 'off'],
    'Multi-process JAX; see rlx.backend.initialize_distributed.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'This process, in [0, num_processes).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}: overrides are '
                         'flags, --config.<section>.<key>=<value>')
  try:
    cfg = config_lib.build(_CONFIG.value)
    # Both before anything touches a device: XLA reads its flags, and
    # jax.distributed must start, when the backend starts.
    backend.configure(cfg.backend)
    backend.initialize_distributed(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
        enabled=_DISTRIBUTED.value)
  except config_lib.ConfigError as e:
    sys.exit(f'config error: {e}')
  try:
    result = trainer.train(cfg, _WORKDIR.value)
  except (checkpoint.CheckpointError, config_lib.ConfigError) as e:
    sys.exit(f'error: {e}')
  print(f'done: step {result["step"]}, final eval {result["last_eval"]}')


if __name__ == '__main__':
  app.run(main)
