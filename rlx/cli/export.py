"""`rlx-export`: a trained run in the Hugging Face layout.

  python scripts/export_hf.py --workdir=runs/grpo --out=/tmp/grpo-hf
  python scripts/export_hf.py --workdir=runs/lora --out=/tmp/lora --peft

Reads checkpoint --step (default: the newest) of the run in --workdir and
writes its policy to --out: the whole model (LoRA adapters merged), which
`rlx.models.from_pretrained` and transformers' AutoModelForCausalLM load;
or with --peft a LoRA run's adapters as PEFT writes them (see rlx.export for
the files and, for rlx's own transformer, the base in OUT/base). --out is
replaced only when it is an earlier export. Library logs are appended to
WORKDIR/log.txt, the run's own log. Prints one line: what was written where.
"""

import errno
import os

from absl import app
from absl import flags

from rlx import config as config_lib
from rlx import export as export_lib
from rlx import runs
from rlx.cli import launch

_WORKDIR = flags.DEFINE_string('workdir', None, 'The run to export (the '
                               'directory the trainer wrote).', required=True)
_OUT = flags.DEFINE_string('out', None, 'Output directory (replaced when it '
                           'is an earlier export, else must not exist or be '
                           'empty).', required=True)
_STEP = flags.DEFINE_integer('step', 0, 'Checkpoint to export; 0: the '
                             'newest finished one.', lower_bound=0)
_PEFT = flags.DEFINE_bool('peft', False, 'LoRA run: write the adapters in '
                          "PEFT's layout instead of the merged model.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  workdir, out = os.path.expanduser(_WORKDIR.value), _OUT.value
  if not os.path.isdir(workdir):  # Before the log file would create it.
    raise FileNotFoundError(errno.ENOENT, 'no such run directory (--workdir)',
                            workdir)
  try:  # Before loading: a refusal should not wait for the model.
    export_lib.check_out(out, keep=(workdir,))
  except export_lib.OutputError as e:
    launch.fail(f'--out: {e}')
  launch.library_logs_to(os.path.join(workdir, 'log.txt'))
  cfg, _, _ = runs.saved_config(workdir, _STEP.value)  # Cheap: no arrays.
  if _PEFT.value and not cfg.lora.rank:
    raise config_lib.ConfigError(
        f'--peft: {workdir} trained every parameter (lora.rank = 0): it has '
        'no adapters; export it without --peft')
  run = runs.load(workdir, step=_STEP.value)
  try:
    result = export_lib.export_run(run, out, peft=_PEFT.value)
  except export_lib.OutputError as e:
    launch.fail(f'--out: {e}')
  except ValueError as e:  # A model with no Hugging Face equivalent.
    launch.fail(e)
  print(f'exported {workdir} step {run.step}: {result.what} to '
        f'{result.out} ({len(result.files)} files)')


def run() -> None:
  """The `rlx-export` console entry point."""
  launch.entry(main)
