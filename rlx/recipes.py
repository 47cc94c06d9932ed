"""Recipes and overrides: what a command line makes of a config.

  config = recipes.load('configs/grpo.py')   # or a packaged name: 'grpo'
  cfg = recipes.build(config, ['rl.num_steps=100', 'lora.targets=q,v'])

A recipe is a Python file with `get_config()` returning an
`ml_collections.ConfigDict` (configs/; installed as `rlx.configs`). An
override is a 'section.key=value' string whose value is read by the
field's type. `build` reports every problem of the overrides and of the
resulting config at once, one line each (rlx.config.build for the
config's own rules).
"""

import ast
import difflib
import importlib.util
import os
from typing import Any, Sequence

import ml_collections

from rlx import config as config_lib
from rlx.config import ConfigError


def build(config: ml_collections.ConfigDict | dict,
          overrides: Sequence[str] = ()) -> config_lib.Config:
  """`config` with `overrides` ('a.b=value' strings) applied to a copy,
  built and validated.

  Raises:
    ConfigError: every problem of the overrides and of the result, one
      line each.
  """
  config = ml_collections.ConfigDict(
      config.to_dict() if isinstance(config, ml_collections.ConfigDict)
      else config)
  problems = override_problems(config, overrides)
  try:
    cfg = config_lib.build(config)
  except ConfigError as e:
    problems += str(e).splitlines()
  if problems:
    raise ConfigError('\n'.join(dict.fromkeys(problems)))
  return cfg


def _parse(text: str, like: Any, key: str) -> Any:
  """`text` read as a value of `like`'s type: a Python literal, booleans
  also as true/false (as absl flags take them); a tuple also as
  comma-separated words (lora.targets=q,v)."""
  if isinstance(like, str):
    return text
  if isinstance(like, bool):
    text = {'true': 'True', 'false': 'False'}.get(text.lower(), text)
  if isinstance(like, float):  # Also nan and inf, for `build` to name.
    try:
      return float(text)
    except ValueError:
      pass
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if not isinstance(like, tuple):
      raise ConfigError(f'{key}: cannot read {text!r} as a '
                        f'{type(like).__name__}') from None
    value = tuple(p.strip() for p in text.split(',') if p.strip())
  if isinstance(like, tuple):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)
  if isinstance(like, float) and isinstance(value, int) and not isinstance(
      value, bool):
    return float(value)
  if type(value) is not type(like):
    raise ConfigError(f'{key}: cannot read {text!r} as a '
                      f'{type(like).__name__}')
  return value


def override(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """Sets dotted `key` (e.g. 'rollout.engine.num_slots') on a ConfigDict; a
  string value for a non-string field is parsed as a value of the field's type
  (`_parse`).

  A deprecated flat name (config_lib.RENAMED) sets its new key, with one
  line on stderr (unless the ConfigDict holds the old key itself: then
  `build` moves it).

  Raises:
    ConfigError: naming an unknown key (with a did-you-mean), a group
      given a value, or a value of the wrong type.
  """
  if key in config_lib.RENAMED and not _has(config, key):
    config_lib.warn_renamed(key)
    key = config_lib.RENAMED[key]
  *groups, name = key.split('.')
  node = config
  for g in groups:
    if not isinstance(node, ml_collections.ConfigDict) or g not in node:
      raise ConfigError(config_lib.unknown_key(key))
    node = node[g]
  if not isinstance(node, ml_collections.ConfigDict) or name not in node:
    raise ConfigError(config_lib.unknown_key(key))
  if isinstance(node[name], ml_collections.ConfigDict):
    raise ConfigError(f'{key}: is a group of fields, not a value; set one '
                      f'of {sorted(node[name].keys())}')
  if isinstance(value, str):
    value = _parse(value, node[name], key)
  node[name] = value


def _has(config: ml_collections.ConfigDict, key: str) -> bool:
  """Whether dotted `key` is in `config`."""
  node = config
  for part in key.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def override_problems(config: ml_collections.ConfigDict,
                      pairs: Sequence[str]) -> list[str]:
  """`override` for each 'key=value' string; returns the problems (also
  a deprecated flat name given beside its new one)."""
  problems = []
  keys = [pair.partition('=')[0].strip() for pair in pairs]
  for old in dict.fromkeys(keys):
    new = config_lib.RENAMED.get(old)
    if new in keys:
      problems.append(f'{old}: is deprecated and {new} is set too; set '
                      f'only {new}')
  for pair in pairs:
    key, sep, value = pair.partition('=')
    try:
      if not sep:
        raise ConfigError(f'override {pair!r} is not key=value')
      override(config, key.strip(), value)
    except ConfigError as e:
      problems.append(str(e))
  return problems


def apply_overrides(config: ml_collections.ConfigDict,
                    pairs: Sequence[str]) -> None:
  """`override` for each 'key=value' string (a bench script's --set).

  Raises:
    ConfigError: every pair's problem, one line each.
  """
  problems = override_problems(config, pairs)
  if problems:
    raise ConfigError('\n'.join(problems))


def load(recipe: str) -> ml_collections.ConfigDict:
  """The ConfigDict of a recipe: a file ('configs/grpo.py', optionally
  'configs/x.py:arg' for get_config(arg)) or the name of a packaged recipe
  ('grpo', 'dapo', ...: rlx.configs).

  Raises:
    ConfigError: naming the recipe when it is missing (with the nearest
      names), fails to import, or has no usable get_config().
  """
  path, _, arg = recipe.partition(':')
  if not os.path.isfile(path):
    known = packaged()
    name = os.path.splitext(os.path.basename(path))[0]
    if os.sep in path or path.endswith('.py') or name not in known:
      folder = os.path.dirname(path)
      near = ({f: os.path.join(folder, f) for f in os.listdir(folder)
               if f.endswith('.py')} if folder and os.path.isdir(folder)
              else {n: n for n in known})
      close = [near[c] for c in difflib.get_close_matches(
          os.path.basename(path) if folder else name, list(near), n=2)]
      hint = (f'; did you mean {" or ".join(close)}?' if close else
              f'; packaged recipes: {", ".join(sorted(known))}')
      raise ConfigError(f'--config: {path}: no such recipe file{hint}')
    path = known[name]
  spec = importlib.util.spec_from_file_location(
      f'rlx_recipe_{os.path.splitext(os.path.basename(path))[0]}', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    get_config = getattr(module, 'get_config', None)
    if get_config is None:
      raise ConfigError(f'--config: {path}: defines no get_config()')
    config = get_config(arg) if arg else get_config()
  except ConfigError:
    raise
  except Exception as e:  # A user's file: report any failure as one line.
    raise ConfigError(f'--config: {path}: {type(e).__name__}: {e}') from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'--config: {path}: get_config() returned '
                      f'{type(config).__name__}, not a ConfigDict')
  return config


def packaged() -> dict[str, str]:
  """{name: file} of the recipes in rlx.configs (the clone's configs/)."""
  from rlx import configs  # pylint: disable=g-import-not-at-top
  folder = os.path.dirname(configs.__file__)
  return {f[:-3]: os.path.join(folder, f) for f in sorted(os.listdir(folder))
          if f.endswith('.py') and f not in ('__init__.py', 'common.py')}
