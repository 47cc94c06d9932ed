"""A task bundles a tokenizer, encoded train/test prompts, a verifier and
its answer rules. Tasks are registered by name (`task.name`):

  @TASKS.register('chain_arith')
  class ChainArith(TaskKind):
    answer_end = False     # has an answer-end rule (TreePO stop_on_answer)
    has_solutions = True   # train prompts carry reference solutions
    reads_test_files = False  # its test split can come from test files
    @staticmethod
    def check(cfg): ...    # the config's problems for this task
    @staticmethod
    def load(cfg: TaskConfig, tokenizer) -> Task: ...

Each task lives in its own module (chain_arith_task.py, math_task.py),
imported by rlx/data/__init__.py.
"""

import abc
import dataclasses
from typing import Callable, Hashable, Sequence

import numpy as np

from rlx import registry
from rlx.config import TaskConfig
from rlx.data import loader
from rlx.models.tokenizer import Tokenizer

# (responses, answers) -> rewards [N] float32
RewardFn = Callable[[Sequence[str], Sequence[str]], np.ndarray]
# response -> its final answer as the verifier reads it (None: no answer).
ExtractFn = Callable[[str], str | None]
# (answer, answer) -> whether they are equivalent (majority voting).
SameAnswerFn = Callable[[str, str], bool]
# task text (a chain, a problem) -> prompt ids, as the task encodes its own.
PromptIdsFn = Callable[[str], list[int]]
# response text -> what makes two answers the same (tree rollouts count
# distinct answers, not distinct texts).
AnswerKeyFn = Callable[[str], Hashable]
# response text -> the end of its first complete answer, in characters
# (None: not yet complete): TreePO's stop_on_answer.
AnswerEndFn = Callable[[str], int | None]

TASKS = registry.Registry('task.name', selected='task.name')


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
  answer_key_fn: AnswerKeyFn | None = None  # None: answers are the texts.
  answer_end_fn: AnswerEndFn | None = None  # None: no answer-end rule.

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


class TaskKind(abc.ABC):
  """A registered task: its capabilities, config checks and loader."""
  answer_end = False  # Its Task has an answer_end_fn.
  has_solutions = False  # Its train prompts carry reference solutions.
  reads_test_files = False  # Its test split comes from task.test_files.

  @staticmethod
  def check(cfg) -> None:
    """Requires (rlx.errors.require) what the task needs of `cfg`."""

  @staticmethod
  @abc.abstractmethod
  def load(cfg: TaskConfig, tokenizer: Tokenizer | None) -> Task:
    """The task's prompts, verifier and rules (ConfigError on bad files)."""


def load_task(cfg: TaskConfig, tokenizer: Tokenizer | None = None) -> Task:
  """Prepares (first use) and loads the task `cfg.name`.

  Args:
    cfg: the task config.
    tokenizer: the model's tokenizer (`HFTokenizer`) for tasks encoded by
      it (math_files); None for tasks with their own (chain_arith).

  Returns:
    The task; `Task.notes` says what loading dropped (the trainer logs it).

  Raises:
    ConfigError: naming the key, or the file (and line) that is missing or
      invalid; raised before any prompt is encoded.
  """
  return TASKS.get(cfg.name).load(cfg, tokenizer)
