"""Rollout throughput: static batching vs continuous batching vs APRIL.

  python scripts/bench_rollout.py --steps=4 --slots=64

Workload: the warm-started default chain_arith policy (configs default,
`warmstart.load_or_train`, reused from its cache) sampling its own
responses at temperature 1 on training prompts. Chain lengths follow a
truncated Zipf law, so response lengths are long-tailed (10..80 tokens,
most short). All three modes get the same KV memory (--slots rows) and want
--groups groups of --group_size responses per RL step:

  static      the jitted sampler on --slots rows at a time; a call lasts as
              long as its longest response;
  continuous  the slot engine; finished slots are refilled between chunks;
  april       the engine with 2x over-provisioning; stops at --groups
              complete groups and carries the rest to the next step,
              where partial responses are re-prefilled;
  april_kv    the same, but the partial responses keep their slot and KV
              cache and go on decoding (rollout.april.resume=keep_kv).

Weights are fixed (no learning), so every step samples the same
distribution; the policy version still advances so staleness is reported.
Prints useful tokens/s (response tokens of returned groups), seconds per
step and slot utilisation, with ratios to static measured in this process
(the modes' steps interleaved, so a drift in machine speed reaches all);
then decode tokens/s of the chunked engine against a naive Python loop over
a jitted single step, and against the roofline from the measured matmul
rate and memory bandwidth.

--rl_steps > 0 runs the RL comparison instead (seconds per RL step and
held-out pass@1 after that many trainer steps, static vs continuous vs
APRIL): it hands over to scripts/bench_rl_modes.py.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from rlx import config as config_lib
from rlx import policy as policy_lib
from rlx.models import transformer
from rlx.sampling import engine as en
from rlx.sampling import partial
from rlx.sampling import sampler as sampler_lib

_STEPS = flags.DEFINE_integer('steps', 4, 'Timed RL steps per mode (after '
                              'one untimed warm-up step).')
_SLOTS = flags.DEFINE_integer('slots', 64, 'R: KV-cache rows for every mode.')
_GROUPS = flags.DEFINE_integer('groups', 16, 'N: groups per RL step.')
_GROUP_SIZE = flags.DEFINE_integer('group_size', 8, 'G: responses per group.')
_CHUNK = flags.DEFINE_integer('chunk_steps', 16, 'Engine decode chunk k.')
_INSERT_ROWS = flags.DEFINE_integer('insert_rows', 0, 'Engine insert width '
                                    'M; 0: slots // 8.')
_PREFILL_PROMPTS = flags.DEFINE_integer(
    'prefill_prompts', 0, 'Engine U: prompts prefilled together, each once '
    'for its group\'s rows; 0: slots // 4.')
_DECODE_STEPS = flags.DEFINE_integer('decode_steps', 64, 'Steps timed in the '
                                     'decode-speed comparison; 0 skips it.')
_RL_STEPS = flags.DEFINE_integer('rl_steps', 0, 'RL steps per mode and seed '
                                 '(through scripts/bench_rl_modes.py); 0: '
                                 'rollout throughput only.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1'], 'RL seeds (--rl_steps).')


def _setup():
  cfg = config_lib.build(config_lib.default_config_dict())
  return (cfg, *policy_lib.warm_started_policy(cfg))


def _engine_cfg(cfg, task, *, chunk, stop=True) -> en.EngineConfig:
  tok = task.tokenizer
  return en.EngineConfig(
      num_slots=_SLOTS.value, prompt_len=cfg.task.prompt_len,
      max_new_tokens=cfg.sampling.max_new_tokens,
      stop_tokens=(tok.eos_id,) if stop else (), pad_id=tok.pad_id,
      chunk_steps=chunk, insert_rows=_INSERT_ROWS.value,
      prefill_prompts=_PREFILL_PROMPTS.value)


def _prompt_ids(task, start: int, n: int) -> np.ndarray:
  """Training prompts start..start+n-1 (wrapping), the same for all modes."""
  return np.arange(start, start + n) % len(task.train)


def _bench_static(model, params, cfg, task):
  tok, g = task.tokenizer, _GROUP_SIZE.value
  sample = sampler_lib.transformer_sampler(model, sampler_lib.SamplerConfig(
      max_new_tokens=cfg.sampling.max_new_tokens, stop_tokens=(tok.eos_id,),
      pad_id=tok.pad_id))
  per_call = _SLOTS.value // g

  def step(i):
    idx = _prompt_ids(task, i * _GROUPS.value, _GROUPS.value)
    useful = busy = 0
    for c in range(0, len(idx), per_call):
      part = idx[c:c + per_call]
      out = sample(params, task.train_prompts[part],
                   task.train_prompt_mask[part], jax.random.key(i * 100 + c),
                   1.0, 1.0, num_samples=g)
      lengths = np.asarray(out.lengths)
      useful += lengths.sum()
      busy += _SLOTS.value * lengths.max()  # Rows x steps the loop ran.
    return useful, useful / busy, {}

  return step


def _bench_continuous(engine, params, task):
  sampler = en.ContinuousSampler(engine)

  def step(i):
    idx = _prompt_ids(task, i * _GROUPS.value, _GROUPS.value)
    out = sampler(params, task.train_prompts[idx],
                  task.train_prompt_mask[idx], jax.random.key(i), 1.0,
                  num_samples=_GROUP_SIZE.value, version=i)
    return (int(np.asarray(out.lengths).sum()),
            sampler.last_stats['slot_utilisation'], {})

  return step


def _bench_april(engine, params, task, *, keep_kv=False):
  sampler = partial.AprilSampler(
      engine, partial.AprilConfig(_GROUPS.value, keep_kv=keep_kv),
      group_size=_GROUP_SIZE.value)
  state = {'buf': sampler.init_buffer(), 'next': 0}

  def step(i):
    n = sampler.prompts_needed(state['buf'])
    idx = _prompt_ids(task, state['next'], n)
    state['next'] += n
    batch, state['buf'], metrics = sampler(
        params, state['buf'], task.train_prompts[idx],
        task.train_prompt_mask[idx], idx, jax.random.key(i), 1.0, version=i)
    return (int(np.asarray(batch.rollout.lengths).sum()),
            metrics['rollout/slot_utilisation'], metrics)

  return step


def _time_interleaved(modes: dict) -> dict:
  """Times every mode's steps 1..--steps, interleaved (step i of each mode,
  the order rotating per step), so that a drift in the machine's speed
  reaches every mode alike; step 0 of each is a warm-up (compilation, and
  APRIL's first, N' step)."""
  for step_fn in modes.values():
    step_fn(0)
  names = list(modes)
  useful = dict.fromkeys(names, 0)
  seconds = dict.fromkeys(names, 0.0)
  util = {name: [] for name in names}
  extra = dict.fromkeys(names)
  for i in range(1, _STEPS.value + 1):
    k = i % len(names)
    for name in names[k:] + names[:k]:
      start = time.perf_counter()
      u, ut, extra[name] = modes[name](i)
      seconds[name] += time.perf_counter() - start
      useful[name] += u
      util[name].append(ut)
  return {name: {'tok_s': useful[name] / seconds[name],
                 's_step': seconds[name] / _STEPS.value,
                 'util': float(np.mean(util[name])), **extra[name]}
          for name in names}


def _fill(engine, params, state, task):
  """Inserts a prompt into every slot (M rows per insert call)."""
  ecfg = engine.cfg
  m, u = ecfg.rows_per_insert, ecfg.prompts_per_prefill
  idx = _prompt_ids(task, 0, u)
  pool = engine.prefill(params, task.train_prompts[idx],
                        task.train_prompt_mask[idx], width=ecfg.prompt_len)
  for start in range(0, ecfg.num_slots, m):
    req = en.Requests(
        slot=np.arange(start, start + m, dtype=np.int32),
        source=np.arange(start, start + m, dtype=np.int32) % u,
        prefix=en.empty_tracks((m,), ecfg.max_new_tokens))
    state = engine.insert(params, state, pool, req, jnp.float32(1.0),
                          jnp.float32(1.0), jnp.int32(0), width=0)
  return state


def _decode_speed(model, params, cfg, task) -> dict:
  """Decode tokens/s with every slot live (no stop token), chunked engine
  vs a Python loop calling the jitted decode one step at a time."""
  out = {}
  for name, chunk in (('engine', _CHUNK.value), ('naive', 1)):
    engine = en.transformer_engine(model, _engine_cfg(cfg, task, chunk=chunk,
                                                      stop=False))
    args = (jnp.float32(1.0), jnp.float32(1.0), jnp.int32(0),
            jnp.int32(_SLOTS.value + 1))
    for timed in (False, True):  # The first pass compiles.
      state = _fill(engine, params, engine.init(jax.random.key(0)), task)
      jax.block_until_ready(state)
      start = time.perf_counter()
      for _ in range(_DECODE_STEPS.value // chunk):
        state = engine.decode(params, state, *args)
      steps = int(state.steps)  # Blocks until done.
      seconds = time.perf_counter() - start
    out[name] = _SLOTS.value * steps / seconds
  return out


def _roofline(mcfg, params, cache_len: int) -> dict:
  """Tokens/s bound: max(FLOPs / matmul rate, bytes / bandwidth) per step."""
  def best_time(fn, x, reps=5):
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(reps):
      start = time.perf_counter()
      jax.block_until_ready(fn(x))
      times.append(time.perf_counter() - start)
    return min(times)

  n = 1024
  flops_rate = 2 * n ** 3 / best_time(jax.jit(lambda a: a @ a),
                                      jnp.ones((n, n), jnp.float32))
  big = jnp.ones((32 * 2 ** 20,), jnp.float32)  # 128 MiB: beyond caches.
  bandwidth = big.nbytes / best_time(jax.jit(jnp.sum), big)  # Read only.
  r, s, d, v = _SLOTS.value, cache_len, mcfg.embed_dim, mcfg.vocab_size
  kv = mcfg.num_layers * 2 * mcfg.num_kv_heads * s * mcfg.head_dim
  n_params = transformer.count_params(params)
  matmul = 2 * (n_params - v * d) + 2 * v * d  # Tied: logits use the table.
  attn = mcfg.num_layers * 4 * s * mcfg.num_heads * mcfg.head_dim
  flops_tok = matmul + attn
  bytes_step = 4 * n_params + r * 4 * kv  # f32 weights once, each KV row.
  step_s = max(r * flops_tok / flops_rate, bytes_step / bandwidth)
  return {'tok_s': r / step_s, 'flops_rate': flops_rate,
          'bandwidth': bandwidth, 'flops_tok': flops_tok,
          'bytes_tok': bytes_step / r}


def main(argv):
  del argv
  if _RL_STEPS.value:  # The trainer with each rollout.mode.
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          'bench_rl_modes.py')
    os.execv(sys.executable, [
        sys.executable, script, f'--rl_steps={_RL_STEPS.value}',
        '--modes=static,continuous,april', '--seeds=' + ','.join(
            _SEEDS.value)])
  if _SLOTS.value % _GROUP_SIZE.value:
    sys.exit(f'--slots={_SLOTS.value} must be a multiple of '
             f'--group_size={_GROUP_SIZE.value} (static calls hold whole '
             'groups)')
  cfg, task, model, params = _setup()
  print(f'device: {jax.devices()[0].device_kind}; model '
        f'{transformer.count_params(params):,} parameters; slots '
        f'{_SLOTS.value}; {_GROUPS.value} groups x {_GROUP_SIZE.value} per '
        f'step; T={cfg.sampling.max_new_tokens}')

  # --- Rollout steps, side by side ---
  engine = en.transformer_engine(model, _engine_cfg(cfg, task,
                                                    chunk=_CHUNK.value))
  en.precompile(engine, params)
  modes = {'static': _bench_static(model, params, cfg, task),
           'continuous': _bench_continuous(engine, params, task),
           'april': _bench_april(engine, params, task),
           'april_kv': _bench_april(engine, params, task, keep_kv=True)}
  rows = _time_interleaved(modes)
  base = rows['static']['tok_s']
  print('\n| mode | useful tok/s | x static | s/step | slot util |')
  print('|---|---|---|---|---|')
  for name, row in rows.items():
    print(f"| {name} | {row['tok_s']:.0f} | {row['tok_s'] / base:.2f} | "
          f"{row['s_step']:.3f} | {row['util']:.2f} |")
  for name in ('april', 'april_kv'):
    m = rows[name]
    print(f"{name} (last step): off-policy token frac "
          f"{m['rollout/off_policy_token_frac']:.2f}, staleness "
          + ', '.join(f"{k.split('/')[-1]}: {v:.2f}" for k, v in m.items()
                      if k.startswith('rollout/staleness/'))
          + f", insert calls {m['rollout/insert_calls']:.0f}"
          + (f", kept-cache rows {m['rollout/kept_kv_rows']:.0f}"
             if 'rollout/kept_kv_rows' in m else ''))

  # --- Decode speed against a naive loop and the roofline ---
  if not _DECODE_STEPS.value:
    return
  speed = _decode_speed(model, params, cfg, task)
  roof = _roofline(model.cfg, params, cfg.task.prompt_len +
                   cfg.sampling.max_new_tokens)
  print(f"\nmatmul {roof['flops_rate'] / 1e9:.1f} GFLOP/s, bandwidth "
        f"{roof['bandwidth'] / 1e9:.1f} GB/s; per token "
        f"{roof['flops_tok'] / 1e6:.2f} MFLOP, "
        f"{roof['bytes_tok'] / 1e3:.1f} kB")
  print('| decode | tok/s | x naive | of roofline |')
  print('|---|---|---|---|')
  for name in ('engine', 'naive'):
    print(f"| {name} | {speed[name]:.0f} | "
          f"{speed[name] / speed['naive']:.2f} | "
          f"{speed[name] / roof['tok_s']:.1%} |")
  print(f"| roofline | {roof['tok_s']:.0f} | | 100% |")


if __name__ == '__main__':
  app.run(main)
