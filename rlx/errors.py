"""Errors every module may raise, and the problem collector of config
checks. Imports nothing of rlx, so that anything can import it.

Config checks call `require(ok, key, message)`. Inside `collecting()` a
failed requirement is recorded and the check goes on, so that one pass
names every problem (one line each); outside it raises at once.
"""

import contextlib
import contextvars


class ConfigError(ValueError):
  """A config key is unknown, mistyped or contradicts another."""


# The failed requirements of the checks in progress (None: raise at once).
_problems = contextvars.ContextVar('rlx_config_problems', default=None)


def require(ok: bool, key: str, message: str) -> None:
  """Records (or raises, outside `collecting`) 'key: message' unless ok."""
  if ok:
    return
  problems = _problems.get()
  if problems is None:
    raise ConfigError(f'{key}: {message}')
  problems.append(f'{key}: {message}')


def one_of(value, known, key: str) -> None:
  """Requires `value` to be one of `known`, naming them."""
  require(value in known, key, f'{value!r} is not one of {list(known)}')


@contextlib.contextmanager
def collecting():
  """Collects the failed requirements of the block into the yielded list."""
  problems = []
  token = _problems.set(problems)
  try:
    yield problems
  finally:
    _problems.reset(token)
