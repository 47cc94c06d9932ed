"""GPPO (Klear-Reasoner, Su et al. 2025): gradient-preserving clipping.

Forward value of clip-higher PPO (0.2 / 0.28), but clipped tokens keep a
bounded gradient instead of none.
"""

from rlx.configs import common


def get_config():
  config = common.base_config()
  config.objective.advantage = 'grpo'
  config.objective.loss = 'gppo'
  config.objective.clip_eps = 0.2
  config.objective.clip_eps_high = 0.28
  config.objective.aggregation = 'token-mean'
  return config
