"""The stage registries outside the curriculum and objectives: tasks and
rollout modes (registration, unknown names, per-entry checks), and the
trainer's Prefetch (rollout.overlap's bookkeeping)."""

import jax.numpy as jnp
import numpy as np
import pytest

from rlx import config as config_lib
from rlx import errors
from rlx import registry
from rlx import testing
from rlx import trainer
from rlx.data import task as task_lib
from rlx.rollouts import base
from rlx.rewards import math_answer


def _dict(tmp_path, **overrides):
  c = testing.tiny_config_dict(str(tmp_path))
  for key, value in overrides.items():
    group, name = key.split('.')
    c[group][name] = value
  return c


def test_registry_get_names_and_unknown_name():
  reg = registry.Registry('stage.kind')
  reg.register('a')(1)
  reg.register('b')(2)
  assert reg.get('b') == 2 and reg.names() == ['a', 'b'] and 'a' in reg
  assert list(reg) == ['a', 'b']
  with pytest.raises(errors.ConfigError,
                     match=r"stage.kind: 'c' is not one of \['a', 'b'\]"):
    reg.get('c')
  with pytest.raises(ValueError, match='registered twice'):
    reg.register('a')(3)
  registry.ALL.remove(reg)


@pytest.mark.parametrize('key,value,known', [
    ('task.name', 'gsm8k', "['chain_arith', 'math_files'"),
    ('rollout.mode', 'bulk', "['static', 'continuous', 'april', 'tree'"),
])
def test_unknown_names_list_the_known_ones(tmp_path, key, value, known):
  with pytest.raises(errors.ConfigError) as err:
    config_lib.build(_dict(tmp_path, **{key: value}))
  line = next(l for l in str(err.value).splitlines() if l.startswith(key))
  # The built-in names first (other tests may register their own after).
  assert line.startswith(f'{key}: {value!r} is not one of {known}')


def test_task_capabilities_and_answer_rules(tmp_path):
  chain = task_lib.TASKS.get('chain_arith')
  math = task_lib.TASKS.get('math_files')
  assert chain.has_solutions and not chain.answer_end
  assert math.answer_end and math.reads_test_files and not math.has_solutions
  task = task_lib.load_task(config_lib.build(_dict(tmp_path)).task)
  # Distinct answers, not texts: two derivations of 7 share their key.
  assert task.answer_key_fn('3+4=7>7') == task.answer_key_fn('7>7') == '7'
  assert task.answer_end_fn is None
  assert math_answer.first_boxed_end('a \\boxed{12} b') == len('a \\boxed{12}')


def test_a_registered_mode_is_built_and_checked(tmp_path):
  seen = []

  @base.MODES.register('test_only_mode')
  class Mode(base.Mode):  # pylint: disable=unused-variable
    @staticmethod
    def check(cfg):
      seen.append(cfg.rollout.mode)
      errors.require(cfg.rl.group_size == 4, 'rl.group_size',
                     'test_only_mode samples groups of 4')

    def collect(self, params, state, request):
      raise AssertionError('not sampled in this test')

  try:
    config_lib.build(_dict(tmp_path, **{'rollout.mode': 'test_only_mode'}))
    assert seen == ['test_only_mode']
    with pytest.raises(errors.ConfigError,
                       match='rl.group_size: test_only_mode samples'):
      config_lib.build(_dict(tmp_path, **{'rollout.mode': 'test_only_mode',
                                          'rl.group_size': 8}))
  finally:
    base.MODES._items.pop('test_only_mode')  # pylint: disable=protected-access


def test_step_groups_batch_takes_batch_named_extras():
  b, g, t = 2, 3, 4
  ones = lambda *s: np.ones(s, np.float32)
  groups = base.StepGroups(
      ids=np.arange(b), tokens=np.zeros((b, g, t), np.int32),
      loss_mask=np.ones((b, g, t), bool), logp=ones(b, g, t),
      entropy=ones(b, g, t), lengths=np.full((b, g), t, np.int32),
      finish=np.zeros((b, g), np.int32), rewards=ones(b, g),
      group_mask=np.ones((b, g), bool), values=ones(b), counts=np.full(b, g),
      rollouts=b * g, decoded_tokens=b * g * t,
      extras={'path_ids': np.arange(b * g * g).reshape(b, g, g),
              'version': np.zeros((b, g, t), np.int32)},
      prompt=np.zeros((b, 5), np.int32), prompt_mask=np.ones((b, 5), bool))
  batch = groups.batch(rewards=2 * groups.rewards, old_logp=groups.logp)
  np.testing.assert_array_equal(batch.path_ids,
                                np.arange(b * g * g).reshape(b, g, g))
  assert batch.depth_start is None  # Not an extra of this rollout.
  np.testing.assert_array_equal(batch.rewards, 2 * np.ones((b, g)))


def test_prefetch_without_overlap_samples_now_by_the_current_weights():
  calls = []
  collect = lambda *args: (calls.append(args) or ('out', 0.5))
  feed = trainer.Prefetch(collect, overlap=False)
  assert feed.get(3, 'w3', 's') == ('out', 0.5, 3)
  feed.after(3, 'w3', 's', launch=True)  # Nothing to launch.
  assert calls == [(3, 'w3', 3, 's')] and feed.weights is None
  feed.close()


def test_prefetch_with_overlap_samples_the_next_step_by_older_weights():
  calls = []

  def collect(step, weights, version, state):
    calls.append((step, float(weights['w']), version, state))
    return f'rollout {step}', 0.0

  feed = trainer.Prefetch(collect, overlap=True)
  params = {'w': jnp.float32(1.0)}
  assert feed.get(0, params, 's0') == ('rollout 0', 0.0, 0)
  feed.after(0, params, 's1', launch=True)  # Step 1 by step 0's weights.
  params = {'w': jnp.float32(2.0)}  # Step 0's update.
  assert feed.get(1, params, 's1') == ('rollout 1', 0.0, 0)
  feed.after(1, params, 's2', launch=False)  # The last step.
  assert float(feed.weights['w']) == 2.0  # Checkpointed for a resume.
  feed.close()
  assert calls == [(0, 1.0, 0, 's0'), (1, 1.0, 0, 's1')]
  # Resumed with saved weights: the first step is sampled by them.
  resumed = trainer.Prefetch(collect, overlap=True,
                             weights={'w': jnp.float32(5.0)})
  assert resumed.get(7, params, 's7') == ('rollout 7', 0.0, 6)
  assert calls[-1] == (7, 5.0, 6, 's7')
  resumed.close()
