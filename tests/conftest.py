"""Test setup, done before JAX is imported.

- 8 simulated CPU devices.
- One persistent compilation cache for the whole run: the trainer tests
  compile the same programs (train step, sampler, evaluation) again and
  again, in both xdist workers and in the scripts they start as
  subprocesses, which all inherit these variables. The process that makes
  the folder (pytest's main process) removes it at exit. A cache folder
  set in the environment beforehand is used as it is and kept.
"""

import atexit
import os
import shutil
import tempfile

os.environ['JAX_PLATFORMS'] = 'cpu'
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')

if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='rlx-tests-jax-cache-')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  # Every program, however quick to compile (JAX's defaults skip those
  # under a second, which are most of the suite's); a folder of the
  # user's keeps the user's thresholds.
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
