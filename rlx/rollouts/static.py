"""rollout.mode=static: the jitted sampler (rlx/sampling/sampler.py), one
batch per call, as long as its longest response."""

import numpy as np

from rlx.rollouts import base


@base.MODES.register('static')
class Static(base.CurriculumMode):
  """The static sampler behind the curriculum."""
  multi_host = True

  def start_step(self, params, request):
    self._busy = self._capacity = 0

  def sampled(self, rollout):
    # Rows x decode steps the batch ran for.
    lengths = np.asarray(rollout.lengths)
    self._busy += int(lengths.sum())
    self._capacity += lengths.size * int(lengths.max())

  def step_metrics(self, groups):
    return {'rollout/slot_utilisation': self._busy / max(self._capacity, 1)}
