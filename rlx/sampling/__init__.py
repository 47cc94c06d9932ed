"""Generation: the jit sampler, the continuous engine (APRIL), tree
rollouts, and the rollout modes behind the trainer."""
