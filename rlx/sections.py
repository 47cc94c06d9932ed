"""Config sections that methods own, and their deprecated flat names.

A method module declares its knobs as a frozen dataclass next to its code
and registers it under a dotted path; the section above it (a `Section`)
then has it as an attribute, `build` reads it from the keys under that
path, and `to_dict` / `default_config_dict` list it with its defaults:

  @config.section('curriculum.dots', renamed={'dots_tau': 'tau'})
  @dataclasses.dataclass(frozen=True)
  class DotsConfig:
    tau: float = 0.1  # dots: P ~ exp(-|p_hat - 0.5| / tau).

  cfg.curriculum.dots.tau                 # --config.curriculum.dots.tau=0.2
  CurriculumConfig(dots=DotsConfig(tau=0.2))

`renamed` keeps the old flat names (curriculum.dots_tau) working for one
release: `upgrade` moves them to the new keys, with one line on stderr.
Imports nothing of rlx.
"""

import copy
import dataclasses
import sys
import typing
from typing import Any


# Sections that methods own: parent path -> {name: dataclass} (`section`).
_OWNED: dict[str, dict[str, type]] = {}
# Deprecated flat names: old dotted key -> its new dotted key.
RENAMED: dict[str, str] = {}
_WARNED: set[str] = set()  # Old keys already reported in this process.


def section(path: str, renamed: dict[str, str] | None = None):
  """Decorator: the frozen dataclass of a method's knobs becomes config
  section `path` (e.g. 'curriculum.dots': its fields are the keys
  curriculum.dots.*; 'mesh': a top-level section, owned by the root
  Config), owned by the section above it, which must be a `Section`.
  `renamed` maps deprecated flat names in the parent section
  to field names ({'dots_tau': 'tau'}: curriculum.dots_tau still works
  for one release, with a one-line deprecation message)."""
  parent, _, name = path.rpartition('.')

  def add(cls):
    owned = _OWNED.setdefault(parent, {})
    old = owned.get(name)
    if old is not None and old.__qualname__ != cls.__qualname__:
      raise ValueError(f'{path}: config section registered twice')
    owned[name] = cls
    cls.section_path = path
    for flat, field in (renamed or {}).items():
      RENAMED['.'.join(filter(None, [parent, flat]))] = f'{path}.{field}'
    return cls
  return add


def owned_sections(path: str) -> dict[str, type]:
  """{name: dataclass} of the sections registered under `path`."""
  return dict(sorted(_OWNED.get(path, {}).items()))


class _Owned:
  """The owned subsections of one section instance: those given, the
  registered defaults for the rest; compares and hashes by that."""

  def __init__(self, path: str, given: dict):
    self.path, self.given = path, dict(given)

  def get(self, name: str):
    if name in self.given:
      return self.given[name]
    cls = _OWNED.get(self.path, {}).get(name)
    if cls is None:
      raise AttributeError(name)
    return cls()

  def resolved(self) -> dict:
    return {name: self.get(name) for name in owned_sections(self.path)}

  def __eq__(self, other):
    return isinstance(other, _Owned) and self.resolved() == other.resolved()

  def __hash__(self):
    return hash(tuple(self.resolved().items()))


class _SectionType(type):
  """Lets a section's constructor take its owned subsections by name, as
  `CurriculumConfig(selector='dots', dots=DotsConfig(tau=0.2))` (or
  `dots={'tau': 0.2}`; and so `dataclasses.replace`)."""

  def __call__(cls, *args, _owned=None, **kwargs):
    given = dict(_owned.given if isinstance(_owned, _Owned) else ())
    for name, sub in owned_sections(cls.section_path).items():
      if name in kwargs:
        value = kwargs.pop(name)
        given[name] = sub(**value) if isinstance(value, dict) else value
    return super().__call__(*args, _owned=_Owned(cls.section_path, given),
                            **kwargs)


@dataclasses.dataclass(frozen=True)
class Section(metaclass=_SectionType):
  """A config section that methods may own subsections of (`section`):
  `cfg.curriculum.dots` is the DotsConfig given or built, else its
  defaults. Subclass as `class X(Section, path='a.b')` (or register it
  with `section`)."""
  section_path: typing.ClassVar[str] = ''
  _owned: Any = dataclasses.field(default=None, repr=False, kw_only=True)

  def __init_subclass__(cls, path: str | None = None, **kwargs):
    super().__init_subclass__(**kwargs)
    if path is not None:
      cls.section_path = path

  def __getattr__(self, name):
    if name.startswith('__') or name == '_owned':
      raise AttributeError(name)
    try:
      return self._owned.get(name)
    except AttributeError:
      raise AttributeError(f'{type(self).__name__} has no field or owned '
                           f'section {name!r}') from None


def _fields(cls) -> list:
  """The config fields of a section dataclass (its owned sections aside)."""
  return [f for f in dataclasses.fields(cls) if f.name != '_owned']


def _pop(tree: dict, key: str) -> tuple[bool, Any]:
  """(found, value) of dotted `key` in a nested dict, removing it."""
  *groups, name = key.split('.')
  for g in groups:
    tree = tree.get(g) if isinstance(tree, dict) else None
  if not isinstance(tree, dict) or name not in tree:
    return False, None
  return True, tree.pop(name)


def _put(tree: dict, key: str, value: Any) -> Any:
  """Sets dotted `key` in a nested dict (making groups); returns the value
  it replaces (`_MISSING` if none)."""
  *groups, name = key.split('.')
  for g in groups:
    tree = tree.setdefault(g, {})
  old = tree.get(name, _MISSING)
  tree[name] = value
  return old


_MISSING = object()


def _get(tree: dict, key: str) -> Any:
  for part in key.split('.'):
    tree = tree.get(part, _MISSING) if isinstance(tree, dict) else _MISSING
  return tree


def warn_renamed(old: str) -> None:
  """One line on stderr (once a process) naming deprecated key `old`'s
  new name."""
  if old not in _WARNED:
    _WARNED.add(old)
    print(f'config: {old} is deprecated; use {RENAMED[old]}',
          file=sys.stderr)


def upgrade(config: dict, defaults: dict, *,
            warn: bool = False) -> tuple[dict, list[str]]:
  """`config` (a nested dict) with deprecated flat keys moved to their
  new names, and the problems: an old key set beside its new one (set: not
  at its value in `defaults`, the nested dict of the defaults). `warn`:
  one line on stderr per old key (once a process), naming the new key."""
  config = copy.deepcopy(config)
  problems = []
  for old, new in RENAMED.items():
    found, value = _pop(config, old)
    if not found:
      continue
    if warn:
      warn_renamed(old)
    before = _put(config, new, value)
    if before is not _MISSING and before != _get(defaults, new):
      problems.append(f'{old}: is deprecated and {new} is set too; set '
                      f'only {new}')
  return config, problems
