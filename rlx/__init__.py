"""rlx: JAX-native RL for language models."""
