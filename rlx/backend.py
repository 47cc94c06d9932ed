"""Platform shim: the one place in rlx that asks which platform JAX runs on.

Four platforms: 'cpu', 'cuda' (NVIDIA GPUs), 'rocm' (AMD GPUs) and 'tpu'.
This module picks the attention implementation (`resolve_attention`),
holds rlx's recommended XLA flags per platform (`xla_flags`, set by
`configure` before the backend starts) and starts multi-process JAX
(`initialize_distributed`). Everything else in rlx is platform-blind.

Order in a main (scripts/train.py): build the config, `configure`,
`initialize_distributed`, then anything that touches a device.
"""

import dataclasses
import os
import pkgutil
import re
import shlex
import warnings
from typing import Mapping, MutableMapping, Optional, Sequence

import jax
import jax.numpy as jnp

from rlx import config as config_lib
from rlx import errors
from rlx import registry
from rlx.config import ConfigError

PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')
ATTENTION_IMPLS = ('auto', 'einsum', 'xla', 'cudnn')  # backend.attention.


@config_lib.section('backend')
@dataclasses.dataclass(frozen=True)
class BackendConfig:
  """Platform choices (rlx/backend.py); `auto` picks per platform."""
  attention: str = 'auto'  # auto | einsum | xla | cudnn: the attention
  # implementation. einsum: rlx's grouped-query einsums (the reference);
  # xla / cudnn: jax.nn.dot_product_attention with that implementation;
  # auto: cudnn on NVIDIA GPUs where the model allows it, else einsum.
  attention_chunk: int = 0  # > 0: full-sequence attention (the learner's
  # forward) runs this many queries at a time, recomputed in the backward
  # pass, so its [rows, heads, L, L] scores are never held at once (einsum
  # and xla; cudnn's fused kernel holds none anyway). For long sequences
  # off cuDNN (TPU, CPU, float32). 0: all queries at once.
  causal_block: int = 128  # > 0: full-sequence attention (einsum and
  # xla) longer than this runs this many queries at a time, each block over
  # the keys up to its last query only (the rest are masked by causality):
  # the same numbers up to float rounding at about (n + 1) / 2n of the
  # attention FLOPs for n blocks (blocks are unrolled: raise it for very
  # long sequences). 0: every query over every key.
  xla_flags: str = 'auto'  # Extra XLA_FLAGS set before the backend starts;
  # auto: rlx's documented per-platform flags; '' none.


@registry.config_check
def _check_backend_section(cfg) -> None:
  """backend.*; whether the attention can run is `resolve_attention`'s."""
  errors.require(cfg.backend.attention in ATTENTION_IMPLS, 'backend.attention',
                 f'{cfg.backend.attention!r} is not one of '
                 f'{list(ATTENTION_IMPLS)}')
  errors.require(cfg.backend.causal_block >= 0, 'backend.causal_block',
                 'must be >= 0')
  errors.require(cfg.backend.attention_chunk >= 0, 'backend.attention_chunk',
                 'must be >= 0')


# --- Which platform ----------------------------------------------


def platform_from_strings(platform: str, platform_version: str = '',
                          device_kind: str = '') -> str:
  """Names the platform from what a JAX device reports (pure, testable).

  JAX calls both GPU kinds 'gpu' in places; the PJRT client's platform
  name or version string says 'cuda' or 'rocm', and the device kind names
  the vendor ('NVIDIA H100 80GB HBM3', 'AMD Instinct MI300X', 'gfx942').

  Args:
    platform: `device.client.platform` or `device.platform`.
    platform_version: `device.client.platform_version`.
    device_kind: `device.device_kind`.

  Returns:
    One of PLATFORMS.

  Raises:
    ValueError: for a platform or GPU vendor rlx does not know.
  """
  name = platform.strip().lower()
  if name in PLATFORMS:
    return name
  if name == 'gpu':
    version, kind = platform_version.lower(), device_kind.lower()
    if 'rocm' in version or 'hip' in version:
      return 'rocm'
    if 'cuda' in version:
      return 'cuda'
    if any(s in kind for s in ('amd', 'instinct', 'radeon', 'gfx')):
      return 'rocm'
    if any(s in kind for s in ('nvidia', 'tesla')):
      return 'cuda'
  raise ValueError(
      f'unknown JAX platform {platform!r} (version {platform_version!r}, '
      f'device kind {device_kind!r}); rlx knows {list(PLATFORMS)}')


def platform(device: Optional[jax.Device] = None) -> str:
  """The platform of `device` (default: the first device; starts JAX)."""
  device = jax.devices()[0] if device is None else device
  client = getattr(device, 'client', None)
  return platform_from_strings(
      getattr(client, 'platform', None) or device.platform,
      getattr(client, 'platform_version', '') or '',
      getattr(device, 'device_kind', '') or '')


def compute_capability(device: Optional[jax.Device] = None
                       ) -> Optional[float]:
  """An NVIDIA GPU's compute capability (9.0 for H100); None elsewhere."""
  device = jax.devices()[0] if device is None else device
  value = str(getattr(device, 'compute_capability', '') or '')
  # ROCm devices report an architecture name ('gfx942') here instead.
  return float(value) if re.fullmatch(r'\d+(\.\d+)?', value) else None


# --- Attention implementation ------------------------------------


def cudnn_limitation(model, capability: Optional[float] = None
                     ) -> Optional[str]:
  """Why cuDNN flash attention cannot run `model`, or None if it can.

  The limits are those jax.nn.dot_product_attention(implementation='cudnn')
  checks (jax/_src/cudnn/fused_attention_stablehlo.py): query, key and
  value in float16 or bfloat16, and a head dim that is a multiple of 8 and
  at most 128 (256 from Hopper, compute capability 9.0, on). Its other
  limits are handled in rlx/models/transformer.py, not here: training with
  a mask needs even query and key lengths (the model pads odd ones with a
  masked row and slot), and keys must be sequence-major (calls with a KV
  cache take the XLA path).

  Args:
    model: a ModelConfig or TransformerConfig (`dtype`, `head_dim`).
    capability: the GPU's compute capability; None assumes pre-Hopper.

  Returns:
    A sentence naming the model key at fault, or None.
  """
  dtype = jnp.dtype(model.dtype).name
  if dtype not in ('bfloat16', 'float16'):
    return (f'model.dtype={dtype!r}: cuDNN flash attention takes bfloat16 or '
            'float16 only')
  limit = 256 if capability is not None and capability >= 9.0 else 128
  if model.head_dim % 8 or model.head_dim > limit:
    return (f'model.head_dim={model.head_dim}: cuDNN flash attention needs a '
            f'multiple of 8, at most {limit} on this GPU')
  return None


def resolve_attention(requested: str, platform_name: str, model=None, *,
                      capability: Optional[float] = None) -> str:
  """Turns `backend.attention` into the model's `TransformerConfig.attention`.

  'auto' is cuDNN flash attention on NVIDIA GPUs when the model allows it
  (see `cudnn_limitation`) and rlx's einsum attention elsewhere (on a
  2-core CPU it was 1.1-1.3x faster than `jax.nn.dot_product_attention`'s
  XLA path on the default model: scripts/bench_attention.py). An explicit 'cudnn' that
  cannot run raises here, before anything compiles.

  Args:
    requested: backend.attention: one of ATTENTION_IMPLS.
    platform_name: one of PLATFORMS (see `platform`).
    model: the model config; None skips the model checks.
    capability: NVIDIA compute capability (see `compute_capability`).

  Returns:
    'einsum', 'xla' or 'cudnn'.

  Raises:
    ConfigError: naming backend.attention and the reason.
  """
  if requested not in ATTENTION_IMPLS:
    raise ConfigError(f'backend.attention: {requested!r} is not one of '
                      f'{list(ATTENTION_IMPLS)}')
  if platform_name not in PLATFORMS:
    raise ValueError(f'platform {platform_name!r} is not one of {PLATFORMS}')
  if requested in ('einsum', 'xla'):
    return requested
  if platform_name != 'cuda':
    reason = (f'cuDNN flash attention needs an NVIDIA GPU, but the platform '
              f'is {platform_name!r}')
  else:
    reason = None if model is None else cudnn_limitation(model, capability)
  if requested == 'auto':
    return 'einsum' if reason else 'cudnn'
  if reason:
    raise ConfigError(f"backend.attention: 'cudnn' cannot run: {reason}; "
                      "use 'auto', 'einsum' or 'xla'")
  return 'cudnn'


# --- XLA flags ---------------------------------------------------

# rlx's recommended flags, one reason each. Unknown flags abort the process
# at startup, so this list stays short and tests/test_backend.py checks the
# GPU ones against the installed jaxlib (the TPU ones are parsed by libtpu).
_RECOMMENDED = {
    'cpu': (),
    'cuda': (
        # Let XLA's scheduler move collectives (FSDP all-gathers, gradient
        # reduce-scatters) to overlap with compute; NVIDIA's JAX containers
        # set it by default. Not set, on purpose: `xla_gpu_enable_triton_gemm
        # =false` (older, workload-dependent advice) and
        # `xla_gpu_enable_command_buffer=` (CUDA graphs, on by default, cut
        # launch overhead in the decode loop's many small kernels).
        '--xla_gpu_enable_latency_hiding_scheduler=true',
    ),
    'rocm': (
        # The same XLA GPU compiler pass, for the same overlap, on ROCm.
        '--xla_gpu_enable_latency_hiding_scheduler=true',
    ),
    'tpu': (
        # Run all-gather / reduce-scatter / all-reduce as asynchronous fused
        # collectives, including the FSDP all-gathers, spread over several
        # steps so that they overlap with the matmuls (MaxText's defaults).
        '--xla_tpu_enable_async_collective_fusion=true',
        '--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true',
        '--xla_tpu_enable_async_collective_fusion_multiple_steps=true',
        # Overlap those collectives with compute on the TensorCore.
        '--xla_tpu_overlap_compute_collective_tc=true',
        # Asynchronous all-gather, the collective FSDP issues most.
        '--xla_enable_async_all_gather=true',
    ),
}


def xla_flags(platform_name: str) -> str:
  """rlx's recommended flags for a platform ('' for CPU)."""
  if platform_name not in _RECOMMENDED:
    raise ValueError(f'platform {platform_name!r} is not one of {PLATFORMS}')
  return ' '.join(_RECOMMENDED[platform_name])


def flags_variable(platform_name: str) -> str:
  """The environment variable that carries XLA flags on a platform.

  TPU compiler flags are parsed by libtpu from LIBTPU_INIT_ARGS; jaxlib's
  XLA_FLAGS parser aborts on flags it does not know, such as `xla_tpu_*`.
  """
  return 'LIBTPU_INIT_ARGS' if platform_name == 'tpu' else 'XLA_FLAGS'


def _plugin_modules() -> list[str]:
  names = [m.name for m in pkgutil.iter_modules()]
  try:
    import jax_plugins  # pylint: disable=g-import-not-at-top
    names += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
  except ImportError:
    pass
  return names


def guess_platform(environ: Optional[Mapping[str, str]] = None,
                   modules: Optional[Sequence[str]] = None) -> str:
  """The platform JAX will pick, guessed without starting its backend.

  First JAX_PLATFORMS (its first entry); else the installed PJRT plugins in
  JAX's own order of preference: libtpu (TPU), jax_cuda*_plugin (NVIDIA),
  jax_rocm*_plugin (AMD), else CPU. A plugin installed on a machine without
  its device makes JAX fall back to CPU; the flags chosen for it are then
  inert (the CPU jaxlib knows the GPU flags; TPU ones go to libtpu).

  Args:
    environ: environment (default os.environ).
    modules: installed top-level module names (default: scanned).

  Returns:
    One of PLATFORMS.
  """
  env = os.environ if environ is None else environ
  wanted = (env.get('JAX_PLATFORMS') or env.get('JAX_PLATFORM_NAME') or '')
  first = wanted.split(',')[0].strip().lower()
  if first in PLATFORMS:
    return first
  names = _plugin_modules() if modules is None else list(modules)
  has = lambda pattern: any(re.fullmatch(pattern, n) for n in names)
  cuda = has(r'jax_cuda\d+_plugin|xla_cuda\d+')
  rocm = has(r'jax_rocm\d+_plugin|xla_rocm\d+')
  if first == 'gpu':
    return 'rocm' if rocm and not cuda else 'cuda'
  if has(r'libtpu(_nightly)?'):
    return 'tpu'
  return 'cuda' if cuda else 'rocm' if rocm else 'cpu'


def backend_initialized() -> bool:
  """Whether JAX has started a backend (XLA flags are read at that point)."""
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  return xla_bridge.backends_are_initialized()


def _flag_name(token: str) -> str:
  return token.lstrip('-').split('=', 1)[0]


def _split_flags(flags: str) -> list[str]:
  try:
    return shlex.split(flags)  # Quoted values may hold spaces.
  except ValueError:
    return flags.split()


def merge_flags(existing: str, extra: str) -> tuple[str, str]:
  """Appends `extra` flags to `existing` ones without overriding any.

  XLA lets the last occurrence of a flag win, so a flag the user already
  set is not appended again: the user's value stays in force.

  Returns:
    (the merged string, the flags actually appended).
  """
  have = {_flag_name(t) for t in _split_flags(existing)}
  added = [t for t in _split_flags(extra) if _flag_name(t) not in have]
  merged = ' '.join(filter(None, [existing.strip(), *added]))
  return merged, ' '.join(added)


def configure(cfg: BackendConfig, *,
              environ: Optional[MutableMapping[str, str]] = None) -> str:
  """Puts `cfg.xla_flags` into the environment before the backend starts.

  'auto' takes `xla_flags(guess_platform())`, '' nothing, anything else
  those flags. They are appended to XLA_FLAGS (LIBTPU_INIT_ARGS on TPU);
  flags already set there keep their values.

  Args:
    cfg: the backend config section.
    environ: environment to edit (default os.environ).

  Returns:
    The flags appended ('' if none).

  Raises:
    RuntimeError: explicit flags requested after JAX's backend started
      (they could no longer take effect). For 'auto' this is a warning.
  """
  env = os.environ if environ is None else environ
  plat = guess_platform(env)
  spec = cfg.xla_flags.strip()
  flags = xla_flags(plat) if spec == 'auto' else spec
  var = flags_variable(plat)
  merged, added = merge_flags(env.get(var, ''), flags)
  if not added:
    return ''
  if backend_initialized():
    message = (f'backend.xla_flags: JAX already started its backend, so '
               f'{added!r} cannot take effect; call rlx.backend.configure '
               'before any JAX computation (scripts/train.py does)')
    if spec != 'auto':
      raise RuntimeError(message)
    warnings.warn(message)
    return ''
  env[var] = merged
  return added


# --- Multi-process JAX -------------------------------------------


def _env_int(env: Mapping[str, str], name: str) -> Optional[int]:
  value = env.get(name, '').strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f'{name}={value!r} is not an integer') from None


def _distributed_initialized() -> bool:
  is_initialized = getattr(jax.distributed, 'is_initialized', None)
  if is_initialized is not None:
    return is_initialized()
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client is not None  # Older JAX.


def detect_launcher(environ: Optional[Mapping[str, str]] = None
                    ) -> Optional[str]:
  """A multi-process launch visible in the environment, or None.

  The cases JAX's `jax.distributed.initialize()` fills in by itself: a
  SLURM step (srun) with more than one task, Open MPI (mpirun) with more
  than one rank, or a TPU pod slice on GKE / multislice. A pod slice on
  TPU VMs (gcloud ... ssh --worker=all) shows nothing in the environment
  (JAX asks the metadata server): pass --distributed=on there.
  """
  env = os.environ if environ is None else environ
  slurm = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_PROCID')
  if all(k in env for k in slurm) and (_env_int(env, 'SLURM_NTASKS') or 1) > 1:
    return 'slurm'
  if (_env_int(env, 'OMPI_COMM_WORLD_SIZE') or 1) > 1:
    return 'openmpi'
  hosts = [h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]
  if len(hosts) > 1 or env.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return 'tpu'
  return None


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, *,
                           enabled: str = 'auto',
                           environ: Optional[Mapping[str, str]] = None
                           ) -> bool:
  """Starts multi-process JAX (`jax.distributed.initialize`) when needed.

  Values come from the arguments, else from RLX_COORDINATOR_ADDRESS,
  RLX_NUM_PROCESSES and RLX_PROCESS_ID, else from JAX's own detection
  (SLURM, Open MPI, TPU pods; see `detect_launcher`). Every process runs
  the same command; process 0 hosts the coordinator.

  Args:
    coordinator_address: 'host:port' of process 0.
    num_processes: processes in the run.
    process_id: this process, in [0, num_processes).
    enabled: 'auto' (start it when the values or a launcher say there are
      several processes; a single process is a no-op), 'on' (always; JAX
      detects what is not given) or 'off' (never).
    environ: environment (default os.environ).

  Returns:
    Whether multi-process JAX is initialized after the call.

  Raises:
    ConfigError: for contradictory or incomplete settings.
  """
  env = os.environ if environ is None else environ
  if enabled not in ('auto', 'on', 'off'):
    raise ConfigError(f'--distributed={enabled!r} is not one of auto, on, '
                      'off')
  address = coordinator_address or env.get('RLX_COORDINATOR_ADDRESS') or None
  count = (num_processes if num_processes is not None
           else _env_int(env, 'RLX_NUM_PROCESSES'))
  index = (process_id if process_id is not None
           else _env_int(env, 'RLX_PROCESS_ID'))
  if count is not None and count < 1:
    raise ConfigError(f'--num_processes={count} must be >= 1')
  if index is not None and (index < 0 or (count is not None and
                                          index >= count)):
    raise ConfigError(f'--process_id={index} must be in [0, num_processes='
                      f'{count})')
  given = address is not None or index is not None or (count or 1) > 1
  if enabled == 'off':
    if given:
      raise ConfigError('--distributed=off contradicts the multi-process '
                        f'settings given (coordinator_address={address!r}, '
                        f'num_processes={count}, process_id={index})')
    return False
  if _distributed_initialized():
    return True
  launcher = detect_launcher(env)
  if enabled == 'auto':
    if count == 1 or not (given or launcher):
      return False  # One process: nothing to coordinate.
    if not launcher and None in (address, count, index):
      raise ConfigError(
          'a multi-process run needs all of --coordinator_address, '
          '--num_processes and --process_id (or RLX_COORDINATOR_ADDRESS, '
          'RLX_NUM_PROCESSES, RLX_PROCESS_ID) unless SLURM, Open MPI or a '
          f'TPU pod provides them; got coordinator_address={address!r}, '
          f'num_processes={count}, process_id={index}')
  if backend_initialized():
    raise RuntimeError('jax.distributed.initialize must run before JAX '
                       'starts its backend: call rlx.backend.'
                       'initialize_distributed first')
  if guess_platform() == 'cpu':
    # CPU processes exchange collectives through gloo (the default CPU
    # client has none across processes); how tests run multi-host.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=address,
                             num_processes=count, process_id=index)
  return True
