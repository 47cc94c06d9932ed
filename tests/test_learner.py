"""Learner: micro-batching, loss and gradient values, KL path, trimming."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlx import config as config_lib
from rlx import learner
from rlx import testing
from rlx import trainer
from rlx.models import transformer

V = 20
B, G, P, T = 4, 4, 10, 8
TEMP = 0.7


def _cfg(tmp_dir, **overrides):
  c = testing.tiny_config_dict(str(tmp_dir))
  c.sampling.temperature = TEMP
  c.optim.warmup_steps = 0
  for key, value in overrides.items():
    group, field = key.split('.')
    setattr(getattr(c, group), field, value)
  return config_lib.build(c)


@pytest.fixture(scope='module')
def tmp_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('learner')


@pytest.fixture(scope='module')
def model(tmp_dir):
  cfg = _cfg(tmp_dir)
  mod, logits_fn = trainer.build_model(cfg, vocab_size=V)
  params = transformer.init_params(mod.cfg, jax.random.key(0))
  return logits_fn, params


@pytest.fixture(scope='module')
def sgd_steps(tmp_dir, model):
  """Jitted train steps with SGD(lr=1): new params = params - grads."""
  logits_fn, _ = model
  return {m: learner.make_train_step(
      logits_fn, optax.sgd(1.0), _cfg(tmp_dir, **{'optim.num_microbatches': m}))
          for m in (1, 2, 4)}


def _copy(tree):
  return jax.tree.map(jnp.array, tree)


def _state(params, optimizer):
  return learner.init_state(_copy(params), optimizer)


def _logp(logits_fn, params, prompt, prompt_mask, response, temp=TEMP):
  """[B, G, T] log-probs of `response` under `params` (no jit)."""
  b, g, t = response.shape
  logp, _ = learner.response_logprobs(
      logits_fn, params, jnp.repeat(prompt, g, axis=0),
      jnp.repeat(prompt_mask, g, axis=0), response.reshape(b * g, t),
      temperature=temp)
  return logp.reshape(b, g, t)


def _batch(logits_fn, params, seed, *, perturb=0.3, rewards=None,
           group_mask=None):
  rng = np.random.default_rng(seed)
  plen = rng.integers(2, P + 1, B)
  plen[0] = P
  prompt_mask = np.arange(P)[None, :] >= (P - plen)[:, None]  # Left-padded.
  prompt = np.where(prompt_mask, rng.integers(3, V, (B, P)), 0)
  response = rng.integers(3, V, (B, G, T))
  lengths = rng.integers(1, T + 1, (B, G))
  lengths[0, 0] = T
  loss_mask = np.arange(T) < lengths[..., None]
  if rewards is None:
    rewards = (rng.random((B, G)) < 0.5).astype(np.float32)
    rewards[:, 0], rewards[:, 1] = 1.0, 0.0  # No zero-variance group.
  if group_mask is None:
    group_mask = np.ones((B, G), bool)
  prompt, prompt_mask = jnp.asarray(prompt, jnp.int32), jnp.asarray(
      prompt_mask)
  response = jnp.asarray(response, jnp.int32)
  logp = _logp(logits_fn, params, prompt, prompt_mask, response)
  noise = rng.uniform(-perturb, perturb, (B, G, T)) if perturb else 0.0
  old_logp = jnp.where(loss_mask, logp + noise, 0.0).astype(jnp.float32)
  return learner.Batch(
      prompt=prompt, prompt_mask=prompt_mask, response=response,
      loss_mask=jnp.asarray(loss_mask), old_logp=old_logp,
      rewards=jnp.asarray(rewards, jnp.float32),
      group_mask=jnp.asarray(group_mask))


def _np_grpo(rewards, mask, eps=1e-6):
  out = np.zeros(rewards.shape)
  for b in range(rewards.shape[0]):
    r = rewards[b][mask[b]].astype(np.float64)
    if r.size >= 2:
      out[b][mask[b]] = (r - r.mean()) / (r.std(ddof=1) + eps)
  return out


def _reference_loss(logits_fn, batch, eps=0.2):
  """Full-batch PPO-clip token-mean loss, written independently."""
  adv = jnp.asarray(_np_grpo(np.asarray(batch.rewards),
                             np.asarray(batch.group_mask)), jnp.float32)
  mask = (batch.loss_mask & batch.group_mask[..., None]).astype(jnp.float32)

  def loss(params):
    logp = _logp(logits_fn, params, batch.prompt, batch.prompt_mask,
                 batch.response)
    rho = jnp.exp(logp - batch.old_logp)
    a = adv[..., None]
    per = -jnp.minimum(rho * a, jnp.clip(rho, 1 - eps, 1 + eps) * a)
    return jnp.sum(per * mask) / jnp.sum(mask)

  return loss


def _max_abs_diff(a, b):
  return max(jax.tree.leaves(
      jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)))


def test_microbatches_match_full_batch_and_reference_gradient(model,
                                                              sgd_steps):
  logits_fn, params = model
  batch = _batch(logits_fn, params, seed=0)
  ref_loss = _reference_loss(logits_fn, batch)
  want_loss, want_grads = jax.value_and_grad(ref_loss)(params)
  results = {}
  for m, step in sgd_steps.items():
    state, metrics = step(_state(params, optax.sgd(1.0)), None, batch)
    grads = jax.tree.map(jnp.subtract, params, state.params)
    results[m] = (grads, metrics)
    assert int(state.step) == 1
  # The perturbation exercises the clip.
  assert float(results[1][1]['clip_frac/high']) > 0
  assert float(results[1][1]['clip_frac/low']) > 0
  for m, (grads, metrics) in results.items():
    np.testing.assert_allclose(float(metrics['loss']), float(want_loss),
                               rtol=1e-5, atol=1e-6, err_msg=f'm={m}')
    assert _max_abs_diff(grads, want_grads) < 1e-5, m
    assert _max_abs_diff(grads, results[1][0]) < 1e-5, m
    np.testing.assert_allclose(float(metrics['grad_norm']),
                               float(optax.global_norm(want_grads)),
                               rtol=1e-4)
  assert float(optax.global_norm(want_grads)) > 1e-3  # Not trivially zero.


def test_group_mask_excludes_samples(model, sgd_steps):
  logits_fn, params = model
  group_mask = np.ones((B, G), bool)
  group_mask[1, 3] = group_mask[2, 0] = False
  batch = _batch(logits_fn, params, seed=1, group_mask=group_mask)
  want_loss, want_grads = jax.value_and_grad(
      _reference_loss(logits_fn, batch))(params)
  state, metrics = sgd_steps[2](_state(params, optax.sgd(1.0)), None, batch)
  grads = jax.tree.map(jnp.subtract, params, state.params)
  np.testing.assert_allclose(float(metrics['loss']), float(want_loss),
                             rtol=1e-5, atol=1e-6)
  assert _max_abs_diff(grads, want_grads) < 1e-5


def test_on_policy_loss_is_minus_mean_token_advantage(model, sgd_steps):
  logits_fn, params = model
  batch = _batch(logits_fn, params, seed=2, perturb=0.0)
  state, metrics = sgd_steps[1](_state(params, optax.sgd(1.0)), None, batch)
  del state
  rewards = np.asarray(batch.rewards)
  adv = _np_grpo(rewards, np.ones((B, G), bool))
  n_tok = np.asarray(batch.loss_mask).sum(-1)  # [B, G]
  # rho = 1: l_t = -A, so the token-mean loss is -sum_i A_i n_i / N.
  want = -np.sum(adv * n_tok) / n_tok.sum()
  assert abs(want) > 1e-3
  np.testing.assert_allclose(float(metrics['loss']), want, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(float(metrics['ratio/mean']), 1.0, atol=1e-5)
  assert float(metrics['clip_frac/low']) == 0.0
  assert float(metrics['clip_frac/high']) == 0.0
  np.testing.assert_allclose(float(metrics['adv/mean']), adv.mean(),
                             atol=1e-6)
  np.testing.assert_allclose(float(metrics['adv/abs_max']),
                             np.abs(adv).max(), rtol=1e-5)


def test_kl_to_reference(tmp_dir, model, sgd_steps):
  logits_fn, params = model
  beta = 0.5
  step = learner.make_train_step(
      logits_fn, optax.sgd(1.0),
      _cfg(tmp_dir, **{'objective.kl_beta': beta}))
  batch = _batch(logits_fn, params, seed=3)
  _, base = sgd_steps[1](_state(params, optax.sgd(1.0)), None, batch)
  # Reference == policy: k3 is exactly 0 and the loss is unchanged.
  _, same = step(_state(params, optax.sgd(1.0)), _copy(params), batch)
  assert abs(float(same['kl_ref'])) < 1e-7
  np.testing.assert_allclose(float(same['loss']), float(base['loss']),
                             rtol=1e-6, atol=1e-7)
  # Perturbed reference: kl_ref > 0 and equals the masked k3 mean.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  ref = jax.tree.unflatten(treedef, [
      x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
      for x, k in zip(leaves, keys)])
  _, pert = step(_state(params, optax.sgd(1.0)), _copy(ref), batch)
  logp = np.asarray(_logp(logits_fn, params, batch.prompt, batch.prompt_mask,
                          batch.response), np.float64)
  ref_logp = np.asarray(_logp(logits_fn, ref, batch.prompt,
                              batch.prompt_mask, batch.response), np.float64)
  k3 = np.exp(ref_logp - logp) - (ref_logp - logp) - 1
  mask = np.asarray(batch.loss_mask)
  want_kl = k3[mask].mean()
  assert want_kl > 1e-4
  np.testing.assert_allclose(float(pert['kl_ref']), want_kl, rtol=1e-4)
  np.testing.assert_allclose(float(pert['loss']),
                             float(base['loss']) + beta * want_kl,
                             rtol=1e-5, atol=1e-6)


def test_trim_batch_drops_only_padding(model):
  logits_fn, params = model
  rng = np.random.default_rng(4)
  b, g, p, t = 2, 3, 16, 40
  plen = np.array([3, 5])
  prompt_mask = np.arange(p)[None, :] >= (p - plen)[:, None]
  prompt = np.where(prompt_mask, rng.integers(3, V, (b, p)), 0)
  response = rng.integers(3, V, (b, g, t))
  lengths = np.array([[4, 10, 1], [7, 2, 9]])
  loss_mask = np.arange(t) < lengths[..., None]
  batch = learner.Batch(
      prompt=jnp.asarray(prompt, jnp.int32),
      prompt_mask=jnp.asarray(prompt_mask),
      response=jnp.asarray(response, jnp.int32),
      loss_mask=jnp.asarray(loss_mask),
      old_logp=jnp.asarray(rng.normal(size=(b, g, t)), jnp.float32),
      rewards=jnp.asarray(rng.random((b, g)), jnp.float32),
      group_mask=jnp.ones((b, g), bool))
  trimmed = learner.trim_batch(batch)
  # max prompt length 5 -> 8 columns; max response length 10 -> 16.
  assert trimmed.prompt.shape == (b, 8)
  assert trimmed.response.shape == (b, g, 16)
  np.testing.assert_array_equal(trimmed.prompt, prompt[:, -8:])
  np.testing.assert_array_equal(trimmed.prompt_mask, prompt_mask[:, -8:])
  assert not prompt_mask[:, :-8].any()
  assert not loss_mask[..., 16:].any()
  np.testing.assert_array_equal(trimmed.loss_mask, loss_mask[..., :16])
  np.testing.assert_array_equal(trimmed.old_logp,
                                np.asarray(batch.old_logp)[..., :16])
  np.testing.assert_array_equal(trimmed.rewards, batch.rewards)
  np.testing.assert_array_equal(trimmed.group_mask, batch.group_mask)
  full = _logp(logits_fn, params, batch.prompt, batch.prompt_mask,
               batch.response)
  short = _logp(logits_fn, params, trimmed.prompt, trimmed.prompt_mask,
                trimmed.response)
  np.testing.assert_allclose(short, np.asarray(full)[..., :16], atol=1e-5)
  # Buckets are capped at the full width.
  same = learner.trim_batch(batch, response_multiple=64, prompt_multiple=64)
  assert same.response.shape == (b, g, t) and same.prompt.shape == (b, p)


def test_one_adam_step_raises_logp_of_rewarded_sample(tmp_dir, model):
  logits_fn, params = model
  cfg = _cfg(tmp_dir, **{'optim.learning_rate': 1e-2})
  optimizer = learner.make_optimizer(cfg.optim)
  step = learner.make_train_step(logits_fn, optimizer, cfg)
  rewards = np.zeros((B, G), np.float32)
  rewards[0, 0] = 1.0  # Only group 0 has signal; the others have A = 0.
  batch = _batch(logits_fn, params, seed=5, perturb=0.0, rewards=rewards)
  state, metrics = step(_state(params, optimizer), None, batch)
  mask = np.asarray(batch.loss_mask)

  def seq_logp(p):
    lp = np.asarray(_logp(logits_fn, p, batch.prompt, batch.prompt_mask,
                          batch.response))
    return (lp * mask).sum(-1)  # [B, G]

  before, after = seq_logp(params), seq_logp(state.params)
  assert float(metrics['grad_norm']) > 0
  assert after[0, 0] > before[0, 0] + 1e-3, (before[0, 0], after[0, 0])
  # The samples with negative advantage lose probability on average.
  assert np.mean(after[0, 1:] - before[0, 1:]) < 0
