"""Orbax checkpoints: everything needed to resume exactly.

A checkpoint holds a pytree of arrays (train state and any other array
state: estimators, buffers) and a JSON dict of host-side bookkeeping (step,
data position, counters, elapsed time, the config). Orbax writes each step
into a temporary directory and renames it when complete, so a checkpoint is
either whole or absent. Only finished checkpoints are ever listed.

Integrity: the metadata carries a checksum of every array (`checksums`),
computed where the array lives before the write and verified by every
`restore` and `read`, so a flipped byte on disk is a named error
(`CorruptCheckpoint`), never silently altered weights. A failed write (a full disk) removes its temporary
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


def _name(path) -> str:
  """A leaf's path as 'train/params/layer_0/...', the same whether the
  state was a dataclass (saved) or nested dicts (read back)."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(
      k, 'idx', k)))) for k in path)


def _words(x, xp):
  """`x`'s bits as uint32 words [*x.shape, k] (k = 2 for 8-byte dtypes,
  low word first; else 1, zero-extended): the same for a numpy array
  (xp=np) and a jax array (xp=jnp) of one dtype and value."""
  if xp is jnp and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == bool:
    x = x.astype(np.uint8)
  size = x.dtype.itemsize
  if xp is np:
    x = np.ascontiguousarray(x)
    if size == 8:
      return x.view('<u4').reshape(x.shape + (2,))
    return x.view(f'<u{size}').astype(np.uint32)[..., None]
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
  return jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32)[..., None]


def _position(words, xp):
  """2 * (flat index) + 1 of every word, as uint32 (wrapping), built in
  the words' own shape: a sharded leaf is summed where it lies (no
  flattening, which would gather it)."""
  index, stride = 0, 1
  for axis in reversed(range(words.ndim)):
    if xp is np:
      iota = np.arange(words.shape[axis], dtype=np.uint32).reshape(
          [-1 if a == axis else 1 for a in range(words.ndim)])
    else:
      iota = jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
    index = index + iota * np.uint32(stride % 2**32)
    stride *= words.shape[axis]
  return 2 * index + 1


def _digest_one(x, xp):
  """[2] uint32: the plain and the position-weighted sums of x's words (a
  changed byte changes the weighted one for certain; integer sums do not
  depend on the order of reduction), and whether x is all finite."""
  w = _words(x, xp)
  sums = xp.stack([xp.sum(w, dtype=np.uint32),
                   xp.sum(w * _position(w, xp), dtype=np.uint32)])
  finite = (xp.all(xp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
            else True)
  return sums, finite


_digest = jax.jit(lambda leaves: [_digest_one(x, jnp) for x in leaves])


def checksums(state: PyTree) -> tuple[dict[str, list], list[str]]:
  """({leaf path: [checksum, dtype]}, paths of leaves holding NaN or inf).
  Jax arrays are summed on their devices, host arrays on the host."""
  flat = [(_name(p), x) for p, x in
          jax.tree_util.tree_flatten_with_path(state)[0]]
  device = [i for i, (_, x) in enumerate(flat) if isinstance(x, jax.Array)]
  digests = dict(zip(device, jax.device_get(
      _digest([flat[i][1] for i in device])) if device else []))
  out, bad = {}, []
  for i, (name, x) in enumerate(flat):
    sums, finite = digests.get(i) or _digest_one(np.asarray(x), np)
    out[name] = [int(sums[0]) << 32 | int(sums[1]), _dtype(x)]
    if not finite:
      bad.append(name)
  return out, bad


def _dtype(x) -> str:
  return str(x.dtype) if hasattr(x, 'dtype') else str(np.asarray(x).dtype)


def _verify(state: PyTree, saved: dict[str, list], where: str) -> None:
  """Raises CorruptCheckpoint when an array of `state` (all of a restored
  checkpoint, or the part `read` returned) differs from what was saved. A
  leaf read back in another dtype (a host int64 as int32 without x64) is
  compared after a cast back to the saved one; one without a saved
  checksum is not checked."""
  flat = [(_name(p), x) for p, x in
          jax.tree_util.tree_flatten_with_path(state)[0]]
  same = {n: x for n, x in flat if n in saved and _dtype(x) == saved[n][1]}
  cast = {n: np.asarray(x).astype(saved[n][1]) for n, x in flat
          if n in saved and n not in same}
  got, _ = checksums({**same, **cast})
  wrong = sorted(n for n in got if got[n][0] != saved[n][0])
  if wrong:
    raise CorruptCheckpoint(
        f'checkpoint {where} fails verification: {len(wrong)} arrays '
        f'differ from what was written (first: {wrong[0]})')


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
    bad = [p for p in bad if p.split('/')[0] in finite]
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
    CorruptCheckpoint naming `what` failed and the step's directory. A
    failed read is tried once more first (a network filesystem's passing
    error is not a corrupt checkpoint)."""
    for attempt in range(2):
      try:
        return self._manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # Orbax raises many types; report them as one.
        if attempt:
          raise CorruptCheckpoint(
              f'cannot {what} {os.path.join(self.directory, str(step))}: '
              f'{_cause(e)}{hint}') from e
        time.sleep(1.0)

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
      _verify(out.state, saved, os.path.join(self.directory, str(step)))
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
      CheckpointError naming the directory when it cannot be read;
      CorruptCheckpoint when its arrays fail verification.
    """
    out = self._restore(step, 'read checkpoint',
                        state=ocp.args.StandardRestore(),
                        meta=ocp.args.JsonRestore())
    saved = out.meta.get('checksums')
    if saved is not None:
      _verify(out.state, saved, os.path.join(self.directory, str(step)))
    return out.state

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
