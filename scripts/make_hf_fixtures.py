r"""Makes tiny random-weight HF models + reference outputs for parity tests.

Needs torch and transformers (only this script does; the tests read the
files it writes with safetensors / tokenizers / numpy):

  pip install torch --index-url https://download.pytorch.org/whl/cpu
  pip install transformers
  python scripts/make_hf_fixtures.py --out_dir=tests/fixtures/hf

For each family (llama, qwen2, qwen3, gemma = Gemma 1) it writes
<out_dir>/<family>/ with config.json, model.safetensors (bfloat16; the
float32 reference model holds the same bf16-rounded values, so loading is
exact), tokenizer.json (a byte-level BPE trained here on a short text, with
the family's special tokens), and reference.npz: for each prompt i,
`prompt_i` [L] ids, `logits_i` [L, V] float32 logits of the eager float32
HF model and `greedy_i` [20] argmax continuations; `texts` / `text_ids_i`
check the tokenizer against HF's.
"""

import copy
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import numpy as np
import tokenizers
import torch
import transformers

from rlx.models import hf_tokenizer

_OUT_DIR = flags.DEFINE_string('out_dir', 'tests/fixtures/hf',
                               'Where to write <family>/ folders.')
_FAMILIES = flags.DEFINE_list('families', ['llama', 'qwen2', 'qwen3', 'gemma'],
                              'Families to make.')

VOCAB = 320
GREEDY_STEPS = 20
MIN_MARGIN = 1e-2  # Top-1 minus top-2 logit at every greedy step.
CORPUS = """The quick brown fox jumps over the lazy dog. What is 2+3? The
answer is 5. Let x be a number; then 2x + 1 = 7 gives x = 3. A model reads
tokens and writes tokens. Pack my box with five dozen liquor jugs.
"""
TEXTS = ('The quick brown fox', 'x = 3\nanswer: 12,345 <b>')
SPECIALS = {
    'llama': ['<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>',
              '<|end_header_id|>', '<|eot_id|>'],
    'qwen2': ['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
    'qwen3': ['<|endoftext|>', '<|im_start|>', '<|im_end|>', '<think>',
              '</think>'],
    'gemma': ['<pad>', '<eos>', '<bos>', '<unk>', '<start_of_turn>',
              '<end_of_turn>'],
}
# (bos, eos, pad) token texts; None: the family has no such token.
IDS = {'llama': ('<|begin_of_text|>', '<|end_of_text|>', None),
       'qwen2': (None, '<|endoftext|>', '<|endoftext|>'),
       'qwen3': (None, '<|im_end|>', '<|endoftext|>'),
       'gemma': ('<bos>', '<eos>', '<pad>')}
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=256)


def make_tokenizer(family: str) -> tokenizers.Tokenizer:
  """Byte-level BPE with `VOCAB` ids, the family's specials first."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
      add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=VOCAB, special_tokens=SPECIALS[family],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False)
  chat = hf_tokenizer.chat_prompt(
      family, [{'role': 'user', 'content': 'What is 2+3?'},
               {'role': 'assistant', 'content': 'The answer is 5.'}])
  tok.train_from_iterator([CORPUS, chat], trainer=trainer)
  return tok


def make_config(family: str, ids: dict) -> transformers.PretrainedConfig:
  """A tiny config exercising the family's specific features."""
  common = dict(COMMON, vocab_size=VOCAB, **ids)
  if family == 'llama':  # GQA, untied, llama3 RoPE scaling.
    return transformers.LlamaConfig(
        **common, num_key_value_heads=2, rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={'rope_type': 'llama3', 'rope_theta': 500000.0,
                         'factor': 8.0, 'low_freq_factor': 1.0,
                         'high_freq_factor': 4.0,
                         'original_max_position_embeddings': 32})
  if family == 'qwen2':  # q/k/v biases, tied, linear RoPE scaling.
    return transformers.Qwen2Config(
        **common, num_key_value_heads=2, rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters={'rope_type': 'linear', 'rope_theta': 1e6,
                         'factor': 2.0})
  if family == 'qwen3':  # QK-norm, head_dim != D / N, untied.
    return transformers.Qwen3Config(
        **common, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_parameters={'rope_type': 'default', 'rope_theta': 1e6})
  if family == 'gemma':  # Gemma 1: MQA, (1+w) norms, sqrt(D) embeddings.
    return transformers.GemmaConfig(
        **common, num_key_value_heads=1, head_dim=32, rms_norm_eps=1e-6,
        hidden_act='gelu_pytorch_tanh', tie_word_embeddings=True,
        rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0})
  raise ValueError(family)


def randomize(model: torch.nn.Module, family: str, seed: int) -> None:
  """Spread-out random weights (HF's init gives near-uniform logits),
  rounded to bfloat16 so the bf16 file holds them exactly."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith('norm.weight'):
        value = noise * 0.2 + (0.0 if family == 'gemma' else 1.0)
      elif name.endswith('bias'):
        value = noise * 0.2
      elif 'embed_tokens' in name:
        value = noise * (0.2 if family == 'gemma' else 1.0)
      else:
        value = noise * p.shape[-1] ** -0.5
      p.copy_(value.to(torch.bfloat16).to(torch.float32))


def greedy(model, prompt: list[int]) -> tuple[np.ndarray, float]:
  """Argmax continuation (full forward each step) and its smallest margin."""
  ids, margin = list(prompt), np.inf
  with torch.no_grad():
    for _ in range(GREEDY_STEPS):
      logits = model(torch.tensor([ids])).logits[0, -1].numpy()
      top = np.sort(logits)[-2:]
      margin = min(margin, float(top[1] - top[0]))
      ids.append(int(np.argmax(logits)))
  return np.array(ids[len(prompt):], np.int32), margin


def make_family(family: str, out: str) -> None:
  """Writes one family's fixture folder."""
  os.makedirs(out, exist_ok=True)
  tok = make_tokenizer(family)
  bos, eos, pad = (None if t is None else tok.token_to_id(t)
                   for t in IDS[family])
  ids = dict(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
  for seed in range(20):
    model = transformers.AutoModelForCausalLM.from_config(
        make_config(family, ids), attn_implementation='eager',
        dtype=torch.float32).eval()
    randomize(model, family, seed)
    chat = hf_tokenizer.chat_prompt(
        family, [{'role': 'user', 'content': 'What is 2+3?'}])
    prompts = [([bos] if bos is not None else []) +
               tok.encode(TEXTS[0], add_special_tokens=False).ids,
               tok.encode(chat, add_special_tokens=False).ids]
    outs = [greedy(model, p) for p in prompts]
    if min(m for _, m in outs) >= MIN_MARGIN:
      break
  else:
    raise RuntimeError(f'{family}: no seed gives greedy margins >= '
                       f'{MIN_MARGIN}')
  ref = {}
  with torch.no_grad():
    for i, (prompt, (gen, margin)) in enumerate(zip(prompts, outs)):
      ref[f'prompt_{i}'] = np.array(prompt, np.int32)
      ref[f'logits_{i}'] = model(torch.tensor([prompt])).logits[0].numpy()
      ref[f'greedy_{i}'] = gen
      print(f'{family}: prompt {i} len {len(prompt)}, seed {seed}, '
            f'min greedy margin {margin:.3f}')
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
  ref['texts'] = np.array(TEXTS)
  for i, text in enumerate(TEXTS):
    ref[f'text_ids_{i}'] = np.array(
        fast.encode(text, add_special_tokens=False), np.int32)
  copy.deepcopy(model).to(torch.bfloat16).save_pretrained(out)
  for name in os.listdir(out):  # Keep only what the layout needs.
    if name not in ('config.json', 'model.safetensors'):
      os.remove(os.path.join(out, name))
  with open(os.path.join(out, 'config.json')) as f:
    config = json.load(f)
  assert config['architectures'][0].lower().startswith(family), config
  tok.save(os.path.join(out, 'tokenizer.json'))
  np.savez(os.path.join(out, 'reference.npz'), **ref)


def main(argv):
  del argv
  for family in _FAMILIES.value:
    make_family(family, os.path.join(_OUT_DIR.value, family))


if __name__ == '__main__':
  app.run(main)
