"""docs/EXTENDING.md: its worked examples run as written.

Each section's first python block is a new method's file, its second the
test; they run in order in one namespace (later sections use what earlier
ones imported), with `tmp_dir` a fresh directory. What the examples
register (names, config sections, checks) is removed afterwards, so that
the other tests in this process see the built-in registries only.
"""

import copy
import os
import re

from rlx import registry
from rlx import sections

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), 'docs', 'EXTENDING.md')


def _sections() -> list[tuple[str, list[str]]]:
  text = open(DOC).read()
  out = []
  for part in re.split(r'^## ', text, flags=re.M)[1:]:
    title = part.splitlines()[0]
    blocks = re.findall(r'```python\n(.*?)```', part, flags=re.S)
    out.append((title, blocks))
  return out


def test_every_section_has_a_file_and_a_test():
  titles = [t for t, _ in _sections()]
  assert len(titles) == 4, titles  # Task, rollout mode, selector, objective.
  for title, blocks in _sections():
    assert len(blocks) == 2, title


def _snapshot():
  return ([(r, dict(r._items), list(r._checks)) for r in registry.ALL],  # pylint: disable=protected-access
          list(registry.ALL), list(registry.CHECKS),
          copy.deepcopy(sections._OWNED), dict(sections.RENAMED))  # pylint: disable=protected-access


def _restore(saved) -> None:
  items, everything, checks, owned, renamed = saved
  for reg, names, reg_checks in items:
    reg._items, reg._checks = names, reg_checks  # pylint: disable=protected-access
  registry.ALL[:] = everything
  registry.CHECKS[:] = checks
  sections._OWNED.clear()  # pylint: disable=protected-access
  sections._OWNED.update(owned)  # pylint: disable=protected-access
  sections.RENAMED.clear()
  sections.RENAMED.update(renamed)


def test_examples_run_in_order(tmp_path):
  namespace = {'tmp_dir': str(tmp_path)}
  saved = _snapshot()
  try:
    for title, blocks in _sections():
      for block in blocks:
        exec(compile(block, f'{DOC}: {title}', 'exec'), namespace)  # pylint: disable=exec-used
  finally:
    _restore(saved)
