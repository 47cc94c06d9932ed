"""A task bundles a tokenizer, encoded train/test prompts and a verifier."""

import dataclasses
import functools
import operator
import os
from typing import Callable, Sequence

import numpy as np

from rlx.config import ConfigError, TaskConfig
from rlx.data import chain_arith
from rlx.data import loader
from rlx.data import math_files
from rlx.models.tokenizer import CharTokenizer, Tokenizer
from rlx.rewards import chain_arith as chain_arith_reward
from rlx.rewards import math_answer

# (responses, answers) -> rewards [N] float32
RewardFn = Callable[[Sequence[str], Sequence[str]], np.ndarray]
# response -> its final answer as the verifier reads it (None: no answer).
ExtractFn = Callable[[str], str | None]
# (answer, answer) -> whether they are equivalent (majority voting).
SameAnswerFn = Callable[[str, str], bool]
# task text (a chain, a problem) -> prompt ids, as the task encodes its own.
PromptIdsFn = Callable[[str], list[int]]


@dataclasses.dataclass(frozen=True)
class Task:
  tokenizer: Tokenizer
  train: loader.TaskData
  test: loader.TaskData
  train_prompts: np.ndarray  # [N, P] int32, left-padded.
  train_prompt_mask: np.ndarray  # [N, P] bool.
  test_prompts: np.ndarray  # [M, P] int32.
  test_prompt_mask: np.ndarray  # [M, P] bool.
  reward_fn: RewardFn
  extract_fn: ExtractFn  # The final answer reward_fn judges.
  same_answer_fn: SameAnswerFn  # Groups equivalent answers for maj@k.
  prompt_ids_fn: PromptIdsFn  # Encodes new prompts as the task's own.
  notes: tuple[str, ...] = ()  # What loading changed (dropped prompts),
  # for the run log.

  def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Encodes task texts (chains such as '7a+3b*2c-5?', or problems) as
    the task encodes its prompts, left-padded to the test prompts' width
    or to the longest, if longer.

    Returns:
      (tokens [B, P] int32, mask [B, P] bool).

    Raises:
      ValueError: a text the tokenizer cannot encode (chain_arith: a
        character outside its alphabet).
    """
    rows = [self.prompt_ids_fn(t) for t in texts]
    width = max([self.test_prompts.shape[1]] + [len(r) for r in rows])
    return loader.pad_rows(rows, length=width,
                           pad_id=self.tokenizer.pad_id, left=True)


def load_task(cfg: TaskConfig, tokenizer: Tokenizer | None = None) -> Task:
  """Prepares (first use) and loads the task; checks prompts fit.

  Args:
    cfg: the task config.
    tokenizer: math_files: the model's `HFTokenizer` (prompts go through
      its chat template); chain_arith: None (it has its own tokenizer).

  Returns:
    The task. math_files prompts longer than `cfg.prompt_len` are dropped;
    `Task.notes` says how many (the trainer logs it).

  Raises:
    ConfigError: naming the key, or the file (and line) that is missing or
      invalid; raised before any prompt is encoded.
  """
  if cfg.name == 'math_files':
    return _load_math_files(cfg, tokenizer)
  if cfg.name != 'chain_arith':
    raise ConfigError(f"task.name: unknown task {cfg.name!r}; known: "
                      "['chain_arith', 'math_files']")
  if tokenizer is not None:
    raise ConfigError('task.name: chain_arith uses its own character '
                      'tokenizer; a model tokenizer needs math_files')
  tok = CharTokenizer(chain_arith.ALPHABET)
  kwargs = dict(data_dir=os.path.expanduser(cfg.data_dir),
                num_train=cfg.num_train, num_test=cfg.num_test,
                max_steps=cfg.max_steps, zipf_s=cfg.zipf_s, seed=cfg.seed)
  train = loader.load_chain_arith('train', **kwargs)
  test = loader.load_chain_arith('test', **kwargs)
  try:
    train_p, train_m = loader.encode_prompts(tok, train.prompts,
                                             max_len=cfg.prompt_len)
    test_p, test_m = loader.encode_prompts(tok, test.prompts,
                                           max_len=cfg.prompt_len)
  except ValueError as e:
    raise ConfigError(f'task.prompt_len={cfg.prompt_len} is too short: {e}'
                      ) from e
  return Task(tokenizer=tok, train=train, test=test, train_prompts=train_p,
              train_prompt_mask=train_m, test_prompts=test_p,
              test_prompt_mask=test_m, reward_fn=chain_arith_reward.score,
              extract_fn=chain_arith_reward.extract_answer,
              same_answer_fn=operator.eq,  # The digit after '>'.
              prompt_ids_fn=functools.partial(tok.encode, add_bos=True))


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


def _load_math_files(cfg: TaskConfig, tok: Tokenizer | None) -> Task:
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
  return Task(tokenizer=tok, train=train_data, test=test_data,
              train_prompts=train_p, train_prompt_mask=train_m,
              test_prompts=test_p, test_prompt_mask=test_m,
              reward_fn=math_answer.score,
              extract_fn=math_answer.extract_answer,
              same_answer_fn=math_answer.same_answer,
              prompt_ids_fn=functools.partial(_math_prompt_ids, tok, cfg),
              notes=tuple(notes + train_notes + test_notes))
