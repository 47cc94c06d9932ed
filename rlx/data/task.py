"""A task bundles a tokenizer, encoded train/test prompts and a verifier."""

import dataclasses
import os
from typing import Callable, Sequence

import numpy as np

from rlx.config import ConfigError, TaskConfig
from rlx.data import chain_arith
from rlx.data import loader
from rlx.models.tokenizer import CharTokenizer, Tokenizer
from rlx.rewards import chain_arith as chain_arith_reward

# (responses, answers) -> rewards [N] float32
RewardFn = Callable[[Sequence[str], Sequence[str]], np.ndarray]


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


def load_task(cfg: TaskConfig) -> Task:
  """Prepares (first use) and loads the task; checks prompts fit."""
  if cfg.name != 'chain_arith':
    raise ConfigError(f"task.name: unknown task {cfg.name!r}; known: "
                      "['chain_arith']")
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
              test_prompt_mask=test_m, reward_fn=chain_arith_reward.score)
