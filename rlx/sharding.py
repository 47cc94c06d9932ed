"""Meshes and shardings: one mesh over (data, fsdp, tensor), rules in config.

Weights carry logical axis names (rlx/models/transformer.py); the rule list
`mesh.rules` maps each name to mesh axes. A dimension that its mesh axes do
not divide is replicated instead (a 2-kv-head model on tensor=8 keeps its kv
heads whole), so every model runs on every mesh. Shardings are inferred from
`jax.eval_shape`; the train state is initialised and restored straight into
them; the train step is jitted with explicit in/out shardings and donation.
Rollout and train batches shard their prompt axis B over `('data', 'fsdp')`
(the `batch` rule), so a group's statistics stay on one device.

On many hosts (JAX multi-controller) every process builds the same mesh over
all devices; batches are placed with `put_batch`, which assembles the global
array from each process's rows.
"""

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from rlx import config as config_lib
from rlx import errors
from rlx import registry
from rlx.config import ConfigError
from rlx.types import PyTree

MESH_AXES = ('data', 'fsdp', 'tensor')


# Logical axis -> mesh axes. Weights carry the logical names of
# rlx/models/transformer.py; `batch` is the prompt axis B of rollouts and
# train batches (over data and fsdp, so a group stays on one device).
DEFAULT_RULES = (
    ('batch', ('data', 'fsdp')),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('q_heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('mlp', 'tensor'),
    ('head_dim', None),
)


@config_lib.section('mesh')
@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh over axes (data, fsdp, tensor); see rlx/sharding.py."""
  shape: tuple = (-1, 1, 1)  # Sizes of (data, fsdp, tensor); one -1 takes
  # the remaining devices. The product may be less than the device count
  # (the first devices are used) on one host; on many hosts it must use all.
  rules: tuple = DEFAULT_RULES  # (logical axis, mesh axis or axes or None)
  # pairs; a weight dimension that a mesh axis does not divide is replicated.
  sampler_shape: tuple = ()  # A separate (data, fsdp, tensor) mesh for the
  # sampler over the same devices (weights resharded each step); (): the
  # learner's mesh.


@registry.config_check
def _check_mesh_section(cfg) -> None:
  """Static checks; device counts are checked in `make_mesh`."""
  for key in ('shape', 'sampler_shape'):
    shape = getattr(cfg.mesh, key)
    if key == 'sampler_shape' and not shape:
      continue
    errors.require(len(shape) == 3 and all(isinstance(n, int) and (
        n >= 1 or n == -1) for n in shape) and list(shape).count(-1) <= 1,
                   f'mesh.{key}', f'{shape!r} must be 3 sizes (data, fsdp, '
                   'tensor), each >= 1 or one of them -1')
  for rule in cfg.mesh.rules:
    ok = isinstance(rule, (tuple, list)) and len(rule) == 2
    axes = rule[1] if ok else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    errors.require(ok and isinstance(rule[0], str) and
                   set(axes) <= set(MESH_AXES), 'mesh.rules',
                   f'{rule!r} must be (logical name, mesh axis or axes '
                   f'from {MESH_AXES} or None)')


def resolve_shape(shape: Sequence[int], num_devices: int
                  ) -> tuple[int, int, int]:
  """Replaces a -1 in `shape` by the remaining devices; checks the count."""
  shape = tuple(int(n) for n in shape)
  fixed = math.prod(n for n in shape if n != -1)
  if -1 in shape:
    if num_devices % fixed:
      raise ConfigError(
          f'mesh.shape={shape}: the other axes ({fixed} devices) do not '
          f'divide the {num_devices} devices')
    shape = tuple(num_devices // fixed if n == -1 else n for n in shape)
  if math.prod(shape) > num_devices:
    raise ConfigError(f'mesh.shape={shape} needs {math.prod(shape)} devices '
                      f'but only {num_devices} are visible')
  return shape


def make_mesh(shape: Sequence[int], devices: Sequence[Any] | None = None
              ) -> Mesh:
  """A mesh with axes (data, fsdp, tensor) over the first prod(shape) devices.

  Axes are `Auto` (GSPMD propagation): shardings are given at the jit
  boundary and XLA places the intermediates.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_shape(shape, len(devices))
  n = math.prod(shape)
  if jax.process_count() > 1 and n != len(devices):
    raise ConfigError(
        f'mesh.shape={shape} uses {n} of {len(devices)} devices; with '
        f'{jax.process_count()} processes the mesh must cover them all')
  if n == len(devices):  # Topology-aware placement (ICI rings on TPU).
    grid = mesh_utils.create_device_mesh(shape, devices)
  else:
    grid = np.asarray(devices[:n], dtype=object).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _rule_axes(axes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


@dataclasses.dataclass(frozen=True)
class Plan:
  """A mesh plus the logical-axis rules: turns names into shardings."""
  mesh: Mesh
  rules: tuple

  @classmethod
  def from_config(cls, cfg: MeshConfig, *, sampler: bool = False,
                  devices=None) -> 'Plan':
    shape = cfg.sampler_shape if sampler and cfg.sampler_shape else cfg.shape
    return cls(make_mesh(shape, devices), tuple(
        (name, _rule_axes(axes)) for name, axes in cfg.rules))

  @property
  def size(self) -> int:
    return self.mesh.devices.size

  def axes_for(self, name: str | None) -> tuple[str, ...]:
    for logical, axes in self.rules:
      if logical == name:
        return axes
    return ()

  def spec(self, shape: Sequence[int], names: Sequence[str | None]) -> P:
    """PartitionSpec for an array of `shape` with logical `names` per dim.

    Per dimension, the rule's mesh axes are kept in order while their sizes
    still divide the dimension; an axis already used by an earlier dimension
    is skipped (an array cannot use a mesh axis twice).
    """
    used, out = set(), []
    for dim, name in zip(shape, names):
      keep, size = [], 1
      for axis in self.axes_for(name):
        n = self.mesh.shape[axis]
        if axis in used or n == 1 or dim % (size * n):
          continue
        keep.append(axis)
        size *= n
      used.update(keep)
      out.append(None if not keep else keep[0] if len(keep) == 1
                 else tuple(keep))
    while out and out[-1] is None:
      out.pop()
    return P(*out)

  def sharding(self, shape, names) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(shape, names))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def params(self, abstract: PyTree, logical: PyTree | None = None
             ) -> PyTree:
    """Shardings for a parameter tree.

    Args:
      abstract: arrays or ShapeDtypeStructs (e.g. from `jax.eval_shape`).
      logical: the matching tree of logical PartitionSpecs (e.g.
        `transformer.logical_specs`); leaves missing from it, or a None
        tree, are replicated.
    """
    names = {}
    if logical is not None:
      flat, _ = jax.tree_util.tree_flatten_with_path(
          logical, is_leaf=lambda x: isinstance(x, P))
      names = {path: tuple(spec) for path, spec in flat}
    return jax.tree_util.tree_map_with_path(
        lambda path, x: self.sharding(x.shape, names.get(path, ())), abstract)

  def batch(self, shape: Sequence[int]) -> NamedSharding:
    """Leading axis B over the `batch` rule's axes (where they divide it)."""
    return self.sharding(shape, ('batch',))

  def constrain(self, tree: PyTree, names: Sequence[str | None] = ('batch',)
                ) -> PyTree:
    """`with_sharding_constraint` inside jit: leading dims named `names`
    (default: B only); scalars are left alone."""
    def put(x):
      if not hasattr(x, 'ndim') or x.ndim == 0:
        return x
      return jax.lax.with_sharding_constraint(
          x, self.sharding(x.shape, tuple(names)[:x.ndim]))
    return jax.tree.map(put, tree)

  def put_batch(self, tree: PyTree) -> PyTree:
    """Places host or device arrays with their leading axis as B.

    On one process this is a `device_put`; on many, each process passes
    the whole global batch (rlx's loop is replicated) and keeps its rows.
    """
    def put(x):
      if x is None:
        return None
      x = np.asarray(x) if not isinstance(x, jax.Array) else x
      sharding = self.batch(x.shape)
      if jax.process_count() == 1:
        return jax.device_put(x, sharding)
      x = np.asarray(jax.device_get(x))
      return jax.make_array_from_callback(x.shape, sharding,
                                          lambda idx: x[idx])
    return jax.tree.map(put, tree)

  def to_global(self, tree: PyTree) -> PyTree:
    """Host-local arrays that every process holds identically (the
    curriculum state) as replicated global arrays, which multi-host orbax
    saves need; on one process, unchanged."""
    if jax.process_count() == 1:
      return tree
    return self.put(tree, jax.tree.map(lambda _: self.replicated, tree))

  def global_abstract(self, abstract: PyTree) -> PyTree:
    """The restore target matching `to_global`."""
    if jax.process_count() == 1:
      return abstract
    return with_shardings(abstract,
                          jax.tree.map(lambda _: self.replicated, abstract))

  def put(self, tree: PyTree, shardings: PyTree) -> PyTree:
    """`device_put` of a (host or device) tree into `shardings`."""
    if jax.process_count() == 1:
      return jax.device_put(tree, shardings)
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(
            np.shape(x), s, lambda idx, x=np.asarray(x): x[idx]),
        jax.device_get(tree), shardings)


class ProcessFailed(RuntimeError):
  """Another process of a multi-host run stopped with an error."""


def together(fn, *args, **kwargs):
  """`fn(*args)` on every process; when it raises on any of them, every
  process raises (that one its own error, the others ProcessFailed), so
  that none is left waiting at a later collective for one that stopped.
  For steps that can fail on one process only (process 0's lock, its W&B
  run)."""
  if jax.process_count() == 1:
    return fn(*args, **kwargs)
  out, error = None, None
  try:
    out = fn(*args, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    error = e
  failed = np.asarray(multihost_utils.process_allgather(
      np.int32(error is not None))).ravel()
  if error is not None:
    raise error
  if failed.any():
    raise ProcessFailed(
        f'process {int(np.argmax(failed))} stopped with an error (its '
        'output says which); this process stops too')
  return out


def sync(name: str) -> None:
  """A barrier across processes (nothing with one process): after process
  0 changed shared files, before the others read them."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def primary_first(fn, *args, **kwargs):
  """`fn(*args)` on process 0 first, then on the others (one process: just
  `fn`). For work that writes shared files, e.g. preparing a dataset.

  When it fails on process 0, process 0 still reaches the barrier before
  raising, so the others go on to `fn` and meet the error themselves (a bad
  config fails everywhere with its message) rather than waiting out the
  coordination timeout.
  """
  if jax.process_count() == 1:
    return fn(*args, **kwargs)
  primary = jax.process_index() == 0
  out, error = None, None
  if primary:
    try:
      out = fn(*args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      error = e
  multihost_utils.sync_global_devices('rlx.primary_first')
  if error is not None:
    raise error
  return out if primary else fn(*args, **kwargs)


def to_host(x) -> np.ndarray:
  """The whole (global) array on this host; on many hosts an all-gather."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def train_state_shardings(plan: Plan, optimizer: optax.GradientTransformation,
                          abstract_state, param_shardings: PyTree):
  """Shardings for a `learner.TrainState`: optimizer moments follow their
  parameters; counters and scalars are replicated."""
  opt = optax.tree_map_params(
      optimizer, lambda _, s: s, abstract_state.opt_state, param_shardings,
      transform_non_params=lambda _: plan.replicated)
  return abstract_state.replace(step=plan.replicated, params=param_shardings,
                                opt_state=opt)


def with_shardings(abstract: PyTree, shardings: PyTree) -> PyTree:
  """ShapeDtypeStructs that carry shardings (orbax restores into them)."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract, shardings)


def memory_stats(jitted, *args) -> dict[str, int]:
  """Bytes per device of a jitted function's compiled program (AOT).

  Keys: arguments, outputs, temporaries, aliased (donated) and generated
  code, from XLA's `memory_analysis()`; empty where the backend gives none.
  """
  stats = jitted.lower(*args).compile().memory_analysis()
  if stats is None:
    return {}
  return {k: int(getattr(stats, f'{k}_size_in_bytes', 0)) for k in
          ('argument', 'output', 'temp', 'alias', 'generated_code')}


def format_bytes(n: float) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if abs(n) < 1024 or unit == 'GiB':
      return f'{n:.1f} {unit}' if unit != 'B' else f'{int(n)} B'
    n /= 1024
  return f'{n:.1f} GiB'
