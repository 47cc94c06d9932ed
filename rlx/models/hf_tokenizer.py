"""A Hugging Face `tokenizer.json` behind rlx's `Tokenizer` protocol.

Uses the `tokenizers` package only (no transformers, no jinja). Special ids
come from config.json, overridden by generation_config.json and
tokenizer_config.json when those are present. Each supported family's chat
template is written out by hand below; the strings match the official
templates for plain (tool-free) conversations:

  llama  Llama 3 template (<|start_header_id|>role<|end_header_id|>...);
         Llama 3.1's date-stamped system preamble is not added.
  qwen2  ChatML, with Qwen2.5's default system message when none is given.
  qwen3  ChatML without a default system message; `enable_thinking=False`
         appends the empty <think></think> block, as Qwen3's template does.
  gemma  <start_of_turn>user/model turns; a system message is prepended to
         the first user turn (as Gemma 2/3's templates do).
"""

from collections.abc import Mapping, Sequence
import json
import os
from typing import Optional

import tokenizers

from rlx.models.hf import config as hf_config_lib

TOKENIZER_FILE = 'tokenizer.json'
QWEN2_SYSTEM = 'You are Qwen, created by Alibaba Cloud. You are a helpful ' \
               'assistant.'
# End-of-turn / end-of-text tokens that stop generation, where the vocab has
# them, in addition to the configured eos ids.
_STOP_TOKENS = ('<|eot_id|>', '<|end_of_text|>', '<|im_end|>',
                '<|endoftext|>', '<end_of_turn>', '<eos>')
_ROLES = ('system', 'user', 'assistant')
# Families whose tokenizers start every text with bos (Qwen's do not).
_BOS_FAMILIES = ('llama', 'gemma')

Message = Mapping[str, str]  # {'role': 'system'|'user'|'assistant', ...}


def _check_messages(messages: Sequence[Message]) -> None:
  for i, m in enumerate(messages):
    if m.get('role') not in _ROLES:
      raise ValueError(f'message {i}: role {m.get("role")!r} is not one of '
                       f'{_ROLES}')
    if m['role'] == 'system' and i:
      raise ValueError(f'message {i}: a system message must come first')
    if not isinstance(m.get('content'), str):
      raise ValueError(f'message {i}: content must be a string')


def llama3_chat(messages: Sequence[Message], *, add_generation_prompt=True,
                bos: str = '<|begin_of_text|>') -> str:
  """Llama 3 instruct template."""
  parts = [bos]
  for m in messages:
    parts.append(f'<|start_header_id|>{m["role"]}<|end_header_id|>\n\n'
                 f'{m["content"].strip()}<|eot_id|>')
  if add_generation_prompt:
    parts.append('<|start_header_id|>assistant<|end_header_id|>\n\n')
  return ''.join(parts)


def chatml_chat(messages: Sequence[Message], *, add_generation_prompt=True,
                default_system: Optional[str] = None,
                enable_thinking: bool = True) -> str:
  """ChatML (Qwen2 / Qwen2.5 / Qwen3)."""
  if default_system and (not messages or messages[0]['role'] != 'system'):
    messages = [{'role': 'system', 'content': default_system}, *messages]
  parts = [f'<|im_start|>{m["role"]}\n{m["content"]}<|im_end|>\n'
           for m in messages]
  if add_generation_prompt:
    parts.append('<|im_start|>assistant\n')
    if not enable_thinking:
      parts.append('<think>\n\n</think>\n\n')
  return ''.join(parts)


def gemma_chat(messages: Sequence[Message], *, add_generation_prompt=True,
               bos: str = '<bos>') -> str:
  """Gemma template; the system message joins the first user turn."""
  system = ''
  if messages and messages[0]['role'] == 'system':
    system, messages = messages[0]['content'] + '\n\n', messages[1:]
  parts = [bos]
  for i, m in enumerate(messages):
    role = 'model' if m['role'] == 'assistant' else m['role']
    content = (system if i == 0 else '') + m['content']
    parts.append(f'<start_of_turn>{role}\n{content.strip()}<end_of_turn>\n')
  if add_generation_prompt:
    parts.append('<start_of_turn>model\n')
  return ''.join(parts)


def chat_prompt(family: str, messages: Sequence[Message], *,
                add_generation_prompt: bool = True, **options) -> str:
  """Renders `messages` with the family's chat template.

  Args:
    family: 'llama', 'qwen2', 'qwen3' or 'gemma' (see `hf.config.FAMILIES`).
    messages: [{'role': ..., 'content': ...}], system first if any.
    add_generation_prompt: end with the assistant turn's header.
    **options: qwen2: `default_system` (None for no default); qwen3:
      `enable_thinking`.

  Returns:
    The prompt text, bos token included as text.
  """
  _check_messages(messages)
  if family == 'llama':
    return llama3_chat(messages, add_generation_prompt=add_generation_prompt)
  if family == 'qwen2':
    return chatml_chat(messages, add_generation_prompt=add_generation_prompt,
                       default_system=options.get('default_system',
                                                  QWEN2_SYSTEM))
  if family == 'qwen3':
    return chatml_chat(messages, add_generation_prompt=add_generation_prompt,
                       enable_thinking=options.get('enable_thinking', True))
  if family == 'gemma':
    return gemma_chat(messages, add_generation_prompt=add_generation_prompt)
  raise ValueError(f'no chat template for family {family!r}')


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _token_text(value) -> Optional[str]:
  """tokenizer_config.json stores tokens as strings or {'content': ...}."""
  return value.get('content') if isinstance(value, dict) else value


class HFTokenizer:
  """`tokenizers.Tokenizer` + special ids + the family's chat template."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, family: str,
               bos_id: int, eos_ids: Sequence[int], pad_id: int):
    """Wraps a tokenizer.

    Args:
      tokenizer: the `tokenizers` object (tokenizer.json).
      family: model family, for `chat_prompt`.
      bos_id: beginning-of-sequence id.
      eos_ids: end ids; the first is `eos_id`. Generation stops on these and
        on the family's end-of-turn tokens present in the vocab.
      pad_id: padding id.
    """
    if not eos_ids:
      raise ValueError('eos_ids must not be empty')
    self._tok = tokenizer
    self._family = family
    self._bos, self._pad, self._eos = bos_id, pad_id, tuple(eos_ids)
    extra = (tokenizer.token_to_id(t) for t in _STOP_TOKENS)
    self._stop = tuple(dict.fromkeys(
        [*self._eos, *(i for i in extra if i is not None)]))

  @classmethod
  def from_dir(cls, model_dir: str) -> 'HFTokenizer':
    """Loads `model_dir/tokenizer.json` and the special ids next to it.

    Raises:
      FileNotFoundError: naming tokenizer.json when it is missing.
      ValueError: when no eos id can be found.
    """
    path = os.path.join(model_dir, TOKENIZER_FILE)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path}: missing (needed for the tokenizer)')
    tok = tokenizers.Tokenizer.from_file(path)
    config = hf_config_lib.read_config(model_dir)
    family = hf_config_lib.family_of(config).name
    ids = {k: config.get(k) for k in ('bos_token_id', 'eos_token_id',
                                      'pad_token_id')}
    generation = _read_json(os.path.join(model_dir,
                                         'generation_config.json'))
    ids.update({k: generation[k] for k in ids if generation.get(k) is not None})
    tok_config = _read_json(os.path.join(model_dir, 'tokenizer_config.json'))
    for key in ('bos', 'eos', 'pad'):
      text = _token_text(tok_config.get(f'{key}_token'))
      if text is not None and tok.token_to_id(text) is not None:
        ids[f'{key}_token_id'] = tok.token_to_id(text)
    # Every end id stops generation: the tokenizer's eos token first (the
    # chat turn's end), then generation_config's and config.json's lists
    # (Llama 3.1 also ends on <|eom_id|>).
    as_list = lambda v: [v] if isinstance(v, int) else list(v or [])
    eos = []
    for i in (as_list(ids['eos_token_id']) +
              as_list(generation.get('eos_token_id')) +
              as_list(config.get('eos_token_id'))):
      if i not in eos:
        eos.append(i)
    if not eos:
      raise ValueError(f'{model_dir}: no eos_token_id in config.json, '
                       'generation_config.json or tokenizer_config.json')
    bos = ids['bos_token_id']
    pad = ids['pad_token_id']
    return cls(tok, family=family, bos_id=eos[0] if bos is None else bos,
               eos_ids=eos, pad_id=eos[0] if pad is None else pad)

  @property
  def family(self) -> str:
    return self._family

  @property
  def prepends_bos(self) -> bool:
    """Whether HF's tokenizer adds bos to plain text for this family."""
    return self._family in _BOS_FAMILIES

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def pad_id(self) -> int:
    return self._pad

  @property
  def bos_id(self) -> int:
    return self._bos

  @property
  def eos_id(self) -> int:
    return self._eos[0]

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """Ids that end a response (eos ids and end-of-turn tokens)."""
    return self._stop

  def encode(self, text: str, *, add_bos: bool = False,
             add_eos: bool = False) -> list[int]:
    """Maps text to ids; special tokens written in the text (e.g. a chat
    template's) map to their ids."""
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return [self._bos] * add_bos + ids + [self.eos_id] * add_eos

  def token_to_id(self, token: str) -> Optional[int]:
    """Id of a vocabulary entry (e.g. '<|im_end|>'), None if absent."""
    return self._tok.token_to_id(token)

  def decode(self, ids: Sequence[int], *, stop_at_eos: bool = True) -> str:
    """Maps ids to text without special tokens.

    Args:
      ids: token ids (ints or a 1-D integer array).
      stop_at_eos: stop at the first stop id (`stop_ids`); otherwise stop
        ids are dropped like every other special token.

    Returns:
      The text.
    """
    kept = []
    for token in ids:
      token = int(token)
      if stop_at_eos and token in self._stop:
        break
      if token not in (self._pad, self._bos):
        kept.append(token)
    return self._tok.decode(kept, skip_special_tokens=True)

  def chat_prompt(self, messages: Sequence[Message], *,
                  add_generation_prompt: bool = True, **options) -> str:
    """The family's chat template (see module docstring and `chat_prompt`)."""
    return chat_prompt(self._family, messages,
                       add_generation_prompt=add_generation_prompt, **options)

  def encode_chat(self, messages: Sequence[Message], **options) -> list[int]:
    """Ids of `chat_prompt(messages)`; bos comes from the template."""
    return self.encode(self.chat_prompt(messages, **options))
