"""Checkpointer metadata: numpy numbers are saved as JSON, anything else is
refused before a byte is written."""

import jax.numpy as jnp
import numpy as np
import pytest

from rlx import checkpoint


def test_numpy_numbers_in_the_metadata_come_back_as_python_numbers(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  state = {'w': jnp.arange(3.0)}
  meta = {'counters': {'rollouts/total': np.int64(4096),
                       'tokens': np.int32(7)},
          'loss': np.float32(0.5), 'hist': np.array([1, 2]),
          'flags': (True, None, 'x'), 'device': jnp.float32(2.0)}
  ckpt.save(3, state, meta)
  got = ckpt.meta(3)
  assert got == {'counters': {'rollouts/total': 4096, 'tokens': 7},
                 'loss': 0.5, 'hist': [1, 2], 'flags': [True, None, 'x'],
                 'device': 2.0}
  assert type(got['counters']['rollouts/total']) is int
  restored, _ = ckpt.restore(3, state)
  np.testing.assert_array_equal(restored['w'], [0.0, 1.0, 2.0])


def test_metadata_that_is_not_json_is_refused_before_writing(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"checkpoint 5, key 'counters', key 'bad': "
                     r'object .* is not JSON data'):
    ckpt.save(5, {'w': jnp.zeros(2)}, {'counters': {'bad': object()}})
  assert ckpt.all_steps() == []
  assert not list(tmp_path.iterdir())  # Not even a temporary directory.


@pytest.mark.parametrize('bad, match', [
    ({'x': np.array([1 + 2j])}, "key 'x': a numpy value of dtype complex"),
    ({'x': np.array([object()])}, 'dtype object'),
    ({'x': np.datetime64('2026-01-01')}, 'dtype datetime64'),
    ({(1, 2): 3}, r'key \(1, 2\) is not a string'),
    ({'c': {np.int64(1): 3}}, r"key 'c': key np.int64\(1\) is not a string"),
])
def test_numpy_values_json_cannot_hold_are_refused(tmp_path, bad, match):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  with pytest.raises(checkpoint.CheckpointError, match=match):
    ckpt.save(1, {'w': jnp.zeros(2)}, bad)
  assert not list(tmp_path.iterdir())
