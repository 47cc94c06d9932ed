"""Sections that methods own (rlx/sections.py) and their deprecated flat
names."""

import dataclasses
import json

import pytest

from rlx import config as config_lib
from rlx import recipes
from rlx import warmstart
from rlx.config import ConfigError
from rlx.curriculum import dots as dots_lib
from rlx.objectives import losses


@pytest.fixture(autouse=True)
def _fresh_warnings():
  """Each test sees the once-a-process deprecation lines afresh."""
  config_lib.sections._WARNED.clear()  # pylint: disable=protected-access
  yield
  config_lib.sections._WARNED.clear()  # pylint: disable=protected-access


def test_owned_sections_default_build_and_compare_by_value():
  built = config_lib.build(config_lib.default_config_dict())
  assert built == config_lib.Config()
  assert hash(built.curriculum) == hash(config_lib.CurriculumConfig())
  assert built.curriculum.dots == dots_lib.DotsConfig()
  tau = config_lib.CurriculumConfig(dots={'tau': 0.2})
  assert tau == config_lib.CurriculumConfig(dots=dots_lib.DotsConfig(tau=0.2))
  assert tau != config_lib.CurriculumConfig()
  assert hash(tau) != hash(config_lib.CurriculumConfig())
  assert tau.dots.tau == 0.2 and tau.gdro.bins == 5  # Others: defaults.
  replaced = dataclasses.replace(tau, selector='dots')
  assert (replaced.selector, replaced.dots.tau) == ('dots', 0.2)
  # Hashable by value: ObjectiveConfig is a static jit argument.
  gspo = config_lib.ObjectiveConfig(gspo={'variant': 'token'})
  assert {gspo: 1}[config_lib.ObjectiveConfig(
      gspo=losses.GspoConfig(variant='token'))] == 1
  with pytest.raises(AttributeError, match='dotz'):
    _ = config_lib.CurriculumConfig().dotz


def test_nested_keys_override_and_round_trip():
  cfg = recipes.build(config_lib.default_config_dict(), [
      'curriculum.dots.tau=0.2', 'rollout.tree.eptree.num_chains=3',
      'rollout.engine.num_slots=32', 'objective.gspo.variant=token'])
  assert cfg.curriculum.dots.tau == 0.2
  assert cfg.rollout.tree.eptree.num_chains == 3
  assert cfg.rollout.engine.num_slots == 32
  assert cfg.objective.gspo.variant == 'token'
  as_dict = config_lib.to_dict(cfg)
  assert as_dict['curriculum']['dots']['tau'] == 0.2
  assert config_lib.build(as_dict) == cfg
  saved = json.loads(json.dumps(as_dict))  # As a checkpoint holds it.
  assert config_lib.diff(config_lib.fill_defaults(saved),
                         json.loads(json.dumps(as_dict))) == []
  keys = config_lib._leaf_keys()  # pylint: disable=protected-access
  assert 'curriculum.dots.tau' in keys and 'curriculum.dots_tau' not in keys


def test_unknown_nested_key_says_did_you_mean():
  with pytest.raises(ConfigError) as e:
    recipes.build(config_lib.default_config_dict(), ['curriculum.dots.tauu=1'])
  assert str(e.value).startswith('curriculum.dots.tauu: unknown config key; '
                                 'did you mean curriculum.dots.tau')
  d = config_lib.default_config_dict().to_dict()
  d['rollout']['tree']['latr']['mixx'] = 0.5
  with pytest.raises(ConfigError, match='rollout.tree.latr.mixx: unknown '
                     'config key; did you mean rollout.tree.latr.mix'):
    config_lib.build(d)


@pytest.mark.parametrize('old,new,value', [
    ('curriculum.dots_refs', 'curriculum.dots.refs', 'history'),
    ('curriculum.gdro_bins', 'curriculum.gdro.bins', 3),
    ('curriculum.oracle_screen', 'curriculum.oracle.screen', 3),
    ('rollout.tree.num_chains', 'rollout.tree.eptree.num_chains', 3),
    ('rollout.num_slots', 'rollout.engine.num_slots', 32),
    ('rollout.inflight_groups', 'rollout.april.inflight_groups', 40),
    ('objective.gspo_variant', 'objective.gspo.variant', 'token'),
    ('objective.tis_cap', 'objective.tis.cap', 3.0),
])
def test_deprecated_flat_override_sets_the_new_key(old, new, value, capsys):
  config = config_lib.default_config_dict()
  recipes.override(config, old, str(value))
  recipes.override(config, old, str(value))  # Twice: still one line.
  value_of = config_lib.to_dict(recipes.build(config))
  for part in new.split('.'):
    value_of = value_of[part]
  assert value_of == value
  assert capsys.readouterr().err == (
      f'config: {old} is deprecated; use {new}\n')


def test_deprecated_flat_key_in_a_config_dict(capsys):
  config = config_lib.default_config_dict()
  config.curriculum.dots_readout = 'ridge'  # A recipe of the old layout.
  config.curriculum.dots_similarity = 'cosine'
  cfg = config_lib.build(config)
  assert (cfg.curriculum.dots.readout, cfg.curriculum.dots.similarity) == (
      'ridge', 'cosine')
  assert capsys.readouterr().err.splitlines() == [
      'config: curriculum.dots_similarity is deprecated; use '
      'curriculum.dots.similarity',
      'config: curriculum.dots_readout is deprecated; use '
      'curriculum.dots.readout']


def test_old_and_new_key_both_set_is_an_error():
  with pytest.raises(ConfigError, match='curriculum.dots_tau: is deprecated '
                     'and curriculum.dots.tau is set too'):
    recipes.build(config_lib.default_config_dict(),
                  ['curriculum.dots_tau=0.2', 'curriculum.dots.tau=0.3'])
  config = config_lib.default_config_dict()
  config.curriculum.dots.tau = 0.3
  config.curriculum.dots_tau = 0.2
  with pytest.raises(ConfigError, match='curriculum.dots_tau: is deprecated '
                     'and curriculum.dots.tau is set too'):
    config_lib.build(config)


def test_saved_config_of_the_old_layout_equals_the_new_one():
  """A checkpoint written before the nesting resumes (trainer's
  _check_same_config compares fill_defaults(saved) with the config)."""
  cfg = recipes.build(config_lib.default_config_dict(), [
      'curriculum.dots.tau=0.2', 'rollout.tree.latr.mix=0.5',
      'objective.d3s.sample_keep=0.25'])
  saved = json.loads(json.dumps(config_lib.to_dict(cfg)))
  cur, tree, obj = saved['curriculum'], saved['rollout']['tree'], saved[
      'objective']
  for name, value in cur.pop('dots').items():  # The old flat layout.
    cur[f'dots_{name}'] = value
  tree.update(tree.pop('latr'))
  for name, value in obj.pop('d3s').items():
    obj[f'd3s_{name}'] = value
  current = json.loads(json.dumps(config_lib.to_dict(cfg)))
  assert config_lib.diff(config_lib.fill_defaults(saved), current) == []
  changed = json.loads(json.dumps(config_lib.to_dict(recipes.build(
      config_lib.default_config_dict(), ['curriculum.dots.tau=0.3']))))
  assert 'curriculum.dots.tau' in config_lib.diff(
      config_lib.fill_defaults(saved), changed)


def test_default_warmstart_cache_key_is_unchanged():
  # Computed before the sections were nested (issue 33): the default
  # warm start is found again.
  cfg = config_lib.build(config_lib.default_config_dict())
  assert warmstart.cache_key(cfg) == 'a12bb2affcce308b'
