"""Safetensors weights <-> rlx transformer parameters.

The HF name of every rlx parameter and how its layout differs:
  embed/embedding [V, D]         <- model.embed_tokens.weight [V, D]
  unembed/kernel [D, V]          <- lm_head.weight [V, D]             (T)
  final_norm/scale [D]           <- model.norm.weight
  layer_i/attn_norm/scale [D]    <- model.layers.i.input_layernorm.weight
  layer_i/mlp_norm/scale [D]     <- ...post_attention_layernorm.weight
  layer_i/attn/q/kernel [D,N,H]  <- ...self_attn.q_proj.weight [N*H, D] (T)
  layer_i/attn/k|v/kernel [D,K,H] <- ...self_attn.k|v_proj.weight      (T)
  layer_i/attn/q|k|v/bias [N|K,H] <- ...self_attn.q|k|v_proj.bias (qwen2)
  layer_i/attn/o/kernel [N,H,D]  <- ...self_attn.o_proj.weight [D, N*H] (T)
  layer_i/attn/q|k_norm/scale [H] <- ...self_attn.q|k_norm.weight (qwen3)
  layer_i/mlp/gate|up/kernel [D,F] <- ...mlp.gate|up_proj.weight [F, D] (T)
  layer_i/mlp/down/kernel [F,D]  <- ...mlp.down_proj.weight [D, F]    (T)
(T): a torch Linear stores [out, in]; rlx kernels are [in..., out...].

Loading reads one tensor at a time through safetensors' lazy `safe_open`
(memory-mapped), converts it, and places it straight into its target
sharding with `jax.make_array_from_callback`, so the host never holds more
than one tensor of the model.
"""

import contextlib
import dataclasses
import functools
import glob
import json
import math
import os
from typing import Any, Union

import flax
import jax
from jax.experimental import multihost_utils
import numpy as np
from safetensors import numpy as st_numpy
from safetensors import safe_open

from rlx.models import transformer
from rlx.types import Params

INDEX_FILE = 'model.safetensors.index.json'
SINGLE_FILE = 'model.safetensors'
# Tensors some checkpoints carry that rlx recomputes or never needs.
_IGNORABLE_SUFFIXES = ('rotary_emb.inv_freq',)

Path = tuple[str, ...]
Shardings = Union[None, jax.sharding.Sharding, Any]


@dataclasses.dataclass(frozen=True)
class Entry:
  """One parameter: its HF name and how its layout differs.

  `num_in` is 0 for tensors copied as they are (embeddings, norms, biases);
  >= 1 for Linear weights, which are transposed: it counts the leading rlx
  kernel axes that are inputs. `flat`: HF stores the tensor as one axis
  (biases [N*H] for rlx [N, H]).
  """
  name: str
  num_in: int = 0
  flat: bool = False


def param_map(cfg: transformer.TransformerConfig) -> dict[Path, Entry]:
  """rlx parameter path -> HF tensor, for every parameter of `cfg`."""
  out = {('embed', 'embedding'): Entry('model.embed_tokens.weight'),
         ('final_norm', 'scale'): Entry('model.norm.weight')}
  if not cfg.tie_embeddings:
    out[('unembed', 'kernel')] = Entry('lm_head.weight', 1)
  for i in range(cfg.num_layers):
    ours, hf = f'layer_{i}', f'model.layers.{i}'
    out[(ours, 'attn_norm', 'scale')] = Entry(f'{hf}.input_layernorm.weight')
    out[(ours, 'mlp_norm', 'scale')] = Entry(
        f'{hf}.post_attention_layernorm.weight')
    for p in 'qkv':
      out[(ours, 'attn', p, 'kernel')] = Entry(
          f'{hf}.self_attn.{p}_proj.weight', 1)
      if cfg.qkv_bias:
        out[(ours, 'attn', p, 'bias')] = Entry(f'{hf}.self_attn.{p}_proj.bias',
                                               flat=True)
    out[(ours, 'attn', 'o', 'kernel')] = Entry(f'{hf}.self_attn.o_proj.weight',
                                               2)
    if cfg.qk_norm:
      for p in 'qk':
        out[(ours, 'attn', f'{p}_norm', 'scale')] = Entry(
            f'{hf}.self_attn.{p}_norm.weight')
    for p in ('gate', 'up', 'down'):
      out[(ours, 'mlp', p, 'kernel')] = Entry(f'{hf}.mlp.{p}_proj.weight', 1)
  return out


def hf_shape(entry: Entry, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The HF tensor shape of an rlx parameter of `shape`."""
  if entry.flat:
    return (math.prod(shape),)
  if not entry.num_in:
    return shape
  return (math.prod(shape[entry.num_in:]), math.prod(shape[:entry.num_in]))


def to_rlx(entry: Entry, tensor: np.ndarray,
           shape: tuple[int, ...]) -> np.ndarray:
  """HF tensor -> rlx layout of `shape`."""
  if entry.num_in:
    tensor = tensor.T
  return tensor.reshape(shape)


def to_hf(entry: Entry, value: np.ndarray) -> np.ndarray:
  """rlx parameter -> HF tensor (contiguous)."""
  shape = hf_shape(entry, value.shape)
  if entry.num_in:
    value = value.reshape(shape[::-1]).T
  return np.ascontiguousarray(value.reshape(shape))


def abstract_params(cfg: transformer.TransformerConfig) -> Params:
  """Shapes and dtypes of `transformer.init_params(cfg)`, no allocation."""
  return jax.eval_shape(
      functools.partial(transformer.init_params, cfg), jax.random.key(0))


def _open(path: str):
  """safetensors' lazy reader of `path`.

  Raises:
    ValueError: naming the file when it is not whole safetensors data (a
      cut-off download, another format).
  """
  try:
    return safe_open(path, framework='numpy')
  except Exception as e:  # SafetensorError and OSError alike.
    raise ValueError(f'{path}: not a readable safetensors file ({e}); '
                     'download or export it again') from e


def tensor_files(model_dir: str) -> dict[str, str]:
  """HF tensor name -> the safetensors file that holds it.

  The files are chosen as transformers chooses them: model.safetensors
  when it exists, else the shards its index lists, else every *.safetensors
  file (then a tensor found in two files is an error, not a silent pick).

  Raises:
    FileNotFoundError: naming the directory when it has no weights, or the
      shard an index points to when that file is missing.
    ValueError: naming an index without a weight map, or a tensor that two
      unindexed files both hold.
  """
  single = os.path.join(model_dir, SINGLE_FILE)
  if os.path.isfile(single):
    with _open(single) as f:
      return {name: single for name in f.keys()}
  index_path = os.path.join(model_dir, INDEX_FILE)
  if os.path.isfile(index_path):
    try:
      with open(index_path) as f:
        weight_map = json.load(f)['weight_map']
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f'{index_path}: not a safetensors index (needs a '
                       f'"weight_map": {e!r})') from e
    out = {}
    for name, file in weight_map.items():
      path = os.path.join(model_dir, file)
      if not os.path.isfile(path):
        raise FileNotFoundError(
            f'{path}: missing (listed in {index_path} for tensor {name})')
      out[name] = path
    return out
  files = sorted(glob.glob(os.path.join(model_dir, '*.safetensors')))
  if not files:
    raise FileNotFoundError(
        f'{model_dir}: no weights ({SINGLE_FILE}, {INDEX_FILE} or any '
        '*.safetensors file)')
  out = {}
  for path in files:
    with _open(path) as f:
      for name in f.keys():
        if name in out:
          raise ValueError(
              f'{model_dir}: tensor {name} is in both {out[name]} and '
              f'{path}, and there is no {INDEX_FILE} to choose; remove the '
              'stale file')
        out[name] = path
  return out


def _check_names(mapping: dict[Path, Entry], files: dict[str, str],
                 model_dir: str, cfg: transformer.TransformerConfig) -> None:
  """Raises when a needed tensor is missing or an unknown one is present."""
  wanted = {e.name: path for path, e in mapping.items()}
  missing = [n for n in wanted if n not in files]
  if missing:
    raise ValueError(
        f'{model_dir}: tensor {missing[0]} (rlx {"/".join(wanted[missing[0]])})'
        f' is missing from the safetensors files ({len(missing)} missing in '
        'all); does config.json match the weights?')
  extra = [n for n in files if n not in wanted and not n.endswith(
      _IGNORABLE_SUFFIXES) and not (n == 'lm_head.weight' and
                                    cfg.tie_embeddings)]
  if extra:
    raise ValueError(
        f'{model_dir}: unexpected tensor(s) {sorted(extra)[:5]} in '
        f'{files[extra[0]]}: config.json does not describe these weights')


def _sharding_leaves(shardings: Shardings, abstract: Params) -> dict:
  """Flattened {path: sharding or None} for `abstract`'s leaves."""
  paths = flax.traverse_util.flatten_dict(abstract)
  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    return {p: shardings for p in paths}
  flat = flax.traverse_util.flatten_dict(shardings)
  if set(flat) != set(paths):
    raise ValueError('shardings pytree does not match the parameters: '
                     f'{sorted(set(flat) ^ set(paths))[:5]}')
  return flat


def _place(value: np.ndarray, sharding) -> jax.Array:
  """Puts a host array into `sharding` (default device if None)."""
  if sharding is None:
    return jax.device_put(value)
  return jax.make_array_from_callback(value.shape, sharding,
                                      lambda index: value[index])


def load_params(model_dir: str, cfg: transformer.TransformerConfig, *,
                shardings: Shardings = None) -> Params:
  """Reads HF safetensors into rlx parameters for `cfg`.

  Args:
    model_dir: a HF model directory (single-file or sharded safetensors).
    cfg: the architecture, e.g. from `hf.config.transformer_config`;
      parameters are cast to `cfg.param_dtype`.
    shardings: None (default device), one `jax.sharding.Sharding` for every
      leaf, or a pytree of shardings shaped like the parameters (e.g.
      `nn.logical_to_mesh_sharding(transformer.logical_specs(cfg), mesh,
      rules)`). Each leaf is built directly in its sharding; only the shards
      addressable by this process are materialised.

  Returns:
    The parameter pytree, as `transformer.init_params(cfg, key)` lays it out.

  Raises:
    FileNotFoundError / ValueError: naming the file or tensor that is
      missing, unexpected, or whose shape does not match config.json.
  """
  abstract = abstract_params(cfg)
  mapping = param_map(cfg)
  files = tensor_files(model_dir)
  _check_names(mapping, files, model_dir, cfg)
  targets = _sharding_leaves(shardings, abstract)
  leaves = {}
  with contextlib.ExitStack() as stack:
    opened = {}
    for path, leaf in flax.traverse_util.flatten_dict(abstract).items():
      entry = mapping[path]
      file = files[entry.name]
      if file not in opened:
        opened[file] = stack.enter_context(_open(file))
      tensor = opened[file].get_tensor(entry.name)
      want = hf_shape(entry, leaf.shape)
      if tuple(tensor.shape) != want:
        raise ValueError(
            f'{file}: tensor {entry.name} has shape {tuple(tensor.shape)}, '
            f'but config.json implies {want} (rlx {"/".join(path)} '
            f'{leaf.shape})')
      value = to_rlx(entry, tensor, leaf.shape).astype(leaf.dtype)
      leaves[path] = _place(value, targets[path])
      del tensor, value  # One tensor on the host at a time.
  return flax.traverse_util.unflatten_dict(leaves)


def _to_host(x: jax.Array) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def save_params(out_dir: str, params: Params,
                cfg: transformer.TransformerConfig, *,
                max_shard_bytes: int = 4 << 30) -> list[str]:
  """Writes rlx parameters as HF safetensors (names and layouts as HF).

  Args:
    out_dir: existing directory to write into.
    params: pytree laid out like `transformer.init_params(cfg, ...)`.
    cfg: the architecture.
    max_shard_bytes: above this total, weights are split into
      model-0000i-of-0000n.safetensors files plus an index, as HF does.

  Returns:
    The files written (weights and, if sharded, the index).
  """
  mapping = param_map(cfg)
  flat = flax.traverse_util.flatten_dict(params)
  if set(flat) != set(mapping):
    raise ValueError('params do not match the config: '
                     f'{sorted(set(flat) ^ set(mapping))[:5]}')
  shards, current, size = [], {}, 0
  for path in sorted(mapping, key=lambda p: mapping[p].name):
    tensor = to_hf(mapping[path], _to_host(flat[path]))
    if current and size + tensor.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[mapping[path].name] = tensor
    size += tensor.nbytes
  shards.append(current)
  metadata = {'format': 'pt'}  # What transformers expects to find.
  if len(shards) == 1:
    path = os.path.join(out_dir, SINGLE_FILE)
    st_numpy.save_file(shards[0], path, metadata=metadata)
    return [path]
  written, weight_map = [], {}
  for i, shard in enumerate(shards):
    name = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    written.append(os.path.join(out_dir, name))
    st_numpy.save_file(shard, written[-1], metadata=metadata)
    weight_map.update(dict.fromkeys(shard, name))
  index = os.path.join(out_dir, INDEX_FILE)
  total = sum(t.nbytes for s in shards for t in s.values())
  with open(index, 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map},
              f, indent=2)
  return written + [index]
