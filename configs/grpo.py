"""GRPO on chain arithmetic: the default recipe (README quickstart).

Warm start by supervised imitation, then GRPO (group-relative advantages,
PPO-clip token loss, token-mean aggregation, no KL) on a ~0.8M-parameter
transformer. Finishes in minutes on a 2-core CPU.
"""

from rlx.configs import common


def get_config():
  config = common.base_config()
  config.objective.advantage = 'grpo'
  config.objective.loss = 'ppo_clip'
  return config
