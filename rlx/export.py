"""A trained run in the Hugging Face layout (`scripts/export_hf.py`).

  run = runs.load('runs/grpo')
  export.export_run(run, '/tmp/grpo-hf')               # the whole model
  export.export_run(run, '/tmp/grpo-lora', peft=True)  # LoRA run: adapters

The whole model (LoRA adapters merged) loads with
`rlx.models.from_pretrained` and with transformers'
`AutoModelForCausalLM` / `AutoTokenizer`; `peft=True` writes a LoRA run's
adapters as PEFT does (adapter_config.json + adapter_model.safetensors,
for `peft.PeftModel.from_pretrained(base, out)`).

What is written, by kind of run:
  model.hf_dir   config.json from model.hf_dir (its dtype set to the
                 exported weights'), model.safetensors, and model.hf_dir's
                 tokenizer files. PEFT: the base is model.hf_dir itself.
  rlx's own      config.json of the equivalent HF architecture
  transformer    (`hf_config`: LlamaForCausalLM, or Qwen3ForCausalLM with
                 model.qk_norm), model.safetensors, and a tokenizer.json
                 that encodes and decodes as the task's CharTokenizer
                 (`char_tokenizer_files`). PEFT: there is no published
                 base, so the frozen base (the warm start) is written as a
                 whole model to OUT/base, which adapter_config.json names
                 by its absolute path.

Each export is written to a new directory beside OUT which then replaces
OUT, so a crash leaves no half-written model; OUT may only be replaced when
it is an earlier export (it holds config.json or adapter_config.json).
"""

import json
import os
import shutil
from typing import Callable, NamedTuple

import flax
import numpy as np
from safetensors import numpy as st_numpy
import tokenizers
from tokenizers import decoders
from tokenizers import models as tok_models
from tokenizers import pre_tokenizers
from tokenizers import processors

from rlx import policy as policy_lib
from rlx import runs
from rlx.models import lora
from rlx.models import tokenizer as tokenizer_lib
from rlx.models import transformer
from rlx.models.hf import config as hf_config_lib
from rlx.models.hf import pretrained
from rlx.models.hf import weights
from rlx.types import Params

PEFT_CONFIG = 'adapter_config.json'
PEFT_WEIGHTS = 'adapter_model.safetensors'
BASE_DIR = 'base'  # PEFT export of rlx's own transformer: OUT/base.
# A directory holding one of these is an earlier export: OUT may replace it.
_EXPORT_MARKERS = (hf_config_lib.CONFIG_FILE, PEFT_CONFIG)
# CharTokenizer's special ids (0, 1, 2) by name in the exported vocabulary.
SPECIAL_TOKENS = ('<pad>', '<s>', '</s>')
# The TransformerConfig fields an HF config.json must reproduce (the rest
# are runtime choices: attention kernel, chunking).
_ARCHITECTURE = ('vocab_size', 'num_layers', 'embed_dim', 'num_heads',
                 'num_kv_heads', 'head_dim', 'mlp_dim', 'rope_theta',
                 'norm_eps', 'qk_norm', 'tie_embeddings', 'qkv_bias',
                 'norm_plus_one', 'embed_scale', 'activation',
                 'rope_scaling')

Files = dict[str, bytes]  # File name -> contents.


class OutputError(ValueError):
  """The output directory cannot be written (named in the message)."""


class Exported(NamedTuple):
  out: str  # The directory written.
  what: str  # e.g. 'merged LoRA model (LlamaForCausalLM)'.
  files: list[str]  # Every file written, under `out`.


def check_out(out: str, *, keep: tuple[str, ...] = ()) -> None:
  """Raises unless `out` may be written: it must not exist, be empty, or
  be an earlier export; it must not be or contain a path of `keep`.

  Raises:
    OutputError: naming `out` and why.
  """
  real = os.path.realpath(out)
  for path in keep:
    if os.path.commonpath([real, os.path.realpath(path)]) == real:
      raise OutputError(f'{out}: would replace {path}; choose another '
                        'output directory')
  if not os.path.exists(out):
    return
  if not os.path.isdir(out):
    raise OutputError(f'{out}: exists and is not a directory')
  if os.listdir(out) and not any(
      os.path.isfile(os.path.join(out, m)) for m in _EXPORT_MARKERS):
    raise OutputError(
        f'{out}: exists and is not a model directory (no '
        f'{" or ".join(_EXPORT_MARKERS)}); refusing to replace it')


def write_atomically(out: str, write: Callable[[str], None]) -> list[str]:
  """Runs `write(tmp)` on a new directory beside `out`, then puts it in
  `out`'s place (an earlier `out` is removed only after that).

  Returns:
    The files written, as paths under `out`.
  """
  out = os.path.normpath(out)
  tmp = f'{out}.partial-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    write(tmp)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  files = sorted(os.path.relpath(os.path.join(d, f), tmp)
                 for d, _, names in os.walk(tmp) for f in names)
  old = f'{out}.old-{os.getpid()}'
  if os.path.exists(out):
    os.rename(out, old)
  os.rename(tmp, out)
  shutil.rmtree(old, ignore_errors=True)
  return [os.path.join(out, f) for f in files]


def hf_config(cfg: transformer.TransformerConfig, *,
              tokenizer: tokenizer_lib.Tokenizer,
              max_positions: int) -> dict:
  """config.json of the HF architecture that computes what rlx's
  transformer `cfg` computes: LlamaForCausalLM, or Qwen3ForCausalLM when
  `cfg.qk_norm` (RMSNorm on q and k per head, before RoPE).

  Args:
    cfg: the architecture (rlx's own: no biases, Gemma switches or RoPE
      scaling).
    tokenizer: gives the bos, eos and pad ids.
    max_positions: max_position_embeddings (the run's prompt + response
      length; with plain RoPE HF only records it).

  Raises:
    ValueError: naming the setting no supported HF family reproduces.
  """
  unsupported = [f for f, plain in (
      ('qkv_bias', False), ('norm_plus_one', False), ('embed_scale', False),
      ('activation', 'silu'), ('rope_scaling', 'none'))
                 if getattr(cfg, f) != plain]
  if unsupported:
    raise ValueError(f'model.{unsupported[0]}={getattr(cfg, unsupported[0])!r}'
                     ': no Llama or Qwen3 equivalent to export to')
  family = hf_config_lib.FAMILIES['qwen3' if cfg.qk_norm else 'llama']
  out = {
      'architectures': [family.architecture], 'model_type': family.name,
      'vocab_size': cfg.vocab_size, 'hidden_size': cfg.embed_dim,
      'intermediate_size': cfg.mlp_dim, 'num_hidden_layers': cfg.num_layers,
      'num_attention_heads': cfg.num_heads,
      'num_key_value_heads': cfg.num_kv_heads, 'head_dim': cfg.head_dim,
      'hidden_act': 'silu', 'rms_norm_eps': cfg.norm_eps,
      'max_position_embeddings': max_positions,
      # transformers < 5 reads rope_theta, >= 5 rope_parameters.
      'rope_theta': cfg.rope_theta,
      'rope_parameters': {'rope_type': 'default',
                          'rope_theta': cfg.rope_theta},
      'tie_word_embeddings': cfg.tie_embeddings,
      'attention_bias': False, 'attention_dropout': 0.0,
      'bos_token_id': tokenizer.bos_id, 'eos_token_id': tokenizer.eos_id,
      'pad_token_id': tokenizer.pad_id, 'use_cache': True,
      'dtype': cfg.param_dtype, 'torch_dtype': cfg.param_dtype}
  out.update({'mlp_bias': False} if family.name == 'llama' else
             {'use_sliding_window': False, 'sliding_window': None})
  # The loader's reading of what we wrote must be `cfg` again.
  back = hf_config_lib.transformer_config(out)
  wrong = [f for f in _ARCHITECTURE if getattr(back, f) != getattr(cfg, f)]
  if wrong:
    raise AssertionError(f'exported config.json reads back with different '
                         f'{wrong}')
  return out


def char_tokenizer_files(tok: tokenizer_lib.CharTokenizer, *,
                         max_len: int) -> Files:
  """tokenizer.json (+ tokenizer_config.json, special_tokens_map.json,
  generation_config.json) that encode and decode like `tok`: one id per
  character, ids 0/1/2 = <pad>/<s>/</s>. HF's default encoding prepends
  <s>, as rlx's prompts do; decoding joins the characters.

  Raises:
    ValueError: when the alphabet can spell a special token's name (that
      text would then encode differently).
  """
  spelled = [s for s in SPECIAL_TOKENS if set(s) <= set(tok.alphabet)]
  if spelled:
    raise ValueError(f'the alphabet {tok.alphabet!r} spells the special '
                     f'token {spelled[0]!r}; cannot export its tokenizer')
  pad, bos, eos = SPECIAL_TOKENS
  vocab = {pad: tok.pad_id, bos: tok.bos_id, eos: tok.eos_id}
  vocab.update({c: tok.encode(c)[0] for c in tok.alphabet})
  # WordLevel over single characters: a character outside the alphabet is
  # an error, as in CharTokenizer (there is no unknown token).
  hf = tokenizers.Tokenizer(tok_models.WordLevel(vocab, unk_token=None))
  hf.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(r'[\s\S]'),
                                          'isolated')
  hf.decoder = decoders.Fuse()
  hf.add_special_tokens([tokenizers.AddedToken(s, special=True,
                                               normalized=False)
                         for s in SPECIAL_TOKENS])
  hf.post_processor = processors.TemplateProcessing(
      single=f'{bos} $A', pair=f'{bos} $A $B:1',
      special_tokens=[(bos, tok.bos_id)])
  special = {'bos_token': bos, 'eos_token': eos, 'pad_token': pad}
  tok_config = {**special, 'tokenizer_class': 'PreTrainedTokenizerFast',
                'model_max_length': max_len, 'padding_side': 'left',
                'clean_up_tokenization_spaces': False}
  generation = {'bos_token_id': tok.bos_id, 'eos_token_id': tok.eos_id,
                'pad_token_id': tok.pad_id}
  as_json = lambda d: json.dumps(d, indent=2, sort_keys=True).encode()
  return {'tokenizer.json': hf.to_str(pretty=True).encode(),
          'tokenizer_config.json': as_json(tok_config),
          'special_tokens_map.json': as_json(special),
          'generation_config.json': as_json(generation)}


def source_files(model_dir: str) -> Files:
  """The tokenizer files of a HF directory (those `save_pretrained`
  copies)."""
  out = {}
  for name in pretrained.TOKENIZER_FILES:
    path = os.path.join(model_dir, name)
    if os.path.isfile(path):
      with open(path, 'rb') as f:
        out[name] = f.read()
  return out


def write_files(folder: str, files: Files) -> None:
  """Writes each of `files` into the existing `folder`."""
  for name, data in files.items():
    with open(os.path.join(folder, name), 'wb') as f:
      f.write(data)


def write_model(folder: str, params: Params,
                cfg: transformer.TransformerConfig, *, config: dict,
                files: Files) -> None:
  """Weights, config.json (dtype: the weights') and `files` into the
  existing `folder`."""
  weights.save_params(folder, params, cfg)
  dtypes = {str(x.dtype) for x in flax.traverse_util.flatten_dict(
      params).values()}
  dtype = dtypes.pop() if len(dtypes) == 1 else 'float32'
  # Both spellings: newer transformers read dtype, older ones torch_dtype.
  config = {**config, 'dtype': dtype, 'torch_dtype': dtype}
  write_files(folder, {hf_config_lib.CONFIG_FILE: json.dumps(
      config, indent=2, sort_keys=True).encode(), **files})


def peft_tensors(adapters: Params,
                 cfg: transformer.TransformerConfig) -> dict[str, np.ndarray]:
  """PEFT's tensors for rlx adapters: lora_A.weight [r, in] = A.T and
  lora_B.weight [out, r] = B.T, named after the HF module (`o`'s input is
  its N*H flattened heads, as o_proj's is), e.g.
  base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight."""
  names = weights.param_map(cfg)
  out = {}
  for path, value in flax.traverse_util.flatten_dict(adapters).items():
    module = names[path[:-1] + ('kernel',)].name.removesuffix('.weight')
    which = {'lora_a': 'lora_A', 'lora_b': 'lora_B'}[path[-1]]
    out[f'base_model.model.{module}.{which}.weight'] = np.ascontiguousarray(
        np.asarray(value).T)
  return out


def peft_config(cfg: lora.LoraConfig, base: str) -> dict:
  """adapter_config.json: PEFT's update is lora_alpha / r * B @ A, as
  rlx's (alpha / rank) * A @ B in the transposed layout."""
  return {'peft_type': 'LORA', 'task_type': 'CAUSAL_LM',
          'base_model_name_or_path': base, 'r': cfg.rank,
          'lora_alpha': cfg.alpha, 'lora_dropout': 0.0, 'bias': 'none',
          'target_modules': sorted(f'{m}_proj' for m in cfg.modules),
          'fan_in_fan_out': False, 'use_rslora': False, 'use_dora': False,
          'inference_mode': True, 'init_lora_weights': True,
          'modules_to_save': None, 'layers_to_transform': None}


def write_peft(folder: str, adapters: Params, *, lora_cfg: lora.LoraConfig,
               model_cfg: transformer.TransformerConfig, base: str) -> None:
  """adapter_config.json + adapter_model.safetensors into `folder`."""
  st_numpy.save_file(peft_tensors(adapters, model_cfg),
                     os.path.join(folder, PEFT_WEIGHTS),
                     metadata={'format': 'pt'})
  write_files(folder, {PEFT_CONFIG: json.dumps(
      peft_config(lora_cfg, base), indent=2, sort_keys=True).encode()})


def export_run(run: runs.SavedRun, out: str, *,
               peft: bool = False) -> Exported:
  """Writes `run`'s policy to `out` in the HF layout (see module
  docstring).

  Args:
    run: from `runs.load`.
    out: the directory to write (replaced if an earlier export).
    peft: a LoRA run's adapters in PEFT's layout instead of the merged
      model.

  Raises:
    OutputError: `out` cannot be written.
    ValueError: peft on a run without adapters, or a model with no HF
      equivalent.
  """
  lora_cfg = policy_lib.lora_config(run.cfg)
  if peft and (lora_cfg is None or run.adapters is None):
    raise ValueError('peft=True needs a LoRA run (lora.rank > 0); this run '
                     'trained every parameter')
  hf_dir = os.path.abspath(os.path.expanduser(run.cfg.model.hf_dir)
                           ) if run.cfg.model.hf_dir else ''
  check_out(out, keep=(run.workdir,) + ((hf_dir,) if hf_dir else ()))
  model_cfg = run.model.cfg
  if hf_dir:
    config, files = hf_config_lib.read_config(hf_dir), source_files(hf_dir)
  else:
    max_len = run.cfg.task.prompt_len + run.cfg.sampling.max_new_tokens
    config = hf_config(model_cfg, tokenizer=run.task.tokenizer,
                       max_positions=max_len)
    files = char_tokenizer_files(run.task.tokenizer, max_len=max_len)
  arch = hf_config_lib.family_of(config).architecture
  if not peft:
    what = f'{"merged LoRA" if lora_cfg else "full"} model ({arch})'
    write = lambda tmp: write_model(tmp, run.params, model_cfg,
                                    config=config, files=files)
  else:
    base = hf_dir or os.path.join(os.path.abspath(out), BASE_DIR)
    what = f'PEFT LoRA adapters over {base} ({arch})'

    def write(tmp):
      if not hf_dir:
        os.makedirs(os.path.join(tmp, BASE_DIR))
        write_model(os.path.join(tmp, BASE_DIR), run.base, model_cfg,
                    config=config, files=files)
      write_peft(tmp, run.adapters, lora_cfg=lora_cfg, model_cfg=model_cfg,
                 base=base)
      write_files(tmp, files)  # AutoTokenizer.from_pretrained(out) too.
  return Exported(out, what, write_atomically(out, write))
