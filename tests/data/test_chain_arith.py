"""Tests for rlx.data.chain_arith."""

import numpy as np
import pytest

from rlx.data import chain_arith


def test_worked_example():
  problem = chain_arith.solve('7a+3b*2c-5?')
  assert problem == chain_arith.Problem(
      prompt='7a+3b*2c-5?',
      solution='7;a+3=0;b*2=0;c-5=5>5',
      answer='5',
      num_steps=3,
  )


@pytest.mark.parametrize(
    'prompt, solution, answer',
    [
        ('0a-5?', '0;a-5=5>5', '5'),  # Subtraction wraps around.
        ('9a*9?', '9;a*9=1>1', '1'),
        ('9a+9?', '9;a+9=8>8', '8'),
        ('3a-3?', '3;a-3=0>0', '0'),
        ('4a*0b+7c-9d*3?', '4;a*0=0;b+7=7;c-9=8;d*3=4>4', '4'),
    ],
)
def test_hand_computed(prompt, solution, answer):
  problem = chain_arith.solve(prompt)
  assert (problem.solution, problem.answer) == (solution, answer)


@pytest.mark.parametrize(
    'prompt', ['', '7?', '7a+3', '7a+3b*?', '12a+3?', '7a/3?', '7a+3? ',
               'a+1?', '7+3?', '7b+3?', '7a+3a+4?']
)
def test_solve_rejects_malformed(prompt):
  with pytest.raises(ValueError, match='malformed prompt'):
    chain_arith.solve(prompt)


def test_alphabet_covers_all_text():
  rng = np.random.default_rng(0)
  for _ in range(200):
    problem = chain_arith.make_problem(rng)
    assert set(problem.prompt + problem.solution) <= set(chain_arith.ALPHABET)


def test_solve_round_trips_make_problem():
  rng = np.random.default_rng(1)
  for _ in range(500):
    problem = chain_arith.make_problem(rng)
    assert chain_arith.solve(problem.prompt) == problem
    assert problem.solution.endswith('>' + problem.answer)
    assert len(problem.prompt) == 3 * problem.num_steps + 2
    assert len(problem.solution) == 6 * problem.num_steps + 3


def test_fixed_num_steps():
  rng = np.random.default_rng(2)
  problem = chain_arith.make_problem(rng, num_steps=16)
  assert problem.num_steps == 16
  # Longest solution: 'd;', 16 steps of 'lop=c', 15 ';', then '>d'.
  assert len(problem.solution) == 2 + 16 * 5 + 15 + 2 == 99
  with pytest.raises(ValueError, match='<= 16'):
    chain_arith.make_problem(rng, max_steps=17)
  with pytest.raises(ValueError):
    chain_arith.make_problem(rng, num_steps=0)


def test_step_distribution_values():
  probs = chain_arith.step_distribution(4, 1.0)
  harmonic = 1 + 1 / 2 + 1 / 3 + 1 / 4
  np.testing.assert_allclose(
      probs, np.array([1, 1 / 2, 1 / 3, 1 / 4]) / harmonic
  )
  np.testing.assert_allclose(chain_arith.step_distribution(5, 0.0), 0.2)
  assert chain_arith.step_distribution(16, 1.0).sum() == pytest.approx(1.0)


def test_empirical_step_distribution_matches():
  rng = np.random.default_rng(3)
  num_draws = 20000
  steps = [chain_arith.make_problem(rng).num_steps for _ in range(num_draws)]
  counts = np.bincount(steps, minlength=17)[1:]
  probs = chain_arith.step_distribution(16, 1.0)
  # 5 binomial standard deviations per bin: a flake is ~1e-6 per bin.
  tolerance = 5 * np.sqrt(probs * (1 - probs) / num_draws)
  np.testing.assert_array_less(np.abs(counts / num_draws - probs), tolerance)
  assert counts[0] > counts[15] > 0  # Both ends of the tail are drawn.


def test_generate_split_is_deterministic_and_distinct():
  kwargs = dict(num_examples=300, max_steps=4, zipf_s=1.0)
  a = chain_arith.generate_split(seed=5, **kwargs)
  b = chain_arith.generate_split(seed=5, **kwargs)
  c = chain_arith.generate_split(seed=6, **kwargs)
  assert a == b
  assert a != c
  assert len({p.prompt for p in a}) == 300
  assert all(1 <= p.num_steps <= 4 for p in a)


def test_generate_split_excludes():
  test = chain_arith.generate_split(
      num_examples=100, seed=0, max_steps=2, zipf_s=1.0
  )
  excluded = {p.prompt for p in test}
  train = chain_arith.generate_split(
      num_examples=1000, seed=0, max_steps=2, zipf_s=1.0, exclude=excluded
  )
  assert not excluded & {p.prompt for p in train}
  assert len({p.prompt for p in train}) == 1000


def test_generate_split_can_exhaust_the_space():
  # One step allows exactly 10 * 3 * 10 prompts; asking for all terminates.
  assert chain_arith.num_distinct_prompts(1) == 300
  every = chain_arith.generate_split(
      num_examples=300, seed=0, max_steps=1, zipf_s=1.0
  )
  assert len({p.prompt for p in every}) == 300
  with pytest.raises(ValueError, match='only 299'):
    chain_arith.generate_split(
        num_examples=300,
        seed=0,
        max_steps=1,
        zipf_s=1.0,
        exclude={'1a+1?', 'not a prompt', '1a+1b+1?'},
    )
