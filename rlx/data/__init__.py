"""Datasets and problem generators for rlx tasks."""
