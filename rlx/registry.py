"""Registries: named implementations of one stage, registered by decorator
where they live (as Tunix registers advantages and losses).

  SELECTORS = registry.Registry('curriculum.selector')

  @SELECTORS.register('vade')
  class Vade: ...

  SELECTORS.get('vade')      # the class; an unknown name raises ConfigError
                             # naming the key and the known names.

Each registry may carry config checks (`check`): a function of the whole
Config that `require`s what its implementations need. A registry made with
`selected='rollout.mode'` (the dotted config key that names the entry in
use) also reports an unknown name there, and runs the chosen entry's own
`check(cfg)` when it has one. `config.build` runs
the checks of every registry (rlx/__init__ imports the built-in ones; a
user's own method registers itself when its module is imported, before
the config is built).
"""

from typing import Any, Callable

from rlx import errors

# Every registry made, in creation order (config.build runs their checks).
ALL: list['Registry'] = []
# Config checks `fn(cfg)` of the modules that own a section or a registry
# (`config_check`; each registry adds its own); config.build runs them all.
CHECKS: list[Callable] = []


def config_check(fn):
  """Decorator: `fn(cfg)` (calling errors.require) runs in config.build;
  for modules that own a config section (e.g. LoRA's lora.*)."""
  CHECKS.append(fn)
  return fn


class Registry:
  """Name -> implementation for one config key (e.g. 'rollout.mode')."""

  def __init__(self, key: str, *, selected: str | None = None):
    self.key = key
    self.selected = selected
    self._items: dict[str, Any] = {}
    self._checks: list[Callable] = []
    ALL.append(self)
    config_check(self.run_checks)

  def register(self, name: str) -> Callable:
    """Decorator: registers the decorated object under `name`."""
    def add(obj):
      if name in self._items and self._items[name] is not obj:
        raise ValueError(f'{self.key}: {name!r} is registered twice')
      self._items[name] = obj
      return obj
    return add

  def get(self, name: str) -> Any:
    """The implementation of `name`.

    Raises:
      ConfigError: 'key: 'name' is not one of [...]'.
    """
    if name not in self._items:
      raise errors.ConfigError(
          f'{self.key}: {name!r} is not one of {self.names()}')
    return self._items[name]

  def names(self) -> list[str]:
    return list(self._items)

  def __contains__(self, name: str) -> bool:
    return name in self._items

  def __iter__(self):
    return iter(list(self._items))

  def check(self, fn: Callable) -> Callable:
    """Decorator: a config check (`fn(cfg)`, calling errors.require) that
    `config.build` runs."""
    self._checks.append(fn)
    return fn

  def known(self, name: str) -> None:
    """Requires `name` registered (collected like any requirement)."""
    errors.one_of(name, self.names(), self.key)

  def run_checks(self, cfg) -> None:
    """The registry's checks of `cfg` (and the selected entry's)."""
    if self.selected is not None:
      name = cfg
      for part in self.selected.split('.'):
        name = getattr(name, part)
      errors.one_of(name, self.names(), self.selected)
      check = getattr(self._items.get(name), 'check', None)
      if check is not None:
        check(cfg)
    for fn in self._checks:
      fn(cfg)
