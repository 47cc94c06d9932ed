"""Config: defaults, unknown keys, types, impossible combinations, the CLI."""

import dataclasses
import os
import subprocess
import sys
import time

import ml_collections
import pytest

from configs import grpo
from rlx import config as config_lib
from rlx import objectives
from rlx.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dict(**overrides):
  """The default config as a plain nested dict with `group.key` overrides."""
  d = config_lib.default_config_dict().to_dict()
  for key, value in overrides.items():
    group, field = key.split('.')
    d[group][field] = value
  return d


# A valid math_files + Hugging Face model config (files are read later).
MATH = {'task.name': 'math_files', 'model.hf_dir': '/models/qwen',
        'task.train_files': 'train.jsonl', 'warmstart.num_steps': 0}


def _error(**overrides) -> str:
  with pytest.raises(ConfigError) as e:
    config_lib.build(_dict(**overrides))
  return str(e.value)


def test_default_recipe_builds_to_dataclass_defaults():
  cfg = config_lib.build(grpo.get_config())
  assert isinstance(cfg, config_lib.Config)
  assert cfg == config_lib.Config()
  assert config_lib.to_dict(cfg) == dataclasses.asdict(config_lib.Config())
  assert cfg.objective.advantage == 'grpo'
  assert cfg.objective.loss == 'ppo_clip'
  # Built configs are frozen.
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.rl.batch_prompts = 3  # pytype: disable=not-writable


def test_partial_dict_fills_defaults():
  cfg = config_lib.build({'rl': {'batch_prompts': 8}, 'seed': 3})
  assert cfg.rl.batch_prompts == 8 and cfg.seed == 3
  assert cfg.rl.group_size == config_lib.RLConfig().group_size
  assert cfg.model == config_lib.ModelConfig()


def test_unknown_key_in_group():
  c = grpo.get_config()
  c.rl.unknown_knob = 1
  with pytest.raises(ConfigError) as e:
    config_lib.build(c)
  msg = str(e.value)
  assert 'rl.unknown_knob' in msg
  assert 'batch_prompts' in msg  # Lists the known keys of the group.


def test_unknown_top_level_group():
  c = grpo.get_config()
  c.mystery = ml_collections.ConfigDict({'a': 1})
  with pytest.raises(ConfigError, match='mystery'):
    config_lib.build(c)
  d = _dict()
  d['not_a_field'] = 1
  with pytest.raises(ConfigError, match='not_a_field'):
    config_lib.build(d)


def test_scalar_where_group_expected():
  d = _dict()
  d['rl'] = 3
  with pytest.raises(ConfigError, match='rl'):
    config_lib.build(d)


@pytest.mark.parametrize('key,value', [
    ('rl.batch_prompts', 'many'),
    ('rl.batch_prompts', 4.0),
    ('rl.batch_prompts', True),
    ('sampling.temperature', 'hot'),
    ('optim.learning_rate', True),
    ('rl.recompute_old_logp', 1),
    ('objective.loss', 3),
])
def test_wrong_type_names_key(key, value):
  assert key in _error(**{key: value})


def test_int_for_float_is_converted():
  cfg = config_lib.build(_dict(**{'optim.learning_rate': 1,
                                  'sampling.temperature': 2}))
  assert cfg.optim.learning_rate == 1.0
  assert isinstance(cfg.optim.learning_rate, float)
  assert isinstance(cfg.sampling.temperature, float)


def test_override_parses_strings_by_field_type():
  c = config_lib.default_config_dict()
  config_lib.override(c, 'optim.packing', 'false')
  config_lib.override(c, 'rollout.num_slots', '32')
  config_lib.override(c, 'optim.learning_rate', '1e-3')
  config_lib.override(c, 'mesh.shape', '(2, 2, 2)')
  config_lib.override(c, 'objective.loss', 'cispo')
  cfg = config_lib.build(c)
  assert cfg.optim.packing is False and cfg.rollout.num_slots == 32
  assert cfg.optim.learning_rate == 1e-3 and cfg.mesh.shape == (2, 2, 2)
  assert cfg.objective.loss == 'cispo'
  with pytest.raises(ConfigError, match="rl.group_size: cannot read 'x8'"):
    config_lib.override(c, 'rl.group_size', 'x8')
  config_lib.apply_overrides(c, ['rl.group_size=4', 'eval.every=3'])
  assert c.rl.group_size == 4 and c.eval.every == 3
  with pytest.raises(ConfigError, match="'rl.group_size' is not key=value"):
    config_lib.apply_overrides(c, ['rl.group_size'])


@pytest.mark.parametrize('overrides,key', [
    ({'rl.batch_prompts': 6, 'optim.num_microbatches': 4},
     'optim.num_microbatches'),
    # Micro-batches split a minibatch: 8 / 2 = 4 prompts, not divisible by 8.
    ({'rl.batch_prompts': 8, 'rl.num_minibatches': 2,
      'optim.num_microbatches': 8}, 'optim.num_microbatches'),
    ({'optim.num_microbatches': 0}, 'optim.num_microbatches'),
    ({'optim.logits_chunk': -2}, 'optim.logits_chunk'),
    ({'backend.attention_chunk': -1}, 'backend.attention_chunk'),
    ({'rl.batch_prompts': 6, 'rl.num_minibatches': 4}, 'rl.num_minibatches'),
    ({'rl.num_minibatches': 0}, 'rl.num_minibatches'),
    ({'rl.group_size': 1}, 'rl.group_size'),
    ({'rl.batch_prompts': 0}, 'rl.batch_prompts'),
    ({'sampling.temperature': 0.0}, 'sampling.temperature'),
    ({'sampling.temperature': -1.0}, 'sampling.temperature'),
    ({'sampling.top_p': 1.5}, 'sampling.top_p'),
    ({'sampling.top_p': 0.0}, 'sampling.top_p'),
    ({'sampling.top_k': -1}, 'sampling.top_k'),
    ({'eval.num_prompts': 513}, 'eval.num_prompts'),
    ({'task.num_test': 100, 'eval.num_prompts': 101}, 'eval.num_prompts'),
    ({'eval.temperature': 0.0}, 'eval.temperature'),
    ({'objective.kl_estimator': 'k4'}, 'objective.kl_estimator'),
    ({'model.num_heads': 4, 'model.num_kv_heads': 3}, 'model.num_kv_heads'),
    ({'task.name': 'gsm8k'}, 'task.name'),
    ({'curriculum.selector': 'thompson'}, 'curriculum.selector'),
    ({'curriculum.allocator': 'greedy'}, 'curriculum.allocator'),
    ({'curriculum.filter': 'dapo+dapo'}, 'curriculum.filter'),
    ({'curriculum.filter': 'sieve'}, 'curriculum.filter'),
    ({'curriculum.estimator': 'kalman'}, 'curriculum.estimator'),
    ({'curriculum.max_group': 6}, 'curriculum.min_group'),
    ({'curriculum.first_round': 9}, 'curriculum.first_round'),
    ({'curriculum.pool_size': 8}, 'curriculum.pool_size'),
    ({'curriculum.discount': 1.5}, 'curriculum.discount'),
    ({'curriculum.dots_tau': 0.0}, 'curriculum.dots_tau'),
    ({'curriculum.dots_readout': 'mlp'}, 'curriculum.dots_readout'),
    ({'curriculum.dots_readout': 'ridge'}, 'curriculum.dots_readout'),
    ({'curriculum.dots_ridge': 0.0, 'curriculum.dots_readout': 'ridge',
      'curriculum.dots_similarity': 'cosine'}, 'curriculum.dots_ridge'),
    ({'curriculum.dots_explore': 1.5}, 'curriculum.dots_explore'),
    ({'curriculum.dots_ref_halflife': -1.0},
     'curriculum.dots_ref_halflife'),
    ({'curriculum.selector': 'dots', 'curriculum.dots_ref_halflife': 64.0,
      'curriculum.dots_readout': 'ridge',
      'curriculum.dots_similarity': 'cosine'},
     'curriculum.dots_ref_halflife'),
    ({'curriculum.likelihood_candidates': 0},
     'curriculum.likelihood_candidates'),
    ({'curriculum.likelihood_prior': 0.0}, 'curriculum.likelihood_prior'),
    ({'rl.max_rollouts': -1}, 'rl.max_rollouts'),
    ({'warmstart.max_steps': 13}, 'warmstart.max_steps'),
    ({'objective.advantage': 'tree'}, 'objective.advantage'),
] + [(dict(MATH, **extra), key) for extra, key in (
    ({'model.hf_dir': ''}, 'model.hf_dir'),
    ({'task.train_files': ' '}, 'task.train_files'),
    ({'warmstart.num_steps': 600}, 'warmstart.num_steps'),
    ({'model.num_layers': 3}, 'model.num_layers'),
    ({'model.tie_embeddings': False}, 'model.tie_embeddings'),
    ({'task.answer_extract': 'last'}, 'task.answer_extract'),
    ({'task.user_template': 'Solve: {question}'}, 'task.user_template'),
    ({'task.name': 'chain_arith', 'warmstart.num_steps': 600},
     'model.hf_dir'),
    ({'curriculum.selector': 'likelihood'}, 'curriculum.selector'),
    ({'lora.rank': -1}, 'lora.rank'),
    ({'lora.rank': 4, 'lora.alpha': 0.0}, 'lora.alpha'),
    ({'lora.rank': 4, 'lora.targets': ('q', 'wq')}, 'lora.targets'),
)])
def test_impossible_combination_names_key(overrides, key):
  assert key in _error(**overrides)


@pytest.mark.parametrize('overrides', [
    MATH,
    dict(MATH, **{'lora.rank': 8, 'lora.targets': ('q_proj', 'down'),
                  'model.dtype': 'bfloat16', 'task.answer_extract': 'boxed'}),
    {'rl.batch_prompts': 8, 'rl.num_minibatches': 2,
     'optim.num_microbatches': 4},
    {'rl.batch_prompts': 6, 'optim.num_microbatches': 3},
    {'sampling.top_p': 1.0, 'eval.num_prompts': 512},
    {'curriculum.filter': 'skip+dapo', 'curriculum.allocator': 'xrpo',
     'curriculum.selector': 'dots', 'objective.advantage': 'spo'},
])
def test_possible_combination_builds(overrides):
  config_lib.build(_dict(**overrides))


@pytest.mark.parametrize('key,registry', [
    ('objective.advantage', objectives.ADVANTAGES),
    ('objective.loss', objectives.LOSSES),
    ('objective.aggregation', objectives.AGGREGATIONS),
])
def test_unknown_objective_name_lists_known(key, registry):
  msg = _error(**{key: 'nope'})
  assert key in msg
  assert "'nope'" in msg
  for name in registry:
    assert repr(name) in msg


def test_zero_eval_batch_rejected():
  assert 'eval.batch_prompts' in _error(**{'eval.batch_prompts': 0})


def _train(tmp_path, *flags):
  workdir = tmp_path / 'work'
  env = dict(os.environ, PYTHONPATH='.', JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  start = time.time()
  proc = subprocess.run(
      [sys.executable, 'scripts/train.py', '--config=configs/grpo.py',
       *flags, f'--workdir={workdir}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
  elapsed = time.time() - start
  assert elapsed < 20, elapsed
  # Nothing was trained or saved.
  assert not (workdir / 'checkpoints').exists()
  assert not (workdir / 'metrics.jsonl').exists()
  return proc


def test_cli_rejects_unknown_flag(tmp_path):
  proc = _train(tmp_path, '--config.rl.bogus=1')
  assert proc.returncode != 0
  assert 'bogus' in proc.stderr


def test_cli_rejects_a_stray_argument(tmp_path):
  # An override without its --config. prefix is not silently dropped.
  proc = _train(tmp_path, 'rl.num_steps=5')
  assert proc.returncode != 0
  assert "unexpected arguments ['rl.num_steps=5']" in proc.stderr


def test_cli_rejects_impossible_combination(tmp_path):
  proc = _train(tmp_path, '--config.rl.batch_prompts=6',
                '--config.optim.num_microbatches=4')
  assert proc.returncode != 0
  assert 'optim.num_microbatches' in proc.stdout + proc.stderr
  assert 'config error' in proc.stderr


def test_fill_defaults_ignores_fields_added_after_a_checkpoint():
  saved = config_lib.to_dict(config_lib.Config())
  del saved['rollout']  # A checkpoint from before `rollout` existed.
  del saved['model']['hf_dir']
  saved['rl']['num_steps'] = 7
  current = config_lib.to_dict(config_lib.Config())
  assert config_lib.diff(config_lib.fill_defaults(saved), current) == [
      'rl.num_steps']
