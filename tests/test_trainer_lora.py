"""Real models and math files in the trainer: HF load, LoRA, stop tokens."""

import json
import os
import re

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rlx import checkpoint
from rlx import config as config_lib
from rlx import learner
from rlx import policy as policy_lib
from rlx import testing
from rlx import trainer
from rlx.actor import Actor
from rlx.config import ConfigError
from rlx.data.task import load_task
from rlx.logbook import read_metrics
import rlx.models
from rlx.models import hf_tokenizer
from rlx.models import lora
from rlx.rollouts import tree as tree_mode

# Qwen2 fixture: D=64, N=4, K=2, H=16, 2 layers, tied, V=320, ChatML.
QWEN2 = os.path.join(os.path.dirname(__file__), 'fixtures', 'hf', 'qwen2')
_NONDETERMINISTIC = ('time/',)


def _write_math(path, n, *, start=0):
  """n distinct problems 'i. What is a+b?' with MATH-style boxed
  answers."""
  with open(path, 'w') as f:
    for i in range(start, start + n):
      a, b = i % 7, (3 * i) % 5
      f.write(json.dumps({'problem': f'{i}. What is {a}+{b}?',
                          'solution': f'{a}+{b}=\\boxed{{{a + b}}}'}) + '\n')
  return str(path)


def _config_dict(tmp, **overrides):
  """A tiny math_files + qwen2 fixture + LoRA rank 4 config."""
  c = testing.tiny_config_dict(str(tmp))
  for key in config_lib.HF_SIZE_FIELDS:  # The fixture's config.json rules.
    c.model[key] = getattr(config_lib.ModelConfig(), key)
  c.model.hf_dir = QWEN2
  c.task.name = 'math_files'
  c.task.train_files = _write_math(tmp / 'train.jsonl', 40)
  c.task.answer_field, c.task.answer_extract = 'solution', 'boxed'
  c.task.num_test, c.task.prompt_len = 8, 96
  c.warmstart.num_steps = 0
  c.lora.rank, c.lora.alpha = 4, 8.0
  c.sampling.max_new_tokens = 16
  # An entropy bonus gives the adapters a gradient even when a random
  # model's groups all score 0 (zero advantages).
  c.objective.entropy_coef = 0.01
  c.optim.warmup_steps = 0
  c.eval.num_prompts, c.eval.batch_prompts = 4, 4
  for key, value in overrides.items():
    group, name = key.split('.')
    c[group][name] = value
  return c


def _cfg(tmp, **overrides):
  return config_lib.build(_config_dict(tmp, **overrides))


def _comparable(rows):
  return [{k: v for k, v in r.items() if not k.startswith(_NONDETERMINISTIC)}
          for r in rows]


@pytest.fixture(scope='module')
def tokenizer():
  return hf_tokenizer.HFTokenizer.from_dir(QWEN2)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('lora')
  cfg = _cfg(tmp)
  result = trainer.train(cfg, str(tmp / 'run'))
  return tmp, cfg, result, read_metrics(str(tmp / 'run' / 'metrics.jsonl'))


# --- Data: prompts through the chat template, drops, errors -------------


def test_math_task_encodes_chat_prompts_left_padded(tmp_path, tokenizer):
  cfg = _cfg(tmp_path, **{'task.system_prompt': 'Box it.',
                          'task.user_template': 'Q: {problem} (\\boxed{})'})
  task = load_task(cfg.task, tokenizer)
  assert (len(task.train), len(task.test)) == (32, 8)  # Last 8 held out.
  assert task.test.answers[0] == str(32 % 7 + 96 % 5)
  want = tokenizer.encode_chat([
      {'role': 'system', 'content': 'Box it.'},
      {'role': 'user', 'content': 'Q: 0. What is 0+0? (\\boxed{})'}])
  row, mask = task.train_prompts[0], task.train_prompt_mask[0]
  assert row.shape == (96,) and mask.sum() == len(want)
  assert list(row[mask]) == want and not mask[0] and mask[-1]
  assert task.reward_fn(['so \\boxed{0}', 'it is 1'], ['0', '0']).tolist() \
      == [1.0, 0.0]
  assert task.notes == ()


def test_long_prompts_are_dropped_and_counted(tmp_path, tokenizer):
  path = tmp_path / 'mixed.jsonl'
  _write_math(path, 6)
  with open(path, 'a') as f:
    f.write(json.dumps({'problem': 'long ' * 200, 'solution': '\\boxed{1}'})
            + '\n')
  test = _write_math(tmp_path / 'test.jsonl', 4, start=6)
  with open(path, 'a') as f:  # A repeat of a train problem.
    f.write(json.dumps({'problem': '0. What is 0+0?',
                        'solution': '\\boxed{0}'}) + '\n')
  # The test file is also among the train files: its problems stay out of
  # train.
  cfg = _cfg(tmp_path, **{'task.train_files': f'{path}, {test}',
                          'task.test_files': test})
  task = load_task(cfg.task, tokenizer)
  assert len(task.train) == 6 and len(task.test) == 4
  assert not set(task.train.prompts) & set(task.test.prompts)
  assert task.notes == (
      'task.train_files: skipped 1 records repeating a problem already read',
      'task.train_files: skipped 4 records whose problem is in the test '
      'split',
      'task: dropped 1 of 7 train problems longer than task.prompt_len=96 '
      'tokens (first: mixed.jsonl:7)')


def test_small_or_empty_splits_are_named(tmp_path, tokenizer):
  six = _write_math(tmp_path / 'six.jsonl', 6)
  task = load_task(_cfg(tmp_path, **{'task.train_files': six}).task,
                   tokenizer)
  assert (len(task.train), len(task.test)) == (3, 3)
  assert task.notes == ('task: held out 3 test problems of the 6 read '
                        '(task.num_test=8)',)
  one = _write_math(tmp_path / 'one.jsonl', 1)
  with pytest.raises(ConfigError, match='task.train_files: 1 problem read; '
                     'holding out a test split needs at least 2'):
    load_task(_cfg(tmp_path, **{'task.train_files': one}).task, tokenizer)
  empty = tmp_path / 'empty.jsonl'
  empty.write_text('')
  with pytest.raises(ConfigError, match='task.test_files: no problem was '
                     'read'):
    load_task(_cfg(tmp_path, **{'task.test_files': str(empty)}).task,
              tokenizer)


def test_bad_data_files_are_named_before_the_model_loads(tmp_path):
  missing = str(tmp_path / 'nope' / 'train.jsonl')
  with pytest.raises(ConfigError,
                     match=re.escape(f'task.train_files: {missing}')):
    trainer.train(_cfg(tmp_path, **{'task.train_files': missing}),
                  str(tmp_path / 'a'))
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"problem": "1+1", "solution": "\\\\boxed{2}"}\n{oops\n')
  with pytest.raises(ConfigError, match='task.train_files: .*bad.jsonl:2: '
                     'invalid JSON'):
    trainer.train(_cfg(tmp_path, **{'task.train_files': str(bad)}),
                  str(tmp_path / 'b'))
  with pytest.raises(ConfigError, match='task.test_files: .*no such file'):
    trainer.train(_cfg(tmp_path, **{'task.test_files': str(bad) + '.x'}),
                  str(tmp_path / 'c'))


def test_missing_model_dir_is_named(tmp_path):
  missing = str(tmp_path / 'no_model')
  with pytest.raises(ConfigError,
                     match=re.escape(f'model.hf_dir: {missing}: no such')):
    trainer.train(_cfg(tmp_path, **{'model.hf_dir': missing}),
                  str(tmp_path / 'run'))
  os.makedirs(tmp_path / 'half')  # config.json but no tokenizer.json.
  with open(os.path.join(QWEN2, 'config.json')) as f:
    (tmp_path / 'half' / 'config.json').write_text(f.read())
  with pytest.raises(ConfigError, match='model.hf_dir: .*tokenizer.json'):
    trainer.train(_cfg(tmp_path, **{'model.hf_dir': str(tmp_path / 'half')}),
                  str(tmp_path / 'run2'))


def test_sampler_stops_on_every_stop_id(tmp_path, tokenizer):
  cfg = _cfg(tmp_path)
  task = load_task(cfg.task, tokenizer)
  model, _ = policy_lib.build_model(cfg, tokenizer.vocab_size)
  actor = Actor(model, task, 8)
  assert actor.stop_tokens == tokenizer.stop_ids
  assert tokenizer.token_to_id('<|im_end|>') in actor.stop_tokens
  assert tokenizer.eos_id in actor.stop_tokens


# --- The learner: adapters trained, base frozen and not donated ---------


def test_treepo_answer_rule_cuts_after_the_first_box(tmp_path, tokenizer):
  c = _config_dict(tmp_path)
  c.rollout.mode, c.rollout.tree.treepo.stop_on_answer = 'tree', True
  cfg = config_lib.build(c)
  # The math_files task supplies the rule (its first complete box).
  stop_fn = tree_mode.tree_stop_fn(cfg, load_task(cfg.task, tokenizer))
  ids = np.asarray(tokenizer.encode('so \\boxed{12} and \\boxed{3}'))
  n = stop_fn(ids)
  assert tokenizer.decode(ids[:n]).endswith('\\boxed{12}')
  assert '}' not in tokenizer.decode(ids[:n - 1])
  assert stop_fn(ids[:n - 1]) == 0
  c.rollout.tree.treepo.stop_on_answer = False
  cfg = config_lib.build(c)
  assert tree_mode.tree_stop_fn(cfg, load_task(cfg.task, tokenizer)) is None


def test_train_step_with_frozen_base(tmp_path):
  """KL reference = the base: 0 at a fresh adapter; the base survives the
  step (not donated) and only adapters (and their moments) are state."""
  cfg = _cfg(tmp_path, **{'objective.kl_beta': 0.1})
  model, params, _ = rlx.models.from_pretrained(QWEN2, dtype='float32',
                                                param_dtype='float32')
  _, logits_fn = policy_lib.build_model(cfg, 320)
  lcfg = lora.LoraConfig(rank=2, alpha=4.0)
  adapters = lora.init_adapters(jax.random.key(0), params, lcfg)
  optimizer = learner.make_optimizer(cfg.optim)
  step = learner.make_train_step(
      logits_fn, optimizer, cfg,
      merge_fn=lambda base, ad: lora.merge(base, ad, lcfg))
  batch = testing.two_group_batch(0)
  before = jax.tree.map(np.array, params)
  state = learner.init_state(adapters, optimizer)
  state, metrics = step(state, params, batch)
  assert float(metrics['kl_ref']) == 0.0
  jax.tree.map(np.testing.assert_array_equal, params, before)  # Alive.
  assert jax.tree.structure(state.params) == jax.tree.structure(adapters)
  b_new = flax.traverse_util.flatten_dict(state.params)
  assert all(np.any(np.asarray(v) != 0) for k, v in b_new.items()
             if k[-1] == 'lora_b')
  state, metrics = step(state, params, batch)
  assert float(metrics['kl_ref']) > 0  # The adapters moved off the base.
  with pytest.raises(ValueError, match='frozen base'):
    step(state, None, batch)


# --- End to end ---------------------------------------------------------


def _checkpoint_sizes(workdir, step):
  """The saved state's tree with each array's element count."""
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  meta = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
  return jax.tree.map(lambda x: int(np.prod(x.shape)), meta)


def test_lora_run_trains_only_adapters(uninterrupted):
  tmp, cfg, result, rows = uninterrupted
  fixture = rlx.models.from_pretrained(QWEN2, dtype='float32',
                                       param_dtype='float32').params
  # The base is bit-for-bit the fixture's weights after 4 steps.
  jax.tree.map(np.testing.assert_array_equal, result['base'], fixture)
  flat = flax.traverse_util.flatten_dict(result['adapters'])
  assert {k[-2] for k in flat} == {'q', 'k', 'v', 'o'}
  assert all(np.any(np.asarray(v) != 0) for k, v in flat.items()
             if k[-1] == 'lora_b')  # Fresh B is 0: they were trained.
  merged = lora.merge(fixture, result['adapters'],
                      lora.LoraConfig(rank=4, alpha=8.0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                       atol=1e-7),
               result['params'], merged)
  # The checkpoint: adapters and their Adam moments; no base, no reference.
  tree = _checkpoint_sizes(str(tmp / 'run'), 4)
  assert tree['ref'] == {}
  assert tree['train']['params'] == jax.tree.map(lambda x: x.size,
                                                 result['adapters'])
  sizes = jax.tree.leaves(tree['train'])
  n_adapter = lora.count_params(result['adapters'])
  # Params, Adam mu and nu; the rest are scalar counters.
  assert sum(sizes) == 3 * n_adapter + sizes.count(1)
  train_rows = [r for r in rows if 'reward/mean' in r]
  assert [r['step'] for r in train_rows] == [1, 2, 3, 4]
  for r in train_rows:
    for key in ('reward/mean', 'learner/loss', 'learner/grad_norm',
                'learner/entropy', 'response/len_mean', 'rollouts/total',
                'tokens/decoded_total', 'time/elapsed_s'):
      assert key in r and np.isfinite(r[key]), key
    assert r['learner/grad_norm'] > 0
  assert [r['step'] for r in rows if 'eval/pass@1' in r] == [0, 2, 4]


def test_lora_kill_and_resume_equals_uninterrupted(uninterrupted, tmp_path):
  tmp, cfg, full, full_rows = uninterrupted
  workdir = str(tmp_path / 'run')
  trainer.train(cfg, workdir, stop_after=2)  # Killed after step 2.
  assert checkpoint.Checkpointer(
      os.path.join(workdir, 'checkpoints')).latest_step() == 2
  resumed = trainer.train(cfg, workdir)
  jax.tree.map(np.testing.assert_array_equal, resumed['adapters'],
               full['adapters'])
  rows = read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  assert _comparable(rows) == _comparable(full_rows)


def test_lora_on_a_mesh_matches_one_device(uninterrupted, tmp_path):
  """Base sharded over (2, 2, 2), adapters replicated, the sampler on its
  own mesh (only adapters move to it): the one-device losses."""
  _, cfg, _, one = uninterrupted
  cfg = config_lib.build(_config_dict(
      tmp_path, **{'mesh.shape': (2, 2, 2), 'mesh.sampler_shape': (1, 1, 8),
                   'task.train_files': cfg.task.train_files}))
  trainer.train(cfg, str(tmp_path / 'run'), stop_after=2)
  mesh = read_metrics(str(tmp_path / 'run' / 'metrics.jsonl'))
  steps = lambda rows: [r for r in rows if 'learner/loss' in r][:2]
  assert len(steps(mesh)) == 2
  for a, b in zip(steps(one), steps(mesh)):
    assert a['tokens/decoded_total'] == b['tokens/decoded_total']
    for key in ('learner/loss', 'learner/grad_norm', 'learner/entropy'):
      np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6,
                                 err_msg=f'{key} at step {a["step"]}')
