"""task.name=math_files: problems and answers from local files (jsonl,
json, parquet), encoded by the model's tokenizer (its chat template),
scored by `rewards.math_answer`."""

import functools
import os

import numpy as np

from rlx import errors
from rlx.config import ConfigError, TaskConfig
from rlx.data import loader
from rlx.data import math_files
from rlx.data import task as task_lib
from rlx.models.tokenizer import Tokenizer
from rlx.rewards import math_answer

ANSWER_EXTRACTS = ('none', 'boxed', 'hashes')  # rlx.data.math_files.


@task_lib.TASKS.register('math_files')
class MathFiles(task_lib.TaskKind):
  """Final answers only (no solutions, hence no warm start); the verifier
  reads the last \\boxed{} (or the answer's own form)."""
  answer_end = True  # A path's first complete \\boxed{...}.
  reads_test_files = True

  @staticmethod
  def check(cfg) -> None:
    task, model, ws = cfg.task, cfg.model, cfg.warmstart
    require = errors.require
    require(bool(model.hf_dir), 'model.hf_dir',
            "task.name='math_files' needs a Hugging Face model directory "
            '(its tokenizer encodes the problems): set --config.model.hf_dir')
    require(bool(task.train_files.strip()), 'task.train_files',
            "task.name='math_files' needs training files (comma-separated "
            'paths or globs)')
    require(task.answer_extract in ANSWER_EXTRACTS, 'task.answer_extract',
            f'{task.answer_extract!r} is not one of {list(ANSWER_EXTRACTS)}')
    require('{problem}' in task.user_template, 'task.user_template',
            f'{task.user_template!r} has no {{problem}} placeholder')
    # Warm start imitates chain_arith demonstrations; math files have none,
    # and a silently skipped warm start would mislead.
    require(ws.num_steps == 0, 'warmstart.num_steps',
            f"is {ws.num_steps}; the warm start imitates chain_arith "
            "demonstrations and task.name='math_files' has none: set "
            '--config.warmstart.num_steps=0')

  @staticmethod
  def load(cfg: TaskConfig, tokenizer) -> task_lib.Task:
    return _load_math_files(cfg, tokenizer)


def _read_math(cfg: TaskConfig, key: str, limit: int, exclude=()
               ) -> tuple[math_files.MathData, list[str]]:
  """Reads `cfg.<key>` (comma-separated paths/globs): distinct problems,
  none of them in `exclude`; errors as ConfigError naming the key and the
  file. Returns the data and notes on what was skipped."""
  paths = [p.strip() for p in getattr(cfg, key).split(',') if p.strip()]
  try:
    data = math_files.load_math_files(
        [os.path.expanduser(p) for p in paths],
        problem_field=cfg.problem_field, answer_field=cfg.answer_field,
        extract=cfg.answer_extract, limit=limit, exclude=exclude)
  except (OSError, ValueError) as e:
    raise ConfigError(f'task.{key}: {e}') from e
  if not len(data):
    raise ConfigError(f'task.{key}: no problem was read from {paths}'
                      + (f' ({data.excluded} are test problems)'
                         if data.excluded else ''))
  notes = []
  if data.repeats:
    notes.append(f'task.{key}: skipped {data.repeats} records repeating a '
                 'problem already read')
  if data.excluded:
    notes.append(f'task.{key}: skipped {data.excluded} records whose '
                 'problem is in the test split')
  return data, notes


def _math_prompt_ids(tok, cfg: TaskConfig, problem: str) -> list[int]:
  """A problem's prompt: the user template, through the chat template (with
  the system prompt) or as plain text."""
  user = cfg.user_template.replace('{problem}', problem)
  if cfg.chat_template:
    messages = ([{'role': 'system', 'content': cfg.system_prompt}]
                if cfg.system_prompt else [])
    return tok.encode_chat(messages + [{'role': 'user', 'content': user}])
  return tok.encode(user, add_bos=getattr(tok, 'prepends_bos', True))


def _encode_math(tok, cfg: TaskConfig, data: math_files.MathData,
                 split: str) -> tuple[loader.TaskData, np.ndarray,
                                      np.ndarray, list[str]]:
  """Encodes problems as left-padded prompts, dropping those too long.

  Returns:
    (kept problems and answers, prompts [N, P], mask [N, P], notes).
  """
  rows, kept = [], []
  for i, problem in enumerate(data.problems):
    ids = _math_prompt_ids(tok, cfg, problem)
    if len(ids) <= cfg.prompt_len:
      rows.append(ids)
      kept.append(i)
  notes = []
  dropped = len(data) - len(kept)
  if dropped:
    kept_set = set(kept)
    first = next(s for i, s in enumerate(data.sources) if i not in kept_set)
    notes.append(f'task: dropped {dropped} of {len(data)} {split} problems '
                 f'longer than task.prompt_len={cfg.prompt_len} tokens '
                 f'(first: {first})')
  if not kept:
    raise ConfigError(f'task.prompt_len={cfg.prompt_len}: every {split} '
                      f'problem is longer (first: {data.sources[0]})')
  tokens = np.full((len(rows), cfg.prompt_len), tok.pad_id, np.int32)
  mask = np.zeros((len(rows), cfg.prompt_len), bool)
  for i, row in enumerate(rows):  # Left padding: prompts end together.
    tokens[i, cfg.prompt_len - len(row):] = row
    mask[i, cfg.prompt_len - len(row):] = True
  problems = [data.problems[i] for i in kept]
  answers = [data.answers[i] for i in kept]
  # No demonstrations: math_files has no warm start (config.py).
  out = loader.TaskData(prompts=problems, solutions=[''] * len(kept),
                        answers=answers,
                        num_steps=np.zeros(len(kept), np.int32))
  return out, tokens, mask, notes


def _load_math_files(cfg: TaskConfig, tok: Tokenizer | None
                     ) -> task_lib.Task:
  """Problems from local files, scored by `math_answer.score`."""
  if tok is None:
    raise ConfigError("task.name='math_files' needs the model's tokenizer "
                      '(model.hf_dir)')
  if cfg.test_files.strip():  # Test first: train skips its problems.
    test, notes = _read_math(cfg, 'test_files', cfg.num_test)
    train, train_notes = _read_math(cfg, 'train_files', cfg.num_train,
                                    exclude=set(test.problems))
    notes += train_notes
  else:  # Hold out the last num_test (distinct) problems read.
    both, notes = _read_math(cfg, 'train_files',
                             cfg.num_train + cfg.num_test)
    if len(both) < 2:
      raise ConfigError(f'task.train_files: {len(both)} problem read; '
                        'holding out a test split needs at least 2 (or '
                        'set task.test_files)')
    held = min(cfg.num_test, len(both) // 2)
    if held < cfg.num_test:
      notes.append(f'task: held out {held} test problems of the '
                   f'{len(both)} read (task.num_test={cfg.num_test})')
    n = len(both) - held
    part = lambda s: math_files.MathData(both.problems[s], both.answers[s],
                                         both.sources[s])
    train, test = part(slice(0, n)), part(slice(n, None))
  train_data, train_p, train_m, train_notes = _encode_math(tok, cfg, train,
                                                           'train')
  test_data, test_p, test_m, test_notes = _encode_math(tok, cfg, test,
                                                       'test')
  return task_lib.Task(tokenizer=tok, train=train_data, test=test_data,
              train_prompts=train_p, train_prompt_mask=train_m,
              test_prompts=test_p, test_prompt_mask=test_m,
              reward_fn=math_answer.score,
              extract_fn=math_answer.extract_answer,
              same_answer_fn=math_answer.same_answer,
              prompt_ids_fn=functools.partial(_math_prompt_ids, tok, cfg),
              notes=tuple(notes + train_notes + test_notes),
              answer_end_fn=math_answer.first_boxed_end)
