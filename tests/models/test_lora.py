"""LoRA: parameter counts, the merge formula, training only adapters."""

import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlx import config as config_lib
from rlx import learner
from rlx import testing
import rlx.models
from rlx.models import kv_cache
from rlx.models import lora

# Qwen3 fixture: D=64, N=4, K=2, H=32, F=128, 2 layers, untied, V=320.
QWEN3 = os.path.join(os.path.dirname(__file__), '..', 'fixtures', 'hf',
                     'qwen3')


@pytest.fixture(scope='module')
def pretrained():
  return rlx.models.from_pretrained(QWEN3, dtype='float32',
                                    param_dtype='float32')


def _logits_fn(model):
  def logits_fn(params, tokens, positions, mask):
    return model.apply({'params': params}, tokens, positions, mask)[0]
  return logits_fn


@pytest.mark.parametrize('targets, per_layer', [
    # r * (in + out): q 64+128, k 64+64, v 64+64, o 128+64.
    (('q', 'k', 'v', 'o'), 4 * (192 + 128 + 128 + 192)),
    # HF names; gate/up 64+128, down 128+64.
    (('gate_proj', 'up_proj', 'down_proj'), 4 * 3 * 192),
])
def test_trainable_parameter_count(pretrained, targets, per_layer):
  cfg = lora.LoraConfig(rank=4, alpha=8.0, targets=targets)
  adapters = lora.init_adapters(jax.random.key(0), pretrained.params, cfg)
  assert lora.count_params(adapters) == 2 * per_layer
  assert set(adapters) == {'layer_0', 'layer_1'}


def test_fresh_adapters_leave_the_model_unchanged(pretrained):
  cfg = lora.LoraConfig(rank=4, alpha=8.0,
                        targets=tuple(lora.TARGETS))
  adapters = lora.init_adapters(jax.random.key(0), pretrained.params, cfg)
  merged = lora.merge(pretrained.params, adapters, cfg)
  jax.tree.map(np.testing.assert_array_equal, merged, pretrained.params)


@pytest.mark.parametrize('module, num_in', [('q', 1), ('o', 2), ('down', 1)])
def test_merged_kernel_equals_low_rank_update_of_the_input(pretrained,
                                                           module, num_in):
  """x W' = x W + (alpha / r) (x A) B, the LoRA forward, for flat x."""
  cfg = lora.LoraConfig(rank=3, alpha=6.0, targets=(module,))
  adapters = lora.init_adapters(jax.random.key(1), pretrained.params, cfg)
  group = 'mlp' if module == 'down' else 'attn'
  ad = adapters['layer_1'][group][module]
  ad['lora_b'] = jax.random.normal(jax.random.key(2), ad['lora_b'].shape)
  merged = lora.merge(pretrained.params, adapters, cfg)
  w = np.asarray(pretrained.params['layer_1'][group][module]['kernel'])
  w_new = np.asarray(merged['layer_1'][group][module]['kernel'])
  fan_in = int(np.prod(w.shape[:num_in]))
  x = np.random.default_rng(0).normal(size=(5, fan_in))
  want = (x @ w.reshape(fan_in, -1) + 2.0 * (x @ np.asarray(ad['lora_a']))
          @ np.asarray(ad['lora_b']))
  np.testing.assert_allclose(x @ w_new.reshape(fan_in, -1), want, rtol=1e-5,
                             atol=1e-5)
  untouched = merged['layer_1']['attn']['k']['kernel']
  np.testing.assert_array_equal(
      untouched, pretrained.params['layer_1']['attn']['k']['kernel'])


def _changed(a, b):
  return jax.tree.map(lambda x, y: bool(np.any(np.asarray(x) !=
                                                np.asarray(y))), a, b)


def test_learner_train_step_changes_only_adapters(pretrained, tmp_path):
  """The unchanged rlx learner (GRPO step, AdamW) on combine(base, lora)."""
  model, base, _ = pretrained
  c = testing.tiny_config_dict(str(tmp_path))
  c.optim.warmup_steps = 0
  cfg = config_lib.build(c)
  lcfg = lora.LoraConfig(rank=2, alpha=4.0)
  params = lora.combine(base, lora.init_adapters(jax.random.key(0), base,
                                                 lcfg))
  optimizer = lora.optimizer(learner.make_optimizer(cfg.optim))
  step = learner.make_train_step(lora.make_logits_fn(_logits_fn(model), lcfg),
                                 optimizer, cfg)
  batch = testing.two_group_batch(0)
  before = jax.tree.map(np.array, params)
  state = learner.init_state(jax.tree.map(jnp.array, params), optimizer)
  opt_leaves = jax.tree.leaves(state.opt_state)
  # Adam moments exist for the adapters only.
  assert sum(x.size for x in opt_leaves if x.ndim) == 2 * lora.count_params(
      params['lora'])
  state, _ = step(state, None, batch)
  changed = _changed(before, state.params)
  assert not any(jax.tree.leaves(changed['base']))
  lora_changed = flax.traverse_util.flatten_dict(changed['lora'])
  assert all(v for k, v in lora_changed.items() if k[-1] == 'lora_b')


def test_adapter_training_lowers_the_loss(pretrained):
  """Plain jax.grad w.r.t. the adapters only: next-token loss on a fixed
  sequence falls; the base is an argument and comes back untouched."""
  model, base, _ = pretrained
  cfg = lora.LoraConfig(rank=4, alpha=8.0, targets=('q', 'v', 'up'))
  adapters = lora.init_adapters(jax.random.key(0), base, cfg)
  tokens = jnp.asarray(np.random.default_rng(1).integers(3, 300, (1, 12)))
  n = tokens.shape[1]
  mask = kv_cache.causal_mask(jnp.ones((1, n), bool), query_len=n,
                              cache_index=0)

  def loss(adapters, base):
    logits = _logits_fn(model)(lora.merge(base, adapters, cfg), tokens,
                               jnp.arange(n)[None], mask)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

  opt = optax.adam(1e-2)
  opt_state = opt.init(adapters)

  @jax.jit
  def step(adapters, opt_state, base):
    value, grads = jax.value_and_grad(loss)(adapters, base)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(adapters, updates), opt_state, value

  losses = []
  for _ in range(5):
    adapters, opt_state, value = step(adapters, opt_state, base)
    losses.append(float(value))
  assert losses[-1] < losses[0] - 0.1, losses


def test_bad_config():
  with pytest.raises(ValueError, match='rank=0'):
    lora.LoraConfig(rank=0, alpha=1.0)
  with pytest.raises(ValueError, match=r"unknown \['wq'\]"):
    lora.LoraConfig(rank=2, alpha=1.0, targets=('q', 'wq'))


def test_merge_rounds_the_sum_once():
  # 1 + 0.00391 in bfloat16 (step 2^-7 at 1): rounding the update first
  # gives exactly half a step, which ties to 1.0; the sum rounded once is
  # 1 + 2^-7.
  kernel = jnp.ones((1, 1), jnp.bfloat16)
  a, b = jnp.full((1, 1), 0.00391, jnp.float32), jnp.ones((1, 1), jnp.float32)
  assert float(kernel[0, 0] + jnp.bfloat16(0.00391)) == 1.0
  merged = lora.merged_kernel(kernel, a, b, 1.0)
  assert merged.dtype == jnp.bfloat16 and float(merged[0, 0]) == 1 + 2 ** -7
