"""Supervised warm start on task demonstrations, cached by config.

RL from a random policy never sees a reward on a reasoning task, so the
policy first imitates worked solutions for a fixed number of steps. The
result is saved (atomically, with orbax) under `warmstart.cache_dir/<key>`,
where the key fingerprints everything that determines it (task, model,
warm-start settings, seed); any later run with the same key reuses it.
"""

import dataclasses
import os
import sys
import time
from typing import Callable

from absl import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from rlx import checkpoint
from rlx import config as config_lib
from rlx import errors
from rlx import registry
from rlx.config import Config, fingerprint
from rlx.data import chain_arith
from rlx.data import loader
from rlx.data.task import Task
from rlx import learner
from rlx.learner import LogitsFn, response_logprobs
from rlx.models import transformer
from rlx.types import Params


@config_lib.section('warmstart')
@dataclasses.dataclass(frozen=True)
class WarmstartConfig:
  num_steps: int = 600  # Supervised steps on demonstrations; 0 skips.
  batch_size: int = 64  # Demonstrations per step.
  learning_rate: float = 3e-3  # Peak AdamW learning rate (cosine decay).
  warmup_steps: int = 50  # Linear warmup.
  demo_error_rate: float = 0.15  # Per-step slip rate in the demonstrations
  # (imperfect data, as human-written solutions are; RL removes the slips).
  seed: int = 0  # Warm-start seed (separate from the RL seed, so RL seeds
  # can share one warm start).
  max_steps: int = 0  # Imitate only train prompts with at most this many
  # steps (longer chains stay unseen until RL); 0: all of them.
  cache_dir: str = '~/.cache/rlx/warmstart'  # Reused across runs by key.


@registry.config_check
def _check_warmstart_section(cfg) -> None:
  """warmstart.*."""
  ws = cfg.warmstart
  errors.require(ws.num_steps >= 0, 'warmstart.num_steps', 'must be >= 0')
  errors.require(ws.batch_size > 0, 'warmstart.batch_size', 'must be positive')
  errors.require(0 <= ws.demo_error_rate <= 1, 'warmstart.demo_error_rate',
                 'must be in [0, 1]')
  errors.require(0 <= ws.max_steps <= cfg.task.max_steps,
                 'warmstart.max_steps',
                 f'must be in [0, task.max_steps={cfg.task.max_steps}]')
  errors.require(ws.learning_rate > 0, 'warmstart.learning_rate',
                 'must be > 0')
  errors.require(ws.warmup_steps >= 0, 'warmstart.warmup_steps',
                 'must be >= 0')


def cache_key(cfg: Config) -> str:
  ws = dataclasses.asdict(cfg.warmstart)
  ws.pop('cache_dir')
  return fingerprint({'task': dataclasses.asdict(cfg.task),
                      'model': dataclasses.asdict(cfg.model),
                      'max_new_tokens': cfg.sampling.max_new_tokens,
                      'warmstart': ws})


def _make_sft_step(logits_fn: LogitsFn, optimizer):
  def loss_fn(params, batch):
    logp, _ = response_logprobs(logits_fn, params, batch['prompt'],
                                batch['prompt_mask'], batch['response'])
    mask = batch['response_mask'].astype(jnp.float32)
    return -jnp.sum(logp * mask) / jnp.maximum(jnp.sum(mask), 1.0)

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


_RESPONSE_BUCKET = 16  # Response lengths are bucketed by this many tokens.


def _length_buckets(demos: dict) -> list[np.ndarray]:
  lengths = demos['response_mask'].sum(-1)
  bucket = (lengths - 1) // _RESPONSE_BUCKET
  return [np.flatnonzero(bucket == b) for b in np.unique(bucket)]


def _bucket_shape(demos: dict, members: np.ndarray) -> tuple[int, int]:
  """(prompt, response) lengths covering every member, rounded up."""
  p_full = demos['prompt'].shape[1]
  t_full = demos['response'].shape[1]
  p = learner.round_up(int(demos['prompt_mask'][members].sum(-1).max()), 8,
                       p_full)
  t = learner.round_up(int(demos['response_mask'][members].sum(-1).max()),
                       _RESPONSE_BUCKET, t_full)
  return p, t


def _trim(batch: dict, shape: tuple[int, int]) -> dict:
  p, t = shape
  return {'prompt': jnp.asarray(batch['prompt'][:, -p:]),
          'prompt_mask': jnp.asarray(batch['prompt_mask'][:, -p:]),
          'response': jnp.asarray(batch['response'][:, :t]),
          'response_mask': jnp.asarray(batch['response_mask'][:, :t])}


def train_sft(cfg: Config, logits_fn: LogitsFn, task: Task, params: Params,
              *, log: Callable[[str], None] = print,
              progress: bool = False) -> Params:
  """Runs `warmstart.num_steps` supervised steps from `params`.

  Progress goes to a bar of its own (`progress`; with its ETA) or, ten
  times over the run, to `log`; the final loss to `log` either way.
  """
  ws = cfg.warmstart
  prompts, solutions = task.train.prompts, task.train.solutions
  if ws.demo_error_rate:
    noise = np.random.default_rng([ws.seed, 7])
    solutions = [chain_arith.noisy_solution(p, noise, ws.demo_error_rate)
                 for p in prompts]
  if ws.max_steps:
    keep = [i for i, p in enumerate(prompts)
            if chain_arith.num_steps(p) <= ws.max_steps]
    prompts = [prompts[i] for i in keep]
    solutions = [solutions[i] for i in keep]
  demos = loader.encode_demonstrations(
      task.tokenizer, prompts, solutions,
      prompt_len=cfg.task.prompt_len,
      response_len=cfg.sampling.max_new_tokens)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, ws.learning_rate, max(ws.warmup_steps, 1),
      max(ws.num_steps, ws.warmup_steps + 1),
      end_value=ws.learning_rate * 0.1)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(schedule, b1=0.9, b2=0.99))
  opt_state = optimizer.init(params)
  step_fn = _make_sft_step(logits_fn, optimizer)
  buckets = _length_buckets(demos)
  weights = np.array([len(b) for b in buckets], np.float64)
  rng = np.random.default_rng(ws.seed)
  start = time.time()
  bar = tqdm.tqdm(total=ws.num_steps, desc='warm start', disable=not progress,
                  dynamic_ncols=True, file=sys.stderr)
  for i in range(ws.num_steps):
    # One length bucket per step: batches are trimmed to the bucket's
    # longest demonstration instead of the global maximum.
    members = buckets[rng.choice(len(buckets), p=weights / weights.sum())]
    idx = members[rng.integers(0, len(members), ws.batch_size)]
    batch = _trim({k: v[idx] for k, v in demos.items()},
                  _bucket_shape(demos, members))
    params, opt_state, loss = step_fn(params, opt_state, batch)
    bar.update(1)
    if (i + 1) % max(ws.num_steps // 10, 1) == 0 or i + 1 == ws.num_steps:
      line = (f'warm start {i + 1}/{ws.num_steps}: nll/token '
              f'{float(loss):.4f} ({time.time() - start:.0f}s)')
      bar.set_postfix({'nll': f'{float(loss):.3f}'})
      if progress and i + 1 < ws.num_steps:
        logging.info(line)  # The bar shows it; the log file keeps it.
      else:
        log(line)
  bar.close()
  return params


def cache_path(cfg: Config) -> str:
  """Where the warm start of `cfg` is cached."""
  return os.path.join(os.path.expanduser(cfg.warmstart.cache_dir),
                      cache_key(cfg))


def load_cached(cfg: Config, init_params: Params) -> Params | None:
  """The cached warm start of `cfg` in the shardings of `init_params`
  (whose shapes it has); None when it is not cached."""
  path = cache_path(cfg)
  if not (os.path.isdir(path) and
          checkpoint.Checkpointer(path).latest_step() is not None):
    return None
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=getattr(x, 'sharding', None)),
      init_params)
  return checkpoint.load_params(path, abstract)[0]


def load_or_train(cfg: Config, logits_fn: LogitsFn, task: Task,
                  init_params: Params, *,
                  log: Callable[[str], None] = print,
                  progress: bool = False) -> tuple[Params, dict]:
  """The warm-start parameters: from the cache if present, else trained.

  Returns:
    (params, info) where info has the cache path, whether it was reused,
    and the seconds spent.
  """
  start = time.time()
  if cfg.warmstart.num_steps == 0:
    return init_params, {'path': '', 'reused': False, 'seconds': 0.0}
  path = cache_path(cfg)
  params = load_cached(cfg, init_params)
  if params is not None:
    log(f'warm start: reusing {path}')
    return params, {'path': path, 'reused': True,
                    'seconds': time.time() - start}
  log(f'warm start: training {cfg.warmstart.num_steps} supervised steps '
      f'({transformer.count_params(init_params):,} parameters)')
  params = train_sft(cfg, logits_fn, task, init_params, log=log,
                     progress=progress)
  checkpoint.save_params(path, params, {'key': cache_key(cfg)})
  log(f'warm start: saved {path}')
  return params, {'path': path, 'reused': False,
                  'seconds': time.time() - start}
