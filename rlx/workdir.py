"""A run's directory: one writer at a time, and what an unfinished start
left behind.

The lock is an advisory `flock` on WORKDIR/.lock, held for the whole run
(by the primary process of a multi-host run); the kernel drops it when the
process ends, however it ends (a `kill -9` leaves no stale lock). The file
names its holder (host, pid, start time) so that a refused second process
can say who.
"""

import contextlib
import datetime
import fcntl
import os
import socket
from typing import Iterator

from absl import logging

LOCK_FILE = '.lock'


class WorkdirBusy(RuntimeError):
  """Another process is running in this workdir."""


class Lock:
  """A held WORKDIR/.lock (`acquire`); `release` lets it go."""

  def __init__(self, fd: int):
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # Releases the flock.
      self._fd = None


def acquire(workdir: str) -> Lock | None:
  """Takes WORKDIR/.lock and writes this process's name into it; None
  (with a warning in the log) where the filesystem has no flock.

  Raises:
    WorkdirBusy: naming the holder when another process holds it.
  """
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = os.pread(fd, 512, 0).decode(errors='replace').strip()
    os.close(fd)
    raise WorkdirBusy(
        f'{workdir} is in use by another run ({holder or "unknown"}); '
        'wait for it to end, or use another --workdir') from None
  except OSError as e:  # No locking on this filesystem (some NFS mounts).
    os.close(fd)
    logging.warning('%s: not locked (%s); make sure one run at a time '
                    'uses it', path, e)
    return None
  os.ftruncate(fd, 0)
  started = datetime.datetime.now().isoformat(timespec='seconds')
  os.pwrite(fd, f'host {socket.gethostname()} pid {os.getpid()} since '
            f'{started}\n'.encode(), 0)
  return Lock(fd)


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Holds WORKDIR/.lock for the duration (`acquire`)."""
  held = acquire(workdir)
  try:
    yield
  finally:
    if held is not None:
      held.release()


def set_aside_unfinished(workdir: str) -> int:
  """Moves the logs of a start that ended before its first checkpoint
  aside, so that the run starts over cleanly: metrics.jsonl rows are
  appended to metrics.jsonl.dropped, tb/ becomes the first free
  tb.dropped[.N]/, and the W&B run id becomes wandb_id.dropped (the new
  start gets a W&B run of its own). Returns the number of rows set aside
  (0: there were none).
  """
  path = os.path.join(workdir, 'metrics.jsonl')
  rows = 0
  if os.path.exists(path):
    with open(path) as f:
      text = f.read()
    rows = sum(1 for line in text.splitlines() if line.strip())
    with open(path + '.dropped', 'a') as f:
      f.write(text)
    os.remove(path)
  tb = os.path.join(workdir, 'tb')
  if os.path.isdir(tb):
    target, n = tb + '.dropped', 1
    while os.path.exists(target):
      n += 1
      target = f'{tb}.dropped.{n}'
    os.rename(tb, target)
  wandb_id = os.path.join(workdir, 'wandb_id')
  if os.path.exists(wandb_id):
    os.replace(wandb_id, wandb_id + '.dropped')
  return rows
