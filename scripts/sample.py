r"""Sample from a run's policy or a local Hugging Face model.

  python scripts/sample.py --workdir=runs/grpo [--step=20] \
      --prompt='7a+3b*2c-5?' --num_samples=4 --temperature=1
  python scripts/sample.py --model_dir=/models/Qwen3-0.6B \
      --prompt='What is 2+3?' --prompt='Name a prime.' --max_new_tokens=64

The command is `rlx.cli.sample` (installed as `rlx-sample`); its docstring
and `--help` describe the flags.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,unused-import
from rlx.cli import sample
# For callers of its functions (tests/models/test_hf_sample_script.py).
from rlx.cli.sample import encode, generate

if __name__ == '__main__':
  sample.run()
