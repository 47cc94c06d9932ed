"""GRPO on the harder mix: most prompts far too easy or far too hard.

Chains of 1..16 steps in equal shares, but the warm start imitates clean
demonstrations (2% slips) of chains with at most 8 steps only. Measured on
the held-out set with 8 samples per prompt (docs/BENCHMARKS.md): chains of
1-8 steps pass at 0.89-0.97 (about 60% of their groups all correct), chains
of 9-16 steps at 0.07-0.18 (about 65% all wrong); 63% of all groups have
zero variance, the realistic case for curricula (rlx/curriculum/).
"""

from configs import common


def get_config():
  config = common.base_config()
  config.task.max_steps = 16
  config.task.zipf_s = 0.0  # Every chain length equally often.
  config.task.prompt_len = 52  # 3 * 16 + 3 characters + bos.
  config.sampling.max_new_tokens = 100  # 6 * 16 + 4.
  config.warmstart.demo_error_rate = 0.02
  config.warmstart.max_steps = 8
  return config
