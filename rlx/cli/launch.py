"""What every rlx command does around its work.

- The recipe: `--config=PATH_OR_NAME[:ARG]` and its `--config.a.b=v`
  overrides are read here, before absl parses the other flags, so that every
  problem they have (a missing recipe file, unknown keys with a
  did-you-mean, values of the wrong type, impossible combinations) is
  reported at once, one line each, before anything is compiled.
- The console: library logs (absl, orbax, TFDS, JAX, Python warnings) go to
  a log file (a run's WORKDIR/log.txt), not the terminal. `--verbosity=1`
  writes debug lines there too; `--alsologtostderr` also prints them.
- Errors the user can fix (config, data, model files, checkpoints) end the
  command with one line per problem and exit status 1, never a traceback.
"""

import functools
import logging
import os
import sys
import warnings
from typing import Callable, Collection, Sequence

from absl import app
from absl import flags
from absl import logging as absl_logging

from rlx import checkpoint
from rlx import config as config_lib
from rlx import learner
from rlx import recipes
from rlx import sharding
from rlx import workdir

# Errors a user can fix; anything else is a bug and keeps its traceback.
USER_ERRORS = (config_lib.ConfigError, checkpoint.CheckpointError,
               FileNotFoundError, workdir.WorkdirBusy,
               learner.NonFiniteUpdates, sharding.ProcessFailed)


def library_logs_to(path: str) -> None:
  """Sends library logging and Python warnings to `path` (appended).

  absl's handler keeps its flags: --alsologtostderr also prints every
  line, --verbosity sets what is written (0: info, 1: debug, -1: warnings
  and errors), and lines at or above --stderrthreshold still reach the
  console. TFDS's own progress bars are turned off (rlx has its own).
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  handler = absl_logging.get_absl_handler().python_handler
  if handler.stream not in (sys.stderr, sys.stdout):  # An earlier call's.
    handler.stream.close()
  handler.stream = open(path, 'a', buffering=1)  # pylint: disable=consider-using-with
  logging.captureWarnings(True)
  warnings.simplefilter('default')  # Each distinct warning once, to the log.
  # Exceptions Python can only report (e.g. orbax's worker threads after a
  # failed write: 'Event loop is closed'), to the log as well.
  sys.unraisablehook = lambda u: absl_logging.warning(
      'ignored exception in %r', u.object,
      exc_info=(u.exc_type, u.exc_value, u.exc_traceback))
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tfds.disable_progress_bar()
  except ImportError:
    pass


def one_line_errors(main: Callable[[list[str]], None]
                    ) -> Callable[[list[str]], None]:
  """`main` with USER_ERRORS turned into `error: ...` lines and exit 1."""
  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except USER_ERRORS as e:
      fail(e)
  return wrapped


def fail(error: Exception | str) -> None:
  """Exits with status 1 after printing `error` (each line prefixed)."""
  text = str(error)
  if isinstance(error, FileNotFoundError) and error.filename:
    text = f'{error.filename}: {error.strerror or text}'
  lines = [l for l in text.splitlines() if l.strip()] or [repr(error)]
  kind = ('config error' if isinstance(error, config_lib.ConfigError)
          else 'error')
  sys.stderr.write(''.join(f'{kind}: {l}\n' for l in lines))
  sys.exit(1)


def split_config_args(argv: Sequence[str], bools: Collection[str] = ()
                      ) -> tuple[list[str], str | None, list[str]]:
  """(argv without the recipe's arguments, --config value or None,
  ['a.b=v', ...] overrides in order). Read as absl reads flags:
  `--config.a.b=v` and `--config.a.b v`; for the boolean fields named in
  `bools` also `--config.a.b` (true) and `--noconfig.a.b` (false)."""
  rest, recipe, pairs = [], None, []
  args = list(argv)
  i = 0
  while i < len(args):
    name, eq, value = args[i].partition('=')
    bare = name.lstrip('-')
    key = bare.partition('.')[2]
    if name.startswith('-') and bare.startswith('noconfig.') and not eq:
      pairs.append(f'{key}=false')
    elif name.startswith('-') and (bare == 'config' or
                                   bare.startswith('config.')):
      if not eq and key in bools:
        value = 'true'
      elif not eq:
        if i + 1 >= len(args):
          fail(f'{name} needs a value')
        value = args[i + 1]
        i += 1
      if bare == 'config':
        recipe = value
      else:
        pairs.append(f'{key}={value}')
    else:
      rest.append(args[i])
    i += 1
  return rest, recipe, pairs


def _bool_fields(config, prefix: str = '') -> set[str]:
  """The dotted keys of a ConfigDict's boolean fields."""
  out = set()
  for key, value in config.items():
    if hasattr(value, 'items'):
      out |= _bool_fields(value, f'{prefix}{key}.')
    elif isinstance(value, bool):
      out.add(prefix + key)
  return out


def read_config(argv: Sequence[str], default: str
                ) -> tuple[config_lib.Config, list[str]]:
  """(the validated config of argv's recipe and overrides, the rest of
  argv). The recipe is --config (a file, or the name of a packaged recipe:
  grpo, dapo, ...; default `default`).

  Raises:
    ConfigError: every problem of the file, the overrides and the result,
      one line each.
  """
  # The recipe first: its boolean fields may stand without a value.
  _, name, _ = split_config_args(argv)
  config = recipes.load(name or default)
  rest, _, pairs = split_config_args(argv, _bool_fields(config))
  return recipes.build(config, pairs), rest


def entry(main: Callable[..., None], *, recipe: str | None = None) -> None:
  """Runs a command: `main(argv)`, or `main(argv, cfg)` when it takes a
  recipe (default `recipe`), whose flags are read first (see the module
  docstring), then absl's."""
  # `--help` lists the command's own flags (absl shows the main module's,
  # and the main module of an entry point or a shim is not this one).
  for flag in flags.FLAGS.get_key_flags_for_module(main.__module__):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  entry_point = sys.modules['__main__']
  if not entry_point.__doc__:  # absl's usage text: the command's docstring.
    entry_point.__doc__ = sys.modules[main.__module__].__doc__
  argv = sys.argv
  if recipe is not None:
    try:
      cfg, argv = read_config(sys.argv, recipe)
    except config_lib.ConfigError as e:
      fail(e)
    main = functools.partial(main, cfg=cfg)
  app.run(one_line_errors(main), argv=argv)
