"""The step controller with a fake sampler: variable groups end to end."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx import config as config_lib
from rlx import objectives
from rlx import recipes
from rlx.curriculum import controller as ctl
from rlx.curriculum import dots as dots_lib
from rlx.curriculum import estimators as est
from rlx.curriculum import selectors as sel
from rlx.sampling.sampler import Rollout

N, B, G, T = 40, 4, 4, 6
# True pass rate per prompt: a third never solved, a third always, the rest
# in between.
P_TRUE = np.where(np.arange(N) % 3 == 0, 0.0,
                  np.where(np.arange(N) % 3 == 1, 1.0, 0.5))


def fake_rollout(params, ids, key, num_samples):
  """Tokens encode the prompt id; reward ~ Bernoulli(P_TRUE[id])."""
  del params
  rows = np.repeat(np.asarray(ids), num_samples)
  r = len(rows)
  seed = int(jax.random.randint(key, (), 0, 2 ** 30))
  rewards = (np.random.default_rng(seed).uniform(size=r)
             < P_TRUE[rows]).astype(np.float32)
  tokens = np.repeat(np.asarray(rows)[:, None, None], T, -1).astype(np.int32)
  lengths = (np.asarray(rows) % T + 1).astype(np.int32)[:, None]
  mask = np.arange(T)[None, None] < lengths[..., None]
  ro = Rollout(tokens=tokens, loss_mask=mask,
               logp=np.full((r, 1, T), -0.5, np.float32),
               entropy=np.ones((r, 1, T), np.float32), lengths=lengths,
               finish=np.ones((r, 1), np.int32))
  regroup = lambda x: x.reshape((len(ids), num_samples) + x.shape[2:])
  return jax.tree.map(regroup, ro), regroup(rewards)


def fake_score(params, ids):
  """The policy's log-probability of the reference solution: log P_TRUE
  (-inf for the never-solved prompts)."""
  del params
  with np.errstate(divide='ignore'):
    return np.log(P_TRUE[np.asarray(ids)]).astype(np.float32)


def _curriculum(pool=N, **kw):
  c = config_lib.default_config_dict()
  c.rl.batch_prompts, c.rl.group_size = B, G
  c.task.num_train = N
  for k, v in kw.items():
    if isinstance(v, dict):  # An owned section: curriculum.dots.*.
      c.curriculum[k].update(v)
    else:
      c.curriculum[k] = v
  cfg = config_lib.build(c)
  embed = lambda params, ids: jax.nn.one_hot(np.asarray(ids) % 3, 3) * 5.0
  return ctl.Curriculum(cfg.curriculum, cfg.rl, pool, embed_fn=embed,
                        score_fn=fake_score)


def _collect(cur, state, step=0):
  return cur.collect(state, None, jax.random.key(step), fake_rollout, step)


@pytest.mark.parametrize('allocator', ['fixed', 'cures', 'rollout_gdro',
                                       'xrpo', 'dars'])
def test_groups_hold_exactly_what_was_sampled(allocator):
  cur = _curriculum(allocator=allocator)
  state = cur.init()
  for step in range(3):
    got, state, m = _collect(cur, state, step)
    assert got.counts.sum() == B * G == m['curriculum/rollouts']
    sampled = np.arange(got.rewards.shape[1]) < got.counts[:, None]
    if allocator != 'dars':
      np.testing.assert_array_equal(got.group_mask, sampled)
    assert not got.group_mask[~sampled].any()
    # Every sampled row belongs to its prompt and carries its reward.
    want = np.broadcast_to(got.ids[:, None], sampled.shape)
    np.testing.assert_array_equal(got.tokens[..., 0][sampled], want[sampled])
    assert set(np.unique(got.rewards[sampled])) <= {0.0, 1.0}
    assert got.tokens.shape[1] % 4 == 0


def test_estimator_sees_every_rollout():
  cur = _curriculum(estimator='count', allocator='cures')
  state = cur.init()
  got, new, _ = _collect(cur, state)
  s = new.stats
  total = np.asarray(s.alpha + s.beta - 2.0)
  np.testing.assert_allclose(total[got.ids], got.counts)
  np.testing.assert_allclose(np.asarray(s.alpha - 1.0)[got.ids],
                             got.rewards.sum(-1))
  assert total.sum() == B * G
  np.testing.assert_allclose(got.values, 0.5)  # Prior mean before update.


def test_dapo_refills_all_equal_groups_and_counts_the_rollouts():
  cur = _curriculum(filter='dapo', dapo_max_retries=5)
  got, state, m = _collect(cur, cur.init())
  kept = got.group_mask.any(-1)
  for i in np.flatnonzero(kept):
    r = got.rewards[i, :got.counts[i]]
    assert r.min() != r.max()
  refills = m['curriculum/rollouts'] - B * G
  assert refills % G == 0 and (refills > 0) == (m['curriculum/dapo_retries']
                                                > 0)
  seen = np.asarray(state.stats.alpha + state.stats.beta - 2.0).sum()
  assert seen == m['curriculum/rollouts']
  assert m['curriculum/dapo_bound_hit'] == float(not kept.all())


@pytest.mark.parametrize('case', ['pool_is_batch', 'few_eligible'])
def test_dapo_refills_never_repeat_a_prompt_in_a_step(case):
  # Refills come from prompts not yet used this step; when none are left the
  # holes stay (masked). Skipped prompts are taken before used ones.
  if case == 'pool_is_batch':
    cur = _curriculum(pool=B, filter='dapo', dapo_max_retries=5)
    state = cur.init()
  else:
    cur = _curriculum(filter='dapo+skip', dapo_max_retries=5,
                      estimator='count')
    state = cur.init()
    # Every prompt but the last two looks all-equal to the estimator (the
    # mixed ones wrongly, as solved): 2 eligible prompts for B = 4.
    known = np.arange(N - 2)
    rate = np.where(P_TRUE[known] == 0.5, 1.0, P_TRUE[known])
    state = state._replace(stats=cur.estimator.update(
        state.stats, jnp.asarray(known), jnp.asarray(rate * 16),
        jnp.full(known.shape, 16.0)))
  for step in range(6):
    got, _, m = _collect(cur, state, step)
    ids = np.asarray(got.ids)
    assert len(set(ids.tolist())) == B, ids
    if case == 'pool_is_batch':
      assert m['curriculum/dapo_retries'] == 0
      assert m['curriculum/rollouts'] == B * G


def test_likelihood_selector_trains_the_candidates_nearest_even_odds():
  # K * B = 64 > N: every prompt is a candidate; only the mixed third (q =
  # 0.5) can be picked, the solved (q = 1) and unsolvable (q = 0) never.
  cur = _curriculum(selector='likelihood')
  state = cur.init()
  for step in range(4):
    got, state, m = _collect(cur, state, step)
    assert np.all(P_TRUE[got.ids] == 0.5), got.ids
    assert len(set(got.ids.tolist())) == B
    assert m['curriculum/likelihood_scored'] == N
    assert m['curriculum/rollouts'] == B * G  # Scoring is no rollout.
  # The estimate of the picks, before their own evidence: q = 0.5.
  got, _, m = _collect(cur, cur.init())
  assert m['curriculum/selected_pass_mean'] == 0.5
  # Same state and key, same picks; K * B candidates when the pool allows.
  again, _, _ = _collect(cur, cur.init())
  np.testing.assert_array_equal(got.ids, again.ids)
  few = _curriculum(selector='likelihood', likelihood=dict(candidates=2))
  assert _collect(few, few.init())[2]['curriculum/likelihood_scored'] == 2 * B


def test_likelihood_estimate_weighs_the_prompts_own_evidence():
  # The mixed prompts have come back solved 40 times: p_hat = (40 + 8 *
  # 0.5) / 48, p(1-p) = 0.076; the unsolvable ones (q = 0) were solved 4
  # times in 8: p_hat = 4 / 16, p(1-p) = 0.19. The second now win.
  cur = _curriculum(selector='likelihood', estimator='count')
  state = cur.init()
  mid, hard = np.flatnonzero(P_TRUE == 0.5), np.flatnonzero(P_TRUE == 0.0)
  stats = cur.estimator.update(
      state.stats, jnp.asarray(np.concatenate([mid, hard])),
      jnp.asarray(np.r_[np.full(len(mid), 40.0), np.full(len(hard), 4.0)]),
      jnp.asarray(np.r_[np.full(len(mid), 40.0), np.full(len(hard), 8.0)]))
  got, _, m = _collect(cur, state._replace(stats=stats))
  assert np.all(P_TRUE[got.ids] == 0.0), got.ids
  np.testing.assert_allclose(m['curriculum/selected_pass_mean'], 0.25)


def test_likelihood_dapo_refills_pick_by_likelihood_never_repeating():
  cur = _curriculum(selector='likelihood', filter='dapo',
                    dapo_max_retries=5)
  state, refilled = cur.init(), 0
  for step in range(8):
    got, state, m = _collect(cur, state, step)
    kept = got.group_mask.any(-1)
    assert len(set(got.ids.tolist())) == B
    assert np.all(P_TRUE[got.ids[kept]] == 0.5)
    refilled += m['curriculum/dapo_retries'] > 0
    # Each refill round scores K candidates per hole (capped by the pool).
    assert m['curriculum/likelihood_scored'] >= N
  assert refilled  # All-equal groups of p = 0.5 at G = 4: 1 in 8.


def test_likelihood_selector_needs_a_score_function():
  c = config_lib.default_config_dict()
  c.rl.batch_prompts, c.rl.group_size = B, G
  c.task.num_train = N
  c.curriculum.selector = 'likelihood'
  cfg = config_lib.build(c)
  with pytest.raises(ValueError, match='score_fn'):
    ctl.Curriculum(cfg.curriculum, cfg.rl, N)


def test_free_dapo_refills_are_the_same_groups_uncharged():
  # The analysis knob changes the bookkeeping only: the same key gives the
  # same groups, and the refills move from the charged count to their own.
  charged = _curriculum(filter='dapo', dapo_max_retries=5)
  free = _curriculum(filter='dapo', dapo_max_retries=5,
                     oracle=dict(free_refills=True))
  want, want_state, wm = _collect(charged, charged.init())
  got, got_state, gm = _collect(free, free.init())
  np.testing.assert_array_equal(got.ids, want.ids)
  np.testing.assert_array_equal(got.rewards, want.rewards)
  np.testing.assert_array_equal(got.group_mask, want.group_mask)
  assert wm['curriculum/rollouts'] > B * G  # This key needs refills.
  assert got.rollouts == gm['curriculum/rollouts'] == B * G
  assert gm['curriculum/uncharged_rollouts'] == (wm['curriculum/rollouts']
                                                 - B * G)
  assert 0 < got.decoded_tokens < want.decoded_tokens
  # Every rollout is still evidence for the estimator.
  np.testing.assert_array_equal(got_state.stats.alpha, want_state.stats.alpha)


def test_oracle_screen_trains_the_most_mixed_groups_and_charges_them_only():
  calls = []

  def recording(params, ids, key, num_samples):
    ro, rewards = fake_rollout(params, ids, key, num_samples)
    calls.append((np.asarray(ids), np.asarray(rewards)))
    return ro, rewards

  cur = _curriculum(oracle=dict(screen=3), estimator='beta', discount=1.0)
  state = cur.init()
  for step in range(4):
    calls.clear()
    got, new, m = cur.collect(state, None, jax.random.key(step), recording,
                              step)
    cand_ids = np.concatenate([i for i, _ in calls])
    cand_rewards = np.concatenate([r for _, r in calls])  # [3B, G]
    assert len(cand_ids) == 3 * B == len(set(cand_ids.tolist()))
    var = np.sort(cand_rewards, -1).astype(np.float64).var(-1)
    # The B trained groups are B of the candidates, with their rewards, and
    # no candidate left out is more mixed than one kept.
    picked = [int(np.flatnonzero(cand_ids == i)[0]) for i in got.ids]
    np.testing.assert_array_equal(got.rewards, cand_rewards[picked])
    left = np.setdiff1d(np.arange(3 * B), picked)
    assert var[picked].min() >= var[left].max()
    np.testing.assert_allclose(m['curriculum/screen_var_mean'],
                               var[picked].mean())
    assert got.group_mask.all()
    # Charged: the trained groups only (tokens: fake lengths id % T + 1).
    assert got.rollouts == m['curriculum/rollouts'] == B * G
    assert m['curriculum/uncharged_rollouts'] == 2 * B * G
    # Plain ints: they go into the checkpoint's JSON metadata.
    assert type(got.rollouts) is type(got.decoded_tokens) is int
    assert got.decoded_tokens == G * np.sum(got.ids % T + 1)
    # Every candidate is evidence for the estimator.
    np.testing.assert_allclose(
        np.sum(new.stats.alpha - state.stats.alpha), cand_rewards.sum(),
        rtol=1e-5)
    state = new


def test_difficulty_oracle_chooses_by_free_probes_then_samples_afresh():
  calls = []

  def recording(params, ids, key, num_samples):
    ro, rewards = fake_rollout(params, ids, key, num_samples)
    calls.append((np.asarray(ids), np.asarray(rewards), num_samples))
    return ro, rewards

  cur = _curriculum(oracle=dict(screen=3, probe=6), estimator='beta',
                    discount=1.0)
  state = cur.init()
  for step in range(4):
    calls.clear()
    got, new, m = cur.collect(state, None, jax.random.key(step), recording,
                              step)
    *probes, train = calls
    assert [n for _, _, n in probes] == [6] * 3 and train[2] == G
    cand_ids = np.concatenate([i for i, _, _ in probes])
    assert len(cand_ids) == 3 * B == len(set(cand_ids.tolist()))
    var = np.sort(np.concatenate([r for _, r, _ in probes]), -1).astype(
        np.float64).var(-1)  # p(1-p), bit-equal for equal groups
    picked = [int(np.flatnonzero(cand_ids == i)[0]) for i in got.ids]
    left = np.setdiff1d(np.arange(3 * B), picked)
    assert var[picked].min() >= var[left].max()
    # The trained groups are the fresh rollouts of the chosen prompts.
    np.testing.assert_array_equal(train[0], got.ids)
    np.testing.assert_array_equal(got.rewards, train[1])
    assert got.rollouts == m['curriculum/rollouts'] == B * G
    assert m['curriculum/uncharged_rollouts'] == 3 * B * 6
    all_rewards = sum(r.sum() for _, r, _ in calls)
    np.testing.assert_allclose(
        np.sum(new.stats.alpha - state.stats.alpha), all_rewards, rtol=1e-5)
    state = new
  with pytest.raises(config_lib.ConfigError, match='oracle.probe: 1 must'):
    _curriculum(oracle=dict(screen=3, probe=1))
  with pytest.raises(config_lib.ConfigError, match='oracle.probe: 4 must'):
    _curriculum(oracle=dict(probe=4))


@pytest.mark.parametrize('mode', ['april', 'tree'])
@pytest.mark.parametrize('knob', [{'oracle.screen': 4},
                                  {'oracle.free_refills': True,
                                   'filter': 'dapo'}])
def test_oracle_bounds_are_refused_where_their_free_rollouts_would_count(
    mode, knob):
  c = config_lib.default_config_dict()
  c.rollout.mode = mode
  for k, v in knob.items():
    recipes.override(c, f'curriculum.{k}', v)
  with pytest.raises(config_lib.ConfigError,
                     match=f'curriculum.{next(iter(knob))}: is an analysis'):
    config_lib.build(c)


def test_oracle_screen_needs_fixed_allocation_and_no_filter():
  with pytest.raises(config_lib.ConfigError,
                     match="oracle.screen: 3 needs allocator 'fixed'"):
    _curriculum(oracle=dict(screen=3), filter='dapo')
  with pytest.raises(config_lib.ConfigError, match='oracle.screen'):
    _curriculum(oracle=dict(screen=2), allocator='dars')


def test_free_refills_need_the_dapo_filter():
  with pytest.raises(config_lib.ConfigError,
                     match='oracle.free_refills: needs curriculum.filter'):
    _curriculum(filter='skip', oracle=dict(free_refills=True))


def test_prompt_gdro_learns_from_the_groups_dapo_replaced(monkeypatch):
  seen = {}

  def spy(gdro, stats, ids, fail, **kw):
    seen['ids'], seen['fail'] = np.asarray(ids), np.asarray(fail)
    return real(gdro, stats, ids, fail, **kw)

  real = sel.gdro_update
  monkeypatch.setattr(sel, 'gdro_update', spy)
  cur = _curriculum(selector='prompt_gdro', filter='dapo', dapo_max_retries=5)
  got, _, m = _collect(cur, cur.init())
  assert m['curriculum/rollouts'] > B * G  # Some groups were replaced.
  final = set(np.asarray(got.ids)[got.group_mask.any(-1)].tolist())
  replaced = [i for i in seen['ids'] if i not in final]
  assert len(seen['ids']) == m['curriculum/rollouts'] // G and replaced
  # Each drawn prompt's failure rate: P_TRUE 0 -> 1, 1 -> 0, exactly.
  sure = P_TRUE[seen['ids']] != 0.5
  np.testing.assert_array_equal(seen['fail'][sure],
                                1.0 - P_TRUE[seen['ids']][sure])


def test_spo_discount_zero_is_refused():
  with pytest.raises(config_lib.ConfigError,
                     match=r'spo_discount: 0.0 not in \(0, 1\]'):
    _curriculum(spo_discount=0.0)


def test_skip_filter_avoids_prompts_known_to_be_all_equal():
  cur = _curriculum(filter='skip', estimator='count')
  state = cur.init()
  stats = state.stats
  solved = np.arange(N) % 3 != 2  # Pass rate 0 or 1: learn it first.
  ids = jnp.asarray(np.flatnonzero(solved))
  succ = jnp.asarray(P_TRUE[np.flatnonzero(solved)] * 16)
  state = state._replace(stats=cur.estimator.update(
      stats, ids, succ, jnp.full(ids.shape, 16.0)))
  got, _, m = _collect(cur, state)
  assert np.all(np.asarray(got.ids) % 3 == 2)
  np.testing.assert_allclose(m['curriculum/eligible_frac'],
                             np.mean(~solved))


def test_dots_reference_rollouts_are_counted_and_update_predictions():
  cur = _curriculum(selector='dots', dots=dict(ref_prompts=6, ref_samples=2))
  state = cur.init(params={})
  got, new, m = _collect(cur, state)
  assert m['curriculum/rollouts'] == B * G + 6 * 2
  assert np.all(np.asarray(new.dots.ref_ids) >= 0)
  pred = np.asarray(dots_lib.dots_predict(new.dots))
  assert pred.shape == (N,) and np.all((pred >= 0) & (pred <= 1))
  del got


def test_selected_pass_histogram_counts_the_batch():
  cur = _curriculum()
  _, _, m = _collect(cur, cur.init())
  hist = [m[f'curriculum/selected_pass_hist/{i}'] for i in range(5)]
  assert sum(hist) == B and hist[2] == B  # All at the prior mean 0.5.


@pytest.mark.parametrize('name', ['grpo', 'dr_grpo', 'rloo'])
def test_variable_group_advantages_equal_per_group_computation(name):
  rng = np.random.default_rng(0)
  counts = np.array([2, 5, 8, 3])
  rewards = rng.binomial(1, 0.5, (4, 8)).astype(np.float32)
  rewards[1, :5] = [1, 0, 1, 1, 0]
  mask = np.arange(8)[None] < counts[:, None]
  got = np.asarray(objectives.compute_advantages(
      name, jnp.asarray(np.where(mask, rewards, 7.0)), jnp.asarray(mask)))
  for i, c in enumerate(counts):
    r = rewards[i, :c].astype(np.float64)
    if name == 'grpo':
      want = (r - r.mean()) / (r.std(ddof=1) + 1e-6)  # Sample std.
    elif name == 'dr_grpo':
      want = r - r.mean()
    else:
      want = r - (r.sum() - r) / (c - 1)
    np.testing.assert_allclose(got[i, :c], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[i, c:], 0.0)


def test_collected_is_a_plain_dataclass():
  assert dataclasses.is_dataclass(ctl.Collected)
  assert est.ESTIMATORS == ('beta', 'vade', 'count', 'spo')


def test_dots_remember_keeps_the_newest_distinct_prompts():
  dots = sel.DotsState(jnp.zeros((1, 1)), jnp.array([5, 3, -1, -1, -1],
                                                    jnp.int32), jnp.zeros(5))
  dots = dots_lib.remember(dots, np.array([7, 3, 7]))
  np.testing.assert_array_equal(dots.ref_ids, [3, 7, 5, -1, -1])
  dots = dots_lib.remember(dots, np.array([1, 2, 4]))
  np.testing.assert_array_equal(dots.ref_ids, [1, 2, 4, 3, 7])


def test_dots_explore_reaches_the_selector():
  # Half of each batch is uniform: about half of DOTS' share (the middle
  # third) plus a third of the explored half lands in the middle.
  cur = _curriculum(selector='dots', dots=dict(
      refs='history', similarity='cosine', history_refs=16, explore=0.5))
  state = cur.init(params={})
  picked = []
  for step in range(12):
    got, state, _ = _collect(cur, state, step)
    picked.append(np.asarray(got.ids))
  late = np.concatenate(picked[4:])
  assert 0.45 < np.mean(late % 3 == 2) < 0.85


# ridge: with 16 references, most of them the middle third once it is
# preferred, lambda = 1 shrinks the few extreme ones halfway to 0.5 (about
# 0.8 of the picks are the middle third then); 0.1 fits them.
@pytest.mark.parametrize('readout', [{}, {'readout': 'ridge', 'ridge': 0.1},
                                      {'readout': 'ridge', 'ridge': 0.1,
                                       'ref_halflife': 16.0}],
                         ids=['attention', 'ridge', 'ridge_recent'])
def test_dots_history_spends_no_reference_rollouts_and_avoids_all_equal(
    readout):
  cur = _curriculum(selector='dots', dots=dict(
      refs='history', similarity='cosine', history_refs=16, **readout))
  state = cur.init(params={})
  picked, predicted = [], []
  for step in range(16):
    got, state, m = _collect(cur, state, step)
    assert m['curriculum/rollouts'] == B * G
    picked.append(np.asarray(got.ids))
    predicted.append(m['curriculum/dots_pred_mean'])
  refs = np.asarray(state.dots.ref_ids)
  assert np.all(refs >= 0) and len(set(refs.tolist())) == 16
  # The embedding (id mod 3) tells the P_TRUE = 0.5 third apart: after a
  # few steps nearly every selected prompt is one of them (a third under
  # uniform selection).
  late = np.concatenate(picked[4:])
  assert np.mean(late % 3 == 2) > 0.9
  # What DOTS predicted for its picks: the middle third's 0.5 (the first
  # step, with no references, predicts 0.5 everywhere).
  assert predicted[0] == 0.5
  assert abs(np.mean(predicted[4:]) - 0.5) < 0.15
  # The selector's prediction is the DOTS module's, with the configured
  # readout and half-life.
  halflife = readout.get('ref_halflife', 0.0)
  want = dots_lib.dots_history_predict(
      state, cur.cfg.dots.cosine_scale, prior=cur.cfg.dots.prior,
      ridge=readout.get('ridge'), halflife=halflife)
  np.testing.assert_allclose(cur.selector.predict(state), want, rtol=1e-4)
  if halflife:
    flat = dots_lib.dots_history_predict(
        state, cur.cfg.dots.cosine_scale, prior=cur.cfg.dots.prior,
        ridge=readout['ridge'])
    assert not np.allclose(want, flat)
