"""Buffers carried across RL steps, with policy-version bookkeeping."""
