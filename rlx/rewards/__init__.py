"""Verifiable reward functions for rlx tasks."""
