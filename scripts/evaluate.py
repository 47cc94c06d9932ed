r"""Evaluate a run's policy on held-out prompts: pass@1, pass@k, maj@k.

  python scripts/evaluate.py --workdir=runs/grpo [--step=20] [--samples=8] \
      [--num_prompts=100] [--test_files=data/test.jsonl] [--out=FILE]

Prints one JSON line; the defaults repeat the trainer's evaluation of the
checkpoint. The command is `rlx.cli.evaluate` (installed as
`rlx-evaluate`); its docstring and `--help` describe the flags.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlx.cli import evaluate  # pylint: disable=g-import-not-at-top

if __name__ == '__main__':
  evaluate.run()
