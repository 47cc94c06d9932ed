"""Logbook: unreadable metrics lines, TensorBoard tags, W&B (offline)."""

import dataclasses
import glob
import json
import os
import struct
import subprocess
import sys

import pytest
from tensorboardX.proto import event_pb2

from rlx import config as config_lib
from rlx import logbook
from rlx import testing
from rlx import trainer


def _config(tmp, **log):
  c = testing.tiny_config_dict(str(tmp))
  for key, value in log.items():
    c.log[key] = value
  return config_lib.build(c)


def _row_items(rows):
  """(step, key) -> value of the numbers in rows; a later row wins."""
  out = {}
  for r in rows:
    for k, v in r.items():
      if k != 'step' and isinstance(v, (int, float)):
        out[r['step'], k] = v
  return out


@pytest.fixture
def messages(monkeypatch):
  got = []
  monkeypatch.setattr(logbook.Logbook, 'message',
                      lambda self, text: got.append(text))
  return got


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
  """W&B without network, printing nothing, keeping its files in tmp.

  wandb is in the test extra: a missing install fails, it does not skip.
  """
  # (WANDB__DISABLE_STATS: no system metrics sampled in the background.)
  for name, value in [('MODE', 'offline'), ('SILENT', 'true'),
                      ('CONSOLE', 'off'), ('_DISABLE_STATS', 'true')]:
    monkeypatch.setenv('WANDB_' + name, value)
  for name in ('CONFIG_DIR', 'CACHE_DIR', 'DATA_DIR', 'ARTIFACT_DIR'):
    monkeypatch.setenv('WANDB_' + name, str(tmp_path / 'wandb-home' / name))


def _wandb_runs(workdir):
  """What each offline W&B run under `workdir` recorded, oldest first.

  Read from the runs' transaction logs by `wandb leet inspect --json`, the
  reader wandb ships (wandb.sdk.internal.datastore is gone from 0.31 on).
  Each run: {'run': its run record, 'config', 'summary', 'history': {step:
  item}, 'dir'}.
  """
  runs = []
  for run_dir in glob.glob(os.path.join(workdir, 'wandb', 'offline-run-*')):
    out = subprocess.run(
        [sys.executable, '-m', 'wandb', 'leet', 'inspect', '--json',
         run_dir], check=True, capture_output=True, text=True).stdout
    run = {'dir': run_dir, 'config': {}, 'summary': {}, 'history': {}}
    for record in map(json.loads, out.splitlines()):
      kind = record['type']
      if kind == 'run':
        run['run'] = record['run']
        run['config'].update(record['run']['config']['update'])
      elif kind == 'config':
        run['config'].update(record['config'].get('update', {}))
      elif kind == 'summary':
        run['summary'].update(record['summary']['update'])
      elif kind == 'history':
        step = record['history']['step']['num']
        assert step not in run['history']
        run['history'][step] = record['history']['item']
    run['config'].pop('_wandb', None)
    runs.append(run)
  return sorted(runs, key=lambda r: r['run']['start_time'])


def _metric_items(history):
  """(step, key) -> value of W&B history, less W&B's own and table keys."""
  return {(step, k): v for step, item in history.items()
          for k, v in item.items()
          if not k.startswith(('_', 'eval/samples'))}


def _tb_events(logdir):
  """The events of each TensorBoard event file in `logdir`, oldest first.

  TFRecord framing: length (uint64), its CRC, the Event proto, its CRC.
  """
  files = []
  for path in glob.glob(os.path.join(logdir, 'events.out.tfevents.*')):
    with open(path, 'rb') as f:
      data = f.read()
    events, pos = [], 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      events.append(event_pb2.Event.FromString(
          data[pos + 12:pos + 12 + length]))
      pos += 12 + length + 4
    assert pos == len(data)
    files.append(events)
  return sorted(files, key=lambda events: events[0].wall_time)


def _tb_scalars(events):
  return {(e.step, v.tag): v.simple_value for e in events
          for v in e.summary.value if v.WhichOneof('value') == 'simple_value'}


_GOOD = [{'step': 0, 'eval/pass@1': 0.25}, {'step': 1, 'reward/mean': 0.5},
         {'step': 2, 'reward/mean': 0.75}, {'step': 2, 'eval/pass@1': 0.5},
         {'step': 3, 'reward/mean': 1.0}]
# Each a line that is not a row, with its line number in the file below.
_BAD = [(3, 'garbage {'), (5, '[1, 2]'), (6, '{"reward/mean": 1}'),
        (7, '{"step": 2.5}'), (11, '{"step": 4, "reward/me')]


def _metrics_with_bad_lines(path):
  good, bad = iter(_GOOD), dict(_BAD)
  lines = ['' if n == 10 else bad[n] if n in bad else json.dumps(next(good))
           for n in range(1, 12)]  # A blank line (10) is just skipped.
  assert next(good, None) is None
  with open(path, 'w') as f:
    f.write('\n'.join(lines))  # The cut-off last line has no newline.


def test_read_metrics_skips_unreadable_lines(tmp_path, caplog):
  path = str(tmp_path / 'metrics.jsonl')
  _metrics_with_bad_lines(path)
  bad = []
  assert logbook.read_metrics(path, bad=bad) == _GOOD
  assert bad == _BAD
  assert not caplog.records
  assert logbook.read_metrics(path) == _GOOD
  assert [r.getMessage() for r in caplog.records] == [
      f'{path}: skipped 5 unreadable lines (lines 3, 5, 6, 7, 11)']


def test_resume_sets_bad_lines_aside(tmp_path, messages):
  path = str(tmp_path / 'metrics.jsonl')
  _metrics_with_bad_lines(path)
  log = logbook.Logbook(str(tmp_path), total_steps=5, resume_step=2,
                        tensorboard=False, progress=False)
  assert messages == ['metrics.jsonl: set aside 5 unreadable lines (lines '
                      '3, 5, 6, 7, 11) in metrics.jsonl.bad']
  assert logbook.read_metrics(path) == _GOOD[:4]
  with open(path + '.bad') as f:
    assert f.read() == ''.join(text + '\n' for _, text in _BAD)
  assert logbook.read_metrics(path + '.dropped') == _GOOD[4:]
  log.write({'step': 3, 'reward/mean': 0.0})
  log.close()
  bad = []
  assert logbook.read_metrics(path, bad=bad) == _GOOD[:4] + [
      {'step': 3, 'reward/mean': 0.0}]
  assert not bad


def test_append_after_cut_off_line_starts_a_new_line(tmp_path):
  path = str(tmp_path / 'metrics.jsonl')
  with open(path, 'w') as f:
    f.write('{"step": 0, "a": 1}\n{"step": 1, "a"')
  log = logbook.Logbook(str(tmp_path), total_steps=2, resume_step=0,
                        tensorboard=False, progress=False)
  log.write({'step': 0, 'a': 2})
  log.close()
  bad = []
  assert logbook.read_metrics(path, bad=bad) == [{'step': 0, 'a': 1},
                                                  {'step': 0, 'a': 2}]
  assert bad == [(2, '{"step": 1, "a"')]


def test_tensorboard_tags_are_the_metric_names(tmp_path):
  rows = [{'step': 0, 'eval/pass@1': 0.25, 'eval/pass@4': 0.5,
           'note': 'not a number', 'curve': [1, 2]},
          {'step': 1, 'reward/mean': 0.5, 'response/len_max': 7},
          {'step': 2, 'reward/mean': 0.75, 'eval/pass@1': 0.5}]
  log = logbook.Logbook(str(tmp_path), total_steps=2, resume_step=0,
                        progress=False)
  for row in rows:
    log.write(row)
  records = [{'prompt': '1+1=', 'answer': '2', 'response': '2', 'reward': 1.0},
             {'prompt': '2*3=', 'answer': '6', 'response': 'five | x\nyes',
              'reward': 0.0}]
  log.log_samples(2, records)
  log.close()
  log = logbook.Logbook(str(tmp_path), total_steps=4, resume_step=2,
                        progress=False)
  log.write({'step': 3, 'reward/mean': 1.0})
  log.close()

  first, resumed = _tb_events(str(tmp_path / 'tb'))
  assert _tb_scalars(first) == {
      (0, 'eval/pass@1'): 0.25, (0, 'eval/pass@4'): 0.5,
      (1, 'reward/mean'): 0.5, (1, 'response/len_max'): 7.0,
      (2, 'reward/mean'): 0.75, (2, 'eval/pass@1'): 0.5}
  [text] = [v for e in first for v in e.summary.value
            if v.WhichOneof('value') == 'tensor']
  assert (text.tag, text.metadata.plugin_data.plugin_name) == (
      'eval/samples', 'text')
  assert [d.size for d in text.tensor.tensor_shape.dim] == [3, 4]
  assert [s.decode() for s in text.tensor.string_val] == [
      'prompt', 'answer', 'response', 'reward',
      '1+1=', '2', '2', '1.0', '2*3=', '6', 'five | x\nyes', '0.0']
  # The resumed file hides earlier events from step 3 on (none here).
  [start] = [e for e in resumed if e.WhichOneof('what') == 'session_log']
  assert (start.step, start.session_log.status) == (
      3, event_pb2.SessionLog.START)
  assert _tb_scalars(resumed) == {(3, 'reward/mean'): 1.0}


def test_wandb_missing_or_bad_mode_fails_early(tmp_path, monkeypatch):
  cfg = _config(tmp_path, wandb_project='rlx-test')
  monkeypatch.setitem(sys.modules, 'wandb', None)  # As if not installed.
  for primary in (True, False):
    with pytest.raises(config_lib.ConfigError, match='pip install wandb'):
      logbook.Logbook(str(tmp_path), total_steps=1, resume_step=0,
                      progress=False, primary=primary, config=cfg)
  # A bad mode: refused with the config, and by a Logbook given one that
  # skipped validation.
  with pytest.raises(config_lib.ConfigError, match='log.wandb_mode'):
    _config(tmp_path, wandb_project='rlx-test', wandb_mode='dryrun')
  cfg = dataclasses.replace(cfg, log=dataclasses.replace(
      cfg.log, wandb_mode='dryrun'))
  with pytest.raises(config_lib.ConfigError, match='log.wandb_mode'):
    logbook.Logbook(str(tmp_path), total_steps=1, resume_step=0,
                    progress=False, config=cfg)
  # Off: no W&B, nothing needed.
  logbook.Logbook(str(tmp_path), total_steps=1, resume_step=0,
                  progress=False, config=_config(tmp_path)).close()
  assert not os.path.exists(tmp_path / 'wandb_id')


def test_wandb_rows_samples_config_and_resume(tmp_path, offline_wandb,
                                              messages):
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  cfg = _config(tmp_path, wandb_project='rlx-test', wandb_tags=('a', 'b'),
                samples=2)
  rows = _GOOD + [{'step': 4, 'reward/mean': 0.125, 'note': 'text'}]
  records = [{'prompt': f'p{i}', 'answer': f'a{i}', 'response': f'r{i}',
              'reward': float(i % 2)} for i in range(3)]
  log = logbook.Logbook(workdir, total_steps=4, resume_step=0,
                        tensorboard=False, progress=False, config=cfg)
  for row in rows:
    log.write(row)
    if row == _GOOD[3]:  # The evaluation at step 2.
      log.log_samples(2, records)
  log.log_samples(3, records)  # Not sent: W&B is at step 4.
  log.close()
  # Resumed at step 2: steps 3 and 4 were sent; only later ones go again.
  log = logbook.Logbook(workdir, total_steps=6, resume_step=2,
                        tensorboard=False, progress=False, config=cfg)
  with open(os.path.join(workdir, 'wandb_id')) as f:
    run_id = f.read().strip()
  assert messages == [f'W&B run {run_id}: steps up to 4 were sent before; '
                      'W&B cannot rewind, so it keeps those and gets rows '
                      'from step 5 on']
  again = [{'step': 3, 'reward/mean': 0.0}, {'step': 4, 'reward/mean': 0.0},
           {'step': 5, 'reward/mean': 0.5}]
  for row in again:
    log.write(row)
  log.log_samples(4, records)  # Not sent either.
  log.close()

  first, resumed = _wandb_runs(workdir)
  for run in (first, resumed):
    assert run['run']['run_id'] == run_id
    assert run['run']['project'] == 'rlx-test'
    assert run['run']['display_name'] == 'run'
    assert run['run']['tags'] == ['a', 'b']
    assert run['config'] == json.loads(json.dumps(config_lib.to_dict(cfg)))
  assert _metric_items(first['history']) == _row_items(rows)
  assert _metric_items(resumed['history']) == _row_items(again[2:])
  # The table: the first log.samples records, at the evaluation's step.
  table = first['history'][2]['eval/samples.path']
  with open(os.path.join(first['dir'], 'files', table)) as f:
    table = json.load(f)
  assert table['columns'] == list(logbook.SAMPLE_KEYS)
  assert table['data'] == [[r[k] for k in logbook.SAMPLE_KEYS]
                           for r in records[:2]]
  assert not any(k.startswith('eval/samples') for k in
                 resumed['summary'])


def test_wandb_run_started_on_resume_gets_earlier_rows(
    tmp_path, offline_wandb, messages):
  with open(tmp_path / 'metrics.jsonl', 'w') as f:  # From a run without W&B.
    f.writelines(json.dumps(r) + '\n' for r in _GOOD)
  cfg = _config(tmp_path, wandb_project='rlx-test', wandb_name='named')
  log = logbook.Logbook(str(tmp_path), total_steps=4, resume_step=2,
                        tensorboard=False, progress=False, config=cfg)
  log.write({'step': 3, 'reward/mean': 0.0})
  log.close()
  assert not messages
  [run] = _wandb_runs(str(tmp_path))
  assert run['run']['display_name'] == 'named'
  assert _metric_items(run['history']) == _row_items(
      _GOOD[:4] + [{'step': 3, 'reward/mean': 0.0}])


def test_trainer_wandb_run_equals_metrics(tmp_path, offline_wandb):
  c = testing.tiny_config_dict(str(tmp_path))
  c.rl.num_steps = 2
  c.log.wandb_project = 'rlx-test'
  # Fewer programs to compile: no warm start, no ahead-of-time memory check.
  c.warmstart.num_steps, c.log.memory_stats = 0, False
  cfg = config_lib.build(c)
  workdir = str(tmp_path / 'run')
  trainer.train(cfg, workdir)

  rows = logbook.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  assert sorted({r['step'] for r in rows}) == [0, 1, 2]
  [run] = _wandb_runs(workdir)
  assert run['config'] == json.loads(json.dumps(config_lib.to_dict(cfg)))
  assert _metric_items(run['history']) == _row_items(rows)
  last = {k: v for (_, k), v in sorted(_row_items(rows).items())}
  assert {k: v for k, v in run['summary'].items()
          if not k.startswith(('_', 'eval/samples'))} == last
  # Each evaluation's first log.samples completions, as a table.
  assert run['summary']['eval/samples._type'] == 'table-file'


def test_trainer_refuses_wandb_before_any_work(tmp_path, monkeypatch):
  """W&B asked for but not installed: one ConfigError from the trainer's
  checks, before the warm start is trained (its cache stays empty) and
  before any log is written."""
  c = testing.tiny_config_dict(str(tmp_path))
  c.log.wandb_project = 'rlx-test'
  monkeypatch.setitem(sys.modules, 'wandb', None)  # As if not installed.
  workdir = tmp_path / 'run'
  with pytest.raises(config_lib.ConfigError,
                     match=r"^log.wandb_project: 'rlx-test' needs the wandb "
                     'package: pip install wandb'):
    trainer.train(config_lib.build(c), str(workdir))
  assert not os.path.exists(tmp_path / 'warmstart')
  assert sorted(os.listdir(workdir)) == ['.lock', 'checkpoints']
