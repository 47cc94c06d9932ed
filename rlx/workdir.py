"""A run's directory: one writer at a time, and what an unfinished start
left behind.

The lock is an advisory `flock` on WORKDIR/.lock, held for the whole run
by the primary process; the kernel drops it when the process ends, however
it ends (a `kill -9` leaves no stale lock). The file names its holder
(host, pid, start time) so that a refused second process can say who.
"""

import contextlib
import datetime
import fcntl
import os
import shutil
import socket
from typing import Iterator

LOCK_FILE = '.lock'


class WorkdirBusy(RuntimeError):
  """Another process is running in this workdir."""


@contextlib.contextmanager
def lock(workdir: str, *, primary: bool = True) -> Iterator[None]:
  """Holds WORKDIR/.lock for the duration (on the primary process only;
  the others share the primary's run).

  Raises:
    WorkdirBusy: naming the holder when another process holds it.
  """
  if not primary:
    yield
    return
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 512, 0).decode(errors='replace').strip()
      raise WorkdirBusy(
          f'{workdir} is in use by another run ({holder or "unknown"}); '
          'wait for it to end, or use another --workdir') from None
    os.ftruncate(fd, 0)
    started = datetime.datetime.now().isoformat(timespec='seconds')
    os.pwrite(fd, f'host {socket.gethostname()} pid {os.getpid()} since '
              f'{started}\n'.encode(), 0)
    yield
  finally:
    os.close(fd)  # Releases the lock.


def set_aside_unfinished(workdir: str) -> int:
  """Moves the logs of a start that ended before its first checkpoint
  (metrics.jsonl rows, TensorBoard events) aside, so that the run starts
  over cleanly: rows are appended to metrics.jsonl.dropped, tb/ becomes
  tb.dropped/. Returns the number of rows set aside (0: nothing there).
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
    shutil.rmtree(tb + '.dropped', ignore_errors=True)
    os.rename(tb, tb + '.dropped')
  return rows
