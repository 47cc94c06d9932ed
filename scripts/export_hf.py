"""Export a trained run to the Hugging Face layout:

  python scripts/export_hf.py --workdir=runs/grpo --out=/tmp/grpo-hf \
      [--step=N] [--peft]

The whole model (LoRA merged) loads with `rlx.models.from_pretrained` and
transformers; --peft writes a LoRA run's adapters for
`peft.PeftModel.from_pretrained`. See rlx/cli/export.py and rlx/export.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlx.cli import export  # pylint: disable=g-import-not-at-top

if __name__ == '__main__':
  export.run()
