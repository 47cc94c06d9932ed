"""Learner: micro-batching, loss and gradient values, KL path, trimming,
packing.

Compiles are the cost here, so the train steps are built once per module
with SGD(lr=1) (new params = params - grads, which exposes the gradients)
and shared; all log-prob computations use one shape where possible.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlx import config as config_lib
from rlx import learner
from rlx import objectives
from rlx import policy
from rlx import recipes
from rlx import testing
from rlx.models import transformer

V = 20
B, G, P, T = 4, 4, 8, 16
TEMP = 0.7
KL_BETA = 0.5
SGD = optax.sgd(1.0)


def _cfg(tmp_dir, **overrides):
  c = testing.tiny_config_dict(str(tmp_dir))
  c.sampling.temperature = TEMP
  c.optim.warmup_steps = 0
  c.model.num_layers = 1  # Halves every compile; depth is not under test.
  for key, value in overrides.items():
    recipes.override(c, key, value)
  return config_lib.build(c)


@pytest.fixture(scope='module')
def tmp_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('learner')


@pytest.fixture(scope='module')
def model(tmp_dir):
  mod, logits_fn = policy.build_model(_cfg(tmp_dir), vocab_size=V)
  params = jax.jit(lambda k: transformer.init_params(mod.cfg, k))(
      jax.random.key(0))
  return logits_fn, params


@pytest.fixture(scope='module')
def steps(tmp_dir, model):
  """SGD(1) train steps by num_microbatches; m=2 also has a KL term."""
  logits_fn, _ = model
  overrides = {1: {}, 2: {'objective.kl_beta': KL_BETA}, 4: {}}
  return {m: learner.make_train_step(
      logits_fn, SGD,
      _cfg(tmp_dir, **{'optim.num_microbatches': m}, **extra))
          for m, extra in overrides.items()}


def _copy(tree):
  return jax.tree.map(jnp.array, tree)


def _run(step, params, batch, ref_params=None):
  """One SGD(1) step on a fresh state; returns (grads, metrics).

  `ref_params` defaults to the params (ignored when kl_beta = 0): the same
  pytree structure every call, so each step compiles once.
  """
  ref_params = params if ref_params is None else ref_params
  state, metrics = step(learner.init_state(_copy(params), SGD),
                        _copy(ref_params), batch)
  assert int(state.step) == 1
  return jax.tree.map(jnp.subtract, params, state.params), metrics


@functools.partial(jax.jit, static_argnums=(0,))
def _logp(logits_fn, params, prompt, prompt_mask, response):
  """[B, G, T] log-probs of `response` under `params`."""
  b, g, t = response.shape
  logp, _ = learner.response_logprobs(
      logits_fn, params, jnp.repeat(prompt, g, axis=0),
      jnp.repeat(prompt_mask, g, axis=0), response.reshape(b * g, t),
      temperature=TEMP)
  return logp.reshape(b, g, t)


def _batch(logits_fn, params, seed, *, perturb=0.3, rewards=None,
           group_mask=None):
  """Random batch; old_logp = current log-probs + uniform noise."""
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
  prompt = jnp.asarray(prompt, jnp.int32)
  prompt_mask = jnp.asarray(prompt_mask)
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


def _reference_loss(logits_fn, params, batch, adv, eps=0.2):
  """Full-batch PPO-clip token-mean loss, written independently."""
  mask = (batch.loss_mask & batch.group_mask[..., None]).astype(jnp.float32)
  logp = _logp(logits_fn, params, batch.prompt, batch.prompt_mask,
               batch.response)
  rho = jnp.exp(logp - batch.old_logp)
  a = adv[..., None]
  per = -jnp.minimum(rho * a, jnp.clip(rho, 1 - eps, 1 + eps) * a)
  return jnp.sum(per * mask) / jnp.sum(mask)


_reference_value_and_grad = jax.jit(
    jax.value_and_grad(_reference_loss, argnums=1), static_argnums=(0,))


def _reference(logits_fn, params, batch):
  adv = _np_grpo(np.asarray(batch.rewards), np.asarray(batch.group_mask))
  return _reference_value_and_grad(logits_fn, params, batch,
                                   jnp.asarray(adv, jnp.float32))


def _max_abs_diff(a, b):
  return max(jax.tree.leaves(
      jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)))


def test_microbatches_match_full_batch_and_reference_gradient(model, steps):
  logits_fn, params = model
  batch = _batch(logits_fn, params, seed=0)
  want_loss, want_grads = _reference(logits_fn, params, batch)
  assert float(optax.global_norm(want_grads)) > 1e-3  # Not trivially zero.
  results = {}
  for m, step in steps.items():
    # ref_params == params: the m=2 step's k3 term is 0 in value and
    # gradient (d k3 / d logp = 1 - exp(ref - logp) = 0), so all agree.
    results[m] = _run(step, params, batch)
  # The perturbation exercises both sides of the clip.
  assert float(results[1][1]['clip_frac/high']) > 0
  assert float(results[1][1]['clip_frac/low']) > 0
  for m, (grads, metrics) in results.items():
    np.testing.assert_allclose(float(metrics['loss']), float(want_loss),
                               rtol=1e-5, atol=1e-6, err_msg=f'm={m}')
    assert _max_abs_diff(grads, want_grads) < 1e-5, m
    assert _max_abs_diff(grads, results[1][0]) < 1e-5, m
    np.testing.assert_allclose(float(metrics['grad_norm']),
                               float(optax.global_norm(want_grads)),
                               rtol=1e-4, err_msg=f'm={m}')


def test_group_mask_excludes_samples(model, steps):
  logits_fn, params = model
  group_mask = np.ones((B, G), bool)
  group_mask[1, 3] = group_mask[2, 0] = False
  batch = _batch(logits_fn, params, seed=1, group_mask=group_mask)
  want_loss, want_grads = _reference(logits_fn, params, batch)
  grads, metrics = _run(steps[4], params, batch)
  np.testing.assert_allclose(float(metrics['loss']), float(want_loss),
                             rtol=1e-5, atol=1e-6)
  assert _max_abs_diff(grads, want_grads) < 1e-5


def test_on_policy_loss_is_minus_mean_token_advantage(model, steps):
  logits_fn, params = model
  batch = _batch(logits_fn, params, seed=2, perturb=0.0)
  _, metrics = _run(steps[1], params, batch)
  adv = _np_grpo(np.asarray(batch.rewards), np.ones((B, G), bool))
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


def test_kl_to_reference(model, steps):
  logits_fn, params = model
  batch = _batch(logits_fn, params, seed=3)
  _, base = _run(steps[1], params, batch)  # kl_beta = 0.
  # Reference == policy: k3 is exactly 0 and the loss is unchanged.
  _, same = _run(steps[2], params, batch)
  assert abs(float(same['kl_ref'])) < 1e-7
  np.testing.assert_allclose(float(same['loss']), float(base['loss']),
                             rtol=1e-6, atol=1e-7)
  # Perturbed reference: kl_ref > 0 and the loss gains beta * token-mean k3.
  rng = np.random.default_rng(6)
  ref = jax.tree.map(
      lambda x: x + 0.05 * rng.normal(size=x.shape).astype(np.float32),
      params)
  _, pert = _run(steps[2], params, batch, ref_params=ref)
  logp = np.asarray(_logp(logits_fn, params, batch.prompt, batch.prompt_mask,
                          batch.response), np.float64)
  ref_logp = np.asarray(_logp(logits_fn, ref, batch.prompt,
                              batch.prompt_mask, batch.response), np.float64)
  k3 = np.exp(ref_logp - logp) - (ref_logp - logp) - 1
  mask = np.asarray(batch.loss_mask)
  want_kl = k3[mask].mean()
  assert want_kl > 1e-4
  np.testing.assert_allclose(float(pert['loss']),
                             float(base['loss']) + KL_BETA * want_kl,
                             rtol=1e-5, atol=1e-6)
  # The metric is the mean of the two micro-batches' masked means.
  half = B // 2
  want_metric = np.mean([k3[:half][mask[:half]].mean(),
                         k3[half:][mask[half:]].mean()])
  np.testing.assert_allclose(float(pert['kl_ref']), want_metric, rtol=1e-4)


def test_kl_in_reward_shapes_the_rewards(tmp_dir, model, steps):
  # r - beta * sum_t k3(old || ref) over the response, then the plain loss:
  # the same gradient as kl_beta = 0 on the shaped rewards.
  logits_fn, params = model
  batch = _batch(logits_fn, params, seed=8)
  rng = np.random.default_rng(9)
  ref = jax.tree.map(
      lambda x: x + 0.05 * rng.normal(size=x.shape).astype(np.float32),
      params)
  step = learner.make_train_step(logits_fn, SGD, _cfg(
      tmp_dir, **{'objective.kl_beta': KL_BETA,
                  'objective.kl_in_reward': True}))
  grads, metrics = _run(step, params, batch, ref_params=ref)
  old = np.asarray(batch.old_logp, np.float64)
  ref_logp = np.asarray(_logp(logits_fn, ref, batch.prompt,
                              batch.prompt_mask, batch.response), np.float64)
  k3 = np.exp(ref_logp - old) - (ref_logp - old) - 1
  seq_kl = np.sum(np.where(np.asarray(batch.loss_mask), k3, 0.0), -1)
  assert seq_kl.min() > 1e-4
  np.testing.assert_allclose(float(metrics['kl_ref_seq']), seq_kl.mean(),
                             rtol=1e-4)
  shaped = batch._replace(rewards=jnp.asarray(
      np.asarray(batch.rewards) - KL_BETA * seq_kl, jnp.float32))
  want, _ = _run(steps[1], params, shaped)
  assert _max_abs_diff(grads, want) < 1e-5


def test_minibatches_whiten_over_the_whole_batch(tmp_dir, model):
  # REINFORCE++ whitens over the batch: two minibatches get the whole
  # batch's advantages (not each half's own); GRPO's stay in the step.
  logits_fn, params = model
  batch = _batch(logits_fn, params, seed=10)
  cfg = _cfg(tmp_dir, **{'objective.advantage': 'reinforce_pp',
                         'rl.num_minibatches': 2})
  parts = learner.minibatches(batch, cfg)
  assert [p.rewards.shape[0] for p in parts] == [B // 2, B // 2]
  rewards = np.asarray(batch.rewards, np.float64)
  centred = rewards - rewards.mean(1, keepdims=True)
  want = (centred - centred.mean()) / (centred.std() + 1e-6)
  got = np.concatenate([p.advantages for p in parts])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  half = centred[:B // 2]
  per_half = (half - half.mean()) / (half.std() + 1e-6)
  assert np.abs(got[:B // 2] - per_half).max() > 1e-3
  np.testing.assert_array_equal(np.concatenate([p.response for p in parts]),
                                batch.response)
  grpo = learner.minibatches(batch, _cfg(tmp_dir, **{
      'rl.num_minibatches': 2}))
  assert all(p.advantages is None for p in grpo)


def test_step_trains_on_given_advantages(model, steps):
  logits_fn, params = model
  batch = _batch(logits_fn, params, seed=11)
  adv = np.random.default_rng(12).normal(size=(B, G)).astype(np.float32)
  grads, _ = _run(steps[1], params, batch._replace(advantages=adv))
  _, want = _reference_value_and_grad(logits_fn, params, batch,
                                      jnp.asarray(adv))
  assert _max_abs_diff(grads, want) < 1e-5


def test_seq_mean_counts_only_sequences_with_loss_tokens(tmp_dir, model):
  # A valid sample whose loss mask is empty (an APRIL 'mask' group) keeps its
  # reward in the group's statistics but is not a sequence of the mean.
  logits_fn, params = model
  batch = _batch(logits_fn, params, seed=13)
  loss_mask = np.array(batch.loss_mask)
  loss_mask[1, 2] = False
  batch = batch._replace(loss_mask=jnp.asarray(loss_mask))
  step = learner.make_train_step(logits_fn, SGD, _cfg(
      tmp_dir, **{'objective.aggregation': 'seq-mean-token-mean'}))
  _, metrics = _run(step, params, batch)
  adv = _np_grpo(np.asarray(batch.rewards), np.asarray(batch.group_mask))
  logp = np.asarray(_logp(logits_fn, params, batch.prompt, batch.prompt_mask,
                          batch.response), np.float64)
  rho = np.exp(logp - np.asarray(batch.old_logp, np.float64))
  a = adv[..., None]
  per = -np.minimum(rho * a, np.clip(rho, 0.8, 1.2) * a)
  lengths = loss_mask.sum(-1)
  per_seq = np.where(loss_mask, per, 0).sum(-1) / np.maximum(lengths, 1)
  want = per_seq[lengths > 0].mean()
  np.testing.assert_allclose(float(metrics['loss']), want, rtol=1e-5)


def test_kl_in_reward_refuses_a_split_whitened_batch(tmp_dir):
  with pytest.raises(config_lib.ConfigError,
                     match='objective.kl_in_reward.*whitens'):
    _cfg(tmp_dir, **{'objective.advantage': 'reinforce_pp',
                     'rl.num_minibatches': 2, 'objective.kl_beta': 0.1,
                     'objective.kl_in_reward': True})


def _scaled_return(rewards, mask, *, values, scale):
  """A user's estimator: A = scale * (r - v(x)), 0 on masked samples."""
  return jnp.where(mask, scale * (rewards - values[:, None]), 0.0)


@pytest.fixture
def scaled_return():
  """`_scaled_return` registered by this test file (removed afterwards):
  its baseline from Batch.values, its scale from objective.xrpo.lam."""
  objectives.ADVANTAGES.declare(
      'test_scaled_return', inputs={'values': 'values'},
      knobs={'scale': 'xrpo.lam'})(_scaled_return)
  yield 'test_scaled_return'
  objectives.ADVANTAGES.unregister('test_scaled_return')


def test_a_registered_advantage_trains_with_its_declared_knobs(
    tmp_dir, model, scaled_return):
  logits_fn, params = model
  cfg = _cfg(tmp_dir, **{'objective.advantage': scaled_return,
                         'objective.xrpo.lam': 0.5})
  step = learner.make_train_step(logits_fn, SGD, cfg)
  batch = _batch(logits_fn, params, seed=14)
  with pytest.raises(ValueError, match=f'the {scaled_return} advantage '
                     'needs Batch.values'):
    _run(step, params, batch)
  values = np.random.default_rng(15).random(B).astype(np.float32)
  batch = batch._replace(values=jnp.asarray(values))
  grads, metrics = _run(step, params, batch)
  adv = 0.5 * (np.asarray(batch.rewards) - values[:, None])
  want_loss, want_grads = _reference_value_and_grad(
      logits_fn, params, batch, jnp.asarray(adv, jnp.float32))
  np.testing.assert_allclose(float(metrics['loss']), float(want_loss),
                             rtol=1e-5, atol=1e-6)
  assert _max_abs_diff(grads, want_grads) < 1e-5
  np.testing.assert_allclose(float(metrics['adv/abs_max']),
                             np.abs(adv).max(), rtol=1e-6)


def test_mc_grpo_pivot_leaves_the_loss(tmp_dir, model, steps):
  # The mc_grpo step trains as the plain step does on its advantages with
  # each group's pivot (numpy: sorted rank (n - 1) // 2, ties by index)
  # out of the group mask, so out of the token-mean denominator too.
  logits_fn, params = model
  rewards = np.array([[1, 0, 1, 1], [0, 0.5, 1, 0.5], [0, 1, 0, 0],
                      [0.2, 0.9, 0.4, 0.7]], np.float32)
  group_mask = np.ones((B, G), bool)
  group_mask[3, 1] = False
  batch = _batch(logits_fn, params, seed=16, rewards=rewards,
                 group_mask=group_mask)
  pivot = np.zeros((B, G), bool)
  for b in range(B):
    idx = np.flatnonzero(group_mask[b])
    order = sorted(idx, key=lambda i: (rewards[b, i], i))
    pivot[b, order[(len(idx) - 1) // 2]] = True
  np.testing.assert_array_equal(np.flatnonzero(pivot.reshape(-1)),
                                [0, 5, 10, 14])
  step = learner.make_train_step(logits_fn, SGD, _cfg(
      tmp_dir, **{'objective.advantage': 'mc_grpo'}))
  grads, metrics = _run(step, params, batch)
  adv = np.asarray(objectives.compute_advantages(
      'mc_grpo', rewards, group_mask))
  want, want_metrics = _run(steps[1], params, batch._replace(
      group_mask=jnp.asarray(group_mask & ~pivot), advantages=adv))
  assert _max_abs_diff(grads, want) < 1e-6
  np.testing.assert_allclose(float(metrics['loss']),
                             float(want_metrics['loss']), rtol=1e-6)


def test_trim_batch_drops_only_padding(model):
  logits_fn, params = model
  rng = np.random.default_rng(4)
  p, t = 16, 40
  plen = np.array([3, 5, 1, 4])
  prompt_mask = np.arange(p)[None, :] >= (p - plen)[:, None]
  prompt = np.where(prompt_mask, rng.integers(3, V, (B, p)), 0)
  response = rng.integers(3, V, (B, G, t))
  lengths = rng.integers(1, 11, (B, G))
  lengths[2, 1] = 10
  loss_mask = np.arange(t) < lengths[..., None]
  batch = learner.Batch(
      prompt=jnp.asarray(prompt, jnp.int32),
      prompt_mask=jnp.asarray(prompt_mask),
      response=jnp.asarray(response, jnp.int32),
      loss_mask=jnp.asarray(loss_mask),
      old_logp=jnp.asarray(rng.normal(size=(B, G, t)), jnp.float32),
      rewards=jnp.asarray(rng.random((B, G)), jnp.float32),
      group_mask=jnp.ones((B, G), bool))
  trimmed = learner.trim_batch(batch)
  # Longest prompt 5 -> 8 columns; longest response 10 -> 16.
  assert trimmed.prompt.shape == (B, 8)
  assert trimmed.response.shape == (B, G, 16)
  assert not prompt_mask[:, :-8].any() and not loss_mask[..., 16:].any()
  np.testing.assert_array_equal(trimmed.prompt, prompt[:, -8:])
  np.testing.assert_array_equal(trimmed.prompt_mask, prompt_mask[:, -8:])
  np.testing.assert_array_equal(trimmed.response, response[..., :16])
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
  assert same.response.shape == (B, G, t) and same.prompt.shape == (B, p)


@pytest.mark.parametrize('m', [1, 2])
def test_packed_step_equals_padded_step(model, steps, m):
  """The packed forward (rlx/packing.py) gives the padded step's gradients
  and metrics: m=1, and m=2 micro-batches with the KL term (one chunk per
  micro-batch), with a sample outside the group mask."""
  logits_fn, params = model
  group_mask = np.ones((B, G), bool)
  group_mask[1, 2] = False
  batch = _batch(logits_fn, params, seed=8, group_mask=group_mask)
  ref_params = jax.tree.map(lambda x: x * 0.9, params)
  grads, metrics = _run(steps[m], params, batch, ref_params)
  packed = learner.pack_batch(batch, chunks=m)
  assert packed.packed.tokens.shape[0] == m
  p_grads, p_metrics = _run(steps[m], params, packed, ref_params)
  for got, want in zip(jax.tree.leaves(p_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=2e-4)
  for k in metrics:
    np.testing.assert_allclose(p_metrics[k], metrics[k], atol=1e-6,
                               rtol=1e-4, err_msg=k)


def test_adam_step_raises_logp_of_rewarded_sample(tmp_dir, model, steps):
  """One update of the real optimizer (AdamW + clipping, lr 1e-2).

  The step's gradients come from the shared SGD(1) step (params - new
  params); the update is the one make_train_step applies to them.
  """
  logits_fn, params = model
  rewards = np.zeros((B, G), np.float32)
  rewards[0, 0] = 1.0  # Only group 0 has signal; the others have A = 0.
  batch = _batch(logits_fn, params, seed=5, perturb=0.0, rewards=rewards)
  grads, metrics = _run(steps[1], params, batch)
  assert float(metrics['grad_norm']) > 0
  optimizer = learner.make_optimizer(
      _cfg(tmp_dir, **{'optim.learning_rate': 1e-2}).optim)

  @jax.jit
  def update(g, p):
    state = learner.init_state(p, optimizer)
    updates, _ = optimizer.update(g, state.opt_state, p)
    return optax.apply_updates(p, updates)

  new_params = update(grads, params)
  mask = np.asarray(batch.loss_mask)

  def seq_logp(p):
    lp = np.asarray(_logp(logits_fn, p, batch.prompt, batch.prompt_mask,
                          batch.response))
    return (lp * mask).sum(-1)  # [B, G]

  before, after = seq_logp(params), seq_logp(new_params)
  assert after[0, 0] > before[0, 0] + 1e-3, (before[0, 0], after[0, 0])
  # The samples with negative advantage lose probability on average.
  assert np.mean(after[0, 1:] - before[0, 1:]) < 0
