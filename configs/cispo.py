"""CISPO (MiniMax-M1, 2025): clipped importance-sampling weights.

l_t = -sg(clip(rho_t, 0, 1 + eps_high)) * A * log pi(y_t): the weight is
clipped, the token's gradient never dropped.
"""

from rlx.configs import common


def get_config():
  config = common.base_config()
  config.objective.advantage = 'grpo'
  config.objective.loss = 'cispo'
  config.objective.clip_eps_high = 0.28
  config.objective.aggregation = 'token-mean'
  return config
