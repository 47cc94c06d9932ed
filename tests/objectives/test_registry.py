"""The objectives' registries: names, declarations, hooks, config checks."""

import ast
import os

import jax.numpy as jnp
import numpy as np
import pytest

from rlx import config as config_lib
from rlx import objectives
from rlx.config import ObjectiveConfig
from rlx.errors import ConfigError
from rlx.objectives import advantages as adv_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _build(**overrides):
  c = config_lib.default_config_dict()
  for key, value in overrides.items():
    group, field = key.split('.')
    setattr(getattr(c, group), field, value)
  return config_lib.build(c)


def _problems(**overrides):
  with pytest.raises(ConfigError) as e:
    _build(**overrides)
  return str(e.value).splitlines()


@pytest.fixture
def registered():
  """Registers test entries by name; removes them after the test."""
  names = []

  def declare(registry, name, fn, **declarations):
    registry.declare(name, **declarations)(fn)
    names.append((registry, name))

  yield declare
  for registry, name in names:
    registry.unregister(name)


# ---------------------------------------------------------------- names


@pytest.mark.parametrize('registry,key', [
    (objectives.ADVANTAGES, 'objective.advantage'),
    (objectives.LOSSES, 'objective.loss')])
def test_unknown_name_lists_the_known_ones(registry, key):
  with pytest.raises(ConfigError) as e:
    registry.get('nope')
  msg = str(e.value)
  assert msg.startswith(f"{key}: 'nope' is not one of ")
  assert len(registry.names()) > 1
  for name in registry:
    assert repr(name) in msg


def test_config_names_an_unknown_advantage_and_loss_at_once():
  lines = _problems(**{'objective.advantage': 'nope',
                       'objective.loss': 'nah'})
  assert lines == [
      f"objective.advantage: unknown 'nope'; known: "
      f'{sorted(objectives.ADVANTAGES)}',
      f"objective.loss: unknown 'nah'; known: {sorted(objectives.LOSSES)}"]


def test_a_name_is_registered_once(registered):
  registered(objectives.ADVANTAGES, 'twice', adv_lib.dr_grpo)
  with pytest.raises(ValueError, match="'twice' is registered twice"):
    objectives.ADVANTAGES.declare('twice')(adv_lib.rloo)


def test_a_declared_keyword_must_be_the_functions():
  with pytest.raises(TypeError, match=r"declares \['scale'\]"):
    objectives.ADVANTAGES.declare('bad', knobs={'scale': 'mc_scale'})(
        adv_lib.dr_grpo)
  assert 'bad' not in objectives.ADVANTAGES


# --------------------------------------------------------- declarations


def test_declared_properties_of_the_builtin_estimators():
  # The name tuples the declarations replace (config.GROUP_RELATIVE,
  # advantages.BATCH_WHITENED, config.TREE_ADVANTAGES).
  entry = objectives.ADVANTAGES.get
  assert {n for n in objectives.ADVANTAGES if entry(n).group_relative} == {
      'grpo', 'dr_grpo', 'rloo', 'reinforce_pp', 'mc_grpo', 'xrpo_sharpen',
      'd3s'}
  assert {n for n in objectives.ADVANTAGES if entry(n).whole_batch} == {
      'reinforce_pp', 'spo', 'tree'}
  assert {n for n in objectives.ADVANTAGES
          if 'path_ids' in objectives.reads(n)} == {'tree', 'treerl'}
  assert {n for n in objectives.ADVANTAGES if entry(n).loss_masks} == {
      'mc_grpo', 'd3s'}
  assert not any(entry(n).needs for n in objectives.ADVANTAGES)
  assert objectives.reads('spo') == {'values'}
  assert objectives.reads('d3s') == {'entropy', 'loss_mask'}
  assert objectives.reads('grpo') == frozenset()
  assert objectives.reads('nope') == frozenset()


def test_loss_knobs_come_from_the_config():
  kwargs = lambda name, **kw: objectives.LOSSES.get(name).kwargs(
      ObjectiveConfig(**kw))
  # clip_eps_high = 0 keeps the loss's own default (0.28 for dapo).
  assert kwargs('dapo') == {'clip_eps': 0.2}
  assert kwargs('dapo', clip_eps_high=0.3) == {'clip_eps': 0.2,
                                               'clip_eps_high': 0.3}
  assert kwargs('dual_clip', dual_clip=dict(c=5.0)) == {'clip_eps': 0.2,
                                                  'dual_clip_c': 5.0}
  assert kwargs('gspo', gspo=dict(variant='token')) == {
      'eps_low': 3e-4, 'eps_high': 4e-4, 'variant': 'token'}
  assert kwargs('cispo', cispo=dict(clip_low=0.1)) == {'clip_low': 0.1}


class _Batch:
  """The Batch fields the built-in estimators read."""

  def __init__(self, **fields):
    for name in ('old_logp', 'behaviour_logp', 'loss_mask', 'entropy',
                 'values', 'path_ids', 'depth_start'):
      setattr(self, name, fields.get(name))


def test_d3s_keep_ratios_anneal_with_the_step():
  obj = ObjectiveConfig(advantage='d3s', d3s=dict(
      sample_keep=0.5, token_keep=0.25, anneal_steps=10))
  batch = _Batch(entropy=jnp.ones((1, 2, 3)),
                 loss_mask=jnp.ones((1, 2, 3), bool))
  entry = objectives.ADVANTAGES.get('d3s')
  for step, sample, token in ((0, 0.5, 0.25), (4, 0.7, 0.55),
                              (10, 1.0, 1.0), (30, 1.0, 1.0)):
    kw = entry.kwargs(obj, batch, jnp.int32(step))
    assert kw['token_entropy'] is batch.entropy
    assert kw['eps'] == obj.adv_eps
    np.testing.assert_allclose(float(kw['sample_keep']), sample, rtol=1e-6)
    np.testing.assert_allclose(float(kw['token_keep']), token, rtol=1e-6)


def test_xrpo_reads_the_samplers_mean_logp():
  rng = np.random.default_rng(0)
  old = rng.normal(size=(2, 3, 5)).astype(np.float32)
  mu = rng.normal(size=(2, 3, 5)).astype(np.float32)
  mask = np.arange(5) < rng.integers(0, 6, (2, 3))[..., None]
  entry = objectives.ADVANTAGES.get('xrpo_sharpen')
  want = lambda lp: (lp * mask).sum(-1) / np.maximum(mask.sum(-1), 1)
  for behaviour, lp in ((None, old), (mu, mu)):
    kw = entry.kwargs(ObjectiveConfig(), _Batch(
        old_logp=jnp.asarray(old), behaviour_logp=behaviour,
        loss_mask=jnp.asarray(mask)), 0)
    np.testing.assert_allclose(kw['mean_logp'], want(lp), rtol=1e-6)
    assert (kw['lam'], kw['clip']) == (0.1, 1.0)


@pytest.mark.parametrize('name,field', [('spo', 'values'),
                                        ('tree', 'path_ids'),
                                        ('treerl', 'depth_start'),
                                        ('d3s', 'entropy')])
def test_a_missing_input_is_named(name, field):
  fields = {'values': np.zeros(2), 'path_ids': np.zeros((2, 3, 1)),
            'depth_start': np.zeros((2, 3, 1)), 'entropy': np.zeros((2, 3, 4)),
            'loss_mask': np.ones((2, 3, 4), bool)}
  del fields[field]
  with pytest.raises(ValueError, match=f'the {name} advantage needs '
                     f'Batch.{field}'):
    objectives.ADVANTAGES.get(name).kwargs(ObjectiveConfig(),
                                           _Batch(**fields), 0)


# ---------------------------------------------------------------- hooks


def _np_pivot(rewards, mask):
  """The valid entry of sorted rank (n - 1) // 2, ties by lower index."""
  out = np.zeros(mask.shape, bool)
  for b in range(rewards.shape[0]):
    idx = np.flatnonzero(mask[b])
    if idx.size:
      order = sorted(idx, key=lambda i: (rewards[b, i], i))
      out[b, order[(idx.size - 1) // 2]] = True
  return out


def test_mc_grpo_hook_drops_the_pivot_from_the_loss():
  rng = np.random.default_rng(3)
  b, g, t = 40, 6, 5
  # Few distinct values: many ties; some rows short or empty.
  rewards = rng.integers(0, 3, (b, g)).astype(np.float32) / 2
  mask = rng.random((b, g)) < 0.8
  mask[0] = False
  mask[1] = [True] + [False] * (g - 1)
  loss_mask = rng.random((b, g, t)) < 0.7
  hook = objectives.ADVANTAGES.get('mc_grpo').loss_masks
  group_mask, got_loss_mask = hook(jnp.asarray(rewards), jnp.asarray(mask),
                                   jnp.asarray(loss_mask), {})
  pivot = _np_pivot(rewards, mask)
  assert pivot.sum() == np.any(mask, -1).sum()
  np.testing.assert_array_equal(group_mask, mask & ~pivot)
  np.testing.assert_array_equal(got_loss_mask, loss_mask)
  # The pivot is where the estimator's baseline comes from: A = 0 there.
  adv = np.asarray(objectives.compute_advantages('mc_grpo', rewards, mask))
  np.testing.assert_array_equal(adv[pivot], 0.0)


def test_d3s_hook_keeps_what_d3s_gives_an_advantage():
  rng = np.random.default_rng(4)
  b, g, t = 6, 8, 7
  rewards = (rng.random((b, g)) < 0.5).astype(np.float32)
  mask = rng.random((b, g)) < 0.9
  loss_mask = np.arange(t) < rng.integers(1, t + 1, (b, g))[..., None]
  kw = {'token_entropy': jnp.asarray(rng.uniform(0.1, 2, (b, g, t)),
                                     jnp.float32),
        'loss_mask': jnp.asarray(loss_mask), 'sample_keep': 0.5,
        'token_keep': 0.5, 'eps': 1e-6}
  entry = objectives.ADVANTAGES.get('d3s')
  kept, tokens = entry.loss_masks(jnp.asarray(rewards), jnp.asarray(mask),
                                  jnp.asarray(loss_mask), kw)
  kept, tokens = np.asarray(kept), np.asarray(tokens)
  adv = np.asarray(entry(rewards, mask, **kw))
  assert not (kept & ~mask).any() and not (tokens & ~loss_mask).any()
  np.testing.assert_array_equal(adv[~(tokens & kept[..., None])], 0.0)
  n = mask.sum(-1)
  k = np.where(n < 2, n, np.minimum(np.maximum(np.floor(0.5 * n + 0.5), 2),
                                    n))
  np.testing.assert_array_equal(kept.sum(-1), k)
  lengths = loss_mask.sum(-1)
  np.testing.assert_array_equal(
      tokens.sum(-1)[kept], np.ceil(0.5 * lengths)[kept])


# -------------------------------------------------------- config checks


def test_group_relative_declaration_needs_two_samples(registered):
  registered(objectives.ADVANTAGES, 'test_centred', adv_lib.dr_grpo,
             group_relative=True)
  registered(objectives.ADVANTAGES, 'test_free', adv_lib.dr_grpo)
  line = ("rl.group_size: is 1; the group-relative advantage "
          "'test_centred' needs at least 2")
  assert line in _problems(**{'objective.advantage': 'test_centred',
                              'rl.group_size': 1})
  assert not any(p.startswith('rl.group_size') for p in _problems(
      **{'objective.advantage': 'test_free', 'rl.group_size': 1}))


def test_needs_and_knob_declarations_are_checked(registered):
  registered(objectives.ADVANTAGES, 'test_needy', adv_lib.dr_grpo,
             needs='a critic')
  assert _problems(**{'objective.advantage': 'test_needy'}) == [
      "objective.advantage: 'test_needy' needs a critic, which the trainer "
      'does not produce yet; it is available as a library function '
      '(rlx.objectives.compute_advantages)']
  registered(objectives.LOSSES, 'test_loss', objectives.losses.ppo_clip,
             knobs={'clip_eps': 'clip_epsilon'})
  assert _problems(**{'objective.loss': 'test_loss'}) == [
      "objective.loss: 'test_loss' takes its knob from "
      'objective.clip_epsilon, which is not a config field']


def test_whole_batch_declaration_refuses_kl_in_reward_split():
  lines = _problems(**{'objective.advantage': 'spo', 'rl.num_minibatches': 2,
                       'objective.kl_beta': 0.1,
                       'objective.kl_in_reward': True})
  assert any(l.startswith("objective.kl_in_reward: 'spo' whitens over the "
                          'whole batch') for l in lines)


def test_config_and_objectives_do_not_import_each_other():
  def imports(path):
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    out = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        out |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom):
        out |= {f'{node.module}.{a.name}' for a in node.names}
    return out

  folder = os.path.join(ROOT, 'rlx', 'objectives')
  for name in os.listdir(folder):
    if name.endswith('.py'):
      assert not any(m.startswith('rlx.config') for m in imports(
          os.path.join('rlx', 'objectives', name))), name
  assert not any('objectives' in m for m in imports('rlx/config.py'))
