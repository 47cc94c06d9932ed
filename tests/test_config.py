"""Config: defaults, unknown keys, types, impossible combinations, the CLI."""

import dataclasses
import os
import subprocess
import sys
import time

import ml_collections
import pytest

from rlx.configs import grpo
from rlx import config as config_lib
from rlx import recipes
from rlx import objectives
from rlx.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dict(**overrides):
  """The default config as a plain nested dict with `group.key` overrides."""
  d = config_lib.default_config_dict().to_dict()
  for key, value in overrides.items():
    *groups, field = key.split('.')
    node = d
    for group in groups:
      node = node[group]
    node[field] = value
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
  assert config_lib.to_dict(cfg) == config_lib.to_dict(config_lib.Config())
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
  recipes.override(c, 'optim.packing', 'false')
  recipes.override(c, 'rollout.engine.num_slots', '32')
  recipes.override(c, 'optim.learning_rate', '1e-3')
  recipes.override(c, 'mesh.shape', '(2, 2, 2)')
  recipes.override(c, 'objective.loss', 'cispo')
  cfg = config_lib.build(c)
  assert cfg.optim.packing is False and cfg.rollout.engine.num_slots == 32
  assert cfg.optim.learning_rate == 1e-3 and cfg.mesh.shape == (2, 2, 2)
  assert cfg.objective.loss == 'cispo'
  with pytest.raises(ConfigError, match="rl.group_size: cannot read 'x8'"):
    recipes.override(c, 'rl.group_size', 'x8')
  recipes.apply_overrides(c, ['rl.group_size=4', 'eval.every=3'])
  assert c.rl.group_size == 4 and c.eval.every == 3
  with pytest.raises(ConfigError, match="'rl.group_size' is not key=value"):
    recipes.apply_overrides(c, ['rl.group_size'])


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
    ({'curriculum.dots.tau': 0.0}, 'curriculum.dots.tau'),
    ({'curriculum.dots.readout': 'mlp'}, 'curriculum.dots.readout'),
    ({'curriculum.dots.readout': 'ridge'}, 'curriculum.dots.readout'),
    ({'curriculum.dots.ridge': 0.0, 'curriculum.dots.readout': 'ridge',
      'curriculum.dots.similarity': 'cosine'}, 'curriculum.dots.ridge'),
    ({'curriculum.dots.explore': 1.5}, 'curriculum.dots.explore'),
    ({'curriculum.dots.ref_halflife': -1.0},
     'curriculum.dots.ref_halflife'),
    ({'curriculum.selector': 'dots', 'curriculum.dots.ref_halflife': 64.0,
      'curriculum.dots.readout': 'ridge',
      'curriculum.dots.similarity': 'cosine'},
     'curriculum.dots.ref_halflife'),
    ({'curriculum.likelihood.candidates': 0},
     'curriculum.likelihood.candidates'),
    ({'curriculum.likelihood.prior': 0.0}, 'curriculum.likelihood.prior'),
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


def test_every_problem_is_reported_at_once_one_line_each():
  """Issue 32: the three mistakes of the LoRA math recipe (and more) in one
  error, each line naming its key."""
  c = grpo.get_config()
  with pytest.raises(ConfigError) as e:
    recipes.build(c, [
        'rl.batch_prompt=4', 'model.dtype=fp16', 'lora.rank=2',
        'lora.targets=q,z', 'optim.learning_rate=nan',
        'rl.num_minibatches=3', 'eval.num_prompts=0', 'rl.num_steps=x'])
  lines = str(e.value).splitlines()
  assert [l.split(':')[0] for l in lines] == [
      'rl.batch_prompt', 'rl.num_steps', 'optim.learning_rate',
      'rl.num_minibatches', 'model.dtype', 'eval.num_prompts', 'lora.targets']
  assert lines[0] == ('rl.batch_prompt: unknown config key; did you mean '
                      'rl.batch_prompts or eval.batch_prompts?')
  assert lines[1] == "rl.num_steps: cannot read 'x' as a int"
  assert lines[2] == 'optim.learning_rate: must be a finite number, got nan'
  assert "unknown ['z']" in lines[6]


@pytest.mark.parametrize('pair,line', [
    ('rl.rollout=april', 'rl.rollout: unknown config key; did you mean '
     'rl.max_rollouts or rollout.mode or rollout.overlap?'),
    ('rl=3', "rl: is a group of fields, not a value; set one of ["),
    ('optim.learning_rate=-1.0', 'optim.learning_rate: must be > 0'),
    ('optim.learning_rate=inf', 'optim.learning_rate: must be a finite '
     'number, got inf'),
    ('optim.b2=1.0', 'optim.b2: 1.0 not in [0, 1)'),
    ('model.param_dtype=half', "model.param_dtype: 'half' is not one of "
     "['float32', 'bfloat16', 'float16']"),
])
def test_override_problems_name_the_key(pair, line):
  with pytest.raises(ConfigError) as e:
    recipes.build(grpo.get_config(), [pair])
  assert str(e.value).startswith(line)


def test_tuple_fields_read_comma_separated_words():
  c = grpo.get_config()
  cfg = recipes.build(c, ['lora.rank=2', 'lora.targets=q,v',
                                       'mesh.shape=1,1,1'])
  assert cfg.lora.targets == ('q', 'v') and cfg.mesh.shape == (1, 1, 1)
  assert recipes.build(c, ['lora.rank=2', 'lora.targets=q']
                       ).lora.targets == ('q',)


def test_a_recipe_is_found_by_path_or_by_name():
  by_path = recipes.load(os.path.join(ROOT, 'configs', 'dapo.py'))
  assert recipes.load('dapo') == by_path
  with pytest.raises(ConfigError, match=r'^--config: configs/grop.py: no '
                     r'such recipe file; did you mean configs/grpo.py'):
    recipes.load('configs/grop.py')
  with pytest.raises(ConfigError, match=r'^--config: grop: no such recipe '
                     r'file; did you mean grpo\?'):
    recipes.load('grop')


def test_a_broken_recipe_is_named(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text('def get_config():\n  return 1 / 0\n')
  with pytest.raises(ConfigError, match=rf'^--config: {bad}: '
                     'ZeroDivisionError: division by zero$'):
    recipes.load(str(bad))
  bad.write_text('x = 1\n')
  with pytest.raises(ConfigError, match='defines no get_config'):
    recipes.load(str(bad))


def test_cli_prints_every_problem_one_line_each_without_a_traceback(
    tmp_path):
  proc = _train(tmp_path, '--config.rl.batch_prompt=4',
                '--config.lora.rank=2', '--config.lora.targets=q,z')
  assert proc.returncode == 1
  assert proc.stderr.splitlines() == [
      'config error: rl.batch_prompt: unknown config key; did you mean '
      'rl.batch_prompts or eval.batch_prompts?',
      "config error: lora.targets: ['q', 'z'] has unknown ['z']; choose "
      "from ['down', 'gate', 'k', 'o', 'q', 'up', 'v']"]
  proc = _train(tmp_path, '--config=configs/grop.py')
  assert proc.stderr == ('config error: --config: configs/grop.py: no such '
                         'recipe file; did you mean configs/grpo.py or '
                         'configs/rloo.py?\n')


def test_boolean_overrides_read_as_absl_reads_flags():
  """`--config.a.b` alone sets a boolean field, `--noconfig.a.b` clears
  it; other fields take the next word (a negative number too), and the
  command's own flags are left to absl."""
  from rlx.cli import launch  # pylint: disable=g-import-not-at-top
  cfg, rest = launch.read_config(
      ['rlx-train', '--config.log.progress', '--workdir=/tmp/w',
       '--noconfig.log.tensorboard', '--config.objective.entropy_coef',
       '-0.01', '--config', 'dapo', '--config.rl.num_steps', '7'], 'grpo')
  assert rest == ['rlx-train', '--workdir=/tmp/w']
  assert (cfg.log.progress, cfg.log.tensorboard) == (True, False)
  assert cfg.objective.entropy_coef == -0.01 and cfg.rl.num_steps == 7
  assert cfg.objective.loss == 'dapo'  # The recipe named by --config.
