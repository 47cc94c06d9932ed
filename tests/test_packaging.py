"""An install outside the clone has every module, recipe and command."""

import configparser
import importlib
import os

from rlx import recipes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_folder_of_rlx_is_a_package():
  """setup.py lists packages with find_packages, which needs __init__.py
  (a folder without one would be missing from a wheel)."""
  missing = [d for d, _, files in os.walk(os.path.join(ROOT, 'rlx'))
             if any(f.endswith('.py') for f in files) and
             '__init__.py' not in files and '__pycache__' not in d]
  assert not missing


def test_the_recipes_are_the_package_rlx_configs():
  import rlx.configs  # pylint: disable=g-import-not-at-top
  assert os.path.samefile(os.path.dirname(rlx.configs.__file__),
                          os.path.join(ROOT, 'configs'))
  names = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, 'configs'))
                 if f.endswith('.py') and f not in ('__init__.py',
                                                    'common.py'))
  assert sorted(recipes.packaged()) == names
  for name in names:  # Each imports as a module (test_recipes builds them).
    config = importlib.import_module(f'rlx.configs.{name}').get_config()
    assert config == recipes.load(name)


def test_console_entry_points_name_run_functions():
  setup = configparser.ConfigParser()
  setup.read(os.path.join(ROOT, 'setup.cfg'))
  scripts = setup['options.entry_points']['console_scripts'].split('\n')
  entries = dict(line.split(' = ') for line in scripts if line.strip())
  assert sorted(entries) == ['rlx-evaluate', 'rlx-export', 'rlx-sample',
                             'rlx-train']
  for target in entries.values():
    module, function = target.split(':')
    # Imported by file (the commands share flag names, so importing all
    # of them as modules in one process would define --workdir twice).
    path = os.path.join(ROOT, *module.split('.')) + '.py'
    assert f'def {function}(' in open(path).read(), target
