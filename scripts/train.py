"""Train with RL: `python scripts/train.py --config=configs/grpo.py
--workdir=runs/grpo [--config.rl.num_steps=100 ...]`.

Running the same command again on the same workdir resumes from its last
checkpoint.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from ml_collections import config_flags

from rlx import checkpoint
from rlx import config as config_lib
from rlx import trainer

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/grpo.py', 'Recipe file (get_config()).',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output directory.',
                               required=True)


def main(argv):
  del argv
  try:
    cfg = config_lib.build(_CONFIG.value)
  except config_lib.ConfigError as e:
    sys.exit(f'config error: {e}')
  try:
    result = trainer.train(cfg, _WORKDIR.value)
  except (checkpoint.CheckpointError, config_lib.ConfigError) as e:
    sys.exit(f'error: {e}')
  print(f'done: step {result["step"]}, final eval {result["last_eval"]}')


if __name__ == '__main__':
  app.run(main)
