"""Tests for rlx.rewards.chain_arith."""

import numpy as np
import pytest

from rlx.rewards import chain_arith


@pytest.mark.parametrize(
    'response, expected',
    [
        ('7+3=0;0*2=0;0-5=5>5', '5'),
        ('>5', '5'),
        ('a>1>2', '2'),  # The last '>' wins.
        ('>5 ', '5'),  # Whitespace is stripped.
        ('>5;', '5;'),
        ('7+3=0', None),  # No '>'.
        ('7+3=0>', None),  # Nothing after '>'.
        ('> ', None),
        ('', None),
    ],
)
def test_extract_answer(response, expected):
  assert chain_arith.extract_answer(response) == expected


@pytest.mark.parametrize(
    'response, reward',
    [
        ('7+3=0;0*2=0;0-5=5>5', 1.0),
        ('7+3=0;0*2=0;0-5=5>4', 0.0),  # Wrong digit.
        ('7+3=0;0*2=0;0-5=5', 0.0),  # Missing '>'.
        ('7+3=1>1;1*2=2;2-5=7>5', 1.0),  # Multiple '>': the last wins.
        ('7+3=0;0*2=0>0;0-5=5>4', 0.0),
        ('>5;', 0.0),  # Trailing garbage after the answer.
        ('>55', 0.0),
        ('', 0.0),
        # Only the final answer is verified, not the steps.
        ('7+3=9;9*2=8;8-5=3>5', 1.0),
    ],
)
def test_reward(response, reward):
  assert chain_arith.reward(response, '5') == reward


def test_score():
  rewards = chain_arith.score(
      ['1+1=2>2', '>3', 'x', '>4'], ['2', '2', '2', '4']
  )
  assert rewards.dtype == np.float32
  np.testing.assert_array_equal(rewards, [1.0, 0.0, 0.0, 1.0])
  assert chain_arith.score([], []).shape == (0,)


def test_score_length_mismatch():
  with pytest.raises(ValueError, match='2 responses but 1 answers'):
    chain_arith.score(['>1', '>2'], ['1'])
