"""DAPO (Yu et al. 2025): clip-higher, token-mean, no KL, overlong shaping.

eps_low = 0.2, eps_high = 0.28; every token weighs the same across the
batch; responses longer than max_new_tokens - overlong_buffer are penalised
linearly (chain_arith's longest correct answer is 76 tokens and
max_new_tokens is 80, so a buffer of 4 only touches runaway responses).
Dynamic sampling (dropping all-equal groups) lives with the curriculum.
"""

from rlx.configs import common


def get_config():
  config = common.base_config()
  config.objective.advantage = 'grpo'
  config.objective.loss = 'dapo'
  config.objective.clip_eps = 0.2
  config.objective.clip_eps_high = 0.28
  config.objective.aggregation = 'token-mean'
  config.objective.kl_beta = 0.0
  config.objective.overlong_buffer = 4
  return config
