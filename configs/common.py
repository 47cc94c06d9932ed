"""Shared config pieces: the defaults live in rlx/config.py dataclasses."""

from rlx import config as config_lib


def base_config():
  """All defaults as an ml_collections.ConfigDict (see rlx/config.py for
  what every field means)."""
  return config_lib.default_config_dict()
