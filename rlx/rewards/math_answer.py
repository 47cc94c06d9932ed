"""Math final-answer verifier: is the response's answer equal to the gold?

Equivalence is decided by Hugging Face's `math-verify` (LaTeX and plain
expressions parsed to SymPy, compared symbolically and numerically: \\frac12
= 0.5 = 1/2, 1,000 = 1000, \\left(1,2\\right) = (1,2) as an interval, units
and \\text{} dropped, sets/tuples/intervals compared as such). rlx adds:

  * only the last \\boxed{...} (or \\fbox{...}) of a response counts when
    there is one, so a model may revise itself (math-verify alone would
    read several boxes as a set); a response whose last box is never
    closed (cut off while answering) has no answer, rather than falling
    back to an earlier box or number;
  * the gold answer is read as LaTeX even without $...$ around it, which is
    how datasets store it ('(1,2)', '\\frac{3}{4}', '1,000');
  * answers that are not mathematics ('Monday', '(B)') fall back to a
    normalised string comparison;
  * math-verify's signal-based timeouts only work in a process's main
    thread, and an answer such as 9^{9^{9^{9}}} would otherwise hang the
    caller: `score` called from another thread (`rollout.overlap` samples
    in one) scores in a helper process, in whose main thread the timeouts
    hold (`is_correct` and `reward` called directly from a thread run
    without them).

For majority voting (maj@k), `extract_answer` reads a response's final
answer as `is_correct` does and `same_answer` says whether two such answers
are equivalent, by the same rules as a response against its gold answer.
"""

from collections.abc import Sequence
from concurrent import futures
import functools
import multiprocessing
import re
import threading
from typing import Optional

import math_verify
import numpy as np

TIMEOUT_S = 5  # Per parse / comparison, in the main thread.
_BOX = re.compile(r'\\(?:boxed|fbox)\s*\{')
_TEXT = re.compile(r'\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}')


def _box_close(response: str, start: int) -> Optional[int]:
  """Index of the brace closing the box whose content starts at `start`."""
  depth = 1
  for i in range(start, len(response)):
    depth += {'{': 1, '}': -1}.get(response[i], 0)
    if depth == 0:
      return i
  return None


def first_boxed_end(response: str) -> Optional[int]:
  """Characters up to and including the first complete box's closing brace
  (TreePO's answer-found rule cuts a path there); None if no box is
  complete yet."""
  for m in _BOX.finditer(response):
    close = _box_close(response, m.end())
    if close is not None:
      return close + 1
  return None


def last_boxed(response: str) -> Optional[str]:
  """Content of the last \\boxed{...} / \\fbox{...}, braces balanced.

  Returns:
    The content, or None if there is no complete box.
  """
  starts = [m.end() for m in _BOX.finditer(response)]
  for start in reversed(starts):
    close = _box_close(response, start)
    if close is not None:
      return response[start:close]
  return None


def _timeout() -> Optional[int]:
  main = threading.current_thread() is threading.main_thread()
  return TIMEOUT_S if main else None


def _parse(text: str) -> list:
  return math_verify.parse(text, parsing_timeout=_timeout())


def _normalise(text: str) -> str:
  """Lower-cased answer text without $, \\text{}, spaces, final period."""
  text = _TEXT.sub(r'\1', text)
  text = text.replace('$', '').replace('\\!', '').replace('\\,', '')
  return re.sub(r'\s+', '', text).rstrip('.').lower()


def is_correct(response: str, answer: str) -> bool:
  """True iff the response's final answer is equivalent to `answer`.

  Args:
    response: the decoded model output.
    answer: the gold answer as datasets store it (LaTeX with or without
      $...$, a number, or a \\boxed{} expression).

  Returns:
    Whether they agree.
  """
  starts = [m.end() for m in _BOX.finditer(response)]
  boxed = None
  if starts:
    close = _box_close(response, starts[-1])
    if close is None:
      return False  # Cut off inside its final answer.
    boxed = response[starts[-1]:close]
  pred = _parse(f'\\boxed{{{boxed}}}' if boxed is not None else response)
  gold_box = last_boxed(answer)
  gold_text = gold_box if gold_box is not None else answer
  gold = _parse(f'${gold_text}$') or _parse(gold_text)
  if gold and pred and math_verify.verify(gold, pred,
                                          timeout_seconds=_timeout()):
    return True
  claimed = boxed if boxed is not None else response
  return bool(gold_text.strip()) and _normalise(claimed) == _normalise(
      gold_text)


def extract_answer(response: str) -> Optional[str]:
  """The final answer `is_correct` reads from a response, as text.

  Args:
    response: the decoded model output.

  Returns:
    The content of its last \\boxed{} (stripped); without a box, the last
    mathematical expression math-verify finds in the text, as it wrote it
    (e.g. '5' from 'The answer is 5.'); None when the last box is never
    closed, is empty, or there is neither a box nor an expression. (A
    response without a box whose whole text equals a non-mathematical gold
    answer, such as 'Monday', is correct for `is_correct` but has no answer
    here: a whole response is not an answer to vote for.)
  """
  starts = [m.end() for m in _BOX.finditer(response)]
  if starts:
    close = _box_close(response, starts[-1])
    if close is None:
      return None  # Cut off inside its final answer.
    return response[starts[-1]:close].strip() or None
  parsed = _parse(response)
  # math-verify returns [expression, the text it was read from].
  return parsed[-1] if len(parsed) > 1 and parsed[-1].strip() else None


@functools.lru_cache(maxsize=4096)
def _parse_answer(text: str) -> tuple:
  """An extracted or gold answer parsed as LaTeX (with or without $...$);
  cached because voting compares each answer with several others."""
  return tuple(_parse(f'${text}$') or _parse(text))


def same_answer(a: str, b: str) -> bool:
  """True iff two final answers (as `extract_answer` returns them) are
  equivalent: math-verify judges them equal (1/2 = 0.5 = \\frac12) or,
  failing that, their normalised texts are equal ('\\text{Monday}' =
  'monday')."""
  if a == b:
    return True
  pa, pb = _parse_answer(a), _parse_answer(b)
  if pa and pb and math_verify.verify(list(pa), list(pb),
                                      timeout_seconds=_timeout()):
    return True
  return bool(a.strip()) and _normalise(a) == _normalise(b)


def reward(response: str, answer: str) -> float:
  """1.0 if `is_correct`, else 0.0."""
  return 1.0 if is_correct(response, answer) else 0.0


_helper = None
_helper_lock = threading.Lock()


def _helper_process() -> futures.ProcessPoolExecutor:
  """One spawned scoring process, started on first use (a fork of a
  process running JAX threads would be unsafe)."""
  global _helper
  with _helper_lock:
    if _helper is None:
      _helper = futures.ProcessPoolExecutor(
          max_workers=1, mp_context=multiprocessing.get_context('spawn'))
    return _helper


def _score(responses: list, answers: list) -> np.ndarray:
  return np.array([reward(r, a) for r, a in zip(responses, answers)],
                  dtype=np.float32)


def score(responses: Sequence[str], answers: Sequence[str]) -> np.ndarray:
  """Rewards a batch: float32 [N] of 0.0 / 1.0, every parse and comparison
  under the TIMEOUT_S limit (from a thread other than the main one, in a
  helper process; see the module docstring).

  Raises:
    ValueError: if the two lengths differ.
  """
  if len(responses) != len(answers):
    raise ValueError(
        f'got {len(responses)} responses but {len(answers)} answers')
  responses, answers = list(responses), list(answers)
  if threading.current_thread() is threading.main_thread():
    return _score(responses, answers)
  return _helper_process().submit(_score, responses, answers).result()
