"""rlx/backend.py (platform, attention choice, XLA flags, multi-process
start) and scripts/env_check.py."""

import dataclasses
import os
import re
import subprocess
import sys
import types

import jax
import pytest

from rlx import backend
from rlx import config as config_lib
from rlx import testing
from rlx import policy as policy_lib
from rlx import warmstart
from rlx.backend import BackendConfig
from rlx.config import ConfigError, ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- Platform ----------------------------------------------------


@pytest.mark.parametrize('strings, expected', [
    (('cpu',), 'cpu'),
    (('tpu', 'libtpu 0.0.51', 'TPU v5 lite'), 'tpu'),
    (('cuda', 'cuda 12080', 'NVIDIA H100 80GB HBM3'), 'cuda'),
    (('gpu', 'PJRT C API\ncuda 12080', 'NVIDIA H100 80GB HBM3'), 'cuda'),
    (('gpu', '', 'Tesla V100-SXM2-16GB'), 'cuda'),
    (('gpu', 'PJRT C API\nrocm 60300', 'AMD Instinct MI300X'), 'rocm'),
    (('gpu', '', 'gfx942:sramecc+:xnack-'), 'rocm'),
    (('rocm', '', ''), 'rocm'),
])
def test_platform_from_strings(strings, expected):
  assert backend.platform_from_strings(*strings) == expected


@pytest.mark.parametrize('strings', [('METAL',), ('gpu', '', 'Mystery GPU')])
def test_unknown_platform_is_an_error(strings):
  with pytest.raises(ValueError, match='unknown JAX platform'):
    backend.platform_from_strings(*strings)


def test_platform_of_devices():
  assert backend.platform() == 'cpu'
  assert backend.compute_capability() is None
  h100 = types.SimpleNamespace(
      platform='gpu', device_kind='NVIDIA H100 80GB HBM3',
      compute_capability='9.0',
      client=types.SimpleNamespace(platform='cuda', platform_version='x'))
  mi300 = types.SimpleNamespace(
      platform='gpu', device_kind='AMD Instinct MI300X',
      compute_capability='gfx942',
      client=types.SimpleNamespace(platform='gpu',
                                   platform_version='rocm 60300'))
  assert backend.platform(h100) == 'cuda'
  assert backend.compute_capability(h100) == 9.0
  assert backend.platform(mi300) == 'rocm'
  assert backend.compute_capability(mi300) is None


# --- Attention ---------------------------------------------------

BF16 = ModelConfig(dtype='bfloat16')  # head_dim 32


@pytest.mark.parametrize('plat, model, capability, expected', [
    ('cuda', BF16, 8.0, 'cudnn'),
    ('cuda', ModelConfig(dtype='float16'), None, 'cudnn'),
    ('cuda', None, None, 'cudnn'),
    ('cuda', ModelConfig(), 9.0, 'einsum'),  # float32
    ('cuda', ModelConfig(dtype='bfloat16', head_dim=12), 9.0, 'einsum'),
    ('cuda', ModelConfig(dtype='bfloat16', head_dim=256), 8.0, 'einsum'),
    ('cuda', ModelConfig(dtype='bfloat16', head_dim=256), 9.0, 'cudnn'),
    ('rocm', BF16, None, 'einsum'),
    ('tpu', BF16, None, 'einsum'),
    ('cpu', BF16, None, 'einsum'),
])
def test_auto_attention(plat, model, capability, expected):
  assert backend.resolve_attention('auto', plat, model,
                                   capability=capability) == expected


@pytest.mark.parametrize('plat', backend.PLATFORMS)
def test_explicit_xla_runs_everywhere(plat):
  assert backend.resolve_attention('xla', plat, ModelConfig()) == 'xla'


def test_explicit_cudnn():
  assert backend.resolve_attention('cudnn', 'cuda', BF16) == 'cudnn'
  for plat in ('cpu', 'rocm', 'tpu'):
    with pytest.raises(ConfigError, match='backend.attention') as e:
      backend.resolve_attention('cudnn', plat, BF16)
    assert repr(plat) in str(e.value) and 'NVIDIA' in str(e.value)
  with pytest.raises(ConfigError, match=r'backend\.attention.*model\.dtype'):
    backend.resolve_attention('cudnn', 'cuda', ModelConfig())
  with pytest.raises(ConfigError, match=r'model\.head_dim=12'):
    backend.resolve_attention('cudnn', 'cuda',
                              ModelConfig(dtype='bfloat16', head_dim=12))


def test_unknown_attention_names_the_key():
  with pytest.raises(ConfigError, match=r"backend\.attention: 'pallas'"):
    backend.resolve_attention('pallas', 'tpu')
  c = config_lib.default_config_dict()
  c.backend.attention = 'pallas'
  with pytest.raises(ConfigError, match='backend.attention'):
    config_lib.build(c)


def test_build_model_resolves_attention(tmp_path):
  c = testing.tiny_config_dict(str(tmp_path))
  model, _ = policy_lib.build_model(config_lib.build(c), vocab_size=30)
  assert model.cfg.attention == 'einsum'  # auto on CPU.
  c.backend.attention = 'cudnn'
  cfg = config_lib.build(c)
  with pytest.raises(ConfigError, match='backend.attention'):
    policy_lib.build_model(cfg, vocab_size=30)
  # A runtime choice: the warm-start cache key ignores it.
  other = dataclasses.replace(cfg, backend=BackendConfig(attention='xla'))
  assert warmstart.cache_key(cfg) == warmstart.cache_key(other)


# --- XLA flags ---------------------------------------------------


def test_recommended_flags():
  assert backend.xla_flags('cpu') == ''
  assert ('--xla_gpu_enable_latency_hiding_scheduler=true'
          in backend.xla_flags('cuda').split())
  tpu = backend.xla_flags('tpu').split()
  assert tpu and all(re.fullmatch(r'--xla_\w+=\w+', f) for f in tpu)
  assert backend.flags_variable('tpu') == 'LIBTPU_INIT_ARGS'
  assert backend.flags_variable('cuda') == 'XLA_FLAGS'


def _starts(xla_flags: str) -> bool:
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags)
  proc = subprocess.run(
      [sys.executable, '-c', 'import jax; jax.numpy.zeros(1)'], env=env,
      capture_output=True, timeout=120)
  return proc.returncode == 0


def test_gpu_flags_are_known_to_this_jaxlib():
  """jaxlib aborts on an unknown flag, whatever the platform."""
  assert _starts(backend.xla_flags('cuda') + ' ' + backend.xla_flags('rocm'))
  assert not _starts('--xla_gpu_no_such_flag=true')  # The check has teeth.


@pytest.mark.parametrize('environ, modules, expected', [
    ({'JAX_PLATFORMS': 'cuda'}, [], 'cuda'),
    ({'JAX_PLATFORMS': 'cpu,tpu'}, ['libtpu'], 'cpu'),
    ({'JAX_PLATFORMS': 'gpu'}, ['jax_rocm7_plugin'], 'rocm'),
    ({'JAX_PLATFORMS': 'gpu'}, [], 'cuda'),
    ({}, ['jax_cuda12_plugin'], 'cuda'),
    ({}, ['xla_cuda13'], 'cuda'),
    ({}, ['jax_rocm60_plugin'], 'rocm'),
    ({}, ['libtpu', 'jax_cuda12_plugin'], 'tpu'),
    ({}, ['numpy'], 'cpu'),
])
def test_guess_platform_does_not_start_jax(environ, modules, expected):
  assert backend.guess_platform(environ, modules) == expected


def test_merge_keeps_the_users_values():
  merged, added = backend.merge_flags(
      '--xla_dump_to=/tmp/d --xla_gpu_enable_latency_hiding_scheduler=false',
      '--xla_gpu_enable_latency_hiding_scheduler=true --xla_b=1')
  assert added == '--xla_b=1'
  assert merged == ('--xla_dump_to=/tmp/d '
                    '--xla_gpu_enable_latency_hiding_scheduler=false '
                    '--xla_b=1')


@pytest.fixture
def fresh_backend(monkeypatch):
  """Pretends JAX has not started (this test process has)."""
  monkeypatch.setattr(backend, 'backend_initialized', lambda: False)
  monkeypatch.delenv('LIBTPU_INIT_ARGS', raising=False)
  monkeypatch.setenv('XLA_FLAGS', '--xla_dump_to=/tmp/mine')


def test_configure_appends_to_users_flags(fresh_backend, monkeypatch):
  del fresh_backend
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda')
  added = backend.configure(BackendConfig())
  assert added == '--xla_gpu_enable_latency_hiding_scheduler=true'
  assert os.environ['XLA_FLAGS'] == '--xla_dump_to=/tmp/mine ' + added
  assert backend.configure(BackendConfig()) == ''  # Idempotent.
  assert os.environ['XLA_FLAGS'] == '--xla_dump_to=/tmp/mine ' + added


def test_configure_explicit_and_empty(fresh_backend, monkeypatch):
  del fresh_backend
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda')
  assert backend.configure(BackendConfig(xla_flags='')) == ''
  assert os.environ['XLA_FLAGS'] == '--xla_dump_to=/tmp/mine'
  backend.configure(BackendConfig(xla_flags='--xla_gpu_autotune_level=0'))
  assert os.environ['XLA_FLAGS'] == ('--xla_dump_to=/tmp/mine '
                                     '--xla_gpu_autotune_level=0')


def test_configure_on_tpu_uses_libtpu_args(fresh_backend, monkeypatch):
  del fresh_backend
  monkeypatch.setenv('JAX_PLATFORMS', 'tpu')
  backend.configure(BackendConfig())
  assert os.environ['LIBTPU_INIT_ARGS'] == backend.xla_flags('tpu')
  assert os.environ['XLA_FLAGS'] == '--xla_dump_to=/tmp/mine'


def test_configure_after_jax_started(monkeypatch):
  monkeypatch.setattr(backend, 'backend_initialized', lambda: True)
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda')
  monkeypatch.setenv('XLA_FLAGS', '')
  with pytest.warns(UserWarning, match='cannot take effect'):
    assert backend.configure(BackendConfig()) == ''
  with pytest.raises(RuntimeError, match='backend.xla_flags'):
    backend.configure(BackendConfig(xla_flags='--xla_gpu_autotune_level=0'))
  assert os.environ['XLA_FLAGS'] == ''
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')  # Nothing to add: silent.
  assert backend.configure(BackendConfig()) == ''


# --- Multi-process -----------------------------------------------


@pytest.fixture
def jax_init(monkeypatch):
  """Records jax.distributed.initialize calls instead of making them."""
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize',
                      lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  monkeypatch.setattr(backend, 'backend_initialized', lambda: False)
  return calls


SLURM = {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'node[1-2]',
         'SLURM_PROCID': '0', 'SLURM_NTASKS': '2'}


@pytest.mark.parametrize('args, environ', [
    ({}, {}),
    ({'num_processes': 1}, {}),
    ({'num_processes': 1, 'process_id': 0}, SLURM),
    ({}, {**SLURM, 'SLURM_NTASKS': '1'}),
    ({'enabled': 'off'}, SLURM),
])
def test_single_process_is_a_no_op(jax_init, args, environ):
  assert backend.initialize_distributed(environ=environ, **args) is False
  assert not jax_init


def _expected(address=None, count=None, index=None):
  return [{'coordinator_address': address, 'num_processes': count,
           'process_id': index}]


def test_explicit_values(jax_init):
  assert backend.initialize_distributed('10.0.0.1:1234', 4, 3, environ={})
  assert jax_init == _expected('10.0.0.1:1234', 4, 3)


def test_values_from_environment_and_override(jax_init):
  env = {'RLX_COORDINATOR_ADDRESS': 'h:1', 'RLX_NUM_PROCESSES': '2',
         'RLX_PROCESS_ID': '1'}
  backend.initialize_distributed(environ=env)
  backend.initialize_distributed(process_id=0, environ=env)
  assert jax_init == _expected('h:1', 2, 1) + _expected('h:1', 2, 0)


@pytest.mark.parametrize('environ', [
    SLURM, {'OMPI_COMM_WORLD_SIZE': '4'},
    {'TPU_WORKER_HOSTNAMES': 'w0,w1'}])
def test_launchers_leave_the_values_to_jax(jax_init, environ):
  assert backend.initialize_distributed(environ=environ)
  assert jax_init == _expected()


def test_on_always_initializes(jax_init):
  assert backend.initialize_distributed(enabled='on', environ={})
  assert jax_init == _expected()


def test_already_initialized(jax_init, monkeypatch):
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: True)
  assert backend.initialize_distributed('h:1', 2, 0, environ={})
  assert not jax_init


@pytest.mark.parametrize('args, environ, match', [
    ({'num_processes': 2, 'process_id': 2}, {}, 'process_id=2'),
    ({'process_id': -1}, {}, 'process_id=-1'),
    ({'num_processes': 0}, {}, 'num_processes=0'),
    ({'num_processes': 4}, {}, 'coordinator_address'),
    ({'coordinator_address': 'h:1'}, {}, 'num_processes'),
    ({'num_processes': 2, 'enabled': 'off'}, {}, 'distributed=off'),
    ({}, {'RLX_NUM_PROCESSES': 'two'}, 'RLX_NUM_PROCESSES'),
    ({'enabled': 'yes'}, {}, 'auto, on, off'),
])
def test_inconsistent_settings(jax_init, args, environ, match):
  with pytest.raises(ConfigError, match=match):
    backend.initialize_distributed(environ=environ, **args)
  assert not jax_init


def test_too_late_to_initialize(jax_init, monkeypatch):
  monkeypatch.setattr(backend, 'backend_initialized', lambda: True)
  with pytest.raises(RuntimeError, match='before JAX starts'):
    backend.initialize_distributed('h:1', 2, 0, environ={})
  assert not jax_init


def test_train_script_rejects_inconsistent_flags(tmp_path):
  env = dict(os.environ, PYTHONPATH='.', JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run(
      [sys.executable, 'scripts/train.py', '--config=configs/grpo.py',
       f'--workdir={tmp_path}', '--num_processes=2', '--process_id=5'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert 'config error' in proc.stderr and 'process_id=5' in proc.stderr
  # Stopped before training: only the library log of the attempt.
  assert os.listdir(tmp_path) == ['log.txt']


# --- scripts/env_check.py ----------------------------------------


def test_env_check_reports_platform_and_agreement(capsys):
  env_check = testing.load_script('env_check')
  env_check.main([])
  lines = capsys.readouterr().out.splitlines()
  assert 'platform: cpu' in lines
  assert any(l.startswith('devices: 8 x cpu') for l in lines)
  assert 'attention auto: default model -> einsum; bfloat16 model -> einsum' in lines
  assert 'recommended for cpu: (none)' in lines
  (xla,) = [l for l in lines if l.startswith('attention xla (float32)')]
  diffs = [float(x) for x in re.findall(r'(\d\.\de[-+]\d+)', xla)]
  assert len(diffs) == 2 and max(diffs) < 1e-5 and xla.endswith('agrees')
  (cudnn,) = [l for l in lines if l.startswith('attention cudnn')]
  assert 'skipped' in cudnn and "'cpu'" in cudnn
