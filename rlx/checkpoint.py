"""Orbax checkpoints: everything needed to resume exactly.

A checkpoint holds a pytree of arrays (train state and any other array
state: estimators, buffers) and a JSON dict of host-side bookkeeping (step,
data position, counters, elapsed time, the config). Orbax writes each step
into a temporary directory and renames it when complete, so a checkpoint is
either whole or absent. Only finished checkpoints are ever listed.
"""

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from rlx.types import PyTree


class CheckpointError(RuntimeError):
  """A checkpoint is missing, unreadable or does not match the run."""


def json_safe(value: Any, what: str) -> Any:
  """`value` with numpy scalars and arrays as Python numbers and lists.

  Raises:
    CheckpointError naming `what` and the offending key when something
    else is not JSON data.
  """
  if isinstance(value, dict):
    for k in value:
      if not isinstance(k, str):
        raise CheckpointError(f'cannot save {what}: key {k!r} is not a '
                              'string')
    return {k: json_safe(v, f'{what}, key {k!r}') for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v, what) for v in value]
  if isinstance(value, (np.generic, np.ndarray, jax.Array)):
    plain = np.asarray(value)
    if plain.dtype.kind not in 'biuf':  # bool, int, float: not complex,
      # bytes, dates or objects (which .tolist() would pass through).
      raise CheckpointError(f'cannot save {what}: a numpy value of dtype '
                            f'{plain.dtype} is not JSON data')
    return plain.tolist()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise CheckpointError(f'cannot save {what}: {type(value).__name__} '
                        f'{value!r} is not JSON data')


class Checkpointer:
  """Saves and restores (state pytree, metadata dict) by step."""

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    self.directory = os.path.abspath(os.path.expanduser(directory))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: PyTree, meta: dict[str, Any]) -> None:
    """Writes step `step`; `meta` must be JSON data (numpy scalars and
    arrays are turned into numbers and lists). Anything else raises
    CheckpointError before anything is written."""
    meta = json_safe(meta, f'the metadata of checkpoint {step}')
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                       force=True)
    self._manager.wait_until_finished()

  def _restore(self, step: int, what: str, hint: str = '', **items):
    """Orbax's restore of `items`; its many error types become one
    CheckpointError naming `what` failed and the step's directory."""
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Orbax raises many types; report them as one.
      raise CheckpointError(
          f'cannot {what} {os.path.join(self.directory, str(step))}: '
          f'{type(e).__name__}: {e}{hint}') from e

  def meta(self, step: int) -> dict[str, Any]:
    """The metadata dict of step `step` alone (cheap: no arrays read).

    Raises:
      CheckpointError naming the directory when it cannot be read.
    """
    return self._restore(step, 'read the metadata of checkpoint',
                         meta=ocp.args.JsonRestore()).meta

  def restore(self, step: int, abstract_state: PyTree
              ) -> tuple[PyTree, dict[str, Any]]:
    """Restores step `step` into the structure of `abstract_state`.

    Raises:
      CheckpointError naming the directory when the files are missing,
      unreadable, or hold a different structure.
    """
    out = self._restore(
        step, 'restore checkpoint',
        '. It may be corrupt or from a different model/config; move it '
        'away to start over, or point --workdir elsewhere.',
        state=ocp.args.StandardRestore(abstract_state),
        meta=ocp.args.JsonRestore())
    return out.state, out.meta

  def read(self, step: int) -> PyTree:
    """The state pytree of step `step` as saved (nested dicts of arrays),
    without a structure to restore into: for tools that inspect one part
    of a run (e.g. its policy's parameters).

    Raises:
      CheckpointError naming the directory when it cannot be read.
    """
    return self._restore(step, 'read checkpoint',
                         state=ocp.args.StandardRestore()).state

  def close(self) -> None:
    self._manager.close()


def save_params(directory: str, params: PyTree, meta: dict[str, Any]) -> None:
  """One-off atomic save of parameters (e.g. the warm-start model)."""
  ckpt = Checkpointer(directory, max_to_keep=1)
  ckpt.save(0, params, meta)
  ckpt.close()


def load_params(directory: str, abstract_params: PyTree
                ) -> tuple[PyTree, dict[str, Any]]:
  ckpt = Checkpointer(directory, max_to_keep=1)
  step = ckpt.latest_step()
  if step is None:
    raise CheckpointError(f'no finished checkpoint under {directory}')
  out = ckpt.restore(step, abstract_params)
  ckpt.close()
  return out


def run_step(run: str, step: int) -> tuple[str, int]:
  """(checkpoints folder, step) of a trainer run (`run`: its workdir or its
  checkpoints folder); step 0: its latest finished checkpoint.

  Raises:
    CheckpointError when there is no such folder or step.
  """
  folder = os.path.abspath(os.path.expanduser(run))
  if os.path.basename(folder) != 'checkpoints':
    folder = os.path.join(folder, 'checkpoints')
  if not os.path.isdir(folder):
    raise CheckpointError(f'no checkpoints folder at {folder}')
  ckpt = Checkpointer(folder)
  steps = ckpt.all_steps()
  ckpt.close()
  if not steps or (step and step not in steps):
    raise CheckpointError(
        f'no finished checkpoint {step or ""} under {folder} (has: {steps})')
  return folder, step or max(steps)


def run_params(folder: str, step: int, like):
  """The policy parameters a trainer run saved at `step` (for tools that
  sample or evaluate a run's policy), as jax arrays.

  Raises:
    CheckpointError when the checkpoint holds none, or when their structure
    or a shape differs from `like` (parameters of the expected model, e.g.
    the warm start's), naming the first difference.
  """
  ckpt = Checkpointer(folder)
  state = ckpt.read(step)
  ckpt.close()
  train = state.get('train') if isinstance(state, dict) else None
  params = train.get('params') if isinstance(train, dict) else None
  if params is None:
    raise CheckpointError(
        f'{folder}/{step} holds no train/params: not a trainer checkpoint')
  got, want = (jax.tree_util.tree_flatten_with_path(x)[0]
               for x in (params, like))
  if [k for k, _ in got] != [k for k, _ in want]:
    raise CheckpointError(
        f'{folder}/{step}: its parameters are not the expected model\'s '
        '(another model, or LoRA adapters without their base)')
  for (path, a), (_, b) in zip(got, want):
    if np.shape(a) != np.shape(b):
      raise CheckpointError(
          f'{folder}/{step}: {jax.tree_util.keystr(path)} has shape '
          f'{np.shape(a)}, the expected model {np.shape(b)}')
  return jax.tree.map(jnp.asarray, params)
