"""Sharding: the train step and the sampler on meshes equal one device.

Meshes over the 8 simulated CPU devices (tests/conftest.py). The model's
sizes are chosen so that most axes shard on every mesh, and the 2 kv heads
exercise the replicate-when-not-divisible rule on tensor=8.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rlx import config as config_lib
from rlx import learner
from rlx import sharding
from rlx import testing
from rlx import policy as policy_lib
from rlx.sampling import sampler as sampler_lib
from rlx.models import transformer

MESHES = [(8, 1, 1), (4, 2, 1), (2, 2, 2), (1, 1, 8)]
V, B, G, P_LEN, T = 32, 8, 2, 8, 8


def _cfg(tmp_dir, shape=(1, 1, 1)):
  c = testing.tiny_config_dict(str(tmp_dir))
  c.model.vocab_size, c.model.embed_dim, c.model.mlp_dim = V, 32, 64
  c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 8, 2, 8
  c.model.num_layers = 1
  c.rl.batch_prompts, c.rl.group_size = B, G
  c.objective.kl_beta = 0.1  # Exercises the sharded reference params.
  c.mesh.shape = shape
  return config_lib.build(c)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  cfg = _cfg(tmp_path_factory.mktemp('sharding'))
  model, logits_fn = policy_lib.build_model(cfg, vocab_size=V)
  params = transformer.init_params(model.cfg, jax.random.key(0))
  return cfg, model, logits_fn, jax.device_get(params)


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  plen = rng.integers(2, P_LEN + 1, B)
  prompt_mask = np.arange(P_LEN)[None, :] >= (P_LEN - plen)[:, None]
  prompt = np.where(prompt_mask, rng.integers(3, V, (B, P_LEN)), 0)
  lengths = rng.integers(1, T + 1, (B, G))
  rewards = (rng.random((B, G)) < 0.5).astype(np.float32)
  rewards[:, 0] = 1.0
  return learner.Batch(
      prompt=prompt.astype(np.int32), prompt_mask=prompt_mask,
      response=rng.integers(3, V, (B, G, T)).astype(np.int32),
      loss_mask=np.arange(T) < lengths[..., None],
      old_logp=-rng.random((B, G, T)).astype(np.float32) - 1.0,
      rewards=rewards, group_mask=np.ones((B, G), bool),
      behaviour_logp=None, entropy=None, values=None)


def _train(cfg, model, logits_fn, params, shape):
  """Three steps on mesh `shape`: (state, metrics, step, shardings, plan)."""
  plan = sharding.Plan.from_config(cfg.mesh.__class__(shape=shape))
  optimizer = learner.make_optimizer(cfg.optim)
  param_sh = plan.params(params, transformer.logical_specs(model.cfg))
  abstract = jax.eval_shape(lambda: learner.init_state(params, optimizer))
  state_sh = sharding.train_state_shardings(plan, optimizer, abstract,
                                            param_sh)
  state = jax.jit(lambda p: learner.init_state(p, optimizer),
                  out_shardings=state_sh)(plan.put(params, param_sh))
  ref = plan.put(params, param_sh)
  step = learner.make_train_step(
      logits_fn, optimizer, cfg,
      shardings=(state_sh, param_sh, plan.batch((B,)), plan.replicated))
  metrics = []
  for seed in range(3):
    state, m = step(state, ref, plan.put_batch(_batch(seed)))
    metrics.append(jax.device_get(m))
  return state, metrics, step, state_sh, plan


@pytest.fixture(scope='module')
def single(setup):
  cfg, model, logits_fn, params = setup
  state, metrics, *_ = _train(cfg, model, logits_fn, params, (1, 1, 1))
  return jax.device_get(state), metrics


@pytest.mark.parametrize('shape', MESHES)
def test_train_step_on_mesh_equals_one_device(setup, single, shape):
  cfg, model, logits_fn, params = setup
  state, metrics, step, state_sh, _ = _train(cfg, model, logits_fn, params,
                                             shape)
  want_state, want_metrics = single
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a), b, rtol=2e-5, atol=2e-6), state, want_state)
  for got, want in zip(metrics, want_metrics):
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6,
                                 err_msg=k)
  # The state keeps its sharding; moments follow their parameters.
  jax.tree.map(lambda x, s: _assert_sharding(x, s), state, state_sh)
  q = state.params['layer_0']['attn']['q']['kernel']  # [D, N, H]
  mu = state.opt_state[1][0].mu['layer_0']['attn']['q']['kernel']
  assert mu.sharding.is_equivalent_to(q.sharding, 3)
  assert step._cache_size() == 1  # pylint: disable=protected-access


def test_rules_map_logical_names_and_replicate_what_does_not_divide():
  plan = sharding.Plan.from_config(sharding.MeshConfig(shape=(1, 2, 4)))
  # [D=32, N=8, H=8]: embed->fsdp, q_heads->tensor.
  assert plan.spec((32, 8, 8), ('embed', 'q_heads', 'head_dim')) == P(
      'fsdp', 'tensor')
  # K=2 kv heads do not split over tensor=4: replicated on that dim.
  assert plan.spec((32, 2, 8), ('embed', 'kv_heads', 'head_dim')) == P(
      'fsdp')
  # batch -> (data, fsdp); data has size 1 and is dropped.
  assert plan.spec((6, 3), ('batch', None)) == P('fsdp')
  assert plan.spec((5, 3), ('batch', None)) == P()
  # A mesh axis is used at most once per array.
  plan2 = sharding.Plan(plan.mesh, (('a', ('tensor',)), ('b', ('tensor',))))
  assert plan2.spec((8, 8), ('a', 'b')) == P('tensor')


def test_mesh_shape_resolution_and_errors():
  assert sharding.resolve_shape((-1, 2, 1), 8) == (4, 2, 1)
  assert sharding.resolve_shape((1, 1, 1), 8) == (1, 1, 1)
  with pytest.raises(config_lib.ConfigError, match='needs 16 devices'):
    sharding.resolve_shape((4, 4, 1), 8)
  with pytest.raises(config_lib.ConfigError, match='do not divide'):
    sharding.resolve_shape((3, -1, 1), 8)
  mesh = sharding.make_mesh((2, 2, 2))
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}


def _sample(setup, shape):
  _, model, _, params = setup
  plan = sharding.Plan.from_config(sharding.MeshConfig(shape=shape))
  sample_fn = sampler_lib.transformer_sampler(
      model, sampler_lib.SamplerConfig(max_new_tokens=T, stop_tokens=(1,),
                                       pad_id=0), constrain=plan.constrain)
  param_sh = plan.params(params, transformer.logical_specs(model.cfg))
  batch = _batch(1)
  prompts, mask = plan.put_batch((batch.prompt, batch.prompt_mask))
  out = sample_fn(plan.put(params, param_sh), prompts, mask,
                  jax.random.key(3), 1.0, 1.0, num_samples=G)
  return out, plan


@pytest.fixture(scope='module')
def single_sample(setup):
  return jax.device_get(_sample(setup, (1, 1, 1))[0])


@pytest.mark.parametrize('shape', MESHES)
def test_sampler_on_mesh_equals_one_device(setup, single_sample, shape):
  want = single_sample
  got, plan = _sample(setup, shape)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.lengths, want.lengths)
  np.testing.assert_allclose(got.logp, want.logp, rtol=1e-5, atol=1e-5)
  for x in got:  # Every rollout array keeps B over (data, fsdp).
    _assert_sharding(x, plan.batch(x.shape))


def _assert_sharding(x, want):
  assert x.sharding.is_equivalent_to(want, x.ndim), (x.sharding, want)


@pytest.mark.parametrize('index', [0, 1])
def test_primary_first_fails_past_the_barrier(monkeypatch, index):
  # Two processes simulated: process 0 runs fn first; when it fails it
  # still reaches the barrier (so process 1 is not left waiting) and then
  # raises; process 1 runs fn after the barrier and meets the error itself.
  calls = []
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(jax, 'process_index', lambda: index)
  monkeypatch.setattr(sharding.multihost_utils, 'sync_global_devices',
                      lambda name: calls.append('barrier'))

  def fail():
    calls.append('fn')
    raise ValueError('bad config')

  with pytest.raises(ValueError, match='bad config'):
    sharding.primary_first(fail)
  assert calls == (['fn', 'barrier'] if index == 0 else ['barrier', 'fn'])
  calls.clear()
  assert sharding.primary_first(lambda: calls.append('fn') or 7) == 7
  assert calls == (['fn', 'barrier'] if index == 0 else ['barrier', 'fn'])
