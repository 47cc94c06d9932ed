"""GRPO with EPTree rollouts whose branches diverge at their fork.

The default recipe (configs/grpo.py) with every prompt's W = G = 8 leaves
grown as a tree (TreeRL's EPTree: M = 2 chains, each forked once at its
most uncertain token into T = 3 branches) and `fork_distinct`: a branch's
first token is drawn without its parent's token there. Measured against
the default recipe over 50 RL steps and 8 seeds (docs/BENCHMARKS.md,
issue 6): 0.56x decoded tokens per leaf, +0.015 held-out pass@1; it
trails the default through the first ~20 steps. Most forced branches
fail, so the training reward (`reward/mean`, about 0.35) is not an
estimate of pass@1 here; the held-out `eval/pass@1` is.
"""

from rlx.configs import common


def get_config():
  config = common.base_config()
  config.objective.advantage = 'grpo'
  config.objective.loss = 'ppo_clip'
  config.rollout.mode = 'tree'
  config.rollout.tree.kind = 'eptree'
  config.rollout.tree.eptree.num_chains = 2
  config.rollout.tree.eptree.fork_points = 1
  config.rollout.tree.eptree.fork_branches = 3
  config.rollout.tree.eptree.fork_distinct = True
  return config
