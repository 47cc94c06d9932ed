"""HF tokenizer wrapper and the hand-written chat templates."""

import json
import os
import shutil

import numpy as np
import pytest

from rlx.models import hf_tokenizer
from rlx.models import tokenizer as tokenizer_lib

FIXTURES = os.path.join(os.path.dirname(__file__), '..', 'fixtures', 'hf')
FAMILIES = ('llama', 'qwen2', 'qwen3', 'gemma')
CHAT = [{'role': 'system', 'content': 'Be brief.'},
        {'role': 'user', 'content': 'What is 2+3?'},
        {'role': 'assistant', 'content': 'The answer is 5.'},
        {'role': 'user', 'content': 'And 2+4?'}]


def _tok(family):
  return hf_tokenizer.HFTokenizer.from_dir(os.path.join(FIXTURES, family))


@pytest.mark.parametrize('family', FAMILIES)
def test_encode_matches_transformers_and_decodes_back(family):
  tok = _tok(family)
  assert isinstance(tok, tokenizer_lib.Tokenizer)
  assert tok.vocab_size == 320 and tok.family == family
  ref = np.load(os.path.join(FIXTURES, family, 'reference.npz'))
  for i, text in enumerate(ref['texts']):
    ids = tok.encode(str(text))
    np.testing.assert_array_equal(ids, ref[f'text_ids_{i}'])
    assert tok.decode(ids) == text
    assert tok.encode(str(text), add_bos=True, add_eos=True) == (
        [tok.bos_id] + ids + [tok.eos_id])


@pytest.mark.parametrize('family', FAMILIES)
def test_fixture_chat_prompt_is_the_template_encoded(family):
  ref = np.load(os.path.join(FIXTURES, family, 'reference.npz'))
  ids = _tok(family).encode_chat([{'role': 'user', 'content': 'What is 2+3?'}])
  np.testing.assert_array_equal(ids, ref['prompt_1'])


@pytest.mark.parametrize('family, bos, eos, pad, extra_stop', [
    ('llama', '<|begin_of_text|>', '<|end_of_text|>', '<|end_of_text|>',
     '<|eot_id|>'),
    ('qwen2', '<|endoftext|>', '<|endoftext|>', '<|endoftext|>',
     '<|im_end|>'),
    ('qwen3', '<|im_end|>', '<|im_end|>', '<|endoftext|>', '<|endoftext|>'),
    ('gemma', '<bos>', '<eos>', '<pad>', '<end_of_turn>'),
])
def test_special_ids_from_config(family, bos, eos, pad, extra_stop):
  tok = _tok(family)
  assert tok.bos_id == tok.token_to_id(bos)
  assert tok.eos_id == tok.token_to_id(eos)
  assert tok.pad_id == tok.token_to_id(pad)
  assert tok.token_to_id(extra_stop) in tok.stop_ids
  assert tok.stop_ids[0] == tok.eos_id


def test_tokenizer_config_overrides_special_tokens(tmp_path):
  path = str(tmp_path / 'llama')
  shutil.copytree(os.path.join(FIXTURES, 'llama'), path)
  with open(os.path.join(path, 'tokenizer_config.json'), 'w') as f:
    json.dump({'eos_token': {'content': '<|eot_id|>'},
               'pad_token': '<|start_header_id|>'}, f)
  tok = hf_tokenizer.HFTokenizer.from_dir(path)
  assert tok.eos_id == tok.token_to_id('<|eot_id|>')
  assert tok.pad_id == tok.token_to_id('<|start_header_id|>')
  # The config's end ids still stop generation beside the override, and so
  # do generation_config's (Llama 3.1's <|eom_id|> is not a built-in stop).
  assert tok.token_to_id('<|end_of_text|>') in tok.stop_ids
  eom = tok.encode('a')[0]  # Stands in for <|eom_id|> (not in the fixture).
  assert eom not in tok.stop_ids
  with open(os.path.join(path, 'generation_config.json'), 'w') as f:
    json.dump({'eos_token_id': [tok.token_to_id('<|end_of_text|>'), eom]}, f)
  tok = hf_tokenizer.HFTokenizer.from_dir(path)
  assert tok.eos_id == tok.token_to_id('<|eot_id|>') and eom in tok.stop_ids


def test_decode_stops_at_end_of_turn_and_skips_specials():
  tok = _tok('llama')
  eot = tok.token_to_id('<|eot_id|>')
  ids = tok.encode('x = 3')
  more = tok.encode(' more')
  row = [tok.bos_id] + ids + [eot] + more + [tok.pad_id] * 3
  assert tok.decode(row) == 'x = 3'
  assert tok.decode(np.array(row), stop_at_eos=False) == 'x = 3 more'


def test_llama3_template():
  assert hf_tokenizer.chat_prompt('llama', CHAT) == (
      '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n'
      'Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n'
      'What is 2+3?<|eot_id|><|start_header_id|>assistant<|end_header_id|>'
      '\n\nThe answer is 5.<|eot_id|><|start_header_id|>user'
      '<|end_header_id|>\n\nAnd 2+4?<|eot_id|><|start_header_id|>assistant'
      '<|end_header_id|>\n\n')


def test_chatml_templates():
  user = [{'role': 'user', 'content': 'Hi'}]
  assert hf_tokenizer.chat_prompt('qwen2', user) == (
      '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a '
      'helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n'
      '<|im_start|>assistant\n')
  assert hf_tokenizer.chat_prompt('qwen2', CHAT[:2]) == (
      '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n'
      'What is 2+3?<|im_end|>\n<|im_start|>assistant\n')
  assert hf_tokenizer.chat_prompt('qwen3', user) == (
      '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n')
  assert hf_tokenizer.chat_prompt('qwen3', user, enable_thinking=False) == (
      '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n'
      '<think>\n\n</think>\n\n')
  assert hf_tokenizer.chat_prompt(
      'qwen3', user, add_generation_prompt=False) == (
          '<|im_start|>user\nHi<|im_end|>\n')


def test_gemma_template():
  assert hf_tokenizer.chat_prompt('gemma', CHAT) == (
      '<bos><start_of_turn>user\nBe brief.\n\nWhat is 2+3?<end_of_turn>\n'
      '<start_of_turn>model\nThe answer is 5.<end_of_turn>\n'
      '<start_of_turn>user\nAnd 2+4?<end_of_turn>\n<start_of_turn>model\n')


def test_special_tokens_in_templates_encode_to_single_ids():
  tok = _tok('gemma')
  ids = tok.encode_chat([{'role': 'user', 'content': 'Hi'}])
  assert ids[:2] == [tok.bos_id, tok.token_to_id('<start_of_turn>')]
  assert tok.token_to_id('<end_of_turn>') in ids


@pytest.mark.parametrize('messages, message', [
    ([{'role': 'robot', 'content': 'x'}], "role 'robot'"),
    ([{'role': 'user', 'content': 'x'}, {'role': 'system', 'content': 'y'}],
     'system message must come first'),
    ([{'role': 'user', 'content': None}], 'content must be a string'),
])
def test_bad_messages(messages, message):
  with pytest.raises(ValueError, match=message):
    hf_tokenizer.chat_prompt('llama', messages)
  with pytest.raises(ValueError, match="no chat template for family 'gpt'"):
    hf_tokenizer.chat_prompt('gpt', [])
