"""Orbax checkpoints: everything needed to resume exactly.

A checkpoint holds a pytree of arrays (train state and any other array
state: estimators, buffers) and a JSON dict of host-side bookkeeping (step,
data position, counters, elapsed time, the config). Orbax writes each step
into a temporary directory and renames it when complete, so a checkpoint is
either whole or absent. Only finished checkpoints are ever listed.

Integrity: the metadata carries a checksum of every array (`checksums`),
computed on device before the write and verified after each restore, so a
flipped byte on disk is a named error (`CorruptCheckpoint`), never silently
altered weights. A failed write (a full disk) removes its temporary
directory and leaves the earlier checkpoints as they were.
"""

import glob
import os
import re
import shutil
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from rlx.types import PyTree


class CheckpointError(RuntimeError):
  """A checkpoint is missing, unreadable or does not match the run."""


class CorruptCheckpoint(CheckpointError):
  """A finished checkpoint cannot be read back as it was written."""


def _words(x: jax.Array) -> jax.Array:
  """`x`'s bits as a flat uint32 vector (one word per element)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32).ravel()


@jax.jit
def _digest(leaves: list[jax.Array]) -> tuple[list[jax.Array],
                                              list[jax.Array]]:
  """Per leaf: [2] uint32 sums of its words, plain and weighted by odd
  position factors (a changed byte changes the weighted sum for certain;
  integer sums do not depend on reduction order or sharding), and whether
  it holds only finite values."""
  sums, finite = [], []
  for x in leaves:
    w = _words(x)
    odd = 2 * jnp.arange(w.size, dtype=jnp.uint32) + 1
    sums.append(jnp.stack([jnp.sum(w, dtype=jnp.uint32),
                           jnp.sum(w * odd, dtype=jnp.uint32)]))
    finite.append(jnp.all(jnp.isfinite(x)) if jnp.issubdtype(
        x.dtype, jnp.inexact) else jnp.bool_(True))
  return sums, finite


def checksums(state: PyTree) -> tuple[dict[str, int], list[str]]:
  """({leaf path: checksum}, paths of leaves holding NaN or inf)."""
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  if not flat:
    return {}, []
  sums, finite = jax.device_get(_digest([jnp.asarray(x) for _, x in flat]))
  names = [jax.tree_util.keystr(p) for p, _ in flat]
  return ({n: int(s[0]) << 32 | int(s[1]) for n, s in zip(names, sums)},
          [n for n, ok in zip(names, finite) if not ok])


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
    self._max_to_keep = max_to_keep
    self._manager = self._new_manager()

  def _new_manager(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=self._max_to_keep, create=True,
            enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def reload(self) -> None:
    """Lists the finished checkpoints again (another process or
    `set_aside` may have changed the folder)."""
    self._manager.reload()

  def save(self, step: int, state: PyTree, meta: dict[str, Any], *,
           finite: Sequence[str] = ()) -> None:
    """Writes step `step` with the checksums of `state`'s arrays.

    Args:
      step: the checkpoint's number.
      state: a pytree of arrays (a dict at the top when `finite` is set).
      meta: JSON data (numpy scalars and arrays are turned into numbers and
        lists).
      finite: top-level keys of `state` whose arrays must hold no NaN or
        inf (the parameters and optimizer state).

    Raises:
      CheckpointError before anything is written when `meta` is not JSON
      data or a `finite` part is not finite; naming the directory and the
      cause when the write fails (its temporary files are removed, the
      earlier checkpoints stay as they were).
    """
    meta = json_safe(meta, f'the metadata of checkpoint {step}')
    sums, bad = checksums(state)
    bad = [p for p in bad if any(p.startswith(f"['{k}']") for k in finite)]
    if bad:
      raise CheckpointError(
          f'not saving checkpoint {step}: {len(bad)} arrays hold NaN or inf '
          f'(first: {bad[0]}); the newest checkpoint stays step '
          f'{self.latest_step()}')
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          meta=ocp.args.JsonSave({**meta, 'checksums': sums})), force=True)
      self._manager.wait_until_finished()
    except Exception as e:  # Orbax raises many types; report them as one.
      self._discard(step)
      raise CheckpointError(
          f'cannot write checkpoint {step} to {self.directory}: '
          f'{_cause(e)}; the newest checkpoint stays step '
          f'{self._reloaded_latest()}') from e

  def _discard(self, step: int) -> None:
    """After a failed write of `step`: its temporary directory removed
    once orbax's writer threads have stopped (the first to fail raises
    while others may still write), and a fresh manager."""
    try:
      self._manager.close()  # Waits for the writers still running.
    except Exception:  # pylint: disable=broad-except
      pass  # They fail as the first one did.
    pattern = os.path.join(self.directory, f'{step}.*tmp*')
    for _ in range(50):  # A straggler may still recreate a file: settle.
      for tmp in glob.glob(pattern):
        shutil.rmtree(tmp, ignore_errors=True)
      time.sleep(0.1)
      if not glob.glob(pattern):
        break
    self._manager = self._new_manager()

  def _reloaded_latest(self) -> int | None:
    self.reload()
    return self.latest_step()

  def _restore(self, step: int, what: str, hint: str = '', **items):
    """Orbax's restore of `items`; its many error types become one
    CorruptCheckpoint naming `what` failed and the step's directory."""
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Orbax raises many types; report them as one.
      raise CorruptCheckpoint(
          f'cannot {what} {os.path.join(self.directory, str(step))}: '
          f'{_cause(e)}{hint}') from e

  def meta(self, step: int) -> dict[str, Any]:
    """The metadata dict of step `step` alone (cheap: no arrays read).

    Raises:
      CheckpointError naming the directory when it cannot be read.
    """
    meta = self._restore(step, 'read the metadata of checkpoint',
                         meta=ocp.args.JsonRestore()).meta
    meta.pop('checksums', None)  # The arrays' (verified by `restore`).
    return meta

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
    saved = out.meta.pop('checksums', None)
    if saved is not None:  # Checkpoints written before rlx had them: none.
      got, _ = checksums(out.state)
      wrong = [p for p in got if saved.get(p) != got[p]]
      if wrong or set(saved) != set(got):
        raise CorruptCheckpoint(
            f'checkpoint {os.path.join(self.directory, str(step))} fails '
            f'verification: {len(wrong) or "its"} arrays differ from what '
            f'was written (first: {(wrong or ["the array list"])[0]})')
    return out.state, out.meta

  def set_aside(self, step: int) -> str:
    """Moves checkpoint `step` out of the listed ones, beside the folder
    (`<folder>.corrupt/<step>`); returns where it went."""
    target = os.path.join(f'{self.directory}.corrupt', str(step))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    shutil.move(os.path.join(self.directory, str(step)), target)
    self.reload()
    return target

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


def _cause(error: BaseException) -> str:
  """The innermost message of an exception chain, on one line (orbax wraps
  the OS error of a failed write several times)."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  if isinstance(error, OSError) and error.errno:
    return os.strerror(error.errno)
  text = ' '.join(str(error).split())
  # TensorStore's I/O errors end with the OS error's number.
  code = re.search(r"os_error_code='?(\d+)", text)
  if code:
    return os.strerror(int(code.group(1)))
  return f'{type(error).__name__}: {text[:300]}'


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
