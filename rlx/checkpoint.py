"""Orbax checkpoints: everything needed to resume exactly.

A checkpoint holds a pytree of arrays (train state and any other array
state: estimators, buffers) and a JSON dict of host-side bookkeeping (step,
data position, counters, elapsed time, the config). Orbax writes each step
into a temporary directory and renames it when complete, so a checkpoint is
either whole or absent. Only finished checkpoints are ever listed.
"""

import os
from typing import Any

import orbax.checkpoint as ocp

from rlx.types import PyTree


class CheckpointError(RuntimeError):
  """A checkpoint is missing, unreadable or does not match the run."""


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
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                       force=True)
    self._manager.wait_until_finished()

  def meta(self, step: int) -> dict[str, Any]:
    """The metadata dict of step `step` alone (cheap: no arrays read).

    Raises:
      CheckpointError naming the directory when it cannot be read.
    """
    try:
      return self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # Orbax raises many types; report them as one.
      raise CheckpointError(
          f'cannot read the metadata of checkpoint '
          f'{os.path.join(self.directory, str(step))}: '
          f'{type(e).__name__}: {e}') from e

  def restore(self, step: int, abstract_state: PyTree
              ) -> tuple[PyTree, dict[str, Any]]:
    """Restores step `step` into the structure of `abstract_state`.

    Raises:
      CheckpointError naming the directory when the files are missing,
      unreadable, or hold a different structure.
    """
    path = os.path.join(self.directory, str(step))
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises many types; report them as one.
      raise CheckpointError(
          f'cannot restore checkpoint {path}: {type(e).__name__}: {e}. '
          'It may be corrupt or from a different model/config; move it '
          'away to start over, or point --workdir elsewhere.') from e
    return out.state, out.meta

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
