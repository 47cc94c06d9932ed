"""Recipes build to the documented objectives; the KL reference path runs."""

import glob
import importlib
import math
import os

import pytest

from rlx import config as config_lib
from rlx import testing
from rlx import trainer
from rlx.logbook import read_metrics

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(os.path.basename(p)[:-3]
                 for p in glob.glob(os.path.join(_ROOT, 'configs', '*.py'))
                 if not p.endswith(('common.py', '__init__.py')))

# What each recipe must set (the paper's defining choices).
EXPECTED = {
    'grpo': dict(advantage='grpo', loss='ppo_clip'),
    'dr_grpo': dict(advantage='dr_grpo',
                    aggregation='seq-mean-token-sum-norm'),
    'dapo': dict(loss='dapo', clip_eps=0.2, clip_eps_high=0.28,
                 aggregation='token-mean', kl_beta=0.0, overlong_buffer=4),
    'gspo': dict(loss='gspo', aggregation='seq-mean-token-mean'),
    'gppo': dict(loss='gppo', clip_eps_high=0.28),
    'cispo': dict(loss='cispo', clip_eps_high=0.28),
    'mc_grpo': {'advantage': 'mc_grpo', 'mc_grpo.scale': 'none'},
    'rloo': dict(advantage='rloo'),
    'reinforce_pp': dict(advantage='reinforce_pp'),
    'grpo_hardmix': dict(advantage='grpo', loss='ppo_clip'),
    'grpo_eptree': dict(advantage='grpo', loss='ppo_clip'),
    'grpo_math_lora': dict(advantage='grpo', loss='ppo_clip', kl_beta=0.0,
                           aggregation='token-mean'),
}


def test_every_recipe_is_listed():
  assert set(RECIPES) == set(EXPECTED)


@pytest.mark.parametrize('recipe', RECIPES)
def test_recipe_builds_with_its_objective(recipe):
  cfg = config_lib.build(
      importlib.import_module(f'rlx.configs.{recipe}').get_config())
  for key, value in EXPECTED[recipe].items():
    section = cfg.objective
    for part in key.split('.'):
      section = getattr(section, part)
    assert section == value, (recipe, key)
  if recipe == 'mc_grpo':
    assert cfg.rl.group_size == 5  # G + 1 with the pivot.
  if recipe == 'grpo_hardmix':  # Short demos, long chains unseen.
    assert (cfg.task.max_steps, cfg.task.zipf_s) == (12, 0.0)
    assert (cfg.warmstart.max_steps, cfg.warmstart.demo_error_rate) == (4,
                                                                       0.1)
  if recipe == 'grpo_eptree':  # The tree of the issue-6 benchmark.
    tree = cfg.rollout.tree
    assert (cfg.rollout.mode, tree.kind, tree.eptree.fork_distinct) == (
        'tree', 'eptree', True)
    assert (tree.eptree.num_chains, tree.eptree.fork_points,
            tree.eptree.fork_branches, tree.eptree.rounds,
            cfg.rl.group_size) == (2, 1, 3, 1, 8)
  if recipe == 'grpo_math_lora':  # A real model on math files, adapters.
    assert cfg.task.name == 'math_files' and cfg.lora.rank > 0
    assert (cfg.rl.group_size, cfg.sampling.max_new_tokens) == (8, 1024)
    assert cfg.optim.logits_chunk == 2048  # 151936-token vocabularies.
    assert cfg.backend.attention_chunk == 512


def test_math_lora_recipe_names_its_placeholder_model_dir(tmp_path):
  cfg = config_lib.build(
      importlib.import_module('configs.grpo_math_lora').get_config())
  with pytest.raises(config_lib.ConfigError,
                     match=f'model.hf_dir: {cfg.model.hf_dir}: no such'):
    trainer.train(cfg, str(tmp_path / 'run'))


def test_tree_advantages_need_tree_rollouts():
  c = config_lib.default_config_dict()
  c.objective.advantage = 'tree'
  with pytest.raises(config_lib.ConfigError, match='path_ids'):
    config_lib.build(c)


def test_kl_reference_with_minibatches_and_tis(tmp_path):
  # The reference must not share (donated) buffers with the train state.
  c = testing.tiny_config_dict(str(tmp_path))
  c.rl.num_steps, c.eval.every = 2, 2
  c.rl.num_minibatches = 2
  c.objective.kl_beta = 0.1
  c.objective.correction = 'tis'
  c.rl.recompute_old_logp = True
  trainer.train(config_lib.build(c), str(tmp_path / 'run'))
  rows = [r for r in read_metrics(str(tmp_path / 'run' / 'metrics.jsonl'))
          if 'reward/mean' in r]
  kl = [r['learner/kl_ref'] for r in rows]
  assert all(math.isfinite(k) and k >= 0 for k in kl)
  assert kl[-1] > 0  # Params have moved away from the reference.
  assert all(r['learner/correction/weight_mean'] > 0 for r in rows)
