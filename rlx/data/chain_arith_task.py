"""task.name=chain_arith: generated chain arithmetic (rlx/data/chain_arith.py),
rlx's own character tokenizer, scored by the last digit after '>'."""

import functools
import operator
import os

from rlx import errors
from rlx.config import ConfigError, TaskConfig
from rlx.data import chain_arith
from rlx.data import loader
from rlx.data import task as task_lib
from rlx.models.tokenizer import CharTokenizer
from rlx.rewards import chain_arith as chain_arith_reward


@task_lib.TASKS.register('chain_arith')
class ChainArith(task_lib.TaskKind):
  """Chains such as '7a+3b*2c-5?' with step-by-step demonstrations."""
  has_solutions = True

  @staticmethod
  def check(cfg) -> None:
    errors.require(not cfg.model.hf_dir, 'model.hf_dir',
                   f"task.name={cfg.task.name!r} uses its own character "
                   "tokenizer; a Hugging Face model needs "
                   "task.name='math_files'")

  @staticmethod
  def load(cfg: TaskConfig, tokenizer=None) -> task_lib.Task:
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
      raise ConfigError(f'task.prompt_len={cfg.prompt_len} is too short: '
                        f'{e}') from e
    return task_lib.Task(
        tokenizer=tok, train=train, test=test, train_prompts=train_p,
        train_prompt_mask=train_m, test_prompts=test_p,
        test_prompt_mask=test_m, reward_fn=chain_arith_reward.score,
        extract_fn=chain_arith_reward.extract_answer,
        same_answer_fn=operator.eq,  # The digit after '>'.
        prompt_ids_fn=functools.partial(tok.encode, add_bos=True),
        answer_key_fn=chain_arith_reward.extract_answer)
