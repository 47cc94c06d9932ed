"""Held-out evaluation: pass@k with the unbiased estimator, maj@k, best-of-k.

`evaluate` is the trainer's: its metrics row (eval/pass@1, eval/pass@k,
lengths), and on request the sampled completions. `scripts/evaluate.py`
adds majority voting over the same samples (`vote_metrics`), which needs
the task's answer extraction (`Task.extract_fn`, `Task.same_answer_fn`).
"""

import dataclasses
import math
import operator
from typing import Any, Callable, Sequence

import jax
import numpy as np

from rlx import config as config_lib
from rlx import errors
from rlx import registry
from rlx.actor import Actor
from rlx.data.task import Task
from rlx.types import Params, PRNGKey

# (answer, answer) -> whether they are equivalent.
SameFn = Callable[[str, str], bool]


@config_lib.section('eval')
@dataclasses.dataclass(frozen=True)
class EvalConfig:
  every: int = 10  # Evaluate every this many RL steps (and at 0 and end).
  num_prompts: int = 512  # Held-out prompts (at most task.num_test).
  samples_per_prompt: int = 2  # k for pass@k; pass@1 averages all k.
  temperature: float = 1.0  # Evaluation sampling temperature.
  batch_prompts: int = 128  # Prompts per sampler call.


@registry.config_check
def _check_eval_section(cfg) -> None:
  """eval.*."""
  ev = cfg.eval
  errors.require(ev.temperature > 0, 'eval.temperature', 'must be > 0')
  errors.require(0 < ev.num_prompts <= cfg.task.num_test, 'eval.num_prompts',
                 f'must be in [1, task.num_test={cfg.task.num_test}]')
  errors.require(ev.samples_per_prompt >= 1, 'eval.samples_per_prompt',
                 'must be >= 1')
  errors.require(ev.every > 0, 'eval.every', 'must be positive')
  errors.require(ev.batch_prompts > 0, 'eval.batch_prompts',
                 'must be positive')


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
  if k > n:
    raise ValueError(f'pass@{k} needs at least {k} samples, got {n}')
  if n - c < k:
    return 1.0
  return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def eval_key(seed: int) -> PRNGKey:
  """The key of a run's evaluations (config `seed`): the same at every step,
  so that evaluations differ by the policy only. rlx/trainer.py derives
  its evaluations with it; `scripts/evaluate.py` repeats their draws."""
  return jax.random.fold_in(jax.random.key(seed), 2)


@dataclasses.dataclass(frozen=True)
class Samples:
  """k sampled responses for each of n held-out prompts, scored."""
  prompts: list[str]  # [n] the task's prompt texts (not the chat-formatted
  # ones).
  answers: list[str]  # [n] gold answers.
  texts: list[list[str]]  # [n][k] decoded responses.
  rewards: np.ndarray  # [n, k] float32 verifier rewards.
  lengths: np.ndarray  # [n, k] response lengths in tokens.
  truncated: np.ndarray  # [n, k] bool: hit the token budget.

  @property
  def correct(self) -> np.ndarray:
    """[n, k] bool: reward > 0.5."""
    return self.rewards > 0.5


def sample(actor: Actor, params: Params, cfg: EvalConfig, key: PRNGKey
           ) -> Samples:
  """Samples `cfg.samples_per_prompt` responses for each of the first
  `cfg.num_prompts` held-out prompts, `cfg.batch_prompts` prompts per
  sampler call (batch i drawn with `fold_in(key, i * batch_prompts)`).

  The same (key, batch_prompts, samples_per_prompt, temperature) give the
  same responses for a prompt whatever num_prompts is; another
  samples_per_prompt changes every draw (the sampler's shapes change).
  """
  task = actor.task
  n, k = cfg.num_prompts, cfg.samples_per_prompt
  texts, rewards, lengths, truncated = [], [], [], []
  for start in range(0, n, cfg.batch_prompts):
    # Fixed-size batches (the last one padded by wrapping) keep one shape.
    idx = np.arange(start, start + cfg.batch_prompts) % n
    scored = actor.rollout(
        params, task.test_prompts[idx], task.test_prompt_mask[idx],
        [task.test.answers[i] for i in idx], jax.random.fold_in(key, start),
        num_samples=k, temperature=cfg.temperature)
    keep = min(cfg.batch_prompts, n - start)
    texts += scored.texts[:keep]
    rewards.append(np.asarray(scored.rewards)[:keep])
    lengths.append(np.asarray(scored.rollout.lengths)[:keep])
    truncated.append(np.asarray(scored.rollout.finish)[:keep] == 2)
  return Samples(prompts=list(task.test.prompts[:n]),
                 answers=list(task.test.answers[:n]), texts=texts,
                 rewards=np.concatenate(rewards),
                 lengths=np.concatenate(lengths),
                 truncated=np.concatenate(truncated))


def metrics(samples: Samples) -> dict[str, float]:
  """The trainer's eval row: eval/pass@1 (mean correctness over all
  samples), eval/pass@k for k = samples per prompt (when k > 1), and
  response statistics."""
  correct = samples.correct
  k = correct.shape[1]
  out = {
      'eval/pass@1': float(correct.mean()),
      'eval/response_len': float(samples.lengths.mean()),
      'eval/truncated_frac': float(samples.truncated.mean()),
  }
  if k > 1:
    out[f'eval/pass@{k}'] = float(np.mean(
        [pass_at_k(k, int(c), k) for c in correct.sum(-1)]))
  return out


def sample_records(samples: Samples) -> list[dict[str, Any]]:
  """One dict per sample (prompt-major): 'prompt', 'answer', 'response',
  'reward' (e.g. for a table of completions)."""
  return [{'prompt': p, 'answer': a, 'response': t, 'reward': float(r)}
          for p, a, group, rs in zip(samples.prompts, samples.answers,
                                     samples.texts, samples.rewards)
          for t, r in zip(group, rs)]


def evaluate(actor: Actor, params: Params, cfg: EvalConfig, key: PRNGKey, *,
             max_new_tokens: int, records: bool = False
             ) -> dict[str, float] | tuple[dict[str, float],
                                           list[dict[str, Any]]]:
  """Samples `samples_per_prompt` responses for the first `num_prompts`
  held-out prompts (`sample`).

  Args:
    actor: samples and scores (its task's test split is evaluated).
    params: the policy's parameters.
    cfg: which prompts, how many samples, the temperature.
    key: the evaluation key (the trainer's is the same at every step).
    max_new_tokens: the response budget (the actor's).
    records: also return the sampled completions.

  Returns:
    `metrics`: eval/pass@1, eval/pass@k for k = samples_per_prompt (k > 1)
    and response statistics; with `records`, (metrics, `sample_records`).
  """
  del max_new_tokens  # The actor's sampler was built with it.
  samples = sample(actor, params, cfg, key)
  out = metrics(samples)
  return (out, sample_records(samples)) if records else out


def group_answers(answers: Sequence[str | None],
                  same: SameFn = operator.eq) -> list[list[int]]:
  """Groups equivalent answers for a majority vote.

  Each answer joins the first group whose first member it is `same` as
  (so a non-transitive equivalence is read against each group's first
  answer), else starts a new group. None (no extractable answer) does not
  vote.

  Args:
    answers: [k] extracted answers, None where there is none.
    same: the equivalence of two answers.

  Returns:
    The groups as lists of indices into `answers`, in order of first
    appearance, each in increasing order.
  """
  groups = []
  for i, answer in enumerate(answers):
    if answer is None:
      continue
    for group in groups:
      if same(answers[group[0]], answer):
        group.append(i)
        break
    else:
      groups.append([i])
  return groups


def majority(answers: Sequence[str | None], same: SameFn = operator.eq
             ) -> int | None:
  """Index of the majority answer's first sample: the largest group of
  `group_answers`; a tie goes to the group that appears first among the
  samples (deterministic, and what sampling order makes arbitrary anyway).
  None when no sample has an answer."""
  groups = group_answers(answers, same)
  if not groups:
    return None
  return max(groups, key=len)[0]  # max keeps the first of equal lengths.


def vote(answers: Sequence[str | None], correct: Sequence[bool],
         same: SameFn = operator.eq) -> tuple[int | None, bool]:
  """maj@k of one prompt: (the majority answer's first sample, as
  `majority`; whether it is correct, read from that sample's verdict;
  False without answers)."""
  winner = majority(answers, same)
  return winner, winner is not None and bool(correct[winner])


def best_of_k(correct: np.ndarray) -> float:
  """Best-of-k by the verifier: the fraction of prompts with at least one
  correct sample among their k ([n, k] bool). The verifier is an oracle
  here, so this is pass@k with n = k samples (`pass_at_k(k, c, k)`)."""
  return float(np.mean(np.asarray(correct).any(-1)))


def vote_metrics(samples: Samples, task: Task
                 ) -> tuple[dict[str, float], list[dict[str, Any]]]:
  """pass@1, pass@k, maj@k and best-of-k of `samples` (k samples per
  prompt), and one record per prompt.

  Args:
    samples: the scored samples (`sample`).
    task: reads answers (`Task.extract_fn`) and groups equivalent ones
      (`Task.same_answer_fn`).

  Returns:
    (metrics, records). metrics: 'pass@1' (as `metrics`' eval/pass@1),
    'pass@<k>', 'maj@<k>', 'best_of_<k>' (equal to pass@<k>: see
    `best_of_k`), 'response_len', 'truncated_frac'. records, one per
    prompt: 'prompt', 'answer', 'responses' [k], 'rewards' [k],
    'extracted' [k] (None: no answer), 'majority' (the majority answer as
    its first sample wrote it, or None), 'majority_correct'.
  """
  correct = samples.correct
  k = correct.shape[1]
  records, maj = [], []
  for i, group in enumerate(samples.texts):
    extracted = [task.extract_fn(t) for t in group]
    winner, right = vote(extracted, correct[i], task.same_answer_fn)
    maj.append(right)
    records.append({
        'prompt': samples.prompts[i], 'answer': samples.answers[i],
        'responses': list(group),
        'rewards': [float(r) for r in samples.rewards[i]],
        'extracted': extracted,
        'majority': None if winner is None else extracted[winner],
        'majority_correct': maj[-1]})
  base = metrics(samples)
  out = {'pass@1': base['eval/pass@1']}
  if k > 1:  # (pass@1 is the mean above, exactly the trainer's.)
    out[f'pass@{k}'] = base[f'eval/pass@{k}']
  out.update({
      f'maj@{k}': float(np.mean(maj)),
      f'best_of_{k}': best_of_k(correct),
      'response_len': base['eval/response_len'],
      'truncated_frac': base['eval/truncated_frac'],
  })
  return out, records
