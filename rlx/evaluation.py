"""Held-out evaluation: pass@k with the unbiased estimator, lengths."""

import math

import jax
import numpy as np

from rlx.actor import Actor
from rlx.config import EvalConfig
from rlx.types import Params, PRNGKey


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
  if k > n:
    raise ValueError(f'pass@{k} needs at least {k} samples, got {n}')
  if n - c < k:
    return 1.0
  return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(actor: Actor, params: Params, cfg: EvalConfig, key: PRNGKey, *,
             max_new_tokens: int) -> dict[str, float]:
  """Samples `samples_per_prompt` responses for the first `num_prompts`
  held-out prompts. Returns eval/pass@1 (mean correctness over all samples),
  eval/pass@k for k = samples_per_prompt, and response statistics."""
  task = actor.task
  n, k = cfg.num_prompts, cfg.samples_per_prompt
  correct, lengths, truncated = [], [], []
  for start in range(0, n, cfg.batch_prompts):
    # Fixed-size batches (the last one padded by wrapping) keep one shape.
    idx = np.arange(start, start + cfg.batch_prompts) % n
    scored = actor.rollout(
        params, task.test_prompts[idx], task.test_prompt_mask[idx],
        [task.test.answers[i] for i in idx], jax.random.fold_in(key, start),
        num_samples=k, temperature=cfg.temperature)
    keep = min(cfg.batch_prompts, n - start)
    correct.append(scored.rewards[:keep] > 0.5)
    lengths.append(np.asarray(scored.rollout.lengths)[:keep])
    truncated.append(np.asarray(scored.rollout.finish)[:keep] == 2)
  correct = np.concatenate(correct)
  lengths = np.concatenate(lengths)
  out = {
      'eval/pass@1': float(correct.mean()),
      'eval/response_len': float(lengths.mean()),
      'eval/truncated_frac': float(np.concatenate(truncated).mean()),
  }
  if k > 1:
    out[f'eval/pass@{k}'] = float(np.mean(
        [pass_at_k(k, int(c), k) for c in correct.sum(-1)]))
  return out
