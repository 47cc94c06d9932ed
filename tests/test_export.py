"""Exporting trained runs to the Hugging Face layout (rlx/export.py and
scripts/export_hf.py): logits, tokenizer, PEFT tensors, refusals, CLI."""

import dataclasses
import json
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as st_numpy
import tokenizers

from rlx import checkpoint
from rlx import config as config_lib
from rlx import export
from rlx import runs
from rlx import testing
from rlx import trainer
from rlx import warmstart
from rlx.data import chain_arith
import rlx.models
from rlx.models import hf_tokenizer
from rlx.models import transformer
from rlx.models.tokenizer import CharTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Qwen3 fixture: D=64, N=4, K=2, H=32, 2 layers, untied, V=320.
QWEN3 = os.path.join(ROOT, 'tests', 'fixtures', 'hf', 'qwen3')
_RUNTIME = dict(attention='einsum', attention_chunk=0, causal_block=0)


def _config_dict(tmp, **overrides):
  """A 2-step tiny run whose LoRA B matrices move off zero."""
  c = testing.tiny_config_dict(str(tmp))
  c.rl.num_steps, c.log.memory_stats = 2, False
  c.warmstart.num_steps = 1  # One compile of the warm-start step.
  c.model.num_layers = 1  # Half the compile time; the qwen3 run has two.
  c.optim.learning_rate, c.optim.warmup_steps = 1e-2, 0
  # An entropy bonus gives a gradient even when every group's rewards tie.
  c.objective.entropy_coef = 0.01
  for key, value in overrides.items():
    group, name = key.split('.')
    c[group][name] = value
  return c


def _math_config_dict(tmp):
  """math_files over the qwen3 fixture (model.hf_dir), LoRA rank 4."""
  c = _config_dict(tmp, **{'lora.rank': 4, 'lora.alpha': 8.0})
  for key in config_lib.HF_SIZE_FIELDS:  # The fixture's config.json rules.
    c.model[key] = getattr(config_lib.ModelConfig(), key)
  path = tmp / 'train.jsonl'
  with open(path, 'w') as f:
    for i in range(24):
      f.write(json.dumps({'problem': f'{i}. What is {i % 7}+2?',
                          'solution': f'\\boxed{{{i % 7 + 2}}}'}) + '\n')
  c.model.hf_dir, c.task.name, c.task.train_files = QWEN3, 'math_files', str(
      path)
  c.task.answer_field, c.task.answer_extract = 'solution', 'boxed'
  c.task.num_test, c.task.prompt_len = 4, 64
  c.warmstart.num_steps, c.sampling.max_new_tokens = 0, 8
  c.eval.num_prompts, c.eval.batch_prompts = 4, 4
  return c


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """{'full', 'lora', 'hf'}: trained runs, read back with runs.load."""
  tmp = tmp_path_factory.mktemp('export')
  configs = {'full': _config_dict(tmp),
             'lora': _config_dict(tmp, **{'lora.rank': 2}),
             'hf': _math_config_dict(tmp)}
  out = {}
  for name, c in configs.items():
    trainer.train(config_lib.build(c), str(tmp / name))
    out[name] = runs.load(str(tmp / name))
  return out


def _logits(logits_fn, params, task, n=4):
  """The run's logits on n left-padded test prompts, as rlx feeds them."""
  tokens = jnp.asarray(task.test_prompts[:n])
  mask = jnp.asarray(task.test_prompt_mask[:n])
  positions = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)
  causal = jnp.tril(jnp.ones((tokens.shape[1],) * 2, bool))
  return np.asarray(jax.jit(logits_fn)(params, tokens, positions,
                                       causal[None] & mask[:, None, :]))


def _assert_loads_as_run(out, run):
  """from_pretrained(out) is the run's model: same architecture, same
  parameters, logits equal bit for bit (the same float32 function)."""
  pre = rlx.models.from_pretrained(out)
  assert dataclasses.replace(pre.model.cfg, **_RUNTIME) == \
      dataclasses.replace(run.model.cfg, **_RUNTIME)
  jax.tree.map(np.testing.assert_array_equal, pre.params, run.params)
  apply = lambda p, *a: pre.model.apply({'params': p}, *a)[0]
  np.testing.assert_array_equal(_logits(apply, pre.params, run.task),
                                _logits(run.logits_fn, run.params, run.task))
  return pre


def _tensors(path):
  return st_numpy.load_file(path)


def _lora_b_max(run):
  return max(float(np.abs(x).max()) for p, x in flax.traverse_util
             .flatten_dict(run.adapters).items() if p[-1] == 'lora_b')


# --- Whole models ---------------------------------------------------------


def test_full_run_exports_as_llama_with_the_runs_logits(saved, tmp_path):
  run = saved['full']
  result = export.export_run(run, str(tmp_path / 'hf'))
  assert result.what == 'full model (LlamaForCausalLM)'
  _assert_loads_as_run(result.out, run)
  with open(tmp_path / 'hf' / 'config.json') as f:
    config = json.load(f)
  cfg = run.model.cfg
  assert (config['tie_word_embeddings'], config['head_dim'],
          config['vocab_size'], config['rms_norm_eps'],
          config['rope_parameters']['rope_theta'], config['dtype']) == (
              True, cfg.head_dim, 36, cfg.norm_eps, cfg.rope_theta,
              'float32')
  assert [config[f'{k}_token_id'] for k in ('pad', 'bos', 'eos')] == [0, 1, 2]
  assert config['max_position_embeddings'] == 12 + 24  # Prompt + response.


def test_lora_run_exports_merged(saved, tmp_path):
  run = saved['lora']
  assert _lora_b_max(run) > 1e-3  # Else merged == base and proves little.
  out = export.export_run(run, str(tmp_path / 'merged')).out
  _assert_loads_as_run(out, run)
  base = _logits(run.logits_fn, run.base, run.task)
  assert np.abs(base - _logits(run.logits_fn, run.params, run.task)).max() \
      > 1e-3


def test_qk_norm_untied_model_exports_as_qwen3(tmp_path):
  cfg = transformer.TransformerConfig(
      vocab_size=40, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2,
      head_dim=8, mlp_dim=48, qk_norm=True, tie_embeddings=False,
      rope_theta=5e5, norm_eps=1e-5)
  params = jax.jit(transformer.init_params, static_argnums=0)(
      cfg, jax.random.key(1))
  tok = CharTokenizer(chain_arith.ALPHABET)
  config = export.hf_config(cfg, tokenizer=tok, max_positions=64)
  assert config['architectures'] == ['Qwen3ForCausalLM']
  export.write_model(str(tmp_path), params, cfg, config=config,
                     files=export.char_tokenizer_files(tok, max_len=64))
  pre = rlx.models.from_pretrained(str(tmp_path))
  assert dataclasses.replace(pre.model.cfg, **_RUNTIME) == cfg
  args = (jnp.asarray([[1, 5, 9, 3, 7, 2]]), jnp.arange(6)[None],
          jnp.tril(jnp.ones((1, 6, 6), bool)))
  logits = lambda model, p: jax.jit(model.apply)({'params': p}, *args)[0]
  np.testing.assert_array_equal(logits(pre.model, pre.params),
                                logits(transformer.Transformer(cfg), params))


def test_tokenizer_round_trips_the_tasks_prompts(saved, tmp_path):
  run = saved['full']
  out = export.export_run(run, str(tmp_path / 'hf')).out
  ours = hf_tokenizer.HFTokenizer.from_dir(out)
  plain = tokenizers.Tokenizer.from_file(os.path.join(out, 'tokenizer.json'))
  task = run.task
  assert (ours.vocab_size, ours.pad_id, ours.bos_id, ours.eos_id) == (
      36, 0, 1, 2)
  for i, text in enumerate(task.train.prompts[:50]):
    want = [int(t) for t in task.train_prompts[i][task.train_prompt_mask[i]]]
    assert ours.encode(text, add_bos=True) == want
    assert plain.encode(text).ids == want  # HF's default adds <s>.
    assert plain.decode(want) == ours.decode(want) == text
  solution = task.train.solutions[0]
  ids = task.tokenizer.encode(solution, add_eos=True) + [5, 6]
  assert ours.decode(ids) == task.tokenizer.decode(ids) == solution
  with pytest.raises(Exception, match='Missing'):  # No unknown token.
    plain.encode('7 x')


# --- PEFT -----------------------------------------------------------------


def test_peft_tensors_are_the_adapters_transposed(saved, tmp_path):
  run = saved['lora']
  out = str(tmp_path / 'peft')
  export.export_run(run, out, peft=True)
  with open(os.path.join(out, 'adapter_config.json')) as f:
    config = json.load(f)
  assert (config['r'], config['lora_alpha'], config['target_modules'],
          config['base_model_name_or_path'], config['peft_type']) == (
              2, 16.0, ['k_proj', 'o_proj', 'q_proj', 'v_proj'],
              os.path.join(out, 'base'), 'LORA')
  got = _tensors(os.path.join(out, 'adapter_model.safetensors'))
  assert len(got) == 1 * 4 * 2  # Layers x targets x (A, B).
  d, nh, r = 32, 2 * 16, 2
  for i in range(1):
    for t, (fan_in, fan_out) in {'q': (d, nh), 'k': (d, 16), 'v': (d, 16),
                                 'o': (nh, d)}.items():
      ad = run.adapters[f'layer_{i}']['attn'][t]
      key = f'base_model.model.model.layers.{i}.self_attn.{t}_proj'
      a, b = got[f'{key}.lora_A.weight'], got[f'{key}.lora_B.weight']
      assert a.shape == (r, fan_in) and b.shape == (fan_out, r)
      np.testing.assert_array_equal(a, np.asarray(ad['lora_a']).T)
      np.testing.assert_array_equal(b, np.asarray(ad['lora_b']).T)
  # The base beside it is the run's frozen base (the warm start).
  base = rlx.models.from_pretrained(os.path.join(out, 'base'))
  jax.tree.map(np.testing.assert_array_equal, base.params, run.base)
  assert os.path.isfile(os.path.join(out, 'tokenizer.json'))


def _merge_by_hand(base, adapters, scale):
  """HF tensors with W + scale * B @ A (numpy, float64) per adapted one."""
  merged = {k: v.astype(np.float64) for k, v in base.items()}
  for key, a in adapters.items():
    if key.endswith('lora_A.weight'):
      b = adapters[key.replace('lora_A', 'lora_B')]
      name = key.removeprefix('base_model.model.').replace(
          '.lora_A.weight', '.weight')
      merged[name] += scale * (b.astype(np.float64) @ a.astype(np.float64))
  return merged


def test_peft_merged_by_hand_equals_merged_export(saved, tmp_path):
  run = saved['lora']
  peft_out, merged_out = str(tmp_path / 'peft'), str(tmp_path / 'merged')
  export.export_run(run, peft_out, peft=True)
  export.export_run(run, merged_out)
  by_hand = _merge_by_hand(
      _tensors(os.path.join(peft_out, 'base', 'model.safetensors')),
      _tensors(os.path.join(peft_out, 'adapter_model.safetensors')),
      16.0 / 2)
  exported = _tensors(os.path.join(merged_out, 'model.safetensors'))
  assert set(by_hand) == set(exported)
  # rlx merges in float32: equal to float32 rounding.
  for name, want in by_hand.items():
    np.testing.assert_allclose(exported[name], want, rtol=1e-6, atol=1e-7,
                               err_msg=name)


def test_hf_dir_run_exports_peft_over_its_model_and_merged(saved, tmp_path):
  run = saved['hf']
  assert _lora_b_max(run) > 1e-3
  peft_out = str(tmp_path / 'peft')
  result = export.export_run(run, peft_out, peft=True)
  assert sorted(os.path.relpath(p, peft_out) for p in result.files) == [
      'adapter_config.json', 'adapter_model.safetensors', 'tokenizer.json']
  with open(os.path.join(peft_out, 'adapter_config.json')) as f:
    config = json.load(f)
  assert config['base_model_name_or_path'] == QWEN3
  assert (config['r'], config['lora_alpha']) == (4, 8.0)
  merged_out = export.export_run(run, str(tmp_path / 'merged')).out
  pre = _assert_loads_as_run(merged_out, run)
  assert pre.model.cfg.qk_norm
  with open(os.path.join(QWEN3, 'tokenizer.json'), 'rb') as f:
    with open(os.path.join(merged_out, 'tokenizer.json'), 'rb') as g:
      assert f.read() == g.read()
  # The fixture's bfloat16 weights, as float32 (the run's param_dtype).
  base = {k: v.astype(np.float32) for k, v in _tensors(
      os.path.join(QWEN3, 'model.safetensors')).items()}
  by_hand = _merge_by_hand(base, _tensors(os.path.join(
      peft_out, 'adapter_model.safetensors')), 8.0 / 4)
  exported = _tensors(os.path.join(merged_out, 'model.safetensors'))
  for name, want in by_hand.items():
    np.testing.assert_allclose(exported[name], want, rtol=1e-6, atol=1e-7,
                               err_msg=name)


# --- Refusals -------------------------------------------------------------


def test_bad_out_is_refused_and_left_alone(saved, tmp_path):
  run = saved['full']
  other = tmp_path / 'notes'
  other.mkdir()
  (other / 'keep.txt').write_text('mine')
  with pytest.raises(export.OutputError, match='not a model directory'):
    export.export_run(run, str(other))
  assert os.listdir(other) == ['keep.txt']
  (tmp_path / 'file').write_text('x')
  with pytest.raises(export.OutputError, match='not a directory'):
    export.export_run(run, str(tmp_path / 'file'))
  for keep in (run.workdir, os.path.dirname(run.workdir)):
    with pytest.raises(export.OutputError, match='would replace'):
      export.export_run(run, keep)
  with pytest.raises(export.OutputError, match='would replace'):
    export.export_run(saved['hf'], QWEN3)
  with pytest.raises(ValueError, match='needs a LoRA run'):
    export.export_run(run, str(tmp_path / 'x'), peft=True)
  assert not os.path.exists(tmp_path / 'x')


def test_an_earlier_export_is_replaced_whole(saved, tmp_path):
  out = str(tmp_path / 'hf')
  export.export_run(saved['lora'], out, peft=True)
  export.export_run(saved['lora'], out)  # PEFT export -> merged model.
  assert sorted(os.listdir(out)) == [
      'config.json', 'generation_config.json', 'model.safetensors',
      'special_tokens_map.json', 'tokenizer.json', 'tokenizer_config.json']
  assert os.listdir(tmp_path) == ['hf']  # No temporary left behind.


# --- The command ----------------------------------------------------------


def _script(*args):
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, 'scripts', 'export_hf.py'), *args],
      capture_output=True, text=True, check=False, timeout=300)


def test_cli_exports_and_prints_one_line(saved, tmp_path):
  run = saved['full']
  out = str(tmp_path / 'hf')
  done = _script(f'--workdir={run.workdir}', f'--out={out}', '--step=2')
  assert done.returncode == 0, done.stderr
  assert done.stdout.splitlines() == [
      f'exported {run.workdir} step 2: full model (LlamaForCausalLM) to '
      f'{out} (6 files)']
  jax.tree.map(np.testing.assert_array_equal,
               rlx.models.from_pretrained(out).params, run.params)
  refused = _script(f'--workdir={run.workdir}', f'--out={ROOT}')
  assert refused.returncode == 1
  assert refused.stderr.splitlines() == [
      f'error: --out: {ROOT}: exists and is not a model directory (no '
      'config.json or adapter_config.json); refusing to replace it']


def test_a_lora_run_whose_warm_start_is_gone_is_named(saved, tmp_path):
  """The base of a LoRA run on rlx's own transformer is its cached warm
  start; without it the run is not loaded (a retrained one could differ),
  and the error names the cache."""
  run = saved['lora']
  cache = warmstart.cache_path(run.cfg)
  os.rename(cache, cache + '.away')
  try:
    with pytest.raises(checkpoint.CheckpointError,
                       match=rf"LoRA adapters sit on its warm start, cached "
                       rf"at {cache}, which is missing"):
      runs.load(run.workdir)
  finally:
    os.rename(cache + '.away', cache)
