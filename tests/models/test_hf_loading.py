"""HF loading: parity with transformers' outputs, round trip, bad input.

The fixtures (tests/fixtures/hf/<family>/) were made by
scripts/make_hf_fixtures.py with torch + transformers; these tests need
neither.
"""

import json
import os
import shutil

import flax
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

import rlx.models
from rlx.models import hf
from rlx.models import kv_cache
from rlx.models import transformer
from rlx.sampling import sampler as sampler_lib

FIXTURES = os.path.join(os.path.dirname(__file__), '..', 'fixtures', 'hf')
FAMILIES = ('llama', 'qwen2', 'qwen3', 'gemma')
LOGIT_TOL = 1e-4


def _fixture(family):
  return os.path.join(FIXTURES, family)


def _reference(family):
  return np.load(os.path.join(_fixture(family), 'reference.npz'))


def _forward(model, params, tokens):
  """Full-sequence logits [L, V] of one unpadded prompt [L]."""
  n = tokens.shape[0]
  mask = kv_cache.causal_mask(jnp.ones((1, n), bool), query_len=n,
                              cache_index=0)
  logits, _, _ = model.apply({'params': params}, tokens[None],
                             jnp.arange(n)[None], mask)
  return np.asarray(logits[0])


@pytest.mark.parametrize('family', FAMILIES)
def test_logits_match_transformers(family):
  model, params, _ = rlx.models.from_pretrained(
      _fixture(family), dtype='float32', param_dtype='float32')
  ref = _reference(family)
  for i in range(2):
    logits = _forward(model, params, jnp.asarray(ref[f'prompt_{i}']))
    np.testing.assert_allclose(logits, ref[f'logits_{i}'], rtol=0,
                               atol=LOGIT_TOL)


@pytest.mark.parametrize('family', FAMILIES)
def test_greedy_generation_matches_transformers(family):
  """20 greedy tokens through rlx's sampler, prompts batched and
  left-padded, equal transformers' greedy continuations."""
  model, params, tok = rlx.models.from_pretrained(
      _fixture(family), dtype='float32', param_dtype='float32')
  ref = _reference(family)
  prompts = [ref['prompt_0'], ref['prompt_1']]
  width = max(len(p) for p in prompts)
  tokens = np.full((2, width), tok.pad_id, np.int32)
  mask = np.zeros((2, width), bool)
  for row, p in enumerate(prompts):
    tokens[row, width - len(p):], mask[row, width - len(p):] = p, True
  steps = len(ref['greedy_0'])
  sample = sampler_lib.transformer_sampler(
      model, sampler_lib.SamplerConfig(max_new_tokens=steps, stop_tokens=(),
                                       pad_id=tok.pad_id, top_k=1))
  out = sample(params, jnp.asarray(tokens), jnp.asarray(mask),
               jax.random.key(0), 1.0, 1.0, num_samples=1)
  got = np.asarray(out.tokens[:, 0])
  np.testing.assert_array_equal(got[0], ref['greedy_0'])
  np.testing.assert_array_equal(got[1], ref['greedy_1'])


def test_config_translation_per_family():
  cfgs = {f: hf.transformer_config(hf.config.read_config(_fixture(f)))
          for f in FAMILIES}
  llama, qwen2, qwen3, gemma = (cfgs[f] for f in FAMILIES)
  assert (llama.rope_scaling, llama.rope_factor,
          llama.rope_original_max_len) == ('llama3', 8.0, 32)
  assert not llama.tie_embeddings and llama.num_kv_heads == 2
  assert llama.norm_eps == 1e-5 and llama.param_dtype == 'bfloat16'
  assert qwen2.qkv_bias and qwen2.tie_embeddings
  assert (qwen2.rope_scaling, qwen2.rope_factor) == ('linear', 2.0)
  assert qwen3.qk_norm and qwen3.head_dim == 32 and not qwen3.qkv_bias
  assert gemma.norm_plus_one and gemma.embed_scale
  assert gemma.activation == 'gelu_tanh' and gemma.num_kv_heads == 1


def test_llama3_rope_frequencies_match_reference_formula():
  """Against a direct numpy transcription of Meta's `apply_scaling`."""
  cfg = transformer.TransformerConfig(
      vocab_size=8, head_dim=64, rope_theta=500000.0, rope_scaling='llama3',
      rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
      rope_original_max_len=8192)
  base = 1.0 / 500000.0 ** (np.arange(0, 64, 2) / 64)
  want = []
  for f in base:
    wavelen = 2 * np.pi / f
    if wavelen < 8192 / 4.0:
      want.append(f)
    elif wavelen > 8192 / 1.0:
      want.append(f / 8.0)
    else:
      smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
      want.append((1 - smooth) * f / 8.0 + smooth * f)
  np.testing.assert_allclose(transformer.rope_frequencies(cfg), want,
                             rtol=1e-5)


def test_round_trip_load_save_load(tmp_path):
  """bf16 weights survive load -> save -> load bit for bit, and the saved
  file holds exactly the original tensors."""
  src = _fixture('qwen3')
  model, params, _ = rlx.models.from_pretrained(src)
  assert model.cfg.param_dtype == 'bfloat16'
  out = str(tmp_path / 'saved')
  rlx.models.save_pretrained(out, params, source_dir=src)
  _, again, _ = rlx.models.from_pretrained(out)
  flat, flat_again = (flax.traverse_util.flatten_dict(p)
                      for p in (params, again))
  assert flat.keys() == flat_again.keys()
  for path in flat:
    assert flat[path].dtype == flat_again[path].dtype
    np.testing.assert_array_equal(np.asarray(flat[path]),
                                  np.asarray(flat_again[path]), str(path))
  with safe_open(os.path.join(src, 'model.safetensors'), 'numpy') as a, \
      safe_open(os.path.join(out, 'model.safetensors'), 'numpy') as b:
    assert set(a.keys()) == set(b.keys())
    for name in a.keys():
      np.testing.assert_array_equal(a.get_tensor(name), b.get_tensor(name))
  assert os.path.isfile(os.path.join(out, 'tokenizer.json'))


def test_sharded_save_and_float32_round_trip(tmp_path):
  src = _fixture('llama')
  _, params, _ = rlx.models.from_pretrained(src, param_dtype='float32')
  out = str(tmp_path / 'sharded')
  written = rlx.models.save_pretrained(out, params, source_dir=src,
                                       max_shard_bytes=100_000)
  assert os.path.join(out, hf.weights.INDEX_FILE) in written
  assert len([w for w in written if w.endswith('.safetensors')]) > 2
  with open(os.path.join(out, 'config.json')) as f:
    assert json.load(f)['dtype'] == 'float32'
  _, again, _ = rlx.models.from_pretrained(out)
  jax.tree.map(np.testing.assert_array_equal, params, again)


def test_a_save_replaces_an_earlier_one_whole(tmp_path):
  # Sharded first, then a single file into the same directory: the old
  # index and shards go (they were loaded instead of the new weights), and
  # a directory that is not a model is refused.
  src = _fixture('llama')
  _, params, _ = rlx.models.from_pretrained(src, param_dtype='float32')
  out = str(tmp_path / 'out')
  rlx.models.save_pretrained(out, params, source_dir=src,
                             max_shard_bytes=100_000)
  halved = jax.tree.map(lambda x: x / 2, params)
  written = rlx.models.save_pretrained(out, halved, source_dir=src)
  assert sorted(os.listdir(out)) == sorted(os.path.basename(w)
                                           for w in written)
  assert not os.path.exists(os.path.join(out, hf.weights.INDEX_FILE))
  assert not [n for n in os.listdir(tmp_path) if n != 'out']  # No leftovers.
  _, again, _ = rlx.models.from_pretrained(out)
  jax.tree.map(np.testing.assert_array_equal, halved, again)
  with open(os.path.join(out, 'config.json')) as f:
    saved = json.load(f)
  assert saved['dtype'] == saved['torch_dtype'] == 'float32'
  other = tmp_path / 'notes'
  other.mkdir()
  (other / 'todo.txt').write_text('mine')
  with pytest.raises(ValueError, match='not a model directory'):
    rlx.models.save_pretrained(str(other), params, source_dir=src)
  assert (other / 'todo.txt').read_text() == 'mine'


def test_weight_files_are_chosen_as_transformers_does(tmp_path):
  path = _copy_fixture(tmp_path)
  cfg = hf.transformer_config(hf.config.read_config(path))
  want = hf.load_params(path, cfg)
  # A stale index beside model.safetensors is ignored, as transformers does.
  with open(os.path.join(path, hf.weights.INDEX_FILE), 'w') as f:
    json.dump({'weight_map': {'x': 'gone.safetensors'}}, f)
  jax.tree.map(np.testing.assert_array_equal, hf.load_params(path, cfg),
               want)
  # Two unindexed files holding the same tensors: named, not picked.
  os.remove(os.path.join(path, hf.weights.INDEX_FILE))
  os.rename(os.path.join(path, 'model.safetensors'),
            os.path.join(path, 'a.safetensors'))
  shutil.copy(os.path.join(path, 'a.safetensors'),
              os.path.join(path, 'b.safetensors'))
  with pytest.raises(ValueError, match=r'is in both .*a.safetensors and '
                     r'.*b.safetensors'):
    hf.load_params(path, cfg)
  os.remove(os.path.join(path, 'a.safetensors'))
  with open(os.path.join(path, hf.weights.INDEX_FILE), 'w') as f:
    json.dump({'files': []}, f)
  with pytest.raises(ValueError, match='not a safetensors index'):
    hf.load_params(path, cfg)


def test_malformed_config_json_and_rope_fields_are_named(tmp_path):
  path = _copy_fixture(tmp_path, rope_parameters={
      'rope_type': 'llama3', 'factor': 8.0, 'rope_theta': 500000.0})
  with pytest.raises(ValueError, match=r"RoPE scaling 'llama3' needs "
                     r"\['low_freq_factor', 'high_freq_factor', "
                     r"'original_max_position_embeddings'\]"):
    hf.transformer_config(hf.config.read_config(path), where='config.json')
  with open(os.path.join(path, 'config.json'), 'w') as f:
    f.write('{"architectures": [')
  with pytest.raises(ValueError, match='config.json: invalid JSON'):
    hf.config.read_config(path)


def test_loads_straight_into_a_named_sharding():
  src = _fixture('llama')
  cfg = hf.transformer_config(hf.config.read_config(src),
                              param_dtype='float32')
  mesh = jax.make_mesh((1, 4, 2), ('data', 'fsdp', 'tensor'))
  rules = (('vocab', 'tensor'), ('embed', 'fsdp'), ('q_heads', 'tensor'),
           ('kv_heads', 'tensor'), ('mlp', 'tensor'), ('head_dim', None))
  shardings = nn.logical_to_mesh_sharding(transformer.logical_specs(cfg),
                                          mesh, rules)
  sharded = hf.load_params(src, cfg, shardings=shardings)
  plain = hf.load_params(src, cfg)
  jax.tree.map(lambda x, s: assert_sharding(x, s), sharded, shardings)
  jax.tree.map(np.testing.assert_array_equal, sharded, plain)
  q = sharded['layer_0']['attn']['q']['kernel']
  assert q.addressable_shards[0].data.shape == (16, 2, 16)  # [D/4, N/2, H]


def assert_sharding(x, sharding):
  assert x.sharding.is_equivalent_to(sharding, x.ndim), (x.sharding,
                                                         sharding)


def _copy_fixture(tmp_path, family='llama', **config_changes):
  path = str(tmp_path / family)
  shutil.copytree(_fixture(family), path)
  with open(os.path.join(path, 'config.json')) as f:
    config = json.load(f)
  config.update(config_changes)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(config, f)
  return path


def test_missing_directory_and_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='no such model directory'):
    rlx.models.from_pretrained(str(tmp_path / 'nope'))
  path = _copy_fixture(tmp_path)
  os.remove(os.path.join(path, 'tokenizer.json'))
  with pytest.raises(FileNotFoundError, match='tokenizer.json: missing'):
    rlx.models.from_pretrained(path)
  os.remove(os.path.join(path, 'model.safetensors'))
  with pytest.raises(FileNotFoundError, match='no weights'):
    hf.load_params(path, hf.transformer_config(hf.config.read_config(path)))
  os.remove(os.path.join(path, 'config.json'))
  with pytest.raises(FileNotFoundError, match='config.json: missing'):
    rlx.models.from_pretrained(path)


def test_a_cut_off_weights_file_is_named(tmp_path):
  """A download that stopped half way: one line naming the file."""
  path = _copy_fixture(tmp_path)
  weights_file = os.path.join(path, 'model.safetensors')
  with open(weights_file, 'r+b') as f:
    f.truncate(os.path.getsize(weights_file) // 2)
  with pytest.raises(ValueError, match=rf'^{weights_file}: not a readable '
                     'safetensors file .*download or export it again$'):
    rlx.models.from_pretrained(path)


@pytest.mark.parametrize('changes, message', [
    ({'architectures': ['MistralForCausalLM'], 'model_type': 'mistral'},
     "config.json: architecture 'MistralForCausalLM'"),
    ({'use_sliding_window': True}, 'use_sliding_window'),
    ({'attention_bias': True}, 'attention_bias'),
    ({'rope_parameters': {'rope_type': 'yarn', 'factor': 4.0}},
     "RoPE type 'yarn'"),
    ({'hidden_act': 'relu'}, "activation 'relu'"),
])
def test_unsupported_architecture_or_setting(tmp_path, changes, message):
  path = _copy_fixture(tmp_path, **changes)
  with pytest.raises(ValueError, match=message):
    rlx.models.from_pretrained(path)


@pytest.mark.parametrize('family, changes, message', [
    ('llama', {'num_key_value_heads': 1},
     r'model.safetensors: tensor model\.layers\.0\.self_attn\.k_proj\.weight '
     r'has shape \(32, 64\), but config.json implies \(16, 64\)'),
    ('llama', {'num_hidden_layers': 3},
     r'tensor model\.layers\.2\.\S+ \(rlx layer_2/\S+\) is missing'),
    ('llama', {'num_hidden_layers': 1},
     r'unexpected tensor\(s\) \[.model\.layers\.1\.'),
    ('qwen2', {'tie_word_embeddings': False},
     r'tensor lm_head\.weight \(rlx unembed/kernel\) is missing'),
])
def test_shapes_or_names_not_matching_config(tmp_path, family, changes,
                                             message):
  path = _copy_fixture(tmp_path, family, **changes)
  with pytest.raises(ValueError, match=message):
    rlx.models.from_pretrained(path)
