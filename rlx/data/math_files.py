"""Math problems from local JSONL or Parquet files (MATH, GSM8K, DAPO...).

Each record gives a problem and its gold answer; the field names are
arguments (dotted for nested JSON: 'reward_model.ground_truth'; a number
indexes a list: 'prompt.0.content' for a chat-message list). When the
answer field holds a whole worked solution, `extract` pulls the final
answer out of it: 'boxed' takes the last \\boxed{...} (MATH), 'hashes' the
text after the last '####' (GSM8K). Files are read whole; the result is
plain Python lists, in file order. A problem whose text was already read
(many datasets repeat each prompt) or is in `exclude` (the test split, when
reading train) is skipped and counted, so the splits hold distinct problems
and never share one.
"""

from collections.abc import Collection, Sequence
import dataclasses
import glob
import json
import os
from typing import Any, Optional, Union

from rlx.rewards import math_answer

EXTRACTORS = ('none', 'boxed', 'hashes')
_JSON_SUFFIXES = ('.jsonl', '.json', '.ndjson')
_PARQUET_SUFFIXES = ('.parquet', '.pq')


@dataclasses.dataclass(frozen=True)
class MathData:
  """Problems and gold answers, [N] each, in file order.

  Attributes:
    problems: problem statements.
    answers: gold final answers (strings, as `math_answer` reads them).
    sources: '<file name>:<n>' of each problem: the line of a JSONL file,
      the record of a JSON list or the row of a Parquet file (from 1).
  """
  problems: list[str]
  answers: list[str]
  sources: list[str]
  repeats: int = 0  # Records skipped: their problem was already read.
  excluded: int = 0  # Records skipped: their problem is in `exclude`.

  def __len__(self) -> int:
    return len(self.problems)


def _expand(paths: Union[str, Sequence[str]]) -> list[str]:
  """Files named by paths / glob patterns, in the order given (sorted per
  pattern)."""
  out, resolved = [], set()
  for pattern in [paths] if isinstance(paths, str) else paths:
    matches = sorted(glob.glob(pattern))
    if not matches:
      raise FileNotFoundError(f'{pattern}: no such file (or no file matches '
                              'the pattern)')
    for match in matches:  # A file named twice (path, pattern): read once.
      if os.path.realpath(match) not in resolved:
        resolved.add(os.path.realpath(match))
        out.append(match)
  return out


def _json_records(path: str):
  """Yields (record number, dict) from JSON Lines or a JSON list."""
  with open(path) as f:
    text = f.read()
  if text.lstrip().startswith('['):
    try:
      yield from enumerate(json.loads(text), 1)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: invalid JSON ({e})') from e
    return
  for line_no, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      yield line_no, json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}:{line_no}: invalid JSON ({e})') from e


def _parquet_records(path: str, columns: list[str]):
  """Yields (row number, dict) with the top-level `columns` of a Parquet
  file."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  names = pq.read_schema(path).names
  missing = [c for c in columns if c not in names]
  if missing:
    raise ValueError(f'{path}: no column {missing[0]!r}; columns: {names}')
  table = pq.read_table(path, columns=columns)
  yield from enumerate(table.to_pylist(), 1)


def _field(record: Any, field: str, where: str) -> Any:
  value = record
  for part in field.split('.'):
    if isinstance(value, dict) and part in value:
      value = value[part]
    elif (not isinstance(value, (str, dict)) and hasattr(value, '__getitem__')
          and part.isdigit() and int(part) < len(value)):
      value = value[int(part)]  # A list (or array) entry.
    else:
      keys = (sorted(value) if isinstance(value, dict) else
              f'a {type(value).__name__}')
      raise ValueError(f'{where}: missing field {field!r} (has {keys})')
  if value is None:
    raise ValueError(f'{where}: field {field!r} is null')
  return value


def _extract(answer: str, extract: str, where: str) -> str:
  if extract == 'boxed':
    boxed = math_answer.last_boxed(answer)
    if boxed is None:
      raise ValueError(f'{where}: no \\boxed{{}} in the answer field')
    return boxed
  if extract == 'hashes':
    _, sep, tail = answer.rpartition('####')
    if not sep:
      raise ValueError(f"{where}: no '####' in the answer field")
    return tail.strip()
  return answer.strip()


def load_math_files(paths: Union[str, Sequence[str]], *,
                    problem_field: str = 'problem',
                    answer_field: str = 'answer', extract: str = 'none',
                    limit: Optional[int] = None,
                    exclude: Collection[str] = ()) -> MathData:
  """Reads math problems from .jsonl/.json/.parquet files.

  Args:
    paths: a file, a glob pattern, or a list of them.
    problem_field: field holding the problem text (dots for nesting).
    answer_field: field holding the gold answer (or a solution, see
      `extract`); numbers are turned into strings.
    extract: 'none', 'boxed' (last \\boxed{} of the field) or 'hashes'
      (text after the last '####').
    limit: stop after this many (distinct) problems.
    exclude: problem texts to skip (another split's).

  Returns:
    The distinct problems, answers and their sources, in file order, and
    how many records were skipped as repeats or excluded.

  Raises:
    FileNotFoundError: naming a path or pattern with no file.
    ValueError: naming the file (and line or row) of an unknown format,
      invalid JSON, a missing/null field, or an answer without the
      requested marker.
  """
  if extract not in EXTRACTORS:
    raise ValueError(f'extract={extract!r} is not one of {EXTRACTORS}')
  problems, answers, sources = [], [], []
  seen, exclude, skipped = set(), frozenset(exclude), [0, 0]
  done = lambda: MathData(problems, answers, sources, *skipped)
  for path in _expand(paths):
    if path.endswith(_JSON_SUFFIXES):
      records = _json_records(path)
    elif path.endswith(_PARQUET_SUFFIXES):
      records = _parquet_records(path, sorted(
          {f.split('.')[0] for f in (problem_field, answer_field)}))
    else:
      raise ValueError(f'{path}: unknown format (expected '
                       f'{_JSON_SUFFIXES + _PARQUET_SUFFIXES})')
    for number, record in records:
      if limit is not None and len(problems) >= limit:
        return done()
      where = f'{path}:{number}'
      problem = _field(record, problem_field, where)
      answer = _field(record, answer_field, where)
      if not isinstance(problem, str):
        raise ValueError(
            f'{where}: field {problem_field!r} is a {type(problem).__name__}, '
            "not text (for a chat-message list name the text's field, e.g. "
            f"'{problem_field}.0.content')")
      if isinstance(answer, bool) or not isinstance(answer,
                                                    (str, int, float)):
        raise ValueError(f'{where}: field {answer_field!r} is a '
                         f'{type(answer).__name__}, not text or a number')
      if problem in seen or problem in exclude:
        skipped[problem in exclude] += 1
        continue
      seen.add(problem)
      problems.append(problem)
      answers.append(_extract(str(answer), extract, where))
      sources.append(os.path.basename(path) + f':{number}')
  return done()
