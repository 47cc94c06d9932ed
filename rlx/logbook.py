"""Run logging: metrics.jsonl, TensorBoard, Weights & Biases, a progress bar.

`metrics.jsonl` holds one JSON object per logged row, each with an integer
'step'. Its keys are the metric names everywhere: TensorBoard tags and W&B
keys are the same strings (`eval/pass@1`, not `eval/pass_at_1`).

On resume from a checkpoint at step k, rows with step > k (written after that
checkpoint by the interrupted run) are moved to `metrics.jsonl.dropped` and
recomputed, so the file reads exactly like an uninterrupted run. Lines that
are not a row (a crash mid-write can cut one off) are moved to
`metrics.jsonl.bad`.

W&B (`log.wandb_project`): one W&B run per workdir, its id kept in
`WORKDIR/wandb_id` and its files under `WORKDIR/wandb`. W&B cannot rewind a
run's history, so on resume the rows the interrupted run had already sent
(steps up to the last one metrics.jsonl held) are not sent again: W&B keeps
the interrupted run's values for those steps, metrics.jsonl the recomputed
ones. A W&B run started on a resumed workdir first gets the rows that
metrics.jsonl kept.
"""

import dataclasses
import importlib.util
import itertools
import json
import os
import secrets
import sys

from absl import logging
import numpy as np
import tqdm

from rlx import config as config_lib
from rlx import errors
from rlx import registry

# Columns of the sampled completions (`Logbook.log_samples`).
SAMPLE_KEYS = ('prompt', 'answer', 'response', 'reward')
WANDB_MODES = ('', 'online', 'offline')  # log.wandb_mode.
_WRITER_IDS = itertools.count()  # Event file names of this process.


@config_lib.section('log')
@dataclasses.dataclass(frozen=True)
class LogConfig:
  every: int = 1  # Write a metrics row every this many steps.
  checkpoint_every: int = 10  # Save a checkpoint every this many steps.
  keep: int = 2  # Checkpoints kept.
  tensorboard: bool = True  # Also write TensorBoard event files.
  progress: bool = True  # Show a progress bar.
  memory_stats: bool = True  # At start, compile the largest train step
  # ahead of time and log its memory per device.
  wandb_project: str = ''  # Also log to this Weights & Biases project
  # ('' = no W&B; needs `pip install wandb`). One W&B run per workdir.
  wandb_entity: str = ''  # W&B user or team ('' = the login's default).
  wandb_name: str = ''  # W&B run name ('' = the workdir's basename).
  wandb_tags: tuple = ()  # W&B run tags (strings).
  wandb_mode: str = ''  # 'online' or 'offline' (sync later with `wandb
  # sync WORKDIR/wandb`); '' = W&B's default (WANDB_MODE, else online).
  samples: int = 8  # Completions of each evaluation logged as a table
  # (TensorBoard text, W&B table): the first this many (0 = none).


@registry.config_check
def _check_log_section(cfg) -> None:
  """log.*; whether W&B can start is `wandb_problems`'."""
  log = cfg.log
  errors.require(log.keep > 0, 'log.keep', 'must be positive')
  errors.require(log.samples >= 0, 'log.samples', 'must be >= 0')
  errors.require(log.wandb_mode in WANDB_MODES, 'log.wandb_mode',
                 f'{log.wandb_mode!r} is not one of {list(WANDB_MODES)}')
  errors.require(log.every > 0, 'log.every', 'must be positive')
  errors.require(log.checkpoint_every > 0, 'log.checkpoint_every',
                 'must be positive')


def _parse_row(line: str) -> dict | None:
  """The row on `line`, or None if it is not a JSON object with an int step."""
  try:
    row = json.loads(line)
  except ValueError:
    return None
  if not isinstance(row, dict) or type(row.get('step')) is not int:
    return None  # (A bool is an int to isinstance.)
  return row


def read_metrics(path: str, *, bad: list | None = None) -> list[dict]:
  """The rows of a metrics.jsonl, skipping lines that are not a row.

  Args:
    path: the file.
    bad: if given, `(line number, text)` of each unreadable line is appended
      to it (numbers from 1); otherwise their count is logged as a warning.

  Returns:
    The rows, in file order.
  """
  rows, skipped = [], []
  # surrogateescape: garbage bytes survive into metrics.jsonl.bad unchanged.
  with open(path, encoding='utf-8', errors='surrogateescape') as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      row = _parse_row(line)
      if row is None:
        skipped.append((number, line.rstrip('\n')))
      else:
        rows.append(row)
  if bad is not None:
    bad.extend(skipped)
  elif skipped:
    logging.warning('%s: skipped %s', path, _count_lines(skipped))
  return rows


def _jsonable(value):
  if isinstance(value, (np.generic, np.ndarray)):
    return value.tolist()
  if hasattr(value, 'tolist'):  # jax arrays
    return value.tolist()
  return value


def _scalars(row: dict) -> dict:
  """The numbers of a row, the ones TensorBoard and W&B plot."""
  return {k: v for k, v in row.items()
          if k != 'step' and isinstance(v, (int, float))}


def _count_lines(bad: list) -> str:
  """'2 unreadable lines (lines 3, 7)' for `read_metrics`'s `bad`."""
  numbers = ', '.join(str(n) for n, _ in bad)
  if len(bad) == 1:
    return f'1 unreadable line (line {numbers})'
  return f'{len(bad)} unreadable lines (lines {numbers})'


def wandb_problems(log: LogConfig) -> list[str]:
  """Why W&B cannot start as `log` asks ([]: it can, or it is off); for
  the trainer's checks before any work (the mode is also checked with
  the config)."""
  if not log.wandb_project:
    return []
  if log.wandb_mode not in WANDB_MODES:
    return [f'log.wandb_mode: {log.wandb_mode!r} is not one of '
            f'{list(WANDB_MODES)}']
  if importlib.util.find_spec('wandb') is None:
    return [f'log.wandb_project: {log.wandb_project!r} needs the wandb '
            "package: pip install wandb (or pip install 'rlx[wandb]')"]
  return []


def _check_wandb(log: LogConfig) -> None:
  """Raises ConfigError unless W&B can start as `log` asks."""
  problems = wandb_problems(log)
  if problems:
    raise config_lib.ConfigError('\n'.join(problems))


class Logbook:
  """Writes metric rows; `resume_step` trims rows past the checkpoint.

  On many hosts only the primary process (index 0) writes; the others get a
  Logbook that drops everything, so the shared workdir has one writer.
  """

  def __init__(self, workdir: str, *, total_steps: int, resume_step: int,
               tensorboard: bool = True, progress: bool = True,
               primary: bool = True, config: config_lib.Config | None = None):
    """Opens the run's logs.

    Args:
      workdir: the run's directory.
      total_steps: RL steps of the whole run (the progress bar's length).
      resume_step: the checkpoint's step when resuming, else 0.
      tensorboard: also write TensorBoard event files (WORKDIR/tb).
      progress: show a progress bar.
      primary: whether this process writes (see the class docstring).
      config: the run's config: its `log.wandb_*` fields turn W&B on, and
        the whole of it is the W&B run's config.

    Raises:
      ConfigError: W&B is on but the wandb package is not installed, or
        log.wandb_mode is not a mode.
    """
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.primary = primary
    self._file = self._tb = self._wandb = None
    # Completions per evaluation table (log_samples).
    self._samples = (config or config_lib.Config()).log.samples
    use_wandb = config is not None and bool(config.log.wandb_project)
    if use_wandb:
      # On every process, so that on many hosts all stop, not just one.
      _check_wandb(config.log)
    self._bar = tqdm.tqdm(total=total_steps, initial=resume_step,
                          disable=not (progress and primary), desc='rl',
                          dynamic_ncols=True, file=sys.stderr)
    if not primary:
      return
    rows, last_step = [], None
    if os.path.exists(self.path) and (resume_step or use_wandb):
      bad = []
      rows = read_metrics(self.path, bad=bad)
      last_step = max((r['step'] for r in rows), default=None)
      if resume_step:
        rows = self._trim(rows, bad, resume_step)
    self._file = open(self.path, 'a')
    if self._file.tell() and not _ends_with_newline(self.path):
      self._file.write('\n')  # A cut-off last line stays a line of its own.
    if tensorboard:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      # A FileWriter, not a SummaryWriter: its add_scalar rewrites tags
      # ('@' -> '_'), and the tags are metrics.jsonl's names.
      # The name ends as TensorFlow's do (pid, a counter): tensorboardX's
      # alone (seconds, host) would let a quick restart overwrite a file.
      self._tb = tensorboardX.FileWriter(
          os.path.join(workdir, 'tb'),
          filename_suffix=f'.{os.getpid()}.{next(_WRITER_IDS)}')
      if resume_step:
        # The recomputed steps; rows of resume_step itself came before the
        # checkpoint (SummaryWriter's purge_step=resume_step hid them too).
        _tb_purge(self._tb, resume_step + 1)
    if use_wandb:
      self._start_wandb(workdir, config, rows if resume_step else [],
                        last_step)

  def _trim(self, rows: list[dict], bad: list, resume_step: int
            ) -> list[dict]:
    """Rewrites metrics.jsonl as it stood at `resume_step`; returns it."""
    keep = [r for r in rows if r['step'] <= resume_step]
    dropped = [r for r in rows if r['step'] > resume_step]
    if dropped:
      with open(self.path + '.dropped', 'a') as f:
        f.writelines(json.dumps(r) + '\n' for r in dropped)
    if bad:
      with open(self.path + '.bad', 'a', encoding='utf-8',
                errors='surrogateescape') as f:
        f.writelines(text + '\n' for _, text in bad)
    with open(self.path + '.tmp', 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in keep)
    os.replace(self.path + '.tmp', self.path)
    if bad:
      self.message(f'metrics.jsonl: set aside {_count_lines(bad)} in '
                   'metrics.jsonl.bad')
    return keep

  def _start_wandb(self, workdir: str, config: config_lib.Config,
                   earlier: list[dict], last_step: int | None) -> None:
    """Starts or resumes the workdir's W&B run.

    Args:
      workdir: the run's directory.
      config: the run's config.
      earlier: rows kept from before a resume (sent to a new W&B run).
      last_step: the last step metrics.jsonl held, dropped rows included.
    """
    import wandb  # pylint: disable=g-import-not-at-top
    log = config.log
    id_path = os.path.join(workdir, 'wandb_id')
    existed = os.path.exists(id_path)
    if existed:
      with open(id_path) as f:
        run_id = f.read().strip()
    else:
      run_id = secrets.token_hex(6)
      with open(id_path + '.tmp', 'w') as f:
        f.write(run_id + '\n')
      os.replace(id_path + '.tmp', id_path)
    try:
      self._wandb = wandb.init(
          project=log.wandb_project, entity=log.wandb_entity or None,
          name=log.wandb_name or os.path.basename(os.path.normpath(workdir)),
          tags=list(log.wandb_tags), config=config_lib.to_dict(config),
          id=run_id, resume='allow', dir=workdir,
          mode=log.wandb_mode or None)
    except Exception as e:  # Login, network, entity: W&B's many errors.
      raise config_lib.ConfigError(
          f'log.wandb_project: W&B did not start ({type(e).__name__}: '
          f'{" ".join(str(e).split())[:300]}); log in (wandb login), or set '
          'log.wandb_mode=offline') from e
    # The first step W&B still takes: it drops (with a warning) any step
    # below the last one it has.
    self._wandb_from = self._wandb.starting_step
    if existed and last_step is not None:
      self._wandb_from = max(self._wandb_from, last_step + 1)
      self.message(f'W&B run {run_id}: steps up to {last_step} were sent '
                   'before; W&B cannot rewind, so it keeps those and gets '
                   f'rows from step {last_step + 1} on')
    else:
      for row in earlier:
        self._wandb.log(_scalars(row), step=row['step'])
        self._wandb_from = row['step']

  def write(self, row: dict) -> None:
    if not self.primary:
      return
    row = {k: _jsonable(v) for k, v in row.items()}
    self._file.write(json.dumps(row) + '\n')
    self._file.flush()
    scalars = _scalars(row)
    if self._tb is not None and scalars:
      self._tb.add_summary(_tb_scalars(scalars), row['step'])
    if self._wandb is not None and row['step'] >= self._wandb_from:
      self._wandb.log(scalars, step=row['step'])
      self._wandb_from = row['step']

  def log_samples(self, step: int, records: list[dict]) -> None:
    """Logs sampled completions of the evaluation at `step`.

    The first `log.samples` go to W&B as the table `eval/samples` and to
    TensorBoard as the text table `eval/samples` (a header row, then one
    row per record).

    Args:
      step: the evaluation's step (that of its metrics row).
      records: dicts with keys 'prompt', 'answer', 'response' (strings) and
        'reward' (a number).
    """
    if not self.primary or not records:
      return
    table = [[r[k] for k in SAMPLE_KEYS] for r in records[:self._samples]]
    if not table:
      return
    if self._tb is not None:
      self._tb.add_summary(_tb_text_table('eval/samples', [
          list(SAMPLE_KEYS), *([str(c) for c in row] for row in table)]),
                           step)
    if self._wandb is not None and step >= self._wandb_from:
      import wandb  # pylint: disable=g-import-not-at-top
      self._wandb.log({'eval/samples': wandb.Table(
          columns=list(SAMPLE_KEYS), data=table)},
                      step=step)
      self._wandb_from = step

  def advance(self, reward: float, pass1: float | None) -> None:
    post = {'reward': f'{reward:.3f}'}
    if pass1 is not None:
      post['pass@1'] = f'{pass1:.3f}'
    self._bar.set_postfix(post, refresh=False)
    self._bar.update(1)

  def message(self, text: str) -> None:
    if self.primary:
      self._bar.write(text, file=sys.stderr)

  def close(self) -> None:
    self._bar.close()
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()


# TensorBoard protos, built here rather than by tensorboardX's summary
# functions, which rewrite tags ('@' -> '_'). Imported late: importing
# tensorboardX takes half a second.


def _tb_scalars(scalars: dict):
  """A Summary of scalars tagged exactly with their metric names."""
  # pylint: disable=g-import-not-at-top
  from tensorboardX.proto import summary_pb2
  return summary_pb2.Summary(value=[
      summary_pb2.Summary.Value(tag=k, simple_value=v)
      for k, v in scalars.items()])


def _tb_text_table(tag: str, cells: list[list[str]]):
  """A Summary that TensorBoard's text plugin shows as a table.

  Args:
    tag: the tag.
    cells: rows of equal length (the first one a header, by convention).
  """
  # pylint: disable=g-import-not-at-top
  from tensorboardX.proto import summary_pb2
  from tensorboardX.proto import tensor_pb2
  from tensorboardX.proto import tensor_shape_pb2
  dim = tensor_shape_pb2.TensorShapeProto.Dim
  tensor = tensor_pb2.TensorProto(  # The plugin draws [rows, cols] strings.
      dtype='DT_STRING', tensor_shape=tensor_shape_pb2.TensorShapeProto(
          dim=[dim(size=len(cells)), dim(size=len(cells[0]))]),
      string_val=[c.encode() for row in cells for c in row])
  metadata = summary_pb2.SummaryMetadata(
      plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name='text'))
  return summary_pb2.Summary(value=[summary_pb2.Summary.Value(
      tag=tag, tensor=tensor, metadata=metadata)])


def _tb_purge(writer, step: int) -> None:
  """TensorBoard hides the earlier event files' events from `step` on.

  What tensorboardX's SummaryWriter(purge_step=step) writes.
  """
  # pylint: disable=g-import-not-at-top
  from tensorboardX.proto import event_pb2
  writer.add_event(event_pb2.Event(file_version='brain.Event:2'), step)
  writer.add_event(event_pb2.Event(session_log=event_pb2.SessionLog(
      status=event_pb2.SessionLog.START)), step)


def _ends_with_newline(path: str) -> bool:
  with open(path, 'rb') as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b'\n'
