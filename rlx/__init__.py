"""rlx: JAX-native RL for language models.

Importing rlx registers the built-in methods of every stage (tasks,
selectors, advantages and losses, rollout modes), so that `config.build`
checks them.
"""

from rlx import curriculum  # Registers the selectors.
from rlx import data  # Registers the tasks.
from rlx import objectives  # Registers the advantages and policy losses.
from rlx.models import lora  # Checks the lora section.
from rlx import rollouts  # Registers the rollout modes.
