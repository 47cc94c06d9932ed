"""REINFORCE++-baseline (Hu 2025): group-mean baseline, batch whitening."""

from rlx.configs import common


def get_config():
  config = common.base_config()
  config.objective.advantage = 'reinforce_pp'
  config.objective.loss = 'ppo_clip'
  return config
