"""Datasets and problem generators for rlx tasks; the registered tasks."""

from rlx.data import chain_arith_task  # Registers chain_arith.
from rlx.data import math_task  # Registers math_files.
