"""docs/EXTENDING.md: its worked examples run as written.

Each section's first python block is a new method's file, its second the
test; they run in order in one namespace (later sections may use what
earlier ones imported), with `tmp_dir` a fresh directory.
"""

import os
import re

import pytest

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
  sections = _sections()
  assert len(sections) >= 2
  for title, blocks in sections:
    assert len(blocks) == 2, title


@pytest.fixture(scope='module')
def namespace(tmp_path_factory):
  return {'tmp_dir': str(tmp_path_factory.mktemp('extending'))}


@pytest.mark.parametrize('title', [t for t, _ in _sections()])
def test_example_runs(title, namespace):
  blocks = dict(_sections())[title]
  for block in blocks:
    exec(compile(block, f'{DOC}: {title}', 'exec'), namespace)  # pylint: disable=exec-used
