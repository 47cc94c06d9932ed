"""rlx: JAX-native RL for language models.

Importing rlx registers the built-in methods of every stage (tasks,
selectors, advantages and losses, rollout modes) and the config sections
that modules own (lora, optim, warmstart, eval, log, mesh, backend), so
that `config.build` reads and checks them.
"""

from rlx import backend  # Owns the backend section.
from rlx import curriculum  # Registers the selectors.
from rlx import data  # Registers the tasks.
from rlx import evaluation  # Owns the eval section.
from rlx import learner  # Owns the optim section.
from rlx import logbook  # Owns the log section.
from rlx.models import lora  # Owns the lora section.
from rlx import objectives  # Registers the advantages and policy losses.
from rlx import rollouts  # Registers the rollout modes.
from rlx import sharding  # Owns the mesh section.
from rlx import warmstart  # Owns the warmstart section.
