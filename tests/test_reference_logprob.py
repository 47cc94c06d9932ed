"""The likelihood selector's score: the policy's log-probability of each
prompt's reference solution, against a one-sequence-at-a-time reference."""

import dataclasses

import jax
import numpy as np
import pytest

from rlx import config as config_lib
from rlx import testing
from rlx import policy as policy_lib
from rlx.data.task import load_task
from rlx.models import kv_cache
from rlx.models import transformer


def _setup(tmp_path, logits_chunk=0, **sampling):
  c = testing.tiny_config_dict(str(tmp_path))
  c.curriculum.selector = 'likelihood'
  c.optim.logits_chunk = logits_chunk
  for k, v in sampling.items():
    c.sampling[k] = v
  cfg = config_lib.build(c)
  task = load_task(cfg.task)
  model, logits_fn = policy_lib.build_model(cfg, task.tokenizer.vocab_size)
  params = transformer.init_params(model.cfg, jax.random.key(0))
  fn = policy_lib.reference_logprob_fn(cfg, logits_fn, policy_lib.split_model(model),
                                    task, len(task.train))
  return cfg, task, logits_fn, params, fn


def _reference(cfg, task, logits_fn, params, i):
  """Sum of log softmax(logits / T) over the solution and eos, the prompt
  and solution as one unpadded sequence (float64 softmax in numpy)."""
  prompt = task.train_prompts[i][task.train_prompt_mask[i]]
  sol = task.tokenizer.encode(task.train.solutions[i], add_eos=True)
  seq = np.concatenate([prompt, sol]).astype(np.int32)
  n = len(seq)
  mask = kv_cache.causal_mask(np.ones((1, n), bool), query_len=n,
                              cache_index=0)
  logits = np.asarray(logits_fn(params, seq[None], np.arange(n)[None], mask),
                      np.float64)[0] / cfg.sampling.temperature
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
      -1, keepdims=True)) - logits.max(-1, keepdims=True)
  return sum(logp[t, seq[t + 1]] for t in range(len(prompt) - 1, n - 1))


@pytest.mark.parametrize('logits_chunk', [0, 8])
def test_matches_one_sequence_at_a_time(tmp_path, logits_chunk):
  # optim.logits_chunk: the output projection in chunks, as the learner's.
  cfg, task, logits_fn, params, fn = _setup(
      tmp_path, logits_chunk=logits_chunk, temperature=0.7)
  # 20 ids: two chunks of B G = 16 rows, the second padded; out of order.
  ids = np.random.default_rng(0).choice(len(task.train), 20, replace=False)
  got = fn(params, ids)
  want = [_reference(cfg, task, logits_fn, params, i) for i in ids]
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-4)
  assert got.dtype == np.float32 and np.all(got < 0)
  # Order-free: each score comes back to its own id (chunks are trimmed to
  # their longest row, so the float rounding may differ with the order).
  np.testing.assert_allclose(fn(params, ids[::-1]), got[::-1], rtol=1e-6)


def test_a_solution_longer_than_the_budget_cannot_be_sampled(tmp_path):
  cfg, task, logits_fn, params, fn = _setup(tmp_path, max_new_tokens=14)
  lengths = np.array([len(s) + 1 for s in task.train.solutions])
  long, short = np.flatnonzero(lengths > 14), np.flatnonzero(lengths <= 14)
  assert len(long) and len(short)
  ids = np.concatenate([long[:3], short[:3]])
  got = fn(params, ids)
  assert np.all(got[:3] == -np.inf)
  np.testing.assert_allclose(
      got[3:], [_reference(cfg, task, logits_fn, params, i)
                for i in short[:3]], rtol=2e-5, atol=2e-4)


def test_a_task_without_reference_solutions_is_refused(tmp_path):
  cfg, task, logits_fn, _, _ = _setup(tmp_path)
  solutions = list(task.train.solutions)
  solutions[7] = ''
  bare = dataclasses.replace(
      task, train=dataclasses.replace(task.train, solutions=solutions))
  with pytest.raises(config_lib.ConfigError,
                     match="'likelihood'.*1 of the 200"):
    policy_lib.reference_logprob_fn(cfg, logits_fn, None, bare, 200)
