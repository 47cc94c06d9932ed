"""scripts/sample.py: greedy text equals the decoded HF reference."""

import os

import numpy as np

from rlx import testing
from rlx.models import hf_tokenizer

ROOT = os.path.join(os.path.dirname(__file__), '..', '..')
LLAMA = os.path.join(ROOT, 'tests', 'fixtures', 'hf', 'llama')


def test_generate_matches_reference_greedy_text():
  sample = testing.load_script('sample')
  ref = np.load(os.path.join(LLAMA, 'reference.npz'))
  tok = hf_tokenizer.HFTokenizer.from_dir(LLAMA)
  # The fixture's prompt 1 is this chat turn, prompt 0 this text with bos.
  chat = sample.generate(LLAMA, ['What is 2+3?'], max_new_tokens=20,
                         dtype='float32')
  assert chat == [[tok.decode(ref['greedy_1'])]]
  tokens, mask = sample.encode(tok, ['The quick brown fox', 'x'], chat=False)
  np.testing.assert_array_equal(tokens[0], ref['prompt_0'])
  assert tokens[1, -2:].tolist() == [tok.bos_id] + tok.encode('x')
  assert mask.sum(1).tolist() == [len(ref['prompt_0']), 2]
