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
                   'special_tokens_map.json', 'generation_config.json')


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
  the saved parameters.

  Args:
    out_dir: created if needed; must differ from source_dir.
    params: laid out as the source's architecture (`from_pretrained`).
    source_dir: the HF directory whose config and tokenizer to reuse.
    max_shard_bytes: split the weights above this size (see
      `weights.save_params`).

  Returns:
    The paths written.
  """
  if os.path.realpath(out_dir) == os.path.realpath(source_dir):
    raise ValueError(f'{out_dir}: refusing to overwrite the source directory')
  hf_config = config_lib.read_config(source_dir)
  cfg = config_lib.transformer_config(
      hf_config, where=os.path.join(source_dir, config_lib.CONFIG_FILE))
  os.makedirs(out_dir, exist_ok=True)
  written = weights.save_params(out_dir, params, cfg,
                                max_shard_bytes=max_shard_bytes)
  dtypes = {str(x.dtype) for x in jax.tree.leaves(params)}
  hf_config = dict(hf_config)
  hf_config.pop('torch_dtype', None)
  hf_config['dtype'] = dtypes.pop() if len(dtypes) == 1 else 'float32'
  config_path = os.path.join(out_dir, config_lib.CONFIG_FILE)
  with open(config_path, 'w') as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  written.append(config_path)
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(source_dir, name)):
      written.append(shutil.copy(os.path.join(source_dir, name), out_dir))
  return written
