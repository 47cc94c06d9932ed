"""The faults a real run meets (issue 32): kills at any moment, non-finite
updates, a flipped byte on disk, a failed write, two processes on one
workdir, a lowered step count. Each test asserts the behaviour named in
the trainer's and checkpoint's docstrings."""

import dataclasses
import glob
import os
import random
import resource
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx import checkpoint
from rlx import config as config_lib
from rlx import learner
from rlx import recipes
from rlx import testing
from rlx import trainer
from rlx import workdir as workdir_lib
from rlx.data import task as task_lib
from rlx.logbook import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_RECIPE = '''
from rlx import testing


def get_config():
  c = testing.tiny_config_dict({tmp!r})
  c.log.checkpoint_every, c.log.keep = 1, 5
  return c
'''


def _cfg(tmp, **overrides):
  c = testing.tiny_config_dict(str(tmp))
  c.log.checkpoint_every, c.log.keep = 1, 5
  for key, value in overrides.items():
    recipes.override(c, key, value)
  return config_lib.build(c)


def _comparable(rows):
  return [{k: v for k, v in r.items() if not k.startswith('time/')}
          for r in rows]


def _rows(workdir):
  return read_metrics(os.path.join(workdir, 'metrics.jsonl'))


def _final_params(workdir):
  folder, step = checkpoint.run_step(str(workdir), 0)
  ckpt = checkpoint.Checkpointer(folder)
  state = ckpt.read(step)
  ckpt.close()
  return step, state['train']


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """An uninterrupted tiny run (4 steps, a checkpoint after each); also
  prepares the data and the warm start the other runs reuse."""
  tmp = tmp_path_factory.mktemp('faults')
  trainer.train(_cfg(tmp), str(tmp / 'reference'))
  return tmp, _rows(tmp / 'reference'), _final_params(tmp / 'reference')


def _assert_same_run(workdir, reference):
  _, rows, (step, train) = reference
  assert _comparable(_rows(workdir)) == _comparable(rows)
  got_step, got = _final_params(workdir)
  assert got_step == step
  jax.tree.map(np.testing.assert_array_equal, got, train)


def _start(tmp, workdir, *flags):
  recipe = tmp / 'faults_recipe.py'
  recipe.write_text(_RECIPE.format(tmp=str(tmp)))
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  return subprocess.Popen(
      [sys.executable, 'scripts/train.py', f'--config={recipe}',
       f'--workdir={workdir}', *flags], cwd=ROOT, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_when(proc, ready, timeout=300):
  """SIGKILLs `proc` as soon as `ready()` holds (polled every ms); returns
  whether it was killed (False: it ended first)."""
  end = time.time() + timeout
  while proc.poll() is None and time.time() < end:
    if ready():
      proc.send_signal(signal.SIGKILL)
      proc.communicate()
      return True
    time.sleep(0.001)
  proc.communicate()
  return False


def test_killed_at_any_moment_resumes_with_the_same_command(reference):
  """Real SIGKILLs: in the window between the step-0 evaluation row and
  the first checkpoint (D1), while a checkpoint is being written, and at a
  random moment; each time the same command resumes, and the finished run
  equals the uninterrupted one (rows and every train-state leaf)."""
  tmp = reference[0]
  workdir = tmp / 'killed'
  ckpts = workdir / 'checkpoints'
  metrics = workdir / 'metrics.jsonl'
  finished = lambda: [d for d in glob.glob(str(ckpts / '[0-9]*'))
                      if '.orbax' not in d]
  windows = [
      # D1: the step-0 row is written, no checkpoint is finished.
      lambda: metrics.exists() and metrics.stat().st_size and not finished(),
      # Mid-write: orbax's temporary directory of a checkpoint exists.
      lambda: bool(glob.glob(str(ckpts / '*tmp*'))),
  ]
  rng = random.Random(0)
  deadline = [None]

  def at_random():
    if deadline[0] is None:
      deadline[0] = time.time() + rng.uniform(2.0, 8.0)
    return time.time() > deadline[0]

  kills = 0
  for ready in windows + [at_random]:
    kills += _kill_when(_start(tmp, workdir), ready)
  assert kills >= 2  # The D1 and mid-write windows were hit.
  proc = _start(tmp, workdir)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  _assert_same_run(workdir, reference)


def test_logs_without_a_checkpoint_start_over(reference, capsys):
  """D1: a start killed after its step-0 evaluation row, before its first
  checkpoint: the same command starts over (the row set aside in
  metrics.jsonl.dropped, saying so) and ends as the uninterrupted run."""
  tmp = reference[0]
  workdir = tmp / 'no_checkpoint'
  workdir.mkdir()
  step0 = '{"step": 0, "eval/pass@1": 0.5}\n'
  (workdir / 'metrics.jsonl').write_text(step0)
  for earlier in ('tb', 'tb.dropped'):  # This start's events and an older.
    (workdir / earlier).mkdir()
    (workdir / earlier / 'events').write_text(earlier)
  (workdir / 'wandb_id').write_text('abc\n')  # Its W&B run.
  trainer.train(_cfg(tmp), str(workdir))
  assert (workdir / 'metrics.jsonl.dropped').read_text() == step0
  # Set aside, keeping the older ones: the new start has its own W&B run.
  assert (workdir / 'tb.dropped' / 'events').read_text() == 'tb.dropped'
  assert (workdir / 'tb.dropped.2' / 'events').read_text() == 'tb'
  assert (workdir / 'wandb_id.dropped').read_text() == 'abc\n'
  assert not (workdir / 'wandb_id').exists()
  assert 'has no finished checkpoint: starting over; the 1 rows' in (
      capsys.readouterr().err)
  _assert_same_run(workdir, reference)


def _poison(monkeypatch, step, until=None):
  """Makes the learner's loss NaN at RL steps [step, until): the verifier
  marks those steps' rollouts with rewards of 7 (evaluation calls, of
  another batch shape with eval.samples_per_prompt=3, stay untouched) and
  the loss turns NaN on a batch holding them, inside the real train step."""
  load, loss_fn = task_lib.load_task, learner._microbatch_loss
  calls = {'n': 0}

  def load_task(*args, **kwargs):
    task = load(*args, **kwargs)
    score = task.reward_fn

    def reward_fn(texts, answers):
      rewards = np.asarray(score(texts, answers), np.float32)
      if len(texts) == 16:  # B * G = 4 * 4: an RL step's rollout.
        calls['n'] += 1
        if step <= calls['n'] < (until or 1 << 30):
          rewards = np.full_like(rewards, 7.0)
      return rewards
    return dataclasses.replace(task, reward_fn=reward_fn)

  def poisoned_loss(*args):
    loss, metrics = loss_fn(*args)
    batch = args[5]
    return jnp.where(jnp.any(batch.rewards == 7.0), jnp.nan, loss), metrics

  monkeypatch.setattr(trainer, 'load_task', load_task)
  monkeypatch.setattr(learner, '_microbatch_loss', poisoned_loss)


def test_a_non_finite_update_is_skipped_and_counted(reference, monkeypatch):
  """D2: step 2's loss is NaN: its update is skipped (the train state
  stays bit for bit that of step 1), counted, and training goes on."""
  tmp = reference[0]
  _poison(monkeypatch, 2, until=3)
  workdir = str(tmp / 'nan_once')
  result = trainer.train(_cfg(tmp, **{'eval.samples_per_prompt': '3'}),
                         workdir)
  rows = [r for r in _rows(workdir) if 'learner/loss' in r]
  assert [r['learner/nonfinite'] for r in rows] == [0, 1, 0, 0]
  assert rows[-1]['learner/nonfinite_total'] == 1
  assert result['step'] == 4
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
  one, two = ckpt.read(1)['train'], ckpt.read(2)['train']
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, two, one)
  for leaf in jax.tree.leaves(result['params']):
    assert np.isfinite(np.asarray(leaf)).all()


def test_steps_that_keep_failing_stop_the_run(reference, monkeypatch):
  """D2: with a NaN loss from step 2 on and optim.max_nonfinite=2, the
  run stops with a clear error after step 3; every checkpoint is finite."""
  tmp = reference[0]
  _poison(monkeypatch, 2)
  workdir = str(tmp / 'nan_always')
  with pytest.raises(learner.NonFiniteUpdates,
                     match=r'step 3: 2 RL steps in a row .* newest checkpoint '
                     r'\(step 2\) is finite'):
    trainer.train(_cfg(tmp, **{'optim.max_nonfinite': '2',
                               'eval.samples_per_prompt': '3'}), workdir)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
  assert ckpt.all_steps() == [1, 2]
  for step in (1, 2):
    for leaf in jax.tree.leaves(ckpt.read(step)['train']):
      assert np.isfinite(np.asarray(leaf)).all()
  ckpt.close()
  # The streak is in the checkpoint: the same command stops the same way
  # (resumed after step 2, whose update was the streak's first)...
  with pytest.raises(learner.NonFiniteUpdates, match=r'step 3: 2 RL steps'):
    trainer.train(_cfg(tmp, **{'optim.max_nonfinite': '2',
                               'eval.samples_per_prompt': '3'}), workdir)
  # ...and a raised limit (a change a resume accepts) lets it go on.
  result = trainer.train(_cfg(tmp, **{'optim.max_nonfinite': '4',
                                      'eval.samples_per_prompt': '3'}),
                         workdir)
  assert result['step'] == 4
  rows = [r for r in _rows(workdir) if 'learner/loss' in r]
  assert [r['learner/nonfinite'] for r in rows] == [0, 1, 1, 1]


def test_nothing_non_finite_is_written(tmp_path):
  """D2: a state holding NaN in a part that must be finite is refused
  before a byte is written; other parts (estimator states) may hold inf."""
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'ck'))
  ok = {'train': {'w': np.ones(3, np.float32)},
        'curriculum': {'score': np.array([-np.inf, 0.5], np.float32)}}
  ckpt.save(1, ok, {}, finite=('train',))
  bad = {'train': {'w': np.array([1.0, np.nan, 2.0], np.float32)}}
  with pytest.raises(checkpoint.CheckpointError,
                     match=r'not saving checkpoint 2: 1 arrays hold NaN or '
                     r'inf \(first: train/w\); the newest checkpoint stays '
                     r'step 1'):
    ckpt.save(2, bad, {}, finite=('train',))
  assert ckpt.all_steps() == [1] and os.listdir(tmp_path / 'ck') == ['1']
  ckpt.close()


def _flip_a_byte(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, 'state', '**'),
                                recursive=True)
           if os.path.isfile(f) and '/d/' in f]
  path = max(files, key=os.path.getsize)
  data = bytearray(open(path, 'rb').read())
  data[len(data) // 2] ^= 0x01
  with open(path, 'wb') as f:
    f.write(bytes(data))


def test_a_flipped_byte_falls_back_to_the_newest_good_checkpoint(
    reference, capsys):
  """D3: one flipped bit in the newest checkpoint's data: the restore
  names it, moves it to checkpoints.corrupt/, resumes from the one before
  and ends where the uninterrupted run did."""
  tmp = reference[0]
  workdir = tmp / 'flipped'
  trainer.train(_cfg(tmp), str(workdir), stop_after=3)
  _flip_a_byte(str(workdir / 'checkpoints' / '3'))
  trainer.train(_cfg(tmp), str(workdir))
  err = capsys.readouterr().err
  assert f'checkpoint {workdir}/checkpoints/3 fails verification' in err
  assert 'resuming from the newest good checkpoint, step 2' in err
  assert os.listdir(workdir / 'checkpoints.corrupt') == ['3']
  _assert_same_run(workdir, reference)


def test_a_flipped_byte_is_named_by_restore_and_read(tmp_path):
  """D3: the tools' `read` (evaluate, sample, export) verifies as the
  trainer's `restore` does."""
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'ck'))
  state = {'train': {'params': {'w': jnp.arange(4096, dtype=jnp.float32)}}}
  ckpt.save(1, state, {})
  jax.tree.map(np.testing.assert_array_equal, ckpt.read(1), state)
  _flip_a_byte(str(tmp_path / 'ck' / '1'))
  match = (rf'^checkpoint {tmp_path}/ck/1 fails verification: 1 arrays '
           'differ from what was written \(first: train/params/w\)$')
  with pytest.raises(checkpoint.CorruptCheckpoint, match=match):
    ckpt.restore(1, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
  with pytest.raises(checkpoint.CorruptCheckpoint, match=match):
    ckpt.read(1)
  ckpt.close()


def _numpy_checksum(x):
  """An independent reference: the words of x (8-byte values as two,
  low first), sums plain and weighted by 2 * index + 1, mod 2**32."""
  raw = np.frombuffer(np.ascontiguousarray(x).tobytes(),
                      dtype=f'<u{min(x.dtype.itemsize, 4)}')
  words = raw.astype(np.uint64)
  odd = 2 * np.arange(words.size, dtype=np.uint64) + 1
  plain = int(words.sum() % 2**32)
  weighted = int((words * odd % 2**32).sum() % 2**32)
  return plain << 32 | weighted


@pytest.mark.parametrize('x', [
    np.arange(-5, 7, dtype=np.int64) * (1 << 40),  # Host, 8 bytes.
    np.linspace(-1, 1, 30, dtype=np.float32).reshape(5, 6),
    np.array([True, False, True]),
    np.array(7, np.int32)], ids=['int64', 'float32', 'bool', 'scalar'])
def test_checksums_equal_a_numpy_reference(x):
  got, bad = checkpoint.checksums({'x': x})
  assert got == {'x': [_numpy_checksum(x), str(x.dtype)]} and not bad
  if x.dtype.itemsize <= 4:  # The same value on a device: the same sum.
    assert checkpoint.checksums({'x': jnp.asarray(x)})[0] == got


def test_a_sharded_leaf_is_summed_where_it_lies():
  """No all-gather: each device sums its shard (a leaf sharded on its
  last axis would otherwise be gathered whole on every device)."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ('b',))
  x = jax.device_put(
      jnp.arange(64 * 256, dtype=jnp.float32).reshape(64, 256),
      jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, 'b')))
  hlo = checkpoint._digest.lower([x]).compile().as_text()
  assert 'all-gather' not in hlo
  assert checkpoint.checksums({'x': x})[0] == {
      'x': [_numpy_checksum(np.asarray(x)), 'float32']}


# Orbax's writer threads report the failed write once more as they stop
# ('Event loop is closed'); rlx's commands send that to the log file.
@pytest.mark.filterwarnings(
    'ignore::pytest.PytestUnraisableExceptionWarning')
def test_a_failed_write_keeps_the_earlier_checkpoint(reference, monkeypatch):
  """D5: checkpoint 2's write fails in the OS (a file-size limit, as a full
  disk does): one error naming the folder and the cause, no temporary
  directory left, checkpoint 1 the resume point; the same command then
  finishes the run as if nothing happened."""
  tmp = reference[0]
  workdir = tmp / 'full_disk'
  save = checkpoint.Checkpointer.save
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

  def save_on_a_full_disk(self, step, *args, **kwargs):
    if step != 2:
      return save(self, step, *args, **kwargs)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
      return save(self, step, *args, **kwargs)
    finally:
      resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
      signal.signal(signal.SIGXFSZ, old)

  monkeypatch.setattr(checkpoint.Checkpointer, 'save', save_on_a_full_disk)
  folder = workdir / 'checkpoints'
  with pytest.raises(checkpoint.CheckpointError) as e:
    trainer.train(_cfg(tmp), str(workdir))
  assert str(e.value) == (f'cannot write checkpoint 2 to {folder}: File too '
                          'large; the newest checkpoint stays step 1')
  assert sorted(os.listdir(folder)) == ['1']
  monkeypatch.undo()
  trainer.train(_cfg(tmp), str(workdir))
  _assert_same_run(workdir, reference)


def test_a_second_process_is_refused_naming_the_holder(reference):
  """D6: while this process runs in a workdir, scripts/train.py on it
  exits at once with one line naming this process."""
  tmp = reference[0]
  workdir = tmp / 'locked'
  workdir.mkdir()
  with workdir_lib.lock(str(workdir)):
    proc = _start(tmp, workdir)
    _, err = proc.communicate(timeout=300)
  assert proc.returncode == 1
  assert err.strip().splitlines()[-1].startswith(
      f'error: {workdir} is in use by another run (host ')
  assert f'pid {os.getpid()} since' in err
  assert not (workdir / 'metrics.jsonl').exists()
  with workdir_lib.lock(str(workdir)):  # Released by its holder.
    pass


def test_a_run_past_its_num_steps_says_so(reference, capsys):
  """D7: rl.num_steps lowered below a finished run's step: nothing is
  trained, the run's step is reported, and it says why."""
  tmp = reference[0]
  workdir = str(tmp / 'reference')
  rows = _rows(workdir)
  result = trainer.train(_cfg(tmp, **{'rl.num_steps': '2'}), workdir)
  assert result['step'] == 4
  assert result['last_eval'] == [r for r in rows if 'eval/pass@1' in r][-1]
  assert 'is already at step 4, past rl.num_steps=2: nothing to train' in (
      capsys.readouterr().err)
  assert _rows(workdir) == rows
