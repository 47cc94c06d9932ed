"""Verifiable reward for chain arithmetic (see rlx.data.chain_arith).

Only the final answer is checked, as in math RL: the worked steps are the
model's own business, and rewarding them would need a parser that a policy
could learn to game.
"""

from collections.abc import Sequence

import numpy as np


def extract_answer(response: str) -> str | None:
  """Returns the text after the last '>' with whitespace stripped.

  Args:
    response: the decoded response (the tokenizer stops at eos).

  Returns:
    The claimed answer, or None if there is no '>' or nothing follows it.
  """
  # Only what follows the last '>' counts, so a model may revise itself.
  _, sep, tail = response.rpartition('>')
  if not sep:
    return None
  answer = tail.strip()
  return answer or None


def reward(response: str, answer: str) -> float:
  """1.0 iff the response's final answer is exactly `answer`, else 0.0."""
  return 1.0 if extract_answer(response) == answer else 0.0


def score(responses: Sequence[str], answers: Sequence[str]) -> np.ndarray:
  """Rewards a batch of responses.

  Args:
    responses: decoded responses, [N].
    answers: the reference answers, [N].

  Returns:
    float32 [N] of 0.0/1.0 rewards.

  Raises:
    ValueError: if the two lengths differ.
  """
  if len(responses) != len(answers):
    raise ValueError(
        f'got {len(responses)} responses but {len(answers)} answers'
    )
  return np.array(
      [reward(r, a) for r, a in zip(responses, answers)], dtype=np.float32
  )
