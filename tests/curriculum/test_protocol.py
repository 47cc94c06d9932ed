"""The selector protocol and its registry: names, registration, the state
every selector keeps, and the parts of the selectors with state (GDRO's
weights, DOTS' references) against hand-computed references."""

import ast
import dataclasses
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx import config as config_lib
from rlx import curriculum
from rlx import errors
from rlx import recipes
from rlx.curriculum import controller as ctl
from rlx.curriculum import estimators as est
from rlx.curriculum import selectors as sel
from rlx.sampling.sampler import Rollout

KNOWN = ['uniform', 'vade', 'insight', 'cures', 'mmr1_vas', 'prompt_gdro',
         'spo', 'dots', 'likelihood']
N, B, G, T = 24, 4, 4, 3


def _cfg(**curriculum_knobs) -> config_lib.Config:
  c = config_lib.default_config_dict()
  c.rl.batch_prompts, c.rl.group_size = B, G
  c.task.num_train = N
  for k, v in curriculum_knobs.items():
    recipes.override(c, f'curriculum.{k}', v)
  return config_lib.build(c)


def _unused(params, ids):
  raise AssertionError(f'called with {params}, {ids}')


def _rollout(params, ids, key, num_samples):
  """Every other response of each prompt is right."""
  del params, key
  r = len(ids) * num_samples
  ro = Rollout(tokens=np.zeros((r, 1, T), np.int32),
               loss_mask=np.ones((r, 1, T), bool),
               logp=np.zeros((r, 1, T), np.float32),
               entropy=np.zeros((r, 1, T), np.float32),
               lengths=np.full((r, 1), T, np.int32),
               finish=np.ones((r, 1), np.int32))
  rewards = (np.arange(r) % 2).astype(np.float32)
  regroup = lambda x: x.reshape((len(ids), num_samples) + x.shape[2:])
  return jax.tree.map(regroup, ro), regroup(rewards)


# The registry ------------------------------------------------------------


def test_known_names_are_listed_in_the_config_order():
  assert sel.SELECTORS.names() == KNOWN


def test_an_unknown_selector_is_named_with_the_known_ones():
  want = f"curriculum.selector: 'thompson' is not one of {KNOWN}"
  with pytest.raises(errors.ConfigError) as e:
    sel.make(config_lib.CurriculumConfig(selector='thompson'),
             est.beta_bernoulli())
  assert str(e.value) == want
  c = config_lib.default_config_dict()
  c.curriculum.selector = 'thompson'
  with pytest.raises(errors.ConfigError) as e:
    config_lib.build(c)
  assert want in str(e.value).splitlines()
  with pytest.raises(errors.ConfigError, match='thompson'):
    ctl.resolve_estimator('auto', 'thompson')
  # The group sizes leave the name to the check.
  cfg = dataclasses.replace(_cfg(), curriculum=dataclasses.replace(
      _cfg().curriculum, selector='thompson'))
  assert curriculum.group_sizes(cfg) == [('rl.group_size', G)]


@pytest.mark.parametrize('name,estimator', [
    ('uniform', 'beta'), ('vade', 'vade'), ('cures', 'count'),
    ('spo', 'spo'), ('dots', 'beta'), ('likelihood', 'beta')])
def test_auto_estimator_is_the_selectors_own(name, estimator):
  assert ctl.resolve_estimator('auto', name) == estimator
  assert ctl.resolve_estimator('auto', name, 'spo') == 'spo'
  assert ctl.resolve_estimator('count', name, 'spo') == 'count'


class _Lowest(sel.Selector):
  """The k lowest ids, tier by tier; remembers what it observed."""

  default_estimator = 'count'

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.seen = []

  def select(self, state, key, k, eligible=None):
    n = state.stats.alpha.shape[0]
    return sel.top_scores(key, -jnp.arange(n, dtype=jnp.float32), k,
                          eligible)

  def observe(self, state, stats_before, evidence):
    self.seen.append(np.concatenate([i for i, _, _ in evidence]).tolist())
    return state


@pytest.fixture(name='lowest')
def _register_lowest():
  sel.SELECTORS.register('lowest')(_Lowest)
  yield _Lowest
  sel.SELECTORS._items.pop('lowest')  # pylint: disable=protected-access


def test_a_registered_selector_is_checked_built_and_run(lowest):
  cfg = _cfg(selector='lowest')  # A known name once registered.
  cur = ctl.Curriculum(cfg.curriculum, cfg.rl, N, embed_fn=_unused,
                       score_fn=_unused)
  assert isinstance(cur.selector, lowest)
  assert cur.estimator_name == 'count'  # Its default_estimator.
  state = cur.init()
  got, new, _ = cur.collect(state, None, jax.random.key(0), _rollout, 0)
  np.testing.assert_array_equal(got.ids, np.arange(B))
  assert cur.selector.seen == [list(range(B))]
  assert jax.tree.structure(new) == jax.tree.structure(state)
  assert curriculum.group_sizes(cfg) == [('rl.group_size', G)]


@pytest.mark.parametrize('name', KNOWN)
def test_the_state_has_every_part_for_every_selector(name):
  # Checkpoints store it: one structure, the parts' shapes fixed by the
  # config (DOTS: the pool's embeddings and its references).
  cfg = _cfg(selector=name)
  cur = ctl.Curriculum(cfg.curriculum, cfg.rl, N, embed_fn=_unused,
                       score_fn=_unused)
  shapes = jax.tree.map(lambda x: x.shape, cur.abstract(7))
  assert shapes.stats == est.PromptStats((N,), (N,), (N,), (N,), ())
  assert shapes.gdro == sel.GdroState((5,), (5,), (5,))
  refs = cfg.curriculum.dots.ref_prompts
  want = (((N, 7), (refs,), (refs,)) if name == 'dots' else
          ((1, 1), (1,), (1,)))
  assert tuple(shapes.dots) == want
  if name != 'dots':  # No policy needed.
    state = cur.init()
    assert jax.tree.map(lambda x: x.shape, state) == shapes


def test_an_unused_embed_or_score_function_is_never_called():
  for name in ('vade', 'prompt_gdro', 'uniform'):
    cfg = _cfg(selector=name, filter='dapo+skip')
    cur = ctl.Curriculum(cfg.curriculum, cfg.rl, N, embed_fn=_unused,
                         score_fn=_unused)
    state = cur.init({'w': 1})
    for step in range(2):
      _, state, _ = cur.collect(state, {'w': 1}, jax.random.key(step),
                                _rollout, step)


@pytest.mark.parametrize('knobs,own', [
    ({}, []),
    ({'selector': 'dots'}, [('curriculum.dots.ref_samples', 4)]),
    ({'selector': 'dots', 'dots.ref_samples': 6},
     [('curriculum.dots.ref_samples', 6)]),
    ({'selector': 'dots', 'dots.refs': 'history',
      'dots.similarity': 'cosine'}, []),
    ({'selector': 'likelihood'}, []),
])
def test_group_sizes_are_the_rl_ones_and_the_selectors_own(knobs, own):
  assert curriculum.group_sizes(_cfg(**knobs)) == [('rl.group_size',
                                                    G)] + own


# Protocol parts ----------------------------------------------------------


def _step(**fields) -> sel.Step:
  parts = dict(params=None, step=0, key=jax.random.key(0), eligible=None,
               embed=lambda: _unused(None, None), rollout=_unused,
               metrics={})
  parts.update(fields)
  return sel.Step(**parts)


def test_uniform_batch_walks_the_data_order_unless_skipping():
  uni = sel.make(config_lib.CurriculumConfig(), est.beta_bernoulli(),
                 seed=3)
  state = sel.default_state(est.beta_bernoulli().init(N), 5)
  for step in range(4):
    ids, p_hat = uni.batch(state, _step(step=step), None, B)
    np.testing.assert_array_equal(ids, ctl.epoch_order(3, step, B, N))
    assert p_hat is None
  eligible = jnp.arange(N) >= N - B
  ids, _ = uni.batch(state, _step(eligible=eligible), jax.random.key(1), B)
  assert sorted(ids.tolist()) == list(range(N - B, N))


def _np_gdro(gdro, mean, evidence, *, bins, eta, decay, explore):
  """Numpy reference of one prompt-GDRO observation (float64)."""
  log_q, ema, updates = (np.asarray(x, np.float64) for x in gdro)
  total, seen = np.zeros(bins), np.zeros(bins)
  for ids, succ, cnt in evidence:
    for i, s, n in zip(ids, succ, cnt):
      if n > 0:  # A prompt never rolled out is no evidence.
        b = min(int(np.floor(mean[i] * np.float32(bins))), bins - 1)
        total[b] += 1.0 - s / n
        seen[b] += 1
  hit = seen > 0
  ema = np.where(hit, decay * ema + (1 - decay) * total / np.maximum(seen,
                                                                    1), ema)
  updates = updates + hit
  debiased = ema / np.maximum(1 - decay ** updates, 1e-6)
  known = updates > 0
  score = np.where(known, debiased - debiased[known].mean(), 0.0)
  q = np.exp(log_q + eta * score)
  q = (1 - explore) * q / q.sum() + explore / bins
  return np.log(q), ema, updates


def test_prompt_gdro_observe_against_numpy():
  knobs = dict(bins=4, eta=2.0, decay=0.8, explore=0.1)
  cfg = config_lib.CurriculumConfig(
      selector='prompt_gdro', gdro=dict(
          bins=knobs['bins'], eta=knobs['eta'], ema=knobs['decay'],
          explore=knobs['explore']))
  gdro = sel.make(cfg, est.beta_bernoulli())
  state = sel.default_state(est.beta_bernoulli().init(N), 4)._replace(
      **gdro.init(embed=None))
  rng = np.random.default_rng(0)
  want = tuple(np.asarray(x) for x in state.gdro)
  for _ in range(4):
    alpha = rng.uniform(0.2, 6.0, N).astype(np.float32)
    beta = rng.uniform(0.2, 6.0, N).astype(np.float32)
    before = state.stats._replace(alpha=jnp.asarray(alpha),
                                  beta=jnp.asarray(beta))
    # A step's groups, then refills (one never rolled out), as evidence.
    ids = rng.choice(N, 9, replace=False)
    cnt = np.r_[np.full(6, G), rng.integers(0, 3, 3)]
    succ = np.array([rng.integers(0, n + 1) for n in cnt], np.float64)
    evidence = [(ids[:6], succ[:6], cnt[:6]), (ids[6:], succ[6:], cnt[6:])]
    new = gdro.observe(state._replace(stats=before), before, evidence)
    want = _np_gdro(want, alpha / (alpha + beta), evidence, **knobs)
    for got, ref in zip(new.gdro, want):
      np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert new.stats is before and new.dots is state.dots
    state = new
  assert np.all(np.asarray(state.gdro.updates) > 0)  # Every bin debiased.


def test_dots_prepare_rolls_out_fresh_references_and_refreshes_embeddings():
  cfg = config_lib.CurriculumConfig(selector='dots', dots=dict(
      ref_prompts=5, ref_samples=3, embed_every=2))
  dots = sel.make(cfg, est.beta_bernoulli())
  embed = jnp.asarray(np.random.default_rng(0).normal(size=(N, 4)),
                      jnp.float32)
  state = sel.default_state(est.beta_bernoulli().init(N), 5)._replace(
      **dots.init(lambda: embed))
  np.testing.assert_array_equal(state.dots.ref_ids, [-1] * 5)
  calls = []

  def rollout(ids, key, per_id):
    calls.append((np.asarray(ids), per_id))
    return np.asarray(ids) % (per_id + 1), np.full(len(ids), per_id)

  for step, refreshed in ((1, False), (2, True)):
    calls.clear()
    ctx = _step(step=step, key=jax.random.key(step), rollout=rollout,
                embed=lambda: 2 * embed)
    new = dots.prepare(state, ctx)
    (ref, per_id), = calls
    assert per_id == 3 and len(set(ref.tolist())) == 5
    np.testing.assert_array_equal(new.dots.ref_ids, ref)
    np.testing.assert_allclose(new.dots.ref_rates, ref % 4 / 3)
    assert ctx.metrics['curriculum/dots_ref_pass_mean'] == pytest.approx(
        np.mean(ref % 4 / 3))
    np.testing.assert_array_equal(new.dots.embed,
                                  2 * embed if refreshed else embed)
    assert new.stats is state.stats
  # Fresh references need no history: observing leaves the state.
  assert dots.observe(new, new.stats, [(ref, ref % 4, [3] * 5)]) is new


def test_dots_history_observe_remembers_the_prompts_rolled_out():
  cfg = config_lib.CurriculumConfig(selector='dots', dots=dict(
      refs='history', history_refs=6, similarity='cosine'))
  dots = sel.make(cfg, est.beta_bernoulli())
  state = sel.default_state(est.beta_bernoulli().init(N), 5)._replace(
      **dots.init(lambda: jnp.eye(N, 4)))
  assert dots.prepare(state, _step(step=1)) is not None  # No rollouts.
  evidence = [(np.array([4, 2, 9]), np.zeros(3), np.array([4, 0, 4])),
              (np.array([11]), np.ones(1), np.array([4]))]
  new = dots.observe(state, state.stats, evidence)
  np.testing.assert_array_equal(new.dots.ref_ids, [4, 9, 11, -1, -1, -1])


# Structure ---------------------------------------------------------------

_SOURCES = sorted(pathlib.Path(sel.__file__).parent.glob('*.py'))


@pytest.mark.parametrize('path', _SOURCES, ids=lambda p: p.name)
def test_no_switch_on_the_selector_name(path):
  # A selector's behaviour is its class's, found through the registry.
  assert not re.search(r'selector\s*(==|!=|(not\s+)?in\s*[(\[{])',
                       path.read_text())


@pytest.mark.parametrize('path', _SOURCES, ids=lambda p: p.name)
def test_functions_are_at_most_80_lines(path):
  for node in ast.walk(ast.parse(path.read_text())):
    if (isinstance(node, ast.FunctionDef) and node.name != 'make' and
        not node.name.startswith('make_')):
      assert node.end_lineno - node.lineno < 80, node.name
