"""Math answer verifier on tricky equivalent (and inequivalent) forms."""

import concurrent.futures
import threading

import numpy as np
import pytest

from rlx.rewards import math_answer

EQUIVALENT = [
    ('So the answer is \\boxed{\\frac{1}{2}}.', '0.5'),
    ('\\boxed{0.5}', '\\frac{1}{2}'),
    ('The answer is 1/2', '\\frac12'),
    ('\\boxed{\\dfrac{3}{4}}', '0.75'),
    ('The answer is \\boxed{1,000}', '1000'),
    ('The total is 12,345 dollars.', '12345'),
    ('\\boxed{\\left(1,2\\right)}', '(1,2)'),
    ('\\boxed{(1, 2)}', '$(1,2)$'),
    ('\\boxed{[0,1)}', '[0,1)'),
    ('\\boxed{\\{1,2\\}}', '\\{2,1\\}'),
    ('$-3$', '-3'),
    ('The answer is \\boxed{-\\frac{3}{2}}', '-1.5'),
    ('It is 5 cm long, so \\boxed{5\\text{ cm}}', '5'),
    ('\\boxed{x=3}', '3'),
    ('\\boxed{\\sqrt{2}/2}', '\\frac{\\sqrt{2}}{2}'),
    ('\\boxed{2\\pi}', '2\\pi'),
    ('first \\boxed{3}, no wait: \\boxed{4}', '4'),
    ('final answer: 7', '7'),
    ('#### 72', '72'),
    ('\\boxed{\\text{Monday}}', 'Monday'),
    ('\\boxed{3}', '\\boxed{3}'),
    ('\\fbox{\\frac{2}{4}}', '1/2'),
]
DIFFERENT = [
    ('\\boxed{(2, 1)}', '(1,2)'),
    ('\\boxed{[0,1]}', '[0,1)'),
    ('The answer is \\boxed{-3}.', '3'),
    ('\\boxed{0.333}', '\\frac13'),
    ('\\boxed{2}', '3'),
    ('no answer here', '3'),
    ('first \\boxed{4}, no wait: \\boxed{3}', '4'),
    ('\\boxed{\\text{Tuesday}}', 'Monday'),
    ('', '0'),
    # Cut off inside the final box: no answer, not an earlier one.
    ('I think 3. Final: \\boxed{4', '3'),
    ('\\boxed{3} or rather \\boxed{\\frac{3', '3'),
]


@pytest.mark.parametrize('response, answer', EQUIVALENT)
def test_equivalent_forms(response, answer):
  assert math_answer.is_correct(response, answer)


@pytest.mark.parametrize('response, answer', DIFFERENT)
def test_different_answers(response, answer):
  assert not math_answer.is_correct(response, answer)


def test_last_boxed_balances_braces():
  text = 'a \\boxed{1} b \\boxed{\\frac{1}{\\sqrt{2}}} c \\boxed{unclosed'
  assert math_answer.last_boxed(text) == '\\frac{1}{\\sqrt{2}}'
  assert math_answer.last_boxed('none') is None


def test_first_boxed_end_is_the_first_complete_box():
  text = 'so \\boxed{\\frac{1}{2}} then \\boxed{3}'
  end = math_answer.first_boxed_end(text)
  assert text[:end] == 'so \\boxed{\\frac{1}{2}}'
  assert math_answer.first_boxed_end('x \\boxed{\\frac{1}{2') is None
  assert math_answer.first_boxed_end('no box') is None
  # Every prefix of the text: found exactly from `end` on (monotone).
  assert [math_answer.first_boxed_end(text[:n]) is not None
          for n in range(len(text) + 1)] == [n >= end
                                             for n in range(len(text) + 1)]


def test_score_batch_and_thread_pool():
  responses = [r for r, _ in EQUIVALENT[:4]] + [r for r, _ in DIFFERENT[:4]]
  answers = [a for _, a in EQUIVALENT[:4]] + [a for _, a in DIFFERENT[:4]]
  want = np.array([1.0] * 4 + [0.0] * 4, np.float32)
  np.testing.assert_array_equal(math_answer.score(responses, answers), want)
  # Worker threads cannot use signal-based timeouts; still correct.
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    got = list(pool.map(math_answer.reward, responses, answers))
  np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match='2 responses but 1 answers'):
    math_answer.score(['a', 'b'], ['a'])


def test_score_from_a_thread_keeps_the_timeouts():
  # 9^(9^(9^9)) would hold the interpreter in SymPy for good without a
  # timeout; `score` from a thread (rollout.overlap) uses a helper process
  # whose main thread has them, and gives the same rewards as the main
  # thread.
  responses = [r for r, _ in EQUIVALENT[:3]] + ['\\boxed{9^{9^{9^{9}}}}']
  answers = [a for _, a in EQUIVALENT[:3]] + ['3']
  got = []
  worker = threading.Thread(  # A daemon: a hang fails the test, not exit.
      target=lambda: got.append(math_answer.score(responses, answers)),
      daemon=True)
  worker.start()
  worker.join(120)
  assert got, 'score from a thread did not return in 120 s'
  np.testing.assert_array_equal(got[0], [1.0, 1.0, 1.0, 0.0])
