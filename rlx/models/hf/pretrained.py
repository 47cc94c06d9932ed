"""Entry points: a HF model directory in, (model, params, tokenizer) out.

  pre = rlx.models.from_pretrained('/models/Qwen3-0.6B', dtype='bfloat16')
  logits, _, _ = pre.model.apply({'params': pre.params}, tokens, positions,
                                 mask)
  rlx.models.hf.save_pretrained('/tmp/out', pre.params,
                                source_dir='/models/Qwen3-0.6B')
"""

import json
import os
import shutil
from typing import NamedTuple, Optional

import jax

from rlx.models import hf_tokenizer
from rlx.models import transformer
from rlx.models.hf import config as config_lib
from rlx.models.hf import weights
from rlx.types import Params

# Files copied unchanged by `save_pretrained` when the source has them.
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json',
                   'special_tokens_map.json', 'generation_config.json',
                   'chat_template.jinja', 'tokenizer.model')


class Pretrained(NamedTuple):
  model: transformer.Transformer
  params: Params
  tokenizer: hf_tokenizer.HFTokenizer


def from_pretrained(model_dir: str, *, dtype: Optional[str] = None,
                    param_dtype: Optional[str] = None,
                    shardings: weights.Shardings = None) -> Pretrained:
  """Loads a local HF model directory.

  Args:
    model_dir: holds config.json, model.safetensors (or shards plus
      model.safetensors.index.json) and tokenizer.json. Supported
      architectures: see `rlx.models.hf.config.FAMILIES`.
    dtype: activation dtype ('float32', 'bfloat16'); default: the dtype
      config.json says the weights were saved in.
    param_dtype: parameter dtype; same default.
    shardings: where each parameter goes (see `weights.load_params`): None
      for the default device, a Sharding for all, or a pytree of them.

  Returns:
    `Pretrained(model, params, tokenizer)`; unpacks as a 3-tuple.

  Raises:
    FileNotFoundError: naming the missing directory or file.
    ValueError: naming the unsupported architecture / setting, or the
      tensor whose name or shape does not match config.json.
  """
  hf_config = config_lib.read_config(model_dir)
  cfg = config_lib.transformer_config(
      hf_config, dtype=dtype, param_dtype=param_dtype,
      where=os.path.join(model_dir, config_lib.CONFIG_FILE))
  tokenizer = hf_tokenizer.HFTokenizer.from_dir(model_dir)
  params = weights.load_params(model_dir, cfg, shardings=shardings)
  return Pretrained(transformer.Transformer(cfg), params, tokenizer)


def save_pretrained(out_dir: str, params: Params, *, source_dir: str,
                    max_shard_bytes: int = 4 << 30) -> list[str]:
  """Writes `params` as a HF model directory loadable by both rlx and HF.

  config.json and the tokenizer files come from `source_dir` (the directory
  the model was loaded from); config.json's dtype is set to the dtype of
  the saved parameters. Atomic: everything is written to a new directory
  beside `out_dir`, which then takes its place, so a crash leaves no partly
  written model and no shard of an earlier save survives.

  Args:
    out_dir: created, or replaced when it is an earlier model directory
      (has config.json); any other non-empty directory is refused. Must
      differ from source_dir.
    params: laid out as the source's architecture (`from_pretrained`).
    source_dir: the HF directory whose config and tokenizer to reuse.
    max_shard_bytes: split the weights above this size (see
      `weights.save_params`).

  Returns:
    The paths written (under out_dir).
  """
  out_dir = os.path.normpath(out_dir)
  if os.path.realpath(out_dir) == os.path.realpath(source_dir):
    raise ValueError(f'{out_dir}: refusing to overwrite the source directory')
  if os.path.exists(out_dir) and (
      not os.path.isdir(out_dir) or (os.listdir(out_dir) and not os.path.isfile(
          os.path.join(out_dir, config_lib.CONFIG_FILE)))):
    raise ValueError(f'{out_dir}: exists and is not a model directory (no '
                     f'{config_lib.CONFIG_FILE}); refusing to replace it')
  hf_config = config_lib.read_config(source_dir)
  cfg = config_lib.transformer_config(
      hf_config, where=os.path.join(source_dir, config_lib.CONFIG_FILE))
  tmp = f'{out_dir}.partial-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    written = _write_model(tmp, params, cfg, hf_config, source_dir,
                           max_shard_bytes)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = f'{out_dir}.old-{os.getpid()}'
  if os.path.exists(out_dir):
    os.rename(out_dir, old)
  os.rename(tmp, out_dir)
  shutil.rmtree(old, ignore_errors=True)
  return [os.path.join(out_dir, os.path.relpath(p, tmp)) for p in written]


def _write_model(tmp: str, params: Params, cfg, hf_config: dict,
                 source_dir: str, max_shard_bytes: int) -> list[str]:
  """Weights, config.json and the tokenizer files into `tmp`."""
  written = weights.save_params(tmp, params, cfg,
                                max_shard_bytes=max_shard_bytes)
  dtypes = {str(x.dtype) for x in jax.tree.leaves(params)}
  hf_config = dict(hf_config)
  # Both spellings: newer transformers read dtype, older ones torch_dtype.
  hf_config['dtype'] = hf_config['torch_dtype'] = (
      dtypes.pop() if len(dtypes) == 1 else 'float32')
  config_path = os.path.join(tmp, config_lib.CONFIG_FILE)
  with open(config_path, 'w') as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  written.append(config_path)
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(source_dir, name)):
      written.append(shutil.copy(os.path.join(source_dir, name), tmp))
  return written
