"""Which prompts get rollouts and how many: estimators, selectors,
allocators and the controller that runs them (ALGORITHMS.md section C).

Importing the package registers the built-in selectors (in the order of
their names in config errors) and the curriculum's config checks.
"""

from rlx.curriculum import selectors  # Registers the posterior selectors.
from rlx.curriculum import dots  # Registers DOTS.
from rlx.curriculum import likelihood  # Registers the likelihood selector.
from rlx.curriculum import oracles  # Checks the analysis knobs.
from rlx.curriculum import controller  # Checks the curriculum section.

SELECTORS = selectors.SELECTORS  # Name -> Selector subclass.
Selector = selectors.Selector  # The protocol a new selector implements.
group_sizes = selectors.group_sizes
