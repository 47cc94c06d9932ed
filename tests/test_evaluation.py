"""rlx.evaluation: maj@k, best-of-k and records against hand-computed cases;
the tasks' answer extraction and prompt encoding."""

import json
import os
import types

import jax
import numpy as np
import pytest

from rlx import config as config_lib
from rlx import evaluation
from rlx.data.task import load_task
from rlx.models import hf_tokenizer
from rlx.rewards import chain_arith
from rlx.rewards import math_answer

QWEN2 = os.path.join(os.path.dirname(__file__), 'fixtures', 'hf', 'qwen2')


def _ref_pass_at_k(n, c, k):
  """1 - C(n-c, k)/C(n, k) as a product (numpy, no binomials)."""
  if n - c < k:
    return 1.0
  return 1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1))


@pytest.mark.parametrize('answers,groups,winner', [
    ([], [], None),
    ([None, None], [], None),  # Nothing extractable: no vote.
    (['7'], [[0]], 0),  # k = 1: the one answer.
    ([None, '3', '5', '3'], [[1, 3], [2]], 1),
    (['5', '3', '3', '5'], [[0, 3], [1, 2]], 0),  # Tie: first seen wins.
    (['3', '5', None, '5', '3'], [[0, 4], [1, 3]], 0),
    (['2', '4', '4', None, None, None], [[0], [1, 2]], 1),  # None don't win.
])
def test_group_answers_and_majority(answers, groups, winner):
  assert evaluation.group_answers(answers) == groups
  assert evaluation.majority(answers) == winner


def test_majority_with_an_equivalence_groups_equal_values():
  # Numerically equal spellings form one group of 3 against '3' (2 votes).
  answers = ['3', '\\frac12', '0.5', None, '3', '1/2']
  assert evaluation.group_answers(answers, math_answer.same_answer) == [
      [0, 4], [1, 2, 5]]
  assert evaluation.majority(answers, math_answer.same_answer) == 1
  assert evaluation.majority(answers) == 0  # As strings: '3' has 2 votes.


@pytest.mark.parametrize('answers,correct,expected', [
    (['5', '3', '3'], [True, False, False], False),  # Minority right.
    (['5', '3', '5'], [True, False, True], True),
    (['5', '3'], [False, True], False),  # Tie -> '5', the first.
    (['3', '5'], [False, True], False),
    ([None, None], [False, False], False),
    ([None], [True], False),  # Correct but nothing to vote for.
    (['9'], [True], True),  # k = 1: maj@1 = pass@1 where answers exist.
])
def test_vote(answers, correct, expected):
  winner, right = evaluation.vote(answers, correct)
  assert right is expected and winner == evaluation.majority(answers)


def test_best_of_k_is_pass_at_k_with_n_equal_k():
  rng = np.random.default_rng(0)
  correct = rng.random((50, 4)) < 0.3
  ref = np.mean([_ref_pass_at_k(4, c, 4) for c in correct.sum(-1)])
  assert evaluation.best_of_k(correct) == pytest.approx(ref, abs=1e-12)
  assert evaluation.best_of_k(correct) == np.mean(
      [evaluation.pass_at_k(4, c, 4) for c in correct.sum(-1)])
  assert evaluation.best_of_k([[False], [True]]) == 0.5  # k = 1.


@pytest.mark.parametrize('n,c,k', [(4, 0, 1), (4, 1, 2), (8, 3, 4),
                                   (5, 4, 2), (3, 3, 3)])
def test_pass_at_k_matches_the_product_form(n, c, k):
  assert evaluation.pass_at_k(n, c, k) == pytest.approx(
      _ref_pass_at_k(n, c, k), abs=1e-12)


def _samples():
  """3 prompts x 3 samples of chain_arith-style responses."""
  texts = [['1>5', '2>5', '3>6'],  # maj 5 (right), 2 of 3 right.
           ['>4', '>7', 'no answer'],  # tie 4/7 -> 4 (wrong), 1 right.
           ['x', 'y', 'z']]  # nothing to vote for.
  answers = ['5', '7', '1']
  rewards = chain_arith.score([t for g in texts for t in g],
                              [a for a in answers for _ in range(3)])
  return evaluation.Samples(
      prompts=['p0', 'p1', 'p2'], answers=answers, texts=texts,
      rewards=rewards.reshape(3, 3),
      lengths=np.array([[3, 3, 3], [2, 2, 9], [1, 1, 1]]),
      truncated=np.array([[0, 0, 0], [0, 0, 1], [0, 0, 0]], bool))


def test_vote_metrics_by_hand():
  task = types.SimpleNamespace(extract_fn=chain_arith.extract_answer,
                               same_answer_fn=lambda a, b: a == b)
  out, records = evaluation.vote_metrics(_samples(), task)
  assert out == {
      'pass@1': 3 / 9,
      'pass@3': (1.0 + 1.0 + 0.0) / 3,
      'maj@3': 1 / 3,
      'best_of_3': 2 / 3,
      'response_len': 25 / 9,
      'truncated_frac': 1 / 9,
  }
  assert records[0] == {
      'prompt': 'p0', 'answer': '5', 'responses': ['1>5', '2>5', '3>6'],
      'rewards': [1.0, 1.0, 0.0], 'extracted': ['5', '5', '6'],
      'majority': '5', 'majority_correct': True}
  assert (records[1]['extracted'], records[1]['majority'],
          records[1]['majority_correct']) == (['4', '7', None], '4', False)
  assert (records[2]['extracted'], records[2]['majority']) == (
      [None] * 3, None)
  json.dumps(records)  # The JSONL lines.


def test_vote_metrics_k1_has_no_separate_pass_at_k():
  s = _samples()
  one = evaluation.Samples(s.prompts, s.answers, [g[:1] for g in s.texts],
                           s.rewards[:, :1], s.lengths[:, :1],
                           s.truncated[:, :1])
  task = types.SimpleNamespace(extract_fn=chain_arith.extract_answer,
                               same_answer_fn=lambda a, b: a == b)
  out, _ = evaluation.vote_metrics(one, task)
  assert (out['pass@1'], out['maj@1'], out['best_of_1']) == (1 / 3,) * 3


class _FakeActor:
  """Prompt id i's sample j is f'{i}>{j}', rewarded when j == i % 2; rows
  are prompt ids (the test prompts are [[0], [1], ...])."""

  def __init__(self, num_test):
    self.task = types.SimpleNamespace(
        test_prompts=np.arange(num_test)[:, None],
        test_prompt_mask=np.ones((num_test, 1), bool),
        test=types.SimpleNamespace(
            prompts=[f'q{i}' for i in range(num_test)],
            answers=[str(i % 2) for i in range(num_test)]))
    self.keys = []

  def rollout(self, params, prompts, prompt_mask, answers, key, *,
              num_samples, temperature):
    del params, prompt_mask, temperature
    self.keys.append(jax.random.key_data(key))
    ids = prompts[:, 0]
    assert answers == [str(i % 2) for i in ids]
    g = np.arange(num_samples)
    return types.SimpleNamespace(
        texts=[[f'{i}>{j}' for j in g] for i in ids],
        rewards=(g[None] == ids[:, None] % 2).astype(np.float32),
        rollout=types.SimpleNamespace(
            lengths=np.broadcast_to(ids[:, None] + 1, (len(ids),
                                                       num_samples)),
            finish=np.full((len(ids), num_samples), 2)))


def test_evaluate_metrics_and_records_over_padded_batches():
  actor = _FakeActor(num_test=10)
  cfg = evaluation.EvalConfig(num_prompts=5, samples_per_prompt=2,
                              batch_prompts=2)
  key = evaluation.eval_key(7)
  metrics, records = evaluation.evaluate(actor, None, cfg, key,
                                         max_new_tokens=4, records=True)
  # Every prompt has exactly one right sample of 2; lengths i + 1.
  assert metrics == {'eval/pass@1': 0.5, 'eval/response_len': 3.0,
                     'eval/truncated_frac': 1.0, 'eval/pass@2': 1.0}
  assert evaluation.evaluate(actor, None, cfg, key,
                             max_new_tokens=4) == metrics
  # One per sample, prompt-major; the wrapped padding (prompt 0 in the
  # third batch) is dropped.
  assert [(r['prompt'], r['response'], r['reward']) for r in records] == [
      (f'q{i}', f'{i}>{j}', float(j == i % 2))
      for i in range(5) for j in range(2)]
  assert all(r['answer'] == str(int(r['prompt'][1:]) % 2) for r in records)
  # Batch b is drawn with fold_in(key, b * batch_prompts), the trainer's.
  want = [jax.random.key_data(jax.random.fold_in(key, s)) for s in (0, 2, 4)]
  np.testing.assert_array_equal(actor.keys[:3], want)
  np.testing.assert_array_equal(
      jax.random.key_data(key),
      jax.random.key_data(jax.random.fold_in(jax.random.key(7), 2)))


@pytest.mark.parametrize('response,expected', [
    ('so \\boxed{\\frac12}.', '\\frac12'),
    ('\\boxed{1} then \\boxed{ 2 }', '2'),  # The last box, stripped.
    ('The answer is 5.', '5'),  # No box: math-verify's last expression.
    ('\\boxed{1} and \\boxed{3', None),  # Cut off in its final box.
    ('\\boxed{}', None),
    ('Monday', None),  # No box, nothing mathematical.
])
def test_math_extract_answer(response, expected):
  assert math_answer.extract_answer(response) == expected


@pytest.mark.parametrize('a,b,same', [
    ('\\frac12', '0.5', True), ('1,000', '1000', True),
    ('(1,2)', '\\left(1,2\\right)', True), ('\\text{Monday}', 'monday', True),
    ('2', '3', False), ('x+1', '1+x', True), ('(B)', '(C)', False),
])
def test_math_same_answer(a, b, same):
  assert math_answer.same_answer(a, b) is same
  assert math_answer.same_answer(b, a) is same


def test_math_task_extracts_votes_and_encodes_as_its_prompts(tmp_path):
  with open(tmp_path / 'p.jsonl', 'w') as f:
    for i in range(6):
      f.write(json.dumps({'problem': f'{i}. What is {i}+1?',
                          'answer': str(i + 1)}) + '\n')
  cfg = config_lib.TaskConfig(
      name='math_files', train_files=str(tmp_path / 'p.jsonl'), num_test=2,
      prompt_len=96, system_prompt='Be brief.', user_template='Q: {problem}')
  task = load_task(cfg, hf_tokenizer.HFTokenizer.from_dir(QWEN2))
  tokens, mask = task.encode(task.test.prompts)
  np.testing.assert_array_equal(tokens, task.test_prompts)
  np.testing.assert_array_equal(mask, task.test_prompt_mask)
  assert task.extract_fn('x \\boxed{0.5}') == '0.5'
  assert task.same_answer_fn('0.5', '\\frac{1}{2}')
  long = task.encode(['word ' * 200])[0]  # Longer than prompt_len: wider.
  assert long.shape[1] > 96
