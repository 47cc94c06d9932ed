"""Rollout modes: what turns `rollout.mode` into a step's training groups.

  static      the jitted sampler, one batch per call, as long as its
              longest response (static.py);
  continuous  the slot engine refilling finished slots (continuous.py);
  april       APRIL: over-provisioned groups, the first B finished trained,
              the rest carried over in a partial buffer (april.py);
  tree        prefix-sharing tree rollouts whose path ids reach the
              advantages (tree.py).

The protocol and registry are in base.py; a new mode is one file that
registers a `Mode` subclass (docs/EXTENDING.md).
"""

# Registers the modes, in the order config errors list them.
from rlx.rollouts import static  # pylint: disable=g-bad-import-order
from rlx.rollouts import continuous
from rlx.rollouts import april
from rlx.rollouts import tree
from rlx.rollouts.base import MODES
from rlx.rollouts.base import Mode
from rlx.rollouts.base import Request
from rlx.rollouts.base import RolloutState
from rlx.rollouts.base import StepGroups
