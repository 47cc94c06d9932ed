"""The rollout-mode protocol and its registry.

A rollout mode turns the policy's weights into one RL step's training
groups. Every mode is a class registered under its `rollout.mode` name:

  @MODES.register('static')
  class Static(Mode):
    def collect(self, params, state, request):
      ...
      return groups, state, metrics

  Mode(cfg, model=..., task=..., curriculum=..., actor=...)
  Mode.init_state(cfg, task) -> dict      its checkpointed state ({}: none)
  Mode.batch_fields(cfg, b, g) -> dict    Batch fields it adds (shapes)
  mode.collect(params, RolloutState, Request)
      -> (StepGroups, RolloutState, metrics)

`collect` selects prompts through the curriculum (every mode does; the
curriculum observes every group), samples and scores them. The sampler
and the curriculum state are the mode's business; the trainer only holds
the `RolloutState` it gets back and checkpoints it.
"""

import abc
import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rlx import errors
from rlx import learner
from rlx import objectives
from rlx import registry
from rlx.actor import Actor
from rlx.curriculum.controller import Collected, Curriculum
from rlx.types import PRNGKey

MODES = registry.Registry('rollout.mode', selected='rollout.mode')


class Request(NamedTuple):
  """What the trainer asks of one `collect`."""
  step: int  # The RL step: the learner's policy version, against which
  # tokens of older weights count as off-policy.
  key: PRNGKey  # This step's key.
  version: int  # The RL step whose update the weights precede (stamped on
  # the tokens): `step`, or step - 1 with rollout.overlap.


class RolloutState(NamedTuple):
  """The rollout side's state between steps (host arrays; checkpointed)."""
  curriculum: object  # curriculum.selectors.CurriculumState.
  mode: dict  # The mode's own (`Mode.init_state`; APRIL's partial buffer
  # and data cursor), {} for most.


@dataclasses.dataclass
class StepGroups(Collected):
  """A step's training groups (the curriculum's `Collected`) plus what the
  learner's Batch needs beyond it."""
  prompt: np.ndarray | None = None  # [B, P] int32, left-padded.
  prompt_mask: np.ndarray | None = None  # [B, P] bool.

  def batch(self, *, rewards, old_logp) -> learner.Batch:
    """The learner's Batch (rewards after any shaping; old log-probs from
    the sampler or recomputed); extras named like Batch fields (a tree's
    path_ids) go into them."""
    extras = {k: jnp.asarray(v, jnp.int32) for k, v in self.extras.items()
              if k in learner.Batch._fields}
    return learner.Batch(
        prompt=jnp.asarray(self.prompt),
        prompt_mask=jnp.asarray(self.prompt_mask),
        response=self.tokens, loss_mask=self.loss_mask,
        old_logp=old_logp, rewards=jnp.asarray(rewards),
        group_mask=self.group_mask, behaviour_logp=self.logp,
        entropy=self.entropy, values=self.values, **extras)


def groups_of(collected: Collected, task) -> StepGroups:
  """`collected` with its prompts."""
  return StepGroups(**{f.name: getattr(collected, f.name)
                       for f in dataclasses.fields(Collected)},
                    prompt=task.train_prompts[collected.ids],
                    prompt_mask=task.train_prompt_mask[collected.ids])


def one_device(tree):
  """`tree` on the first device (the engine's), copied there if needed."""
  dev = jax.devices()[0]
  if all(isinstance(x, jax.Array) and x.sharding.device_set == {dev}
         for x in jax.tree.leaves(tree)):
    return tree
  return jax.device_put(tree, jax.sharding.SingleDeviceSharding(dev))


def score(task, tokens: np.ndarray, ids: np.ndarray) -> np.ndarray:
  """Verifier rewards [B, G] of responses tokens [B, G, T] to prompts ids."""
  tok, g = task.tokenizer, tokens.shape[1]
  texts = [tok.decode(row) for group in tokens for row in group]
  answers = [task.train.answers[i] for i in ids for _ in range(g)]
  return np.asarray(task.reward_fn(texts, answers),
                    np.float32).reshape(tokens.shape[:2])


def mean_metrics(rows: list[dict]) -> dict:
  """Mean of each key over a step's sampler calls (one call, usually)."""
  keys = {k for r in rows for k in r}
  return {k: float(np.mean([r[k] for r in rows if k in r]))
          for k in sorted(keys)}


class Mode(abc.ABC):
  """A rollout mode (the protocol; see the module docstring).

  Args:
    cfg: the run config.
    model: the policy's Transformer (engine and tree samplers are built
      from it).
    task: the task (prompts, verifier and answer rules).
    curriculum: the run's curriculum (selection, estimator state).
    actor: the trainer's static actor (it samples the static mode; the
      other samplers take its stop tokens).
  """

  # Whether the step's rollouts and tokens are the curriculum's own
  # tallies (so the analysis bounds can split off uncharged ones).
  curriculum_tallies = False
  # Whether unfinished responses carry over to the next step
  # (rollout.april.resume applies).
  carries_over = False
  # Whether it samples across processes (else on one device of each).
  multi_host = False

  def __init__(self, cfg, *, model, task, curriculum: Curriculum,
               actor: Actor):
    self.cfg, self.model, self.task = cfg, model, task
    self.curriculum, self.actor = curriculum, actor

  @classmethod
  def init_state(cls, cfg, task) -> dict:
    """The mode's checkpointed state (numpy arrays, so that it also serves
    as the restore target); {}: none."""
    del cfg, task
    return {}

  @classmethod
  def check_state(cls, cfg, state: dict) -> None:
    """Raises ValueError when a restored mode state is inconsistent."""
    del cfg, state

  @classmethod
  def batch_fields(cls, cfg, b: int, g: int) -> dict:
    """Shapes of the Batch fields the mode adds (ahead-of-time compiles)."""
    del cfg, b, g
    return {}

  @abc.abstractmethod
  def collect(self, params, state: RolloutState, request: Request
              ) -> tuple[StepGroups, RolloutState, dict]:
    """Samples and scores one step's training groups.

    Args:
      params: the policy weights (placed for the sampler).
      state: the rollout state.
      request: the step, its key and the weights' version.

    Returns:
      (groups, new state, metrics: curriculum/ and rollout/ (or tree/)
      metrics of the step).
    """


class CurriculumMode(Mode):
  """A mode whose groups are the curriculum's (`Curriculum.collect`): the
  mode supplies a sampler (`rollout_fn`) and its own step metrics."""

  curriculum_tallies = True

  def collect(self, params, state, request):
    self.start_step(params, request)
    got, cur_state, cur_metrics = self.curriculum.collect(
        state.curriculum, params, request.key, self.rollout_fn,
        request.step)
    groups = groups_of(got, self.task)
    metrics = {**cur_metrics, **self.step_metrics(groups)}
    return groups, state._replace(curriculum=cur_state), metrics

  def start_step(self, params, request: Request) -> None:
    """Resets the step's tallies (and compiles, the first time)."""

  def rollout_fn(self, params, rows, key, num_samples):
    """(sampler Rollout [R, n, ...], rewards [R, n]) of prompts `rows`."""
    task, s = self.task, self.cfg.sampling
    scored = self.actor.rollout(
        params, task.train_prompts[rows], task.train_prompt_mask[rows],
        [task.train.answers[i] for i in rows], key, num_samples=num_samples,
        temperature=s.temperature, top_p=s.top_p)
    self.sampled(scored.rollout)
    return scored.rollout, scored.rewards

  def sampled(self, rollout) -> None:
    """Tallies one sampler call of the step."""

  def step_metrics(self, groups: StepGroups) -> dict:
    """The step's rollout/ (or tree/) metrics; may adjust `groups`."""
    del groups
    return {}


@MODES.check
def _check_rollout(cfg) -> None:
  """The rollout section, whichever the mode (the engine's and APRIL's
  knobs: continuous.py, april.py)."""
  ro, cur = cfg.rollout, cfg.curriculum
  if ro.mode not in MODES:
    return  # Named by the registry.
  mode = MODES.get(ro.mode)
  resume = ro.april.resume
  errors.require(resume == 'prefill' or mode.carries_over,
                 'rollout.april.resume', f'{resume!r} needs rollout.mode=april '
                 f'(is {ro.mode!r}): only APRIL carries unfinished responses '
                 'to the next step')
  # The uncharged rollouts of the analysis bounds are split off in the
  # curriculum's tallies.
  oracle = [k for k, on in (('oracle.screen', cur.oracle.screen > 1),
                            ('oracle.free_refills', cur.oracle.free_refills))
            if on]
  errors.require(not oracle or mode.curriculum_tallies,
                 f'curriculum.{oracle[0] if oracle else ""}',
                 f'is an analysis bound for rollout.mode static or '
                 f'continuous (is {ro.mode!r}): its uncharged rollouts would '
                 'be ignored or charged')
  obj = cfg.objective
  errors.require('path_ids' not in objectives.reads(obj.advantage) or
                 'path_ids' in mode.batch_fields(cfg, 1, 1),
                 'objective.advantage', f'{obj.advantage!r} needs the '
                 'path_ids of tree rollouts; set rollout.mode=tree (is '
                 f'{ro.mode!r})')
  loss = objectives.LOSSES.get(obj.loss) if obj.loss in objectives.LOSSES \
      else None  # An unknown loss is named by its registry.
  corrected = obj.correction != 'none' or (loss is not None and
                                           loss.off_policy)
  errors.require(not corrected or cfg.rl.recompute_old_logp,
                 'rl.recompute_old_logp', 'must be True with objective.'
                 f'correction={obj.correction!r} / objective.loss='
                 f'{obj.loss!r}: the correction compares the old policy (the '
                 "learner's weights before the update) with the behaviour "
                 'log-probs of the sampler, and without a recompute the old '
                 'log-probs are the behaviour ones (every weight exactly 1)')
