"""Registry entries of the objectives: what each estimator and loss takes.

An advantage estimator or policy loss is registered by decorator where it
is implemented, with declarations the learner reads instead of switching
on names:

  ADVANTAGES = entries.Registry('objective.advantage', entries.Advantage)

  @ADVANTAGES.declare('spo', inputs={'values': 'values'},
                      knobs={'eps': 'adv_eps'}, whole_batch=True)
  def spo(rewards, mask, *, values, eps=1e-6): ...

  entry = ADVANTAGES.get('spo')         # An `Advantage`; unknown names
                                        # raise ConfigError listing the
                                        # known ones.
  entry(rewards, mask, **entry.kwargs(objective_cfg, batch, step))

The declaring decorator returns the function itself, so the estimators
and losses stay plain functions of their modules. Declared keyword names
are checked against the function's signature when it is registered.
"""

import dataclasses
import inspect
from typing import Any, Callable, Mapping, NamedTuple

from rlx import errors
from rlx import registry
from rlx.types import Array


class Derived(NamedTuple):
  """An input computed from Batch fields rather than passed as one.

  `fn(*fields)` gets the named Batch fields in order, None where a field
  is unset (so `fn` decides what an unset field means).
  """
  fields: tuple[str, ...]
  fn: Callable[..., Array]


# A knob function returns DEFAULT to leave the function's own default.
DEFAULT = object()

# Knob: an objective config key under objective. ('clip_eps', or a method's
# own section's 'gspo.eps_low'), or `fn(objective_cfg, step) -> value`
# (step: the optimizer updates applied, a traced int32; None for losses).
Knob = str | Callable[[Any, Any], Any]


def knob_value(obj, key: str) -> Any:
  """The value of objective config key `key` (dots follow sections)."""
  for part in key.split('.'):
    obj = getattr(obj, part)
  return obj


def unless_zero(field: str) -> Callable[[Any, Any], Any]:
  """A knob passing ObjectiveConfig `field` unless it is 0, which keeps the
  function's own default (e.g. clip_eps_high: 0.28 for dapo)."""
  def knob(obj, step):
    del step
    return knob_value(obj, field) or DEFAULT
  knob.field = field
  return knob


def knob_fields(knobs: Mapping[str, Knob]) -> tuple[str, ...]:
  """The ObjectiveConfig fields the knobs name (a knob function may name
  its own in a `field` or `fields` attribute)."""
  out = []
  for knob in knobs.values():
    if isinstance(knob, str):
      out.append(knob)
    else:
      out += ([knob.field] if hasattr(knob, 'field') else
              list(getattr(knob, 'fields', ())))
  return tuple(out)


def _exists(obj, key: str) -> bool:
  try:
    knob_value(obj, key)
  except AttributeError:
    return False
  return True


def check_knobs(key: str, entry, obj) -> None:
  """Requires every objective config key `entry`'s knobs name to exist (a
  user's registration may misspell one)."""
  for field in knob_fields(entry.knobs):
    errors.require(_exists(obj, field), key,
                   f'{entry.name!r} takes its knob from objective.{field}, '
                   'which is not a config field')


def _resolve(knobs: Mapping[str, Knob], obj, step) -> dict:
  """The knobs' keyword arguments for config `obj` at `step`."""
  out = {}
  for kwarg, knob in knobs.items():
    value = (knob_value(obj, knob) if isinstance(knob, str) else
             knob(obj, step))
    if value is not DEFAULT:
      out[kwarg] = value
  return out


def _check_signature(name: str, fn: Callable, kwargs) -> None:
  """Fails at registration if `fn` lacks a keyword argument of `kwargs`
  (a misspelt declaration would otherwise fail at the first step)."""
  params = inspect.signature(fn).parameters
  if any(p.kind == p.VAR_KEYWORD for p in params.values()):
    return
  unknown = [k for k in kwargs if k not in params]
  if unknown:
    raise TypeError(f'{name}: declares {unknown}, which '
                    f'{fn.__name__}{inspect.signature(fn)} does not take')


# LossMasks hook: (rewards [B, G], group_mask [B, G] bool,
# loss_mask [B, G, T] bool, kwargs: the estimator's keyword arguments)
# -> (group_mask [B, G], loss_mask [B, G, T]) of the samples and tokens
# that enter the loss.
LossMasks = Callable[[Array, Array, Array, dict], tuple[Array, Array]]


@dataclasses.dataclass(frozen=True, eq=False)
class Advantage:
  """A registered advantage estimator and what it takes.

  Attributes:
    name: its name (the value of objective.advantage).
    fn: `fn(rewards [B, G], mask [B, G] bool, **kwargs)` -> advantages
      [B, G] ([B, G, T] for token-level estimators).
    inputs: keyword argument -> the Batch field passed as it (required:
      `kwargs` raises if it is None), or a `Derived` input.
    knobs: keyword argument -> its `Knob` (an ObjectiveConfig field, or a
      function of the config and the step, e.g. an annealed ratio).
    group_relative: the baseline comes from the other samples of the group,
      so rl.group_size must be >= 2.
    whole_batch: statistics over the whole batch (whitening): the learner
      computes the advantages before splitting the batch into minibatches.
    loss_masks: a `LossMasks` hook, where the estimator also decides which
      samples or tokens carry gradient (mc_grpo's pivot, d3s's selection);
      None: the batch's own masks.
    needs: inputs the training loop cannot supply yet; non-empty makes
      the config check refuse the estimator (a library-only function).
    hint: where the Batch inputs come from, for the missing-input error.
    estimator: the curriculum estimator whose per-prompt values it reads
      (Batch.values), chosen when curriculum.estimator=auto; '' none.
  """
  name: str
  fn: Callable[..., Array]
  inputs: Mapping[str, str | Derived] = dataclasses.field(
      default_factory=dict)
  knobs: Mapping[str, Knob] = dataclasses.field(default_factory=dict)
  group_relative: bool = False
  whole_batch: bool = False
  loss_masks: LossMasks | None = None
  needs: str = ''
  hint: str = ''
  estimator: str = ''

  def __post_init__(self):
    _check_signature(f'advantage {self.name!r}', self.fn,
                     list(self.inputs) + list(self.knobs))

  def __call__(self, rewards: Array, mask: Array, **kwargs) -> Array:
    return self.fn(rewards, mask, **kwargs)

  @property
  def reads(self) -> frozenset[str]:
    """The Batch fields read beyond rewards and group_mask."""
    out = set()
    for source in self.inputs.values():
      out.update([source] if isinstance(source, str) else source.fields)
    return frozenset(out)

  def kwargs(self, obj, batch, step) -> dict:
    """The keyword arguments of `fn` for one batch, inputs then knobs.

    Args:
      obj: the ObjectiveConfig.
      batch: a `learner.Batch` (any object with its fields).
      step: the optimizer updates applied so far (int32, may be traced).

    Raises:
      ValueError: a required Batch field is None.
    """
    out = {}
    for kwarg, source in self.inputs.items():
      if isinstance(source, Derived):
        out[kwarg] = source.fn(*(getattr(batch, f) for f in source.fields))
        continue
      value = getattr(batch, source)
      if value is None:
        raise ValueError(f'the {self.name} advantage needs Batch.{source}'
                         + (f' ({self.hint})' if self.hint else ''))
      out[kwarg] = value
    out.update(_resolve(self.knobs, obj, step))
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class Loss:
  """A registered policy loss and the config knobs it takes.

  Attributes:
    name: its name (the value of objective.loss).
    fn: `fn(logp, old_logp, advantages, loss_mask, *, behaviour_logp,
      **hparams) -> (per-token loss [B, G, T], diag)` (rlx/objectives/
      losses.py).
    knobs: hyper-parameter keyword -> its `Knob` (step is None).
    off_policy: it weighs the old policy against the sampler's behaviour
      log-probs (decoupled), so the old log-probs must be recomputed by
      the learner (rl.recompute_old_logp).
  """
  name: str
  fn: Callable[..., Any]
  knobs: Mapping[str, Knob] = dataclasses.field(default_factory=dict)
  off_policy: bool = False

  def __post_init__(self):
    _check_signature(f'loss {self.name!r}', self.fn, self.knobs)

  def __call__(self, *args, **kwargs):
    return self.fn(*args, **kwargs)

  def kwargs(self, obj) -> dict:
    """The hyper-parameters of `fn` from ObjectiveConfig `obj`."""
    return _resolve(self.knobs, obj, None)


class Registry(registry.Registry):
  """An `rlx.registry.Registry` of `entry`s (iterable as its names, as the
  name tuples it replaces were), with a declaring decorator."""

  def __init__(self, key: str, entry: type):
    super().__init__(key)
    self._entry = entry

  def declare(self, name: str, **declarations) -> Callable:
    """Decorator: registers `entry(name, fn, **declarations)`; returns the
    function unchanged."""
    def add(fn):
      self.register(name)(self._entry(name=name, fn=fn, **declarations))
      return fn
    return add

  def unregister(self, name: str) -> None:
    """Removes `name` (for tests that register their own entries)."""
    self._items.pop(name, None)
