r"""The shape of the rlx package: modules, imports that point up the
layer order, import cycles, imports deferred into functions, and the
longest functions.

  python scripts/module_graph.py [--root=.] [--longest=8]

Run it in a checkout (or point --root at one). The layers, lowest first,
are the order a module may import in (a module imports its own layer or
lower ones); an import from a lower layer to a higher one is "upward".
"""

import ast
import os
import sys

from absl import app
from absl import flags

_ROOT = flags.DEFINE_string('root', '.', 'The checkout to measure.')
_LONGEST = flags.DEFINE_integer('longest', 8, 'Longest functions to list.')

# Lowest first; a module belongs to the first layer with a matching prefix.
LAYERS = (
    ('foundations', ('rlx.types', 'rlx.errors', 'rlx.registry',
                     'rlx.sections')),
    ('config', ('rlx.config',)),
    # Pure functions and building blocks (objectives: formulas only).
    ('blocks', ('rlx.backend', 'rlx.sharding', 'rlx.packing', 'rlx.lm_head',
                'rlx.models', 'rlx.rewards', 'rlx.sampling', 'rlx.replay',
                'rlx.data', 'rlx.checkpoint', 'rlx.workdir',
                'rlx.objectives')),
    ('stages', ('rlx.curriculum', 'rlx.learner',
                'rlx.actor', 'rlx.warmstart', 'rlx.evaluation',
                'rlx.logbook', 'rlx.policy')),
    ('rollouts', ('rlx.rollouts',)),
    ('runs', ('rlx.trainer', 'rlx.runs', 'rlx.export', 'rlx.recipes',
              'rlx.testing')),
    ('commands', ('rlx.cli', 'rlx')),
)


def layer(module: str) -> int:
  for i, (_, prefixes) in enumerate(LAYERS):
    if any(module == p or module.startswith(p + '.') for p in prefixes):
      return i
  return len(LAYERS)


def modules(root: str) -> dict[str, str]:
  out = {}
  for folder, _, files in os.walk(os.path.join(root, 'rlx')):
    for f in files:
      if f.endswith('.py'):
        path = os.path.join(folder, f)
        rel = os.path.relpath(path, root)[:-3].replace(os.sep, '.')
        out[rel.removesuffix('.__init__')] = path
  return out


def imports(module: str, path: str, known) -> list[tuple[str, bool]]:
  """(imported rlx module, whether the import is inside a function)."""
  tree = ast.parse(open(path).read())
  deferred = set()
  for fn in ast.walk(tree):
    if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
      deferred.update(id(n) for n in ast.walk(fn)
                      if isinstance(n, (ast.Import, ast.ImportFrom)))
  out = []
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.ImportFrom) and node.module:
      base = node.module
      if node.level:
        parts = module.split('.')
        if not path.endswith('__init__.py'):
          parts = parts[:-1]
        base = '.'.join(parts[:len(parts) - node.level + 1] + [node.module])
      # `from rlx import configs`: the installed recipes, not a module
      # of the tree.
      names = [next((c for c in (f'{base}.{a.name}', base) if c in known),
                    None) for a in node.names
               if not (base == 'rlx' and f'rlx.{a.name}' not in known)]
    elif isinstance(node, ast.Import):
      names = [a.name for a in node.names if a.name in known]
    out += [(n, id(node) in deferred) for n in names if n]
  return out


def cycles(edges: dict[str, set[str]]) -> list[str]:
  found, seen = set(), set()

  def visit(u, stack):
    seen.add(u)
    stack.append(u)
    for v in sorted(edges[u]):
      if v in stack:
        found.add(' -> '.join(stack[stack.index(v):] + [v]))
      elif v not in seen:
        visit(v, stack)
    stack.pop()

  for u in sorted(edges):
    if u not in seen:
      visit(u, [])
  return sorted(found)


def main(argv):
  del argv
  root = _ROOT.value
  mods = modules(root)
  edges = {m: set() for m in mods}
  upward, deferred = [], []
  for m, path in sorted(mods.items()):
    for target, inside in imports(m, path, mods):
      if target == m:
        continue
      edges[m].add(target)
      if inside:
        deferred.append(f'{m} -> {target}')
      if layer(target) > layer(m) and m != 'rlx':
        upward.append(f'{m} ({LAYERS[layer(m)][0]}) -> {target} '
                      f'({LAYERS[layer(target)][0]})')
  longest = []
  for m, path in mods.items():
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        longest.append((node.end_lineno - node.lineno + 1,
                        f'{m}.{node.name}'))
  longest.sort(reverse=True)
  cyc = cycles(edges)
  print(f'modules: {len(mods)}; imports between them: '
        f'{sum(len(v) for v in edges.values())}')
  print(f'upward imports: {len(sorted(set(upward)))}')
  for line in sorted(set(upward)):
    print('  ' + line)
  print(f'import cycles: {len(cyc)}')
  for line in cyc:
    print('  ' + line)
  print(f'imports deferred into functions: {len(deferred)}')
  for line in deferred:
    print('  ' + line)
  print('longest functions (lines):')
  for n, name in longest[:_LONGEST.value]:
    print(f'  {n:4d} {name}')
  over = [name for n, name in longest if n > 80 and
          not name.rsplit('.', 1)[-1].startswith('make_')]
  print(f'non-factory functions over 80 lines: {len(over)}')
  sys.exit(0)


if __name__ == '__main__':
  app.run(main)
