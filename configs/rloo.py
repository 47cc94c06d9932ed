"""RLOO (Ahmadian et al. 2024): leave-one-out baseline.

A_i = r_i - mean of the other responses' rewards in the group.
"""

from rlx.configs import common


def get_config():
  config = common.base_config()
  config.objective.advantage = 'rloo'
  config.objective.loss = 'ppo_clip'
  return config
