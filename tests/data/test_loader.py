"""Tests for rlx.data.loader and rlx.data.tfds_builder."""

import importlib.util
import sys

import numpy as np
import pytest

from rlx.data import chain_arith
from rlx.data import loader
from rlx.data import tfds_builder
from rlx.models import tokenizer as tokenizer_lib

# Small enough to prepare in well under a second.
_CONFIG = dict(num_train=300, num_test=40, max_steps=6, zipf_s=1.0, seed=3)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def splits(data_dir):
  return {
      split: loader.load_chain_arith(split, data_dir=data_dir, **_CONFIG)
      for split in ('train', 'test')
  }


@pytest.fixture
def tok():
  return tokenizer_lib.CharTokenizer(chain_arith.ALPHABET)


def _problems(data):
  return [
      chain_arith.Problem(p, s, a, int(n))
      for p, s, a, n in zip(
          data.prompts, data.solutions, data.answers, data.num_steps
      )
  ]


def test_records_equal_generate_split(splits):
  test = chain_arith.generate_split(
      num_examples=40, seed=3, max_steps=6, zipf_s=1.0
  )
  train = chain_arith.generate_split(
      num_examples=300,
      seed=4,
      max_steps=6,
      zipf_s=1.0,
      exclude={p.prompt for p in test},
  )
  assert _problems(splits['test']) == test
  assert _problems(splits['train']) == train
  assert splits['train'].num_steps.dtype == np.int32
  assert len(splits['train']) == 300 and len(splits['test']) == 40


def test_splits_are_disjoint(splits):
  assert not set(splits['train'].prompts) & set(splits['test'].prompts)


def test_prepared_without_tensorflow(splits):
  del splits  # Only needed to have prepared and read the dataset.
  assert 'tensorflow' not in sys.modules


def test_reload_reads_disk_without_regenerating(data_dir, splits, monkeypatch):
  def fail(**kwargs):
    raise AssertionError(f'regenerated with {kwargs}')

  monkeypatch.setattr(chain_arith, 'generate_split', fail)
  for split in ('train', 'test'):
    again = loader.load_chain_arith(split, data_dir=data_dir, **_CONFIG)
    assert again.prompts == splits[split].prompts
    assert again.solutions == splits[split].solutions
    assert again.answers == splits[split].answers
    np.testing.assert_array_equal(again.num_steps, splits[split].num_steps)


def test_unknown_split(data_dir):
  with pytest.raises(ValueError, match="'validation'"):
    loader.load_chain_arith('validation', data_dir=data_dir, **_CONFIG)


def test_config_names():
  assert tfds_builder.make_config() is tfds_builder.DEFAULT_CONFIG
  config = tfds_builder.make_config(**_CONFIG)
  assert config.name == 'train300_test40_steps6_zipf1p0_seed3'
  assert (config.num_train, config.num_test, config.seed) == (300, 40, 3)
  assert tfds_builder.make_config(zipf_s=1.5).name.endswith('zipf1p5_seed0')


def test_builder_module_imports_twice():
  # TFDS raises on a second registration of a name; the module guards it.
  spec = importlib.util.spec_from_file_location(
      'tfds_builder_copy', tfds_builder.__file__
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.ChainArith.name == 'chain_arith'


def test_encode_prompts_left_pads(tok):
  tokens, mask = loader.encode_prompts(tok, ['7+3?', '1-2*3?'], max_len=8)
  assert tokens.dtype == np.int32 and mask.dtype == bool
  np.testing.assert_array_equal(
      tokens,
      [
          [0, 0, 0, 1] + tok.encode('7+3?'),
          [0] + [1] + tok.encode('1-2*3?'),
      ],
  )
  np.testing.assert_array_equal(mask, tokens != tok.pad_id)
  for row, prompt in zip(tokens, ['7+3?', '1-2*3?']):
    assert tok.decode(row) == prompt


def test_encode_prompts_exact_fit_and_overflow(tok):
  tokens, mask = loader.encode_prompts(tok, ['1+2?'], max_len=5)
  assert mask.all() and tokens[0, 0] == tok.bos_id
  with pytest.raises(ValueError, match=r"prompt 1 \('1\+2\*3\?'\) is 7 tokens"):
    loader.encode_prompts(tok, ['1+2?', '1+2*3?'], max_len=6)


def test_encode_demonstrations(tok, splits):
  data = splits['test']
  batch = loader.encode_demonstrations(
      tok, data.prompts, data.solutions, prompt_len=24, response_len=48
  )
  assert set(batch) == {'prompt', 'prompt_mask', 'response', 'response_mask'}
  prompt, _ = loader.encode_prompts(tok, data.prompts, max_len=24)
  np.testing.assert_array_equal(batch['prompt'], prompt)
  for i, solution in enumerate(data.solutions):
    response = batch['response'][i]
    assert tok.decode(response) == solution
    # Right-padded: solution, eos, then pad only.
    n = len(solution)
    assert response[n] == tok.eos_id
    assert (response[n + 1 :] == tok.pad_id).all()
    assert batch['response_mask'][i].sum() == n + 1
    assert batch['response_mask'][i, : n + 1].all()
  assert batch['response'].dtype == np.int32
  assert batch['response_mask'].dtype == bool


def test_encode_demonstrations_errors(tok):
  with pytest.raises(ValueError, match='2 prompts but 1 solutions'):
    loader.encode_demonstrations(
        tok, ['1a+1?', '2a+2?'], ['1;a+1=2>2'], prompt_len=8, response_len=10
    )
  # 9 characters plus eos do not fit in 9.
  with pytest.raises(ValueError, match=r'solution 0 .* is 10 tokens long'):
    loader.encode_demonstrations(
        tok, ['1a+1?'], ['1;a+1=2>2'], prompt_len=8, response_len=9
    )
  with pytest.raises(ValueError, match='prompt_len=4'):
    loader.encode_demonstrations(
        tok, ['1a+1?'], ['1;a+1=2>2'], prompt_len=4, response_len=10
    )
