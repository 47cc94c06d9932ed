"""Math problems from JSONL / JSON / Parquet files."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlx.data import math_files

RECORDS = [
    {'problem': 'What is 1/2 + 1/4?', 'answer': '\\frac{3}{4}',
     'meta': {'solution': 'Add: \\boxed{\\frac{3}{4}}', 'level': 1}},
    {'problem': 'How many legs do 3 cats have?', 'answer': 12,
     'meta': {'solution': '3 * 4 = 12\n#### 12', 'level': 2}},
]


def _jsonl(path, records):
  path.write_text(''.join(json.dumps(r) + '\n\n' for r in records))
  return str(path)


def test_jsonl_with_default_fields(tmp_path):
  data = math_files.load_math_files(_jsonl(tmp_path / 'a.jsonl', RECORDS))
  assert data.problems == [r['problem'] for r in RECORDS]
  assert data.answers == ['\\frac{3}{4}', '12']
  assert data.sources == ['a.jsonl:1', 'a.jsonl:3']  # Blank lines skipped.
  assert len(data) == 2


def test_nested_fields_extractors_and_json_list(tmp_path):
  path = tmp_path / 'b.json'
  path.write_text(json.dumps(RECORDS[:1]))
  data = math_files.load_math_files(str(path), answer_field='meta.solution',
                                    extract='boxed')
  assert data.answers == ['\\frac{3}{4}'] and data.sources == ['b.json:1']
  gsm = math_files.load_math_files(
      _jsonl(tmp_path / 'c.jsonl', RECORDS[1:]), answer_field='meta.solution',
      extract='hashes')
  assert gsm.answers == ['12']


def test_parquet_globs_and_limit(tmp_path):
  table = pa.table({'question': ['q1', 'q2', 'q3'], 'final': ['1', '2', '3'],
                    'other': [0, 0, 0]})
  pq.write_table(table, tmp_path / 'part-0.parquet')
  pq.write_table(table.slice(0, 1), tmp_path / 'part-1.parquet')
  data = math_files.load_math_files(str(tmp_path / 'part-*.parquet'),
                                    problem_field='question',
                                    answer_field='final')
  # part-1's q1 repeats part-0's: read once, counted.
  assert data.problems == ['q1', 'q2', 'q3'] and data.repeats == 1
  assert data.sources[-1] == 'part-0.parquet:3'
  first = math_files.load_math_files(
      [str(tmp_path / 'part-1.parquet'), str(tmp_path / 'part-0.parquet')],
      problem_field='question', answer_field='final', limit=2)
  assert first.problems == ['q1', 'q2'] and first.answers == ['1', '2']
  assert first.sources == ['part-1.parquet:1', 'part-0.parquet:2']
  with pytest.raises(ValueError, match=r"part-0.parquet: no column 'answer'"):
    math_files.load_math_files(str(tmp_path / 'part-0.parquet'),
                               problem_field='question')


def test_errors_name_the_file_line_and_field(tmp_path):
  with pytest.raises(FileNotFoundError, match='missing.jsonl: no such file'):
    math_files.load_math_files(str(tmp_path / 'missing.jsonl'))
  good = _jsonl(tmp_path / 'd.jsonl', RECORDS)
  with pytest.raises(ValueError, match=r"d.jsonl:1: missing field 'question'"
                     r" \(has \['answer', 'meta', 'problem'\]\)"):
    math_files.load_math_files(good, problem_field='question')
  with pytest.raises(ValueError, match=r"d.jsonl:1: missing field 'meta.x' "
                     r"\(has \['level', 'solution'\]\)"):
    math_files.load_math_files(good, answer_field='meta.x')
  with pytest.raises(ValueError, match=r'd.jsonl:3: no \\boxed'):
    math_files.load_math_files(good, answer_field='meta.solution',
                               extract='boxed')
  with pytest.raises(ValueError, match=r"'meta' is a dict"):
    math_files.load_math_files(good, answer_field='meta')
  bad = tmp_path / 'e.jsonl'
  bad.write_text('{"problem": "p", "answer": "1"}\n{oops\n')
  with pytest.raises(ValueError, match='e.jsonl:2: invalid JSON'):
    math_files.load_math_files(str(bad))
  null = tmp_path / 'f.jsonl'
  null.write_text('{"problem": "p", "answer": null}\n')
  with pytest.raises(ValueError, match="f.jsonl:1: field 'answer' is null"):
    math_files.load_math_files(str(null))
  csv = tmp_path / 'g.csv'
  csv.write_text('problem,answer\n')
  with pytest.raises(ValueError, match='g.csv: unknown format'):
    math_files.load_math_files(str(csv))
  with pytest.raises(ValueError, match="extract='last'"):
    math_files.load_math_files(good, extract='last')


def test_distinct_problems_exclusion_and_files_named_twice(tmp_path):
  path = _jsonl(tmp_path / 'a.jsonl', RECORDS + RECORDS[:1])
  data = math_files.load_math_files([path, str(tmp_path / 'a*.jsonl')])
  assert data.problems == [r['problem'] for r in RECORDS]
  assert data.repeats == 1 and data.excluded == 0  # The file read once.
  rest = math_files.load_math_files(path, exclude={RECORDS[0]['problem']})
  assert rest.problems == [RECORDS[1]['problem']]
  assert rest.excluded == 2 and rest.repeats == 0


def test_chat_message_lists_and_field_types(tmp_path):
  chat = [{'prompt': [{'role': 'user', 'content': 'What is 2+2?'}],
           'reward_model': {'ground_truth': '4'}}]
  path = _jsonl(tmp_path / 'chat.jsonl', chat)
  data = math_files.load_math_files(
      path, problem_field='prompt.0.content',
      answer_field='reward_model.ground_truth')
  assert data.problems == ['What is 2+2?'] and data.answers == ['4']
  with pytest.raises(ValueError, match=r"chat.jsonl:1: field 'prompt' is a "
                     r"list, not text .*'prompt.0.content'"):
    math_files.load_math_files(path, problem_field='prompt',
                               answer_field='reward_model.ground_truth')
  with pytest.raises(ValueError, match=r"missing field 'prompt.1.content' "
                     r'\(has a list\)'):
    math_files.load_math_files(path, problem_field='prompt.1.content',
                               answer_field='reward_model.ground_truth')
  flag = _jsonl(tmp_path / 'flag.jsonl', [{'problem': 'p', 'answer': True}])
  with pytest.raises(ValueError, match="'answer' is a bool"):
    math_files.load_math_files(flag)
