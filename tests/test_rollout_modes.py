"""rollout.mode in the trainer: static, continuous, APRIL and tree rollouts."""

import dataclasses
import os
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rlx import config as config_lib
from rlx import testing
from rlx import trainer
from rlx.actor import Actor
from rlx.curriculum.controller import Curriculum, epoch_order
from rlx.logbook import read_metrics
from rlx import policy as policy_lib
from rlx import rollouts
from rlx.curriculum import controller
from rlx.rollouts import tree as tree_mode
from rlx.types import FinishReason

_NONDETERMINISTIC = ('time/',)
_RUNNING = int(FinishReason.RUNNING)


def _dict(base, **overrides):
  c = testing.tiny_config_dict(str(base))
  # Long enough that rewards vary within groups (the policy learns).
  c.warmstart.num_steps, c.warmstart.batch_size = 200, 32
  c.rl.num_steps, c.eval.every = 3, 10  # Evaluations at 0 and the end.
  c.log.memory_stats = False
  for key, value in overrides.items():
    *groups, name = key.split('.')
    node = c
    for g in groups:
      node = node[g]
    node[name] = value
  return c


def _cfg(base, **overrides):
  return config_lib.build(_dict(base, **overrides))


def _frozen(cfg):
  """`cfg` with a zero learning rate (which validation refuses: here it
  freezes the weights on purpose)."""
  return dataclasses.replace(cfg, optim=dataclasses.replace(
      cfg.optim, learning_rate=0.0))


def _run(base, name, *, frozen=False, **overrides):
  """Trains in base/name (`frozen`: learning rate 0); returns (result,
  training rows, all rows)."""
  workdir = os.path.join(str(base), name)
  cfg = _cfg(base, **overrides)
  result = trainer.train(_frozen(cfg) if frozen else cfg, workdir)
  rows = read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  return result, [r for r in rows if 'reward/mean' in r], rows


def _comparable(rows):
  return [{k: v for k, v in r.items() if not k.startswith(_NONDETERMINISTIC)}
          for r in rows]


@pytest.fixture(scope='module')
def base(tmp_path_factory):
  """A directory whose dataset and warm start every test here shares."""
  return tmp_path_factory.mktemp('modes')


# --------------------------------------------------------------- config


@pytest.mark.parametrize('overrides,key', [
    ({'rollout.mode': 'bulk'}, 'rollout.mode'),
    ({'rollout.engine.num_slots': -1}, 'rollout.engine.num_slots'),
    ({'rollout.engine.num_slots': 8, 'rollout.engine.insert_rows': 9},
     'rollout.engine.insert_rows'),
    ({'rollout.engine.prefill_prompts': -1},
     'rollout.engine.prefill_prompts'),
    ({'rollout.april.off_policy': 'drop'}, 'rollout.april.off_policy'),
    ({'rollout.mode': 'april', 'rollout.april.resume': 'stale'},
     'rollout.april.resume'),
    ({'rollout.mode': 'continuous', 'rollout.april.resume': 'keep_kv'},
     'rollout.april.resume'),
    ({'rollout.mode': 'april', 'rollout.overlap': True,
      'rollout.april.off_policy': 'mask'}, 'rollout.april.off_policy'),
    ({'rollout.mode': 'april', 'curriculum.selector': 'vade'},
     'curriculum.selector'),
    ({'rollout.mode': 'april', 'curriculum.allocator': 'dars'},
     'curriculum.allocator'),
    ({'rollout.mode': 'april', 'curriculum.filter': 'dapo'},
     'curriculum.filter'),
    ({'rollout.mode': 'april', 'rollout.april.inflight_groups': 8},
     'rollout.april.inflight_groups'),
    # N' = B: an empty partial buffer, which a checkpoint cannot hold.
    ({'rollout.mode': 'april', 'rollout.april.inflight_groups': 16},
     'rollout.april.inflight_groups'),
    ({'rollout.mode': 'april', 'objective.correction': 'tis'},
     'rl.recompute_old_logp'),
    ({'rollout.mode': 'april', 'objective.loss': 'decoupled'},
     'rl.recompute_old_logp'),
    ({'objective.correction': 'icepop'}, 'rl.recompute_old_logp'),
    ({'rollout.overlap': True, 'objective.loss': 'decoupled'},
     'rl.recompute_old_logp'),
    ({'rollout.mode': 'april', 'rollout.april.off_policy': 'mask',
      'objective.correction': 'tis'}, 'rl.recompute_old_logp'),
    ({'objective.advantage': 'tree'}, 'objective.advantage'),
    ({'objective.advantage': 'treerl', 'rollout.mode': 'continuous'},
     'objective.advantage'),
    ({'rollout.mode': 'tree', 'curriculum.allocator': 'cures'},
     'curriculum.allocator'),
    ({'rollout.mode': 'tree', 'rollout.tree.kind': 'beam'},
     'rollout.tree.kind'),
    ({'rollout.mode': 'tree', 'rollout.tree.treepo.segment_len': 0},
     'rollout.tree.treepo.segment_len'),
    ({'rollout.mode': 'tree', 'rollout.tree.latr.mix_end': 1.5},
     'rollout.tree.latr.mix_end'),
    ({'rollout.mode': 'tree', 'rollout.tree.latr.lookahead': ()},
     'rollout.tree.latr.lookahead'),
    ({'rollout.mode': 'tree', 'rollout.tree.kind': 'eptree',
      'rollout.tree.eptree.num_chains': 9}, 'rl.group_size'),
    ({'rollout.mode': 'tree', 'rollout.tree.kind': 'eptree',
      'curriculum.selector': 'dots', 'curriculum.dots.ref_samples': 1},
     'curriculum.dots.ref_samples'),
    ({'rollout.tree.unknown': 1}, 'rollout.tree.unknown'),
    ({'rollout.mode': 'tree', 'rollout.tree.treepo.stop_on_answer': True},
     'rollout.tree.treepo.stop_on_answer'),  # chain_arith: nothing to cut.
    ({'rollout.mode': 'tree', 'rollout.tree.eptree.fork_distinct': True},
     'rollout.tree.eptree.fork_distinct'),  # treepo: forks at a path's end.
])
def test_config_errors_name_the_key(overrides, key):
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.build(_plain(**overrides))
  assert key in str(err.value)


def _plain(**overrides) -> dict:
  """The default config as a dict with dotted overrides (unknown keys
  included)."""
  c = config_lib.default_config_dict().to_dict()
  for k, v in overrides.items():
    *groups, name = k.split('.')
    node = c
    for g in groups:
      node = node[g]
    node[name] = v
  return c


@pytest.mark.parametrize('overrides', [
    {'rollout.mode': 'april', 'rollout.april.off_policy': 'mask'},
    {'rollout.mode': 'april', 'rollout.april.resume': 'keep_kv'},
    {'rollout.mode': 'april', 'objective.correction': 'tis',
     'rl.recompute_old_logp': True, 'rollout.april.inflight_groups': 20},
    {'rollout.mode': 'tree', 'objective.advantage': 'tree',
     'curriculum.selector': 'vade', 'curriculum.filter': 'dapo'},
    {'rollout.mode': 'tree', 'objective.advantage': 'treerl',
     'rollout.tree.kind': 'eptree'},
    {'rollout.mode': 'tree', 'rollout.tree.kind': 'latr',
     'rollout.tree.latr.mix_end': 0.0,
     'rollout.tree.latr.mix_anneal_steps': 10},
    {'rollout.mode': 'continuous', 'curriculum.allocator': 'dars'},
])
def test_supported_combinations_build(overrides):
  config_lib.build(_plain(**overrides))


def test_resumed_tuple_fields_are_not_a_config_change():
  saved = {'rollout': {'tree': {'lookahead': [6, 12]}}}
  assert not config_lib.diff(saved, {'rollout': {'tree': {
      'lookahead': (6, 12)}}})
  assert config_lib.diff(saved, {'rollout': {'tree': {'lookahead': (6,)}}})


# ------------------------------------------------------------ plumbing


def test_latr_mix_anneals_linearly_then_holds(tmp_path):
  cfg = _cfg(tmp_path, **{'rollout.mode': 'tree', 'rollout.tree.kind': 'latr',
                          'rollout.tree.latr.mix': 1.0,
                          'rollout.tree.latr.mix_end': 0.25,
                          'rollout.tree.latr.mix_anneal_steps': 3})
  np.testing.assert_allclose([tree_mode.latr_mix(cfg, s) for s in range(6)],
                             [1.0, 0.75, 0.5, 0.25, 0.25, 0.25])


def test_april_data_order_continues_the_uniform_epoch_order():
  # APRIL admits 2B prompts, then B per step, along the same permutation.
  got = np.concatenate([controller.data_order(3, 0, 8, 50),
                        controller.data_order(3, 8, 4, 50)])
  want = np.concatenate([epoch_order(3, s, 4, 50) for s in range(3)])
  np.testing.assert_array_equal(got, want)
  # Across an epoch boundary (50 prompts): each prompt once per epoch.
  np.testing.assert_array_equal(np.sort(controller.data_order(3, 0, 50, 50)),
                                np.arange(50))


def test_curriculum_drops_unused_tree_slots_and_carries_path_ids():
  """Non-leaf slots (RUNNING) are no responses; path ids follow the kept
  rows into Collected.extras, -1 where a group has no response."""
  cur = Curriculum(config_lib.CurriculumConfig(),
                   config_lib.RLConfig(batch_prompts=2, group_size=4), 10)
  t = 6

  def rollout_fn(params, rows, key, n):
    del params, key
    r = len(rows)
    lengths = np.tile(np.arange(1, n + 1), (r, 1)).astype(np.int32)
    finish = np.ones((r, n), np.int32)
    finish[0, 1] = _RUNNING  # Prompt 0's slot 1 holds no leaf.
    lengths[0, 1] = 0
    mask = np.arange(t) < lengths[..., None]
    path = np.arange(r * n * n, dtype=np.int32).reshape(r, n, n)
    ro = tree_mode.TreeRows(
        tokens=np.where(mask, 7, 0).astype(np.int32), loss_mask=mask,
        logp=np.where(mask, -1.0, 0.0).astype(np.float32),
        entropy=np.zeros((r, n, t), np.float32), lengths=lengths,
        finish=finish, path_ids=path, depth_start=path + 100)
    rewards = np.tile([1.0, 0.0, 1.0, 0.0], (r, 1)).astype(np.float32)
    return ro, rewards

  got, _, metrics = cur.collect(cur.init(), None, jax.random.key(0),
                                rollout_fn, 0)
  np.testing.assert_array_equal(got.counts, [3, 4])
  np.testing.assert_array_equal(got.group_mask, [[1, 1, 1, 0], [1, 1, 1, 1]])
  # Prompt 0 keeps slots 0, 2, 3 (lengths 1, 3, 4), in order.
  np.testing.assert_array_equal(got.lengths[0], [1, 3, 4, 0])
  np.testing.assert_array_equal(got.rewards[0], [1, 1, 0, 0])
  path = got.extras['path_ids']
  np.testing.assert_array_equal(path[0, :3], np.arange(16).reshape(4, 4)[
      [0, 2, 3]])
  np.testing.assert_array_equal(path[0, 3], -1)
  np.testing.assert_array_equal(path[1], np.arange(16, 32).reshape(4, 4))
  np.testing.assert_array_equal(got.extras['depth_start'][1], path[1] + 100)
  assert metrics['curriculum/rollouts'] == 8  # Slots asked for.


# -------------------------------------------------------- static / continuous


def test_greedy_continuous_equals_static_and_writes_slot_metrics(base):
  """top_k = 1 (greedy): both modes sample the same tokens, so every
  step's rewards, lengths and losses agree."""
  greedy = {'sampling.top_k': 1}
  _, static, _ = _run(base, 'static', **greedy)
  _, cont, _ = _run(base, 'continuous', **{'rollout.mode': 'continuous',
                                           **greedy})
  assert [r['step'] for r in cont] == [1, 2, 3]
  for a, b in zip(static, cont):
    for key in ('reward/mean', 'response/len_mean', 'response/len_max',
                'response/truncated_frac', 'tokens/decoded_total',
                'rollouts/total'):
      assert a[key] == b[key], (key, a['step'])
    np.testing.assert_allclose(b['learner/loss'], a['learner/loss'],
                               atol=1e-6)
    # Static: B * G rows for as many steps as the longest response.
    assert 0 < a['rollout/slot_utilisation'] <= 1
    assert 0 < b['rollout/slot_utilisation'] <= 1
    # 16 responses, 8 slots, one row per insert: 16 inserts.
    assert b['rollout/insert_calls'] == 16
    assert b['rollout/decode_calls'] >= 2
  assert any(r['reward/mean'] > 0 for r in static)


# ---------------------------------------------------------------- APRIL


@pytest.mark.parametrize('resume', ['prefill', 'keep_kv'])
def test_april_step_bookkeeping(base, resume):
  """Three APRIL steps with the warm start: prompts admitted once, groups
  returned once, off-policy tokens masked in 'mask' mode, decoded tokens
  counted; with keep_kv the responses decoding at a stop go on in their
  slots at the next step."""
  cfg = _cfg(base, **{'rollout.mode': 'april',
                      'rollout.april.off_policy': 'mask',
                      'rollout.april.resume': resume})
  task, model, params = policy_lib.warm_started_policy(cfg)
  cur = Curriculum(cfg.curriculum, cfg.rl, len(task.train), seed=cfg.seed)
  actor = Actor(model, task, cfg.sampling.max_new_tokens)
  mode_cls = rollouts.MODES.get('april')
  ro = mode_cls(cfg, model=model, task=task, curriculum=cur, actor=actor)
  b, g = cfg.rl.batch_prompts, cfg.rl.group_size
  both = rollouts.RolloutState(cur.init(), mode_cls.init_state(cfg, task))
  returned, off, before, partial_rows = [], 0, 0, 0
  for step in range(3):
    got, both, m = ro.collect(params, both, rollouts.Request(
        step=step, key=jax.random.key(step), version=step))
    state = both.mode
    assert int(state['cursor']) == 2 * b + step * b
    assert int(state['buffer'].count) == b  # N' - N groups carried.
    version = got.extras['version']
    full = np.arange(got.tokens.shape[-1]) < got.lengths[..., None]
    np.testing.assert_array_equal(got.loss_mask, full & (version == step))
    assert m['rollout/no_loss_group_frac'] == np.mean(
        ~(full & (version == step)).any(axis=(1, 2)))
    np.testing.assert_array_equal(version >= 0, full)
    off += int(np.sum(full & (version < step)))
    assert m['curriculum/zero_var_frac'] == np.mean(np.ptp(got.rewards, 1)
                                                    == 0)
    assert m['rollout/off_policy_token_frac'] == pytest.approx(
        np.sum(full & (version < step)) / full.sum())
    assert np.all(got.finish != _RUNNING)
    held = state['buffer'].groups.tracks
    after = held.length[:b].sum()
    assert got.decoded_tokens == got.lengths.sum() + after - before
    if resume == 'prefill':  # Sampled now = stamped now.
      assert got.decoded_tokens == np.sum(version == step) + np.sum(
          held.version[:b] == step)
    else:  # Every partial response went on in its slot.
      assert m['rollout/kept_kv_rows'] == partial_rows
    partial_rows = np.sum((held.length[:b] > 0) &
                          (held.finish[:b] == _RUNNING))
    before = after
    # Rewards are the verifier's on the returned tokens.
    texts = [task.tokenizer.decode(x) for grp in got.tokens for x in grp]
    answers = [task.train.answers[i] for i in got.ids for _ in range(g)]
    np.testing.assert_array_equal(
        got.rewards, task.reward_fn(texts, answers).reshape(b, g))
    np.testing.assert_array_equal(got.prompt,
                                  task.train_prompts[got.ids])
    returned += got.ids.tolist()
  assert off > 0  # Resumed responses kept their earlier tokens.
  admitted = controller.data_order(cfg.seed, 0, 4 * b, len(task.train))
  held_ids = state['buffer'].groups.prompt_id[:b].tolist()
  # Every admitted prompt is either returned once or still held.
  assert sorted(returned + held_ids) == sorted(admitted.tolist())


def _partial_of(workdir, step):
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    return ocp.PyTreeCheckpointer().restore(path)['partial']


def test_april_kill_and_resume_equals_uninterrupted(base):
  """keep + TIS on recomputed old log-probs; the partial buffer and data
  cursor survive a kill after step 2."""
  over = {'rollout.mode': 'april', 'objective.correction': 'tis',
          'rl.recompute_old_logp': True,
          'optim.warmup_steps': 0}  # Full steps: visible weight changes.
  full, rows, all_rows = _run(base, 'april_full', **over)
  workdir = os.path.join(str(base), 'april_killed')
  trainer.train(_cfg(base, **over), workdir, stop_after=2)
  saved = _partial_of(workdir, 2)
  assert int(saved['buffer']['count']) == 4
  tracks = saved['buffer']['groups']['tracks']
  # Partial responses (RUNNING, some tokens) wait in the checkpoint.
  assert np.any((tracks['finish'] == _RUNNING) & (tracks['length'] > 0))
  resumed = trainer.train(_cfg(base, **over), workdir)
  jax.tree.map(np.testing.assert_array_equal, resumed['params'],
               full['params'])
  got_rows = read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  assert _comparable(got_rows) == _comparable(all_rows)
  jax.tree.map(np.testing.assert_array_equal, _partial_of(workdir, 3),
               _partial_of(os.path.join(str(base), 'april_full'), 3))
  for r in rows:
    hist = [r[f'rollout/staleness/{k}'] for k in ('0', '1', '2', '3+')]
    assert sum(hist) == pytest.approx(1.0)
    assert r['rollout/off_policy_token_frac'] == pytest.approx(sum(hist[1:]))
    assert 0.5 < r['rollout/slot_utilisation'] <= 1
    assert r['rollout/buffer_groups'] == 4
  # Step 1 is all on-policy: pi_old (recomputed) = mu up to round-off.
  assert rows[0]['rollout/off_policy_token_frac'] == 0
  assert rows[0]['learner/correction/weight_mean'] == pytest.approx(
      1.0, abs=1e-6)
  later = [r for r in rows[1:] if r['rollout/off_policy_token_frac'] > 0]
  assert later
  # Stale tokens meet updated weights: TIS weights pi_old / mu != 1.
  assert any(abs(r['learner/correction/weight_mean'] - 1) > 1e-4
             for r in later)
  assert [r['rollouts/total'] for r in rows] == [16, 32, 48]


# ------------------------------------------------ overlap (one-step async)


_TIME_OR_OVERLAP = ('time/', 'rollout/policy_lag')


def test_overlap_with_frozen_weights_equals_sync(base):
  """With a zero learning rate the weights never change, so sampling the
  next step during this one's update must give exactly the sync run:
  same batches, curriculum state flow and keys."""
  over = {'curriculum.selector': 'vade'}
  _, sync_rows, _ = _run(base, 'frozen_sync', frozen=True, **over)
  _, rows, _ = _run(base, 'frozen_overlap', frozen=True, **over,
                    **{'rollout.overlap': True})
  strip = lambda rs: [{k: v for k, v in r.items()
                       if not k.startswith(_TIME_OR_OVERLAP)} for r in rs]
  assert strip(rows) == strip(sync_rows)
  assert [r['rollout/policy_lag'] for r in rows] == [0, 1, 1]
  assert all(r['time/rollout_busy_s'] > 0 for r in rows)


def test_overlap_kill_and_resume_equals_uninterrupted(base):
  """Static sampler, TIS on recomputed old log-probs: each batch after the
  first is sampled by the weights before the previous update (TIS weights
  move off 1), and a run killed after step 2 resumes from the checkpointed
  sampler weights to exactly the uninterrupted result."""
  over = {'rollout.overlap': True, 'objective.correction': 'tis',
          'rl.recompute_old_logp': True, 'optim.warmup_steps': 0}
  full, rows, all_rows = _run(base, 'overlap_full', **over)
  workdir = os.path.join(str(base), 'overlap_killed')
  trainer.train(_cfg(base, **over), workdir, stop_after=2)
  resumed = trainer.train(_cfg(base, **over), workdir)
  jax.tree.map(np.testing.assert_array_equal, resumed['params'],
               full['params'])
  got_rows = read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  assert _comparable(got_rows) == _comparable(all_rows)
  assert [r['rollout/policy_lag'] for r in rows] == [0, 1, 1]
  # Step 1 is sampled by the weights it trains: pi_old = mu.
  assert rows[0]['learner/correction/weight_mean'] == pytest.approx(
      1.0, abs=1e-6)
  # A batch sampled before an update that moved the weights (a non-zero
  # gradient at the step before) meets them: TIS weights pi_old / mu != 1.
  moved = [r for prev, r in zip(rows, rows[1:])
           if prev['learner/grad_norm'] > 0]
  assert moved and all(
      abs(r['learner/correction/weight_mean'] - 1) > 1e-4 for r in moved)


def test_overlap_april_tokens_are_one_version_stale(base):
  over = {'rollout.mode': 'april', 'rollout.overlap': True,
          'rollout.april.resume': 'keep_kv'}
  _, rows, _ = _run(base, 'overlap_april', **over)
  assert rows[0]['rollout/staleness/0'] > 0  # Step 1: the current weights.
  for r in rows[1:]:  # Later: every token at least one version old.
    assert r['rollout/staleness/0'] == 0
    assert r['rollout/off_policy_token_frac'] == pytest.approx(1.0)
  assert [r['rollouts/total'] for r in rows] == [16, 32, 48]


def test_overlap_needs_one_device(base):
  cfg = _cfg(base, **{'rollout.overlap': True, 'mesh.shape': (2, 1, 1)})
  with pytest.raises(config_lib.ConfigError, match='rollout.overlap: needs '
                     'a one-device mesh'):
    trainer.train(cfg, os.path.join(str(base), 'overlap_mesh'))


# ----------------------------------------------------------------- trees


def test_tree_mode_trains_with_the_tree_advantage(base):
  result, rows, _ = _run(base, 'tree', **{'rollout.mode': 'tree',
                                          'objective.advantage': 'tree'})
  cfg = _cfg(base)
  _, _, warm = policy_lib.warm_started_policy(cfg)
  changed = jax.tree.leaves(jax.tree.map(
      lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
      result['params'], warm))
  assert all(changed)
  assert any(r['learner/grad_norm'] > 0 for r in rows)
  decoded = np.diff([0] + [r['tokens/decoded_total'] for r in rows])
  for r, d in zip(rows, decoded):
    assert r['tree/decoded_tokens'] == d
    assert r['tree/leaves_per_prompt'] == 4  # W = G, fallback fills it.
    # Shared prefixes are decoded once: fewer tokens than the leaves hold.
    assert r['tree/decoded_tokens_per_leaf'] < r['tree/leaf_tokens_per_leaf']
    assert r['tree/leaf_tokens_per_leaf'] == pytest.approx(
        r['response/len_mean'])
    assert 0 < r['tree/shared_prefix_frac'] < 1
    assert r['tree/depth_max'] >= 1
    assert 1 <= r['tree/distinct_answers'] <= 4


def test_eptree_mode_trains_with_the_treerl_advantage(base):
  """Token-level TreeRL advantages from EPTree's entropy forks; on a mesh
  of 2 devices (the tree samples on one) with the ahead-of-time memory
  report, which compiles the step with the tree's Batch fields."""
  over = {'rollout.mode': 'tree', 'objective.advantage': 'treerl',
          'rollout.tree.kind': 'eptree',
          'rollout.tree.eptree.num_chains': 2,
          'rollout.tree.eptree.fork_points': 1,
          'rollout.tree.eptree.fork_branches': 1,
          'rl.num_steps': 2, 'mesh.shape': (2, 1, 1),
          'log.memory_stats': True}
  _, rows, _ = _run(base, 'eptree', **over)
  assert [r['step'] for r in rows] == [1, 2]
  assert any(r['learner/adv/std'] > 0 for r in rows)
  for r in rows:
    assert r['tree/leaves_per_prompt'] == 4  # M (1 + L N T) = 4.
    assert r['tree/forks'] == 2 * 4  # N T per chain, B prompts.
