"""Train with RL: `python scripts/train.py --config=configs/grpo.py
--workdir=runs/grpo [--config.rl.num_steps=100 ...]` (the same as
`rlx-train`; see rlx/cli/train.py).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlx.cli import train  # pylint: disable=g-import-not-at-top

if __name__ == '__main__':
  train.run()
