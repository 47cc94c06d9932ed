"""MC-GRPO: median-centred advantages for small groups.

Samples G + 1 = 5 responses per prompt; the baseline is the median reward,
and the pivot response that sits at the median is excluded from the loss,
so 4 samples carry gradient. No scaling (MAD is often 0 with binary
rewards).
"""

from rlx.configs import common


def get_config():
  config = common.base_config()
  config.rl.group_size = 5
  config.objective.advantage = 'mc_grpo'
  config.objective.mc_grpo.scale = 'none'
  config.objective.loss = 'ppo_clip'
  return config
