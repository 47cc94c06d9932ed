"""A step's groups of sampled responses on the host, as they grow: rollout
rounds, refills and screens add to them (the controller and the oracles)."""

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rlx.types import FinishReason

# (ids [R], key, per_id) -> (rows, rewards [R * per_id]): per_id responses
# to each id, flattened id-major (the controller's sampler, charged to a
# tally).
Sample = Callable


@dataclasses.dataclass
class Groups:
  """Growing per-prompt lists of sampled responses (host)."""
  rows: list  # [B] lists of one response's rollout row (a NamedTuple)
  rewards: list  # [B] lists of float

  @classmethod
  def empty(cls, b: int):
    return cls([[] for _ in range(b)], [[] for _ in range(b)])

  def counts(self) -> np.ndarray:
    """[B] responses per group."""
    return np.array([len(r) for r in self.rewards])

  def successes(self) -> np.ndarray:
    """[B] summed rewards per group."""
    return np.array([float(np.sum(r)) for r in self.rewards])


def zero_variance(rewards: list) -> bool:
  """Whether a group's rewards are all equal (no GRPO signal)."""
  return len(rewards) == 0 or float(np.ptp(rewards)) == 0.0


def extend(groups: Groups, ids, counts, key, sample: Sample) -> None:
  """Adds counts[i] responses to prompt slot i (in place). Equal counts
  are sampled as groups (one prefill per prompt), ragged ones as rows; a
  response still RUNNING (an unused tree slot) is no response."""
  counts = np.asarray(counts, int)
  if counts.sum() == 0:
    return
  slot = np.repeat(np.arange(len(ids)), counts)
  if np.all(counts == counts[0]):
    ro, rewards = sample(np.asarray(ids), key, int(counts[0]))
  else:
    ro, rewards = sample(np.asarray(ids)[slot], key, 1)
  running = np.asarray(ro.finish) == int(FinishReason.RUNNING)
  for j, i in enumerate(slot):
    if not running[j]:
      groups.rows[i].append(type(ro)(*(np.asarray(x)[j] for x in ro)))
      groups.rewards[i].append(float(rewards[j]))


def draw_unused(pick, used, n, key, attempt, per_id, sample: Sample,
                evidence, eligible=None) -> tuple[np.ndarray, Groups]:
  """n more prompts by the selector (`pick`: (key, n, tiers) -> ids),
  none of them `used` (updated), with `per_id` rollouts each (keys folded
  from `attempt`), as evidence.

  Tiers: eligible and unused first, then unused, used ones last.

  Returns:
    (ids [n], their Groups).
  """
  tiers = np.where(used, 2, 0 if eligible is None else
                   np.where(np.asarray(eligible), 0, 1)).astype(np.int32)
  new = pick(jax.random.fold_in(key, attempt), n, jnp.asarray(tiers))
  used[new] = True
  fresh = Groups.empty(len(new))
  extend(fresh, new, np.full(len(new), per_id),
         jax.random.fold_in(key, 1000 + attempt), sample)
  evidence.append((new, fresh.successes(), fresh.counts()))
  return new, fresh


@dataclasses.dataclass
class StepRun:
  """One step's bookkeeping on the host, shared by the controller's phases
  (and the oracles wrapped around them)."""
  sampler: Callable  # tally [rollouts, tokens] -> a Sample charging it.
  keys: tuple  # (first round, second round, refills and screens) keys.
  eligible: Optional[jax.Array]  # [N] bool, the skip filter's, or None.
  values: np.ndarray  # [N] posterior mean pass rates before the step.
  spent: list = dataclasses.field(default_factory=lambda: [0, 0])  # Charged
  # [rollouts, tokens].
  evidence: list = dataclasses.field(default_factory=list)  # (ids,
  # successes, counts) of every batch of groups sampled, in order.
  metrics: dict = dataclasses.field(default_factory=dict)
  pick: Optional[Callable] = None  # (key, n, tiers) -> ids [n]: more
  # prompts by the selector, from the state it selected with.
  refill_sample: Optional[Sample] = None  # DAPO's refills' (None: charged).
  sample: Sample = dataclasses.field(init=False)  # The charged Sample.

  def __post_init__(self):
    self.sample = self.sampler(self.spent)
