r"""Sample from a local Hugging Face model with rlx's jit sampler.

  python scripts/sample.py --model_dir=/models/Qwen3-0.6B \
      --prompt='What is 2+3?' --prompt='Name a prime.' --max_new_tokens=64

Prompts go through the family's chat template unless --nochat (then the
text is encoded as is, with bos where the family uses one). --temperature=0
(the default) is greedy decoding.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import numpy as np

import rlx.models
from rlx.sampling import sampler as sampler_lib

_MODEL_DIR = flags.DEFINE_string('model_dir', None, 'HF model directory.',
                                 required=True)
_PROMPT = flags.DEFINE_multi_string('prompt', None, 'Prompt (repeatable).',
                                    required=True)
_CHAT = flags.DEFINE_bool('chat', True, 'Apply the chat template.')
_SYSTEM = flags.DEFINE_string('system', None, 'System message (chat only).')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 128, 'Response budget.',
                                lower_bound=1)
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, '0 = greedy.',
                                  lower_bound=0.0)
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus mass, in (0, 1].',
                            upper_bound=1.0)
flags.register_validator('top_p', lambda v: v > 0,
                         message='--top_p must be in (0, 1]')
_TOP_K = flags.DEFINE_integer('top_k', 0, '0 disables top-k.', lower_bound=0)
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1, 'Samples per prompt.',
                                    lower_bound=1)
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_DTYPE = flags.DEFINE_string('dtype', None,
                             "'float32' or 'bfloat16'; default: the "
                             "checkpoint's.")


def encode(tokenizer, prompts, *, chat: bool, system=None):
  """Left-padded ids [B, P] int32 and mask [B, P] bool."""
  rows = []
  for text in prompts:
    if chat:
      messages = [{'role': 'system', 'content': system}] if system else []
      rows.append(tokenizer.encode_chat(
          messages + [{'role': 'user', 'content': text}]))
    else:
      rows.append(tokenizer.encode(text, add_bos=tokenizer.prepends_bos))
  width = max(len(r) for r in rows)
  tokens = np.full((len(rows), width), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(rows), width), bool)
  for i, row in enumerate(rows):
    tokens[i, width - len(row):], mask[i, width - len(row):] = row, True
  return tokens, mask


def generate(model_dir, prompts, *, chat=True, system=None,
             max_new_tokens=128, temperature=0.0, top_p=1.0, top_k=0,
             num_samples=1, seed=0, dtype=None) -> list[list[str]]:
  """Returns num_samples decoded responses for each prompt, [B][G]."""
  model, params, tok = rlx.models.from_pretrained(model_dir, dtype=dtype,
                                                  param_dtype=dtype)
  tokens, mask = encode(tok, prompts, chat=chat, system=system)
  greedy = temperature == 0
  sample = sampler_lib.transformer_sampler(model, sampler_lib.SamplerConfig(
      max_new_tokens=max_new_tokens, stop_tokens=tok.stop_ids,
      pad_id=tok.pad_id, top_k=1 if greedy else top_k))
  out = sample(params, tokens, mask, jax.random.key(seed),
               1.0 if greedy else temperature, top_p, num_samples=num_samples)
  return [[tok.decode(row) for row in group]
          for group in np.asarray(out.tokens)]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  try:
    texts = generate(
        _MODEL_DIR.value, _PROMPT.value, chat=_CHAT.value,
        system=_SYSTEM.value, max_new_tokens=_MAX_NEW.value,
        temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
        top_k=_TOP_K.value, num_samples=_NUM_SAMPLES.value, seed=_SEED.value,
        dtype=_DTYPE.value)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  for prompt, group in zip(_PROMPT.value, texts):
    print(f'=== {prompt}')
    for i, text in enumerate(group):
      print(f'--- sample {i}\n{text}')


if __name__ == '__main__':
  app.run(main)
