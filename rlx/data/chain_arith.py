"""Chain arithmetic modulo 10: a tiny reasoning task for RL at small scale.

A problem is a start digit followed by n labelled operations (`+`, `-` or
`*` with a one-digit operand) applied left to right, everything modulo 10:

  prompt:   7a+3b*2c-5?
  solution: 7;a+3=0;b*2=0;c-5=5>5
  answer:   5

The solution restates the start digit, then works one labelled step per
operation, writing every intermediate result, then the answer after `>`.
The labels (a, b, c, ...) make "which operation comes next" a content lookup
(match the label in the prompt) instead of position counting, and each step
reads the previous result at a fixed offset: a small transformer can learn
the procedure, and then solve chains far longer than it could in one step. The
number of steps is drawn from a truncated Zipf law, which gives a mix from
trivial (n=1) to hard (n=max_steps) with a long tail of long responses.
"""

from collections.abc import Collection
import dataclasses
import re
from typing import Callable

import numpy as np

# Step labels; their number bounds max_steps.
LABELS = 'abcdefghijklmnop'
MAX_STEPS = len(LABELS)

# Every character a prompt or a solution can contain.
ALPHABET = '0123456789+-*=;>?' + LABELS

OPS = '+-*'
_APPLY = {
    '+': lambda a, b: (a + b) % 10,
    '-': lambda a, b: (a - b) % 10,  # Python's % keeps this in [0, 10).
    '*': lambda a, b: (a * b) % 10,
}
_PROMPT_RE = re.compile(r'[0-9](?:[a-p][-+*][0-9])+\?')


@dataclasses.dataclass(frozen=True)
class Problem:
  """One chain-arithmetic problem.

  Attributes:
    prompt: e.g. '7+3*2-5?'.
    solution: the worked demonstration response, without eos, e.g.
      '7+3=0;0*2=0;0-5=5>5'.
    answer: the final digit as a string, e.g. '5'.
    num_steps: the number of operations n.
  """

  prompt: str
  solution: str
  answer: str
  num_steps: int


def step_distribution(max_steps: int, zipf_s: float) -> np.ndarray:
  """Probabilities of each number of steps.

  Args:
    max_steps: the largest number of steps.
    zipf_s: Zipf exponent; P(n) is proportional to n**(-zipf_s). 0 gives a
      uniform mix, larger values favour short chains more.

  Returns:
    float64 [max_steps]; entry i is P(n = i + 1). Sums to 1.
  """
  if max_steps < 1:
    raise ValueError(f'max_steps must be >= 1, got {max_steps}')
  if max_steps > MAX_STEPS:
    raise ValueError(f'max_steps must be <= {MAX_STEPS} (one label per '
                     f'step), got {max_steps}')
  weights = np.arange(1, max_steps + 1, dtype=np.float64) ** (-zipf_s)
  return weights / weights.sum()


def _build(start: int, ops: str, operands: list[int],
           corrupt: Callable[[int], int] | None = None) -> Problem:
  """Works a chain out step by step; `corrupt` may alter written results
  (later steps continue from the written value)."""
  prompt_parts = [str(start)]
  steps = []
  value = start
  for label, op, operand in zip(LABELS, ops, operands):
    prompt_parts.append(f'{label}{op}{operand}')
    result = _APPLY[op](value, operand)
    if corrupt is not None:
      result = corrupt(result)
    steps.append(f'{label}{op}{operand}={result}')
    value = result
  return Problem(
      prompt=''.join(prompt_parts) + '?',
      solution=f'{start};' + ';'.join(steps) + f'>{value}',
      answer=str(value),
      num_steps=len(operands),
  )


def make_problem(
    rng: np.random.Generator,
    *,
    max_steps: int = 16,
    zipf_s: float = 1.0,
    num_steps: int | None = None,
) -> Problem:
  """Draws one random problem.

  Args:
    rng: the source of randomness.
    max_steps: the largest number of steps to draw.
    zipf_s: Zipf exponent of the step distribution (see `step_distribution`).
    num_steps: if given, use exactly this many steps instead of drawing it.

  Returns:
    The problem with its worked solution.
  """
  if num_steps is None:
    probs = step_distribution(max_steps, zipf_s)
    num_steps = int(rng.choice(max_steps, p=probs)) + 1
  elif num_steps < 1:
    raise ValueError(f'num_steps must be >= 1, got {num_steps}')
  start = int(rng.integers(10))
  ops = ''.join(OPS[i] for i in rng.integers(len(OPS), size=num_steps))
  operands = [int(b) for b in rng.integers(10, size=num_steps)]
  return _build(start, ops, operands)


def _parse(prompt: str) -> tuple[int, str, list[int]]:
  """Splits a prompt into (start, ops, operands); ValueError if malformed."""
  body = prompt[1:-1]
  if not _PROMPT_RE.fullmatch(prompt) or body[0::3] != LABELS[:len(body) // 3]:
    raise ValueError(
        f'malformed prompt {prompt!r}: expected a digit, then one or more '
        f'steps "<label><op><digit>" with labels {LABELS[:3]}... in order '
        f'and op in {OPS!r}, then "?"')
  return int(prompt[0]), body[1::3], [int(b) for b in body[2::3]]


def num_steps(prompt: str) -> int:
  """Number of steps of a prompt (its difficulty); ValueError if malformed."""
  return len(_parse(prompt)[1])


def solve(prompt: str) -> Problem:
  """Recomputes the solution and answer of a prompt.

  Args:
    prompt: e.g. '7a+3b*2c-5?'.

  Returns:
    The problem the prompt states.

  Raises:
    ValueError: if the prompt is malformed.
  """
  return _build(*_parse(prompt))


def noisy_solution(prompt: str, rng: np.random.Generator,
                   error_rate: float) -> str:
  """A demonstration with slips, like imperfect human-written solutions.

  Each step's written result is, with probability `error_rate`, replaced by
  a uniformly drawn wrong digit; later steps continue from the written value,
  so the chain stays internally consistent and its final answer is wrong.
  A model imitating such demonstrations learns the right computation plus a
  calibrated slip rate, which RL then has to remove.

  Args:
    prompt: e.g. '7a+3b*2c-5?'.
    rng: the source of randomness.
    error_rate: probability of a slip per step, in [0, 1].

  Returns:
    The (possibly corrupted) solution text.
  """
  if not 0.0 <= error_rate <= 1.0:
    raise ValueError(f'error_rate must be in [0, 1], got {error_rate}')
  def corrupt(result: int) -> int:
    if rng.random() < error_rate:
      return (result + int(rng.integers(1, 10))) % 10
    return result
  return _build(*_parse(prompt), corrupt).solution


def num_distinct_prompts(max_steps: int) -> int:
  """Number of different prompts with 1..max_steps steps."""
  return sum(10 * (len(OPS) * 10) ** n for n in range(1, max_steps + 1))


def generate_split(
    *,
    num_examples: int,
    seed: int,
    max_steps: int,
    zipf_s: float,
    exclude: Collection[str] = frozenset(),
) -> list[Problem]:
  """Draws a list of distinct problems, deterministically.

  Duplicates are redrawn, so short chains are rarer than `step_distribution`
  says once their few distinct prompts run out (there are only 300 prompts
  with one step and 3000 with two).

  Args:
    num_examples: how many problems to return.
    seed: seed of the numpy generator; the same arguments give the same list.
    max_steps: the largest number of steps.
    zipf_s: Zipf exponent of the step distribution.
    exclude: prompts that must not appear, e.g. a held-out split's.

  Returns:
    `num_examples` problems with pairwise different prompts, none in
    `exclude`.

  Raises:
    ValueError: if there are fewer than `num_examples` allowed prompts.
  """
  excluded_in_range = sum(
      1
      for p in exclude
      if _PROMPT_RE.fullmatch(p) and (len(p) - 2) // 3 <= max_steps
  )
  available = num_distinct_prompts(max_steps) - excluded_in_range
  if num_examples > available:
    raise ValueError(
        f'asked for {num_examples} distinct problems but only {available} '
        f'prompts with at most {max_steps} steps are not excluded'
    )
  rng = np.random.default_rng(seed)
  seen = set(exclude)
  problems = []
  while len(problems) < num_examples:
    problem = make_problem(rng, max_steps=max_steps, zipf_s=zipf_s)
    if problem.prompt in seen:
      continue
    seen.add(problem.prompt)
    problems.append(problem)
  return problems
