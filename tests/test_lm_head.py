"""The learner's output projection in chunks (`optim.logits_chunk`,
rlx/lm_head.py): the same log-probs, entropies, gradients and train steps as
the materialised logits, and a temporary buffer bounded by the chunk."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx import config as config_lib
from rlx import learner
from rlx import lm_head
from rlx import packing
from rlx import sharding
from rlx import testing
from rlx import policy as policy_lib
from rlx import trainer
from rlx.logbook import read_metrics
from rlx.models import transformer

V = 50


def _model(tmp_path, *, tie=True, vocab=V, dtype='float32'):
  c = testing.tiny_config_dict(str(tmp_path))
  c.model.tie_embeddings = tie
  c.model.dtype = dtype
  cfg = config_lib.build(c)
  mod, logits_fn = policy_lib.build_model(cfg, vocab_size=vocab)
  params = transformer.init_params(mod.cfg, jax.random.key(3))
  return cfg, mod, logits_fn, params


@pytest.mark.parametrize('tie', [True, False])
def test_unembedding_gives_the_model_logits(tmp_path, tie):
  _, mod, _, params = _model(tmp_path, tie=tie)
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, V, (2, 5)))
  positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
  mask = jnp.tril(jnp.ones((5, 5), bool))[None].repeat(2, 0)
  logits, _, hidden = mod.apply({'params': params}, tokens, positions, mask)
  out = transformer.unembedding(mod.cfg, params)
  assert out.shape == (V, mod.cfg.embed_dim)
  np.testing.assert_allclose(hidden @ out.T, logits, rtol=1e-6, atol=1e-6)


def test_position_stats_match_log_softmax():
  # Independent of the model: a random projection, chunk not dividing N.
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(23, 8)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(V, 8)), jnp.float32)
  split = lm_head.SplitLM(hidden=None, unembedding=lambda p: p,
                          dtype=jnp.float32)
  lse, ent = lm_head.position_stats(split, table, hidden, chunk=5,
                                    temperature=0.7)
  logits = np.asarray(hidden @ table.T, np.float64) / 0.7
  ref_lse = np.log(np.exp(logits).sum(-1))
  probs = np.exp(logits - ref_lse[:, None])
  np.testing.assert_allclose(lse, ref_lse, rtol=1e-5)
  np.testing.assert_allclose(ent, -(probs * np.log(probs)).sum(-1), rtol=1e-4)
  tokens = jnp.asarray(rng.integers(0, V, 23))
  np.testing.assert_allclose(
      lm_head.token_logits(split, table, hidden, tokens, temperature=0.7),
      logits[np.arange(23), np.asarray(tokens)], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('tie,chunk', [(True, 7), (False, 16), (True, 1000)])
def test_chunked_packed_logprobs_and_gradients_equal_materialised(
    tmp_path, tie, chunk):
  _, mod, logits_fn, params = _model(tmp_path, tie=tie)
  split = policy_lib.split_model(mod)
  prompt, prompt_mask, response, lengths = testing.random_responses(
      1, vocab=V)
  pk = packing.pack(prompt, prompt_mask, response, lengths, chunks=2)
  fill = np.full(response.shape, -3.0, np.float32)
  weights = np.random.default_rng(2).normal(size=response.shape)

  def run(c):
    def loss(p):
      logp, ent = packing.logprobs(logits_fn, p, pk, response,
                                   temperature=0.8, fill_logp=fill,
                                   split=split, logits_chunk=c)
      return jnp.sum(logp * weights) + jnp.sum(ent), (logp, ent)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (_, (logp, ent)), grads = run(chunk)
  (_, (ref_logp, ref_ent)), ref_grads = run(0)
  np.testing.assert_allclose(logp, ref_logp, rtol=1e-5, atol=2e-5)
  np.testing.assert_allclose(ent, ref_ent, rtol=1e-5, atol=2e-5)
  needed = np.arange(response.shape[-1]) < lengths[..., None]
  np.testing.assert_array_equal(np.asarray(logp)[~needed], -3.0)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, rtol=2e-4, atol=2e-5)


def test_chunked_padded_logprobs_equal_materialised(tmp_path):
  _, mod, logits_fn, params = _model(tmp_path, tie=False)
  prompt, prompt_mask, response, _ = testing.random_responses(4, vocab=V)
  b, g, t = response.shape
  args = (params, np.repeat(prompt, g, 0), np.repeat(prompt_mask, g, 0),
          response.reshape(b * g, t))
  got = learner.response_logprobs(logits_fn, *args, temperature=1.3,
                                  split=policy_lib.split_model(mod),
                                  logits_chunk=10)
  ref = learner.response_logprobs(logits_fn, *args, temperature=1.3)
  for x, y in zip(got, ref):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=2e-5)


def _train_setup(tmp_path, chunk, vocab=V):
  c = testing.tiny_config_dict(str(tmp_path))
  c.optim.logits_chunk = chunk
  c.rl.batch_prompts, c.rl.group_size = 2, 2
  cfg = config_lib.build(c)
  mod, logits_fn = policy_lib.build_model(cfg, vocab_size=vocab)
  opt = learner.make_optimizer(cfg.optim)
  step = learner.make_train_step(logits_fn, opt, cfg,
                                 split=policy_lib.split_model(mod))
  params = transformer.init_params(mod.cfg, jax.random.key(5))
  batch = learner.pack_batch(testing.two_group_batch(vocab=vocab))
  return step, learner.init_state(params, opt), batch


def test_train_step_with_chunks_equals_materialised(tmp_path):
  step, state, batch = _train_setup(tmp_path, 5)
  ref_step, ref_state, _ = _train_setup(tmp_path, 0)
  new, metrics = step(state, None, batch)
  ref_new, ref_metrics = ref_step(ref_state, None, batch)
  for k in ref_metrics:
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-4,
                               atol=1e-6, err_msg=k)
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(
      ref_new.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_chunks_bound_the_train_steps_temporaries(tmp_path):
  # A vocabulary 40x the model's width: the materialised logits dominate
  # the step's temporaries; with chunks of 8 positions they are gone.
  vocab = 5000
  temps = {}
  for chunk in (0, 8):
    step, state, batch = _train_setup(tmp_path / str(chunk), chunk,
                                      vocab=vocab)
    temps[chunk] = sharding.memory_stats(step, state, None, batch)['temp']
  positions = batch.packed.tokens.size
  logits_bytes = positions * vocab * 4
  assert temps[0] > 2 * logits_bytes
  assert temps[8] < temps[0] / 4, temps


def test_logits_chunk_config_and_missing_split(tmp_path):
  c = testing.tiny_config_dict(str(tmp_path))
  c.optim.logits_chunk = -1
  with pytest.raises(config_lib.ConfigError, match='optim.logits_chunk'):
    config_lib.build(c)
  c.optim.logits_chunk = 4
  cfg = config_lib.build(c)
  _, logits_fn = policy_lib.build_model(cfg, vocab_size=V)
  with pytest.raises(ValueError, match='needs the model split'):
    learner.forward_logp(logits_fn, cfg, {}, testing.two_group_batch(
        vocab=V))


def test_trainer_with_chunks_matches_materialised_run(tmp_path):
  # End to end (the trainer passes the split model to the train step and to
  # the recomputed old log-probs): the first step samples the same rollout,
  # so its loss and gradient agree to rounding.
  rows = {}
  for chunk in (0, 6):
    c = testing.tiny_config_dict(str(tmp_path))
    c.rl.num_steps, c.eval.every = 1, 1
    c.rl.recompute_old_logp = True
    c.optim.logits_chunk = chunk
    trainer.train(config_lib.build(c), str(tmp_path / f'run{chunk}'))
    rows[chunk] = next(r for r in read_metrics(
        str(tmp_path / f'run{chunk}' / 'metrics.jsonl'))
                       if 'learner/loss' in r)
  assert rows[0]['reward/mean'] == rows[6]['reward/mean']
  for k in ('learner/loss', 'learner/grad_norm', 'learner/entropy'):
    np.testing.assert_allclose(rows[6][k], rows[0][k], rtol=1e-4, err_msg=k)
