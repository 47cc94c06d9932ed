"""Hugging Face `config.json` -> `TransformerConfig`, per model family.

Supported families (decoder-only, full attention):
  llama  LlamaForCausalLM   SwiGLU, GQA, optional llama3/linear RoPE scaling.
  qwen2  Qwen2ForCausalLM   as llama plus biases on q/k/v.
  qwen3  Qwen3ForCausalLM   as llama plus per-head RMSNorm on q and k.
  gemma  GemmaForCausalLM   Gemma 1: RMSNorm by (1 + w), embeddings times
                            sqrt(D), tanh-GELU gate, tied embeddings.

Anything the rlx transformer cannot reproduce exactly (sliding windows,
biases elsewhere, other RoPE types) is rejected with a message naming the
file and the setting, rather than loaded approximately.
"""

import dataclasses
import json
import os
from typing import Any, Optional

from rlx.models import transformer

CONFIG_FILE = 'config.json'


@dataclasses.dataclass(frozen=True)
class Family:
  """What a model family adds to the plain llama architecture."""
  name: str  # Our name, also the chat template's (see hf_tokenizer).
  architecture: str  # HF `architectures[0]`.
  tie_default: bool  # tie_word_embeddings when config.json omits it.
  qkv_bias: bool = False
  qk_norm: bool = False
  gemma: bool = False  # norm_plus_one, embed_scale, gelu_tanh.


FAMILIES = {
    f.name: f for f in (
        Family('llama', 'LlamaForCausalLM', tie_default=False),
        Family('qwen2', 'Qwen2ForCausalLM', tie_default=False,
               qkv_bias=True),
        Family('qwen3', 'Qwen3ForCausalLM', tie_default=False, qk_norm=True),
        Family('gemma', 'GemmaForCausalLM', tie_default=True, gemma=True),
    )
}
_BY_ARCHITECTURE = {f.architecture: f for f in FAMILIES.values()}
_ACTIVATIONS = {'silu': 'silu', 'gelu_pytorch_tanh': 'gelu_tanh',
                # Gemma's official configs say 'gelu' but mean tanh-GELU
                # (HF rewrites it the same way).
                'gelu': 'gelu_tanh'}
_DTYPES = {'float32': 'float32', 'bfloat16': 'bfloat16',
           'float16': 'float16'}


def read_config(model_dir: str) -> dict[str, Any]:
  """Reads `model_dir/config.json`.

  Raises:
    FileNotFoundError: naming the directory or the missing file.
  """
  if not os.path.isdir(model_dir):
    raise FileNotFoundError(f'{model_dir}: no such model directory')
  path = os.path.join(model_dir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: missing (a Hugging Face model directory '
                            'needs config.json, *.safetensors and '
                            'tokenizer.json)')
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: invalid JSON ({e})') from e


def family_of(hf_config: dict[str, Any], where: str = CONFIG_FILE) -> Family:
  """Returns the family of a config, from `architectures` or `model_type`.

  Raises:
    ValueError: naming the architecture when it is not supported.
  """
  archs = hf_config.get('architectures') or []
  model_type = hf_config.get('model_type')
  family = (_BY_ARCHITECTURE.get(archs[0]) if archs
            else FAMILIES.get(model_type))
  if family is None:
    supported = ', '.join(f.architecture for f in FAMILIES.values())
    raise ValueError(
        f'{where}: architecture {archs[0] if archs else None!r} '
        f'(model_type {model_type!r}) is not supported; supported: '
        f'{supported}')
  return family


def _rope_fields(hf_config: dict[str, Any], where: str) -> dict[str, Any]:
  """RoPE settings, from transformers>=5 `rope_parameters` or the older
  top-level `rope_theta` + `rope_scaling`."""
  params = dict(hf_config.get('rope_parameters') or {})
  scaling = hf_config.get('rope_scaling') or {}
  params = {**scaling, **params}
  theta = params.get('rope_theta', hf_config.get('rope_theta', 10_000.0))
  kind = params.get('rope_type', params.get('type', 'default'))
  fields = {'rope_theta': float(theta)}
  if kind == 'default':
    return fields
  if kind not in ('linear', 'llama3'):
    raise ValueError(f'{where}: RoPE type {kind!r} is not supported (only '
                     'default, linear, llama3)')
  need = ['factor'] + (['low_freq_factor', 'high_freq_factor',
                        'original_max_position_embeddings']
                       if kind == 'llama3' else [])
  missing = [k for k in need if k not in params]
  if missing:
    raise ValueError(f'{where}: RoPE scaling {kind!r} needs {missing}')
  fields.update(rope_scaling=kind, rope_factor=float(params['factor']))
  if kind == 'llama3':
    fields.update(
        rope_low_freq_factor=float(params['low_freq_factor']),
        rope_high_freq_factor=float(params['high_freq_factor']),
        rope_original_max_len=int(params['original_max_position_embeddings']))
  return fields


def _reject_unsupported(hf_config: dict[str, Any], family: Family,
                        where: str) -> None:
  """Raises on settings the rlx transformer does not implement."""
  problems = []
  if hf_config.get('use_sliding_window'):
    problems.append('use_sliding_window=true (sliding-window attention)')
  if hf_config.get('attention_bias') and not family.qkv_bias:
    problems.append('attention_bias=true (biases on q/k/v/o)')
  if hf_config.get('mlp_bias'):
    problems.append('mlp_bias=true')
  if hf_config.get('partial_rotary_factor', 1.0) != 1.0:
    problems.append('partial_rotary_factor != 1')
  if hf_config.get('use_bidirectional_attention'):
    problems.append('use_bidirectional_attention=true')
  if problems:
    raise ValueError(f'{where} ({family.architecture}): unsupported '
                     f'setting(s): {"; ".join(problems)}')


def checkpoint_dtype(hf_config: dict[str, Any]) -> str:
  """The dtype the weights were saved in ('float32' if not said)."""
  name = hf_config.get('dtype') or hf_config.get('torch_dtype') or 'float32'
  return _DTYPES.get(str(name), 'float32')


def transformer_config(hf_config: dict[str, Any], *,
                       dtype: Optional[str] = None,
                       param_dtype: Optional[str] = None,
                       where: str = CONFIG_FILE
                       ) -> transformer.TransformerConfig:
  """Translates a HF config dict into the rlx architecture.

  Args:
    hf_config: the parsed config.json.
    dtype: activation dtype; default: the checkpoint's dtype.
    param_dtype: parameter dtype; default: the checkpoint's dtype.
    where: how to name the config in error messages (its path).

  Returns:
    The equivalent `TransformerConfig`.

  Raises:
    ValueError: on an unsupported architecture or setting, or a missing
      required field (each named).
  """
  family = family_of(hf_config, where)
  _reject_unsupported(hf_config, family, where)

  def need(key):
    if hf_config.get(key) is None:
      raise ValueError(f'{where} ({family.architecture}): missing {key!r}')
    return hf_config[key]

  heads = int(need('num_attention_heads'))
  width = int(need('hidden_size'))
  act_name = hf_config.get('hidden_activation') or hf_config.get(
      'hidden_act', 'silu')
  activation = _ACTIVATIONS.get(act_name)
  if activation is None or (activation == 'gelu_tanh') != family.gemma:
    raise ValueError(f'{where} ({family.architecture}): activation '
                     f'{act_name!r} is not supported for this family')
  tie = hf_config.get('tie_word_embeddings')
  stored = checkpoint_dtype(hf_config)
  return transformer.TransformerConfig(
      vocab_size=int(need('vocab_size')),
      num_layers=int(need('num_hidden_layers')),
      embed_dim=width,
      num_heads=heads,
      num_kv_heads=int(hf_config.get('num_key_value_heads') or heads),
      head_dim=int(hf_config.get('head_dim') or width // heads),
      mlp_dim=int(need('intermediate_size')),
      norm_eps=float(hf_config.get('rms_norm_eps', 1e-6)),
      qk_norm=family.qk_norm,
      tie_embeddings=family.tie_default if tie is None else bool(tie),
      dtype=dtype or stored,
      param_dtype=param_dtype or stored,
      qkv_bias=family.qkv_bias,
      norm_plus_one=family.gemma,
      embed_scale=family.gemma,
      activation=activation,
      **_rope_fields(hf_config, where))
