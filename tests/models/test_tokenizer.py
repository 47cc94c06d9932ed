"""Tests for rlx.models.tokenizer."""

import numpy as np
import pytest

from rlx.models import tokenizer as tokenizer_lib


@pytest.fixture
def tok():
  return tokenizer_lib.CharTokenizer('ab+')


def test_implements_protocol(tok):
  assert isinstance(tok, tokenizer_lib.Tokenizer)


def test_ids(tok):
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.vocab_size == 6
  assert tok.encode('ab+ba') == [3, 4, 5, 4, 3]


def test_encode_specials(tok):
  assert tok.encode('a', add_bos=True) == [1, 3]
  assert tok.encode('a', add_eos=True) == [3, 2]
  assert tok.encode('', add_bos=True, add_eos=True) == [1, 2]
  assert tok.encode('') == []


def test_encode_unknown_character_names_it_and_position(tok):
  with pytest.raises(ValueError, match=r"'c' at position 2"):
    tok.encode('abc')


def test_duplicate_alphabet_raises():
  with pytest.raises(ValueError, match=r"repeats character 'a' at position 2"):
    tokenizer_lib.CharTokenizer('aba')


def test_empty_alphabet_raises():
  with pytest.raises(ValueError, match='empty'):
    tokenizer_lib.CharTokenizer('')


def test_decode_drops_pad_and_bos_and_stops_at_eos(tok):
  assert tok.decode([0, 0, 1, 3, 5, 4, 2, 3, 3, 0]) == 'a+b'


def test_decode_without_stop_drops_eos(tok):
  assert tok.decode([1, 3, 2, 4, 2, 0], stop_at_eos=False) == 'ab'


def test_decode_accepts_numpy(tok):
  ids = np.array([1, 4, 5, 3, 2, 0], dtype=np.int32)
  assert tok.decode(ids) == 'b+a'
  assert tok.decode(np.array([], dtype=np.int64)) == ''


def test_decode_rejects_out_of_vocab(tok):
  with pytest.raises(ValueError, match='id 6'):
    tok.decode([3, 6])
  with pytest.raises(ValueError, match='id -1'):
    tok.decode([-1])


def test_round_trip_on_every_character():
  alphabet = '0123456789+-*=;>?'
  tok = tokenizer_lib.CharTokenizer(alphabet)
  text = alphabet[::-1] + alphabet
  ids = tok.encode(text, add_bos=True, add_eos=True)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
  assert sorted(set(ids[1:-1])) == list(range(3, tok.vocab_size))
  assert tok.decode(ids) == text
