"""GSPO (Zheng et al. 2025): sequence-level importance ratio and clipping.

s_i = exp(mean_t log(pi / pi_old)), clipped to [1 - 3e-4, 1 + 4e-4];
aggregated per sequence.
"""

from rlx.configs import common


def get_config():
  config = common.base_config()
  config.objective.advantage = 'grpo'
  config.objective.loss = 'gspo'
  config.objective.gspo.variant = 'seq'
  config.objective.aggregation = 'seq-mean-token-mean'
  return config
