"""Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training").

Group-mean baseline without std normalisation, and a sum over tokens divided
by a constant (max_new_tokens) instead of each response's length: removes
GRPO's length and difficulty biases.
"""

from rlx.configs import common


def get_config():
  config = common.base_config()
  config.objective.advantage = 'dr_grpo'
  config.objective.loss = 'ppo_clip'
  config.objective.aggregation = 'seq-mean-token-sum-norm'
  return config
