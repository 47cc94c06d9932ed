"""The RL loop: select -> generate -> score -> update -> log/checkpoint.

  run = setup(cfg, workdir)              # built, restored or initialised
  state, row = rl_step(run, state, step)  # one RL step (labelled blocks)
  train(cfg, workdir)                    # the loop around them

The Python loop only moves batches, runs verifiers, logs and checkpoints;
everything numeric happens in the jitted sampler and train step. Every
random choice is a function of (seed, step), and the prompt order is a
seeded permutation per epoch, so a run resumed from a checkpoint ends at
the same result as an uninterrupted one.

With rollout.overlap the rollout of step s + 1 runs in a background thread
(by the weights before step s's update, which the checkpoint keeps) while
step s trains: one-step off-policy training (`Prefetch`).
"""

from concurrent import futures
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from rlx import checkpoint
from rlx import config as config_lib
from rlx import evaluation
from rlx import learner
from rlx import logbook
from rlx import objectives
from rlx import packing
from rlx import policy as policy_lib
from rlx import rollouts
from rlx import sharding
from rlx import warmstart
from rlx import workdir as workdir_lib
from rlx.actor import Actor
from rlx.config import Config
from rlx.curriculum.controller import Curriculum
from rlx.data.task import load_task
from rlx.errors import ConfigError
from rlx.logbook import Logbook
from rlx.logbook import read_metrics
from rlx.models import lora
from rlx.models import transformer
from rlx.rewards import shaping

# Config keys that may change when a run is resumed (schedule and logging);
# anything else differing from the checkpoint's config is an error.
RESUMABLE_CHANGES = ('rl.num_steps', 'eval.every', 'log.', 'mesh.',
                     'backend.', 'optim.max_nonfinite')


class State(NamedTuple):
  """What one RL step changes (checkpointed with the counters)."""
  train: learner.TrainState  # Trainable params and optimizer state; each
  # update donates it.
  rollout: rollouts.RolloutState  # Curriculum and rollout-mode state (host).
  counters: dict  # Running totals written with every row (host numbers).


class Prefetch:
  """Where each step's rollout comes from.

  Without rollout.overlap a step's rollout is sampled when it is asked
  for, by the current weights. With it, step s + 1 is sampled in a
  background thread by the weights from before step s's update (`weights`,
  which the checkpoint keeps) while step s trains.

  Args:
    collect: (step, weights, version, rollout state) -> (collect's
      outputs, seconds it took).
    overlap: rollout.overlap.
    weights: the restored next weights (overlap), else None.
  """

  def __init__(self, collect: Callable, overlap: bool, weights=None):
    self._collect = collect
    self._pool = futures.ThreadPoolExecutor(1) if overlap else None
    self.weights = weights
    self._pending = None  # (version of its weights, future).

  def _launch(self, *args) -> futures.Future:
    if self._pool is not None:
      return self._pool.submit(self._collect, *args)
    done = futures.Future()
    done.set_result(self._collect(*args))
    return done

  def get(self, step: int, params, rollout_state):
    """(collect's outputs, busy seconds, version of the weights) of step
    `step`: launched by the step before, or now by `params` (or the
    restored next weights)."""
    if self._pending is None:  # Not launched by the step before.
      version = step if self.weights is None else step - 1
      self._pending = version, self._launch(
          step, params if self.weights is None else self.weights, version,
          rollout_state)
    (version, future), self._pending = self._pending, None
    out, busy = future.result()
    return out, busy, version

  def after(self, step: int, params, rollout_state, launch: bool) -> None:
    """overlap: `params` (before step `step`'s update) become the next
    weights, and with `launch` step + 1's rollout starts by them."""
    if self._pool is None:
      return
    # A copy: the train step donates the train state's buffers.
    self.weights = jax.tree.map(jnp.copy, params)
    if launch:
      self._pending = step, self._launch(step + 1, self.weights, step,
                                         rollout_state)

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)


@dataclasses.dataclass
class Run:
  """Everything a run holds besides its `State`, made by `setup`."""
  cfg: Config
  workdir: str
  plan: sharding.Plan
  task: Any
  policy: policy_lib.Policy
  actor: Actor  # The static actor: evaluation in every mode.
  mode: rollouts.Mode  # rollout.mode's sampler behind the curriculum.
  train_step: Callable  # (train state, ref, batch) -> (train state, metrics)
  ref_params: Any  # The train step's frozen argument: the KL reference, or
  # LoRA's base (None: neither).
  saved_ref: dict  # The checkpoint's 'ref' (its own KL reference or {}).
  recompute_logp: Callable  # (trainable params, batch) -> old log-probs.
  pack_chunks: int  # Chunks per packed minibatch (0: padded batches).
  ckpt: checkpoint.Checkpointer
  log: Logbook
  prefetch: Prefetch
  evaluate: Callable  # (step, trainable params) -> its eval row (logged).
  start_step: int  # The step resumed from (0: a fresh run).
  end: int  # The step this call stops after.
  state: State  # The state at start_step.
  last_eval: dict  # The newest eval row.
  elapsed: Callable  # () -> wall seconds of the run, earlier calls in.

  def close(self) -> None:
    self.prefetch.close()
    self.log.close()
    self.ckpt.close()


def train(cfg: Config, workdir: str, *, stop_after: int | None = None
          ) -> dict[str, Any]:
  """Runs (or resumes) RL training in `workdir`.

  The workdir is locked for the run (a second process is refused, naming
  the holder). It resumes from its newest checkpoint that verifies (newer
  ones that do not are moved to checkpoints.corrupt/, saying so); a
  workdir with logs but no finished checkpoint (a start killed before its
  first one) starts over, its rows set aside in metrics.jsonl.dropped.

  Args:
    cfg: the validated config.
    workdir: output directory (metrics.jsonl, tb/, checkpoints/).
    stop_after: stop after this many RL steps in this call (simulates a
      pre-emption; the run is resumable).

  Returns:
    {'params': final model params, 'step': last step, 'last_eval': the
    newest eval row}; with LoRA also 'adapters' (the trained ones) and
    'base' (the frozen base; 'params' is it with the adapters merged).

  Raises:
    ConfigError: the config does not fit the task, mesh or processes
      (every such problem at once), before anything is compiled.
    CheckpointError: the checkpoints cannot be resumed, or one cannot be
      written (naming the directory and the cause).
    WorkdirBusy: another process runs in `workdir`.
    NonFiniteUpdates: optim.max_nonfinite steps in a row were skipped.
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  # Process 0 holds the lock; if it cannot, every process stops.
  held = sharding.together(lambda: workdir_lib.acquire(workdir)
                           if jax.process_index() == 0 else None)
  try:
    run = setup(cfg, workdir, stop_after=stop_after)
    state, end = run.state, run.end
    try:
      for step in range(run.start_step, run.end):
        state, row = rl_step(run, state, step)
        if _record(run, state, step, row, end):  # rl.max_rollouts spent.
          end = step + 1
          break
    finally:
      run.close()
    out = {'params': run.policy.merged(state.train.params), 'step': end,
           'last_eval': run.last_eval}
    if run.policy.lora is not None:
      out.update(adapters=state.train.params, base=run.policy.base)
    return out
  finally:
    if held is not None:
      held.release()


def setup(cfg: Config, workdir: str, *, stop_after: int | None = None
          ) -> Run:
  """Builds a run in the (locked) `workdir`: its mesh, task, policy,
  curriculum, rollout mode and train step, and its state, restored from
  the newest good checkpoint or initialised (warm start, step-0 eval).

  Raises:
    ConfigError, CheckpointError: see `train`.
  """
  primary = jax.process_index() == 0
  # The console before the logbook exists (it opens at the resume step).
  say = lambda text: tqdm.tqdm.write(text, file=sys.stderr) if primary else None
  ckpt = _checkpointer(cfg, workdir, say)
  run_start = time.time()
  plan, splan, task = _placement(cfg, say)
  model, logits_fn = policy_lib.build_model(cfg, task.tokenizer.vocab_size)
  split, optimizer = (policy_lib.split_model(model),
                      learner.make_optimizer(cfg.optim))
  policy, init_params = _policy(cfg, model, plan, splan)
  warm_start = functools.partial(warmstart.load_or_train, cfg, logits_fn,
                                 task, log=say,
                                 progress=cfg.log.progress and primary)
  curriculum = _curriculum(cfg, model, logits_fn, split, task)
  mode_cls = rollouts.MODES.get(cfg.rollout.mode)
  abstract, state_sh, own_ref = _abstract_state(
      cfg, plan, policy, optimizer, curriculum, model, mode_cls, task)
  if policy.lora is not None:  # The base: fresh start and resume alike.
    _set_lora_base(cfg, plan, policy, warm_start(init_params())[0], say)
  start_step, saved, meta = _restore(ckpt, abstract, cfg, mode_cls, say)
  counters = {**_COUNTERS, **(meta['counters'] if start_step else {})}
  if start_step:
    say(f'resumed from step {start_step} ({ckpt.directory})')
  else:
    saved = _fresh_state(cfg, plan, policy, optimizer, state_sh, own_ref,
                         curriculum, mode_cls, task,
                         lambda: warm_start(init_params())[0])
  # Only process 0 writes (and starts W&B); if that fails, all stop.
  log = sharding.together(
      Logbook, workdir, total_steps=max(cfg.rl.num_steps, start_step),
      resume_step=start_step, tensorboard=cfg.log.tensorboard,
      progress=cfg.log.progress, primary=primary, config=cfg)
  base_elapsed = counters.pop('elapsed_s')  # Wall time of earlier runs.
  elapsed = lambda: base_elapsed + time.time() - run_start
  actor = Actor(model, task, cfg.sampling.max_new_tokens,
                top_k=cfg.sampling.top_k, plan=splan)
  # LoRA: the train step's frozen, non-donated argument is the base (and
  # KL reference); else the KL reference, if any.
  ref_params = (policy.base if policy.lora is not None else
                saved['ref'] or None)
  train_step = learner.make_train_step(
      logits_fn, optimizer, cfg, shardings=(
          state_sh, plan.replicated if ref_params is None else
          policy.param_shardings, plan.batch((_minibatch(cfg),)),
          plan.replicated), merge_fn=policy.merge_fn, split=split)
  pack_chunks = _pack_chunks(cfg, plan, say)
  if start_step == 0 and cfg.log.memory_stats:
    _log_memory(log, train_step, saved['train'], ref_params, cfg, plan,
                task, pack_chunks)
  mode = mode_cls(cfg, model=model, task=task, curriculum=curriculum,
                  actor=actor)
  evaluate = functools.partial(_evaluate, cfg, actor, policy, log, elapsed)
  last_eval = (evaluate(0, saved['train'].params) if start_step == 0 else
               _last_eval(workdir))
  # Host-local again (on many hosts it was restored as a global array).
  cur_state = jax.tree.map(lambda x: jnp.asarray(sharding.to_host(x)),
                           saved['curriculum'])
  state = State(train=saved['train'],
                rollout=rollouts.RolloutState(cur_state, saved['partial']),
                counters=counters)
  return Run(
      cfg=cfg, workdir=workdir, plan=plan, task=task, policy=policy,
      actor=actor, mode=mode, train_step=train_step, ref_params=ref_params,
      saved_ref=saved['ref'],
      recompute_logp=_recompute_fn(cfg, logits_fn, split, policy),
      pack_chunks=pack_chunks, ckpt=ckpt, log=log,
      prefetch=Prefetch(functools.partial(_collect, cfg, mode, policy),
                        cfg.rollout.overlap, saved.get('sampler')),
      evaluate=evaluate, start_step=start_step,
      end=_end_step(cfg, start_step, stop_after, log, workdir), state=state,
      last_eval=last_eval, elapsed=elapsed)


def rl_step(run: Run, state: State, step: int) -> tuple[State, dict]:
  """RL step `step`: returns the new state and the step's metrics row."""
  cfg = run.cfg
  t0 = time.time()
  # SELECT, GENERATE, SCORE: the rollout mode samples the prompts the
  # curriculum chooses and scores them with the task's verifier.
  (groups, rollout_state, metrics), busy, version = run.prefetch.get(
      step, state.train.params, state.rollout)
  t1 = time.time()
  counters = dict(state.counters)
  counters['rollouts/total'] += groups.rollouts
  counters['tokens/decoded_total'] += groups.decoded_tokens
  spent = bool(cfg.rl.max_rollouts and
               counters['rollouts/total'] >= cfg.rl.max_rollouts)
  run.prefetch.after(step, state.train.params, rollout_state,
                     launch=step + 1 < run.end and not spent)
  # SHAPE: rewards for the objective (the verifier's stay in the row).
  rewards = groups.rewards
  if cfg.objective.overlong_buffer:  # DAPO overlong shaping.
    rewards = rewards + np.asarray(shaping.overlong_penalty(
        groups.lengths, max_len=cfg.sampling.max_new_tokens,
        buffer=cfg.objective.overlong_buffer))
  # ADVANTAGE, UPDATE: the jitted train step (advantages inside it).
  train_state, learned = _update(run, state.train, groups.batch(
      rewards=rewards, old_logp=groups.logp))
  counters['learner/nonfinite_total'] += int(learned['nonfinite'])
  counters['learner/nonfinite_run'] = (
      counters['learner/nonfinite_run'] + 1 if learned['nonfinite'] else 0)
  # LOG: the row (written, evaluated and checkpointed by `train`).
  sampled = np.arange(groups.rewards.shape[1]) < groups.counts[:, None]
  lengths = groups.lengths[sampled]
  row = {
      'step': step + 1,
      # Verifier rewards (before any shaping) of the trained groups.
      'reward/mean': float(groups.rewards[sampled].mean()),
      'reward/zero_var_group_frac': metrics['curriculum/zero_var_frac'],
      'response/len_mean': float(lengths.mean()),
      'response/len_max': int(lengths.max()),
      'response/truncated_frac': float(np.mean(
          groups.finish[sampled] == 2)),
      **{k: counters[k] for k in ('rollouts/total', 'tokens/decoded_total',
                                  'learner/nonfinite_total')},
      # Waiting for the rollout (all of it unless rollout.overlap).
      'time/rollout_s': t1 - t0,
      'time/train_s': time.time() - t1,
      'time/elapsed_s': run.elapsed(),
      **{f'learner/{k}': float(v) for k, v in learned.items()},
      **metrics,  # curriculum/, rollout/ and tree/ metrics.
  }
  if cfg.rollout.overlap:  # The rollout's own time, and the staleness.
    row['time/rollout_busy_s'] = busy
    row['rollout/policy_lag'] = step - version
  return State(train_state, rollout_state, counters), row


def _update(run: Run, train_state, batch: learner.Batch):
  """The learner's updates on a step's batch: (train state, metrics)."""
  cfg = run.cfg
  if not run.pack_chunks:  # Packed rows have a fixed length instead.
    batch = learner.trim_batch(batch)
  parts = learner.minibatches(batch, cfg)
  if run.pack_chunks:
    parts = [learner.pack_batch(p, chunks=run.pack_chunks) for p in parts]
  if cfg.rl.recompute_old_logp:  # Under the weights before the updates.
    parts = [p._replace(old_logp=run.recompute_logp(train_state.params, p))
             for p in parts]
  metrics, skipped = {}, 0
  for part in parts:
    train_state, metrics = run.train_step(train_state, run.ref_params,
                                          run.plan.put_batch(part))
    skipped += metrics['nonfinite']
  metrics = jax.device_get({**metrics, 'nonfinite': skipped})
  if run.pack_chunks:  # Rows per minibatch, and the share of slots used.
    rows = [p.packed.bundle for p in parts]
    metrics['pack_rows'] = np.mean([r.shape[0] * r.shape[1] for r in rows])
    metrics['pack_fill'] = np.mean([np.mean(r > 0) for r in rows])
  return train_state, metrics


def _record(run: Run, state: State, step: int, row: dict, end: int
            ) -> bool:
  """Writes step `step`'s row, evaluates and checkpoints on schedule;
  returns whether rl.max_rollouts is spent (the run stops).

  Raises:
    NonFiniteUpdates: optim.max_nonfinite steps in a row were skipped.
  """
  cfg, counters = run.cfg, state.counters
  spent = bool(cfg.rl.max_rollouts and
               counters['rollouts/total'] >= cfg.rl.max_rollouts)
  last = step + 1 == cfg.rl.num_steps or spent
  streak = counters['learner/nonfinite_run']
  if (step + 1) % cfg.log.every == 0 or last or streak:
    run.log.write(row)
  if streak >= cfg.optim.max_nonfinite:
    raise learner.NonFiniteUpdates(
        f'step {step + 1}: {streak} RL steps in a row had a '
        'non-finite loss or gradient (optim.max_nonfinite='
        f'{cfg.optim.max_nonfinite}); their updates were skipped and the '
        f'run stops. The newest checkpoint (step {run.ckpt.latest_step()}) '
        'is finite; see learner/nonfinite and reward/mean in '
        'metrics.jsonl (a reward of NaN or inf, or too high a learning '
        'rate?)')
  if (step + 1) % cfg.eval.every == 0 or last:
    run.last_eval = run.evaluate(step + 1, state.train.params)
  run.log.advance(row['reward/mean'], run.last_eval.get('eval/pass@1'))
  if (step + 1) % cfg.log.checkpoint_every == 0 or step + 1 == end or spent:
    # LoRA: the adapters and their optimizer state; the base is not saved.
    saved = {'train': state.train, 'ref': run.saved_ref,
             'curriculum': run.plan.to_global(state.rollout.curriculum),
             'partial': state.rollout.mode}
    if cfg.rollout.overlap:
      saved['sampler'] = run.prefetch.weights
    run.ckpt.save(step + 1, saved,
                  {'counters': {**counters, 'elapsed_s': run.elapsed()},
                   'config': config_lib.to_dict(cfg)},
                  finite=('train', 'ref', 'sampler'))
  if spent:
    run.log.message(f'stopping after step {step + 1}: rl.max_rollouts='
                    f'{cfg.rl.max_rollouts} responses sampled')
  return spent


_COUNTERS = {'rollouts/total': 0, 'tokens/decoded_total': 0,
             'learner/nonfinite_total': 0,
             'learner/nonfinite_run': 0,  # The current streak of skips.
             'elapsed_s': 0.0}


def _checkpointer(cfg: Config, workdir: str, say) -> checkpoint.Checkpointer:
  """The run's checkpoints; a workdir without a finished one starts over
  (its rows set aside)."""
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                 max_to_keep=cfg.log.keep)
  if ckpt.latest_step() is None and jax.process_index() == 0:
    dropped = workdir_lib.set_aside_unfinished(workdir)
    if dropped:
      say(f'{workdir} has no finished checkpoint: starting over; the '
          f'{dropped} rows of the earlier start are in metrics.jsonl.dropped')
  return ckpt


def _set_lora_base(cfg: Config, plan: sharding.Plan, policy, base,
                   say) -> None:
  policy.set_base(plan.put(base, policy.param_shardings))
  say(f'LoRA rank {cfg.lora.rank} on {list(cfg.lora.targets)}: '
      f'{lora.count_params(policy.abstract_trainable):,} trainable of '
      f'{transformer.count_params(policy.abstract_params):,} parameters')


def _recompute_fn(cfg: Config, logits_fn, split, policy) -> Callable:
  """(trainable params, minibatch) -> old-policy log-probs from the
  learner's forward (packed or padded, as the train step's), for
  rl.recompute_old_logp."""
  forward = jax.jit(lambda p, part: learner.forward_logp(
      logits_fn, cfg, p, part, split)[0])
  return lambda p, part: forward(policy.merged(p), part)


def _collect(cfg: Config, mode: rollouts.Mode, policy, step: int, weights,
             version: int, rollout_state):
  """Step `step`'s rollout by `weights` (trainable params of `version`):
  the mode's outputs and the seconds they took."""
  start = time.time()
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), 1),
                           step)
  out = mode.collect(policy.for_sampler(weights), rollout_state,
                     rollouts.Request(step=step, key=key, version=version))
  return out, time.time() - start


def _evaluate(cfg: Config, actor: Actor, policy, log: Logbook, elapsed,
              step: int, trainable) -> dict:
  """Evaluates `trainable` (the same draws every time) and logs the row
  and sample completions."""
  row, records = evaluation.evaluate(
      actor, policy.for_sampler(trainable), cfg.eval,
      evaluation.eval_key(cfg.seed),
      max_new_tokens=cfg.sampling.max_new_tokens, records=True)
  row = {'step': step, **row, 'time/elapsed_s': elapsed()}
  log.write(row)
  log.log_samples(step, records)
  log.message(f'eval step {step}: pass@1 {row["eval/pass@1"]:.3f}')
  return row


def _end_step(cfg: Config, start_step: int, stop_after: int | None, log,
              workdir: str) -> int:
  """The step this call trains up to."""
  end = cfg.rl.num_steps
  if end < start_step:
    log.message(f'{workdir} is already at step {start_step}, past '
                f'rl.num_steps={end}: nothing to train (raise rl.num_steps '
                'to extend the run)')
    end = start_step
  if stop_after is not None:
    end = min(end, start_step + stop_after)
  return end


def _placement(cfg: Config, say) -> tuple[sharding.Plan, sharding.Plan, Any]:
  """(learner plan, sampler plan, task), the config checked against them
  before anything is compiled."""
  plan = sharding.Plan.from_config(cfg.mesh)
  # A separate sampler mesh gets an explicit weight reshard every step.
  splan = (sharding.Plan.from_config(cfg.mesh, sampler=True)
           if cfg.mesh.sampler_shape else plan)
  # Process 0 prepares the dataset files; the others then read them.
  task = sharding.primary_first(load_task, cfg.task,
                                policy_lib.load_tokenizer(cfg))
  _preflight(cfg, plan, task)
  say(f'mesh {dict(plan.mesh.shape)} over {plan.size} of '
      f'{jax.device_count()} {jax.devices()[0].platform} devices'
      + (f'; sampler mesh {dict(splan.mesh.shape)}'
         if splan is not plan else ''))
  for note in task.notes:
    say(note)
  return plan, splan, task


def _policy(cfg: Config, model, plan: sharding.Plan, splan: sharding.Plan):
  """(Policy, () -> initial params): random init or model.hf_dir's
  weights, loaded only when needed (a full fine-tuning run resumes from
  its checkpoint alone)."""
  init_fn = functools.partial(transformer.init_params, model.cfg)
  seed_key = jax.random.key(cfg.warmstart.seed)
  logical = transformer.logical_specs(model.cfg)
  abstract_params = jax.eval_shape(init_fn, seed_key)
  param_sh = plan.params(abstract_params, logical)
  policy = policy_lib.Policy(
      cfg, plan=plan, sampler_plan=splan, abstract_params=abstract_params,
      param_shardings=param_sh,
      sampler_param_shardings=splan.params(abstract_params, logical))
  return policy, lambda: policy_lib.initial_params(cfg, model.cfg, seed_key,
                                                   param_sh)


def _curriculum(cfg: Config, model, logits_fn, split, task) -> Curriculum:
  """The curriculum over the pool, with the policy's prompt embeddings
  and reference-solution scores for the selectors that use them (the
  scorer is built on its first use)."""
  pool = cfg.curriculum.pool_size or len(task.train)
  scorer = functools.cache(lambda: policy_lib.reference_logprob_fn(
      cfg, logits_fn, split, task, pool))
  return Curriculum(cfg.curriculum, cfg.rl, pool,
                    values_estimator=objectives.ADVANTAGES.get(
                        cfg.objective.advantage).estimator,
                    embed_fn=policy_lib.prompt_embed_fn(model, task),
                    score_fn=lambda params, ids: scorer()(params, ids),
                    seed=cfg.seed)


def _abstract_state(cfg: Config, plan: sharding.Plan, policy, optimizer,
                    curriculum: Curriculum, model, mode_cls, task):
  """(the checkpoint's abstract tree, train-state shardings, whether the
  run keeps its own KL reference)."""
  abstract_state = jax.eval_shape(functools.partial(
      learner.init_state, optimizer=optimizer), policy.abstract_trainable)
  state_sh = sharding.train_state_shardings(plan, optimizer, abstract_state,
                                            policy.trainable_shardings)
  # LoRA: the KL reference is the frozen base, never checkpointed.
  own_ref = bool(cfg.objective.kl_beta) and policy.lora is None
  abstract = {'train': sharding.with_shardings(abstract_state, state_sh),
              'ref': sharding.with_shardings(policy.abstract_params,
                                             policy.param_shardings)
                     if own_ref else {},
              'curriculum': plan.global_abstract(
                  curriculum.abstract(model.cfg.embed_dim)),
              # The rollout mode's own (APRIL's partial buffer), or {}.
              'partial': mode_cls.init_state(cfg, task)}
  if cfg.rollout.overlap:  # The weights sampling the next step.
    abstract['sampler'] = sharding.with_shardings(abstract_state.params,
                                                  state_sh.params)
  return abstract, state_sh, own_ref


def _fresh_state(cfg: Config, plan: sharding.Plan, policy, optimizer,
                 state_sh, own_ref: bool, curriculum: Curriculum, mode_cls,
                 task, warm_params: Callable) -> dict:
  """The state of step 0, in the checkpoint's layout."""
  if policy.lora is None:
    params = plan.put(warm_params(), policy.param_shardings)
  else:
    params = policy.base
  trainable = policy.init_trainable(
      params, jax.random.fold_in(jax.random.key(cfg.seed), 3))
  # The reference is a copy: the train state's buffers are donated.
  return {'train': jax.jit(functools.partial(
      learner.init_state, optimizer=optimizer), out_shardings=state_sh)(
          trainable),
          'ref': jax.tree.map(jnp.copy, params) if own_ref else {},
          'curriculum': curriculum.init(params),
          'partial': mode_cls.init_state(cfg, task)}


def _restore(ckpt: checkpoint.Checkpointer, abstract: dict, cfg: Config,
             mode, say) -> tuple[int, dict | None, dict | None]:
  """(step, state, metadata) of the newest checkpoint that restores and
  verifies; (0, None, None) when there is none.

  Newer checkpoints that fail (unreadable, or arrays that differ from what
  was written) are moved to checkpoints.corrupt/, saying so, once an older
  one has restored; when none restores nothing is moved and the error
  names each failure.

  Raises:
    CheckpointError: the newest readable checkpoint was made with a
      different config, or none restores.
  """
  failures = []
  for step in sorted(ckpt.all_steps(), reverse=True):
    try:
      # The config first: a changed one would also change what is restored.
      _check_same_config(ckpt.meta(step)['config'], cfg, ckpt.directory)
      state, meta = ckpt.restore(step, abstract)
      try:  # The mode's state (APRIL's carried responses), before sampling.
        mode.check_state(cfg, state['partial'])
      except ValueError as e:
        raise checkpoint.CorruptCheckpoint(
            f'checkpoint {ckpt.directory}/{step}: {e}') from e
    except checkpoint.CorruptCheckpoint as e:
      failures.append((step, str(e)))
      continue
    if failures and jax.process_index() == 0:
      for bad, why in failures:
        say(f'{why}; moved to {ckpt.set_aside(bad)}')
      say(f'resuming from the newest good checkpoint, step {step}')
    sharding.sync('rlx-checkpoints-set-aside')
    ckpt.reload()
    return step, state, meta
  if failures:
    raise checkpoint.CheckpointError(
        'no checkpoint restores: ' + '; '.join(why for _, why in failures))
  return 0, None, None


def _last_eval(workdir: str) -> dict:
  """The newest evaluation row of a resumed run's metrics.jsonl ({}:
  none)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  rows = read_metrics(path) if os.path.exists(path) else []
  evals = [r for r in rows if 'eval/pass@1' in r]
  return evals[-1] if evals else {}


def _check_same_config(saved: dict, cfg: Config, path: str) -> None:
  # The saved config went through JSON (tuples came back as lists).
  current = json.loads(json.dumps(config_lib.to_dict(cfg)))
  changed = [k for k in config_lib.diff(config_lib.fill_defaults(saved),
                                        current)
             if not k.startswith(RESUMABLE_CHANGES)]
  if changed:
    raise checkpoint.CheckpointError(
        f'the checkpoint in {path} was made with a different config '
        f'(differs in: {", ".join(changed)}); resume with the same config, '
        'or use a new --workdir.')


def _minibatch(cfg: Config) -> int:
  return cfg.rl.batch_prompts // cfg.rl.num_minibatches


def _pack_chunks(cfg: Config, plan: sharding.Plan, message) -> int:
  """Chunks the learner packs each minibatch into (one per micro-batch and
  batch shard); 0: packing off (`optim.packing`, or chunks that would not
  divide the minibatch's prompts)."""
  if not cfg.optim.packing:
    return 0
  mini = _minibatch(cfg)
  shards = mini // plan.batch((mini,)).shard_shape((mini,))[0]
  chunks = cfg.optim.num_microbatches * shards
  if mini % chunks:
    message(f'optim.packing: off, since {cfg.optim.num_microbatches} '
            f'micro-batches x {shards} batch shards do not divide the '
            f'{mini} prompts per minibatch; the learner runs on the padded '
            'batch')
    return 0
  return chunks


def _preflight(cfg: Config, plan: sharding.Plan, task) -> None:
  """Every problem of the config against the mesh, the processes and the
  task's data, at once (one ConfigError, a line each), before any
  compilation."""
  problems = (_task_size_problems(cfg, task) + _mesh_problems(cfg, plan) +
              _overlap_problems(cfg, plan) +
              logbook.wandb_problems(cfg.log))
  if not rollouts.MODES.get(cfg.rollout.mode).multi_host and (
      jax.process_count() > 1):
    # The engine and tree samplers run on one device of this process.
    problems.append(
        f'rollout.mode: {cfg.rollout.mode!r} samples on one device and does '
        f'not run with {jax.process_count()} processes; use '
        'rollout.mode=static for multi-host runs')
  if problems:
    raise ConfigError('\n'.join(problems))


def _task_size_problems(cfg: Config, task) -> list[str]:
  """Files may hold fewer problems than the config asks for."""
  n_train, n_test = len(task.train), len(task.test)
  pool = cfg.curriculum.pool_size or n_train
  problems = []
  if not cfg.rl.batch_prompts <= pool <= n_train:
    key = ('curriculum.pool_size' if cfg.curriculum.pool_size else
           'rl.batch_prompts')
    problems.append(
        f'{key}: the task has {n_train} training prompts; need '
        f'rl.batch_prompts={cfg.rl.batch_prompts} <= curriculum.pool_size '
        f'<= {n_train}')
  if cfg.eval.num_prompts > n_test:
    problems.append(
        f'eval.num_prompts: {cfg.eval.num_prompts}, but the task has only '
        f'{n_test} held-out prompts')
  return problems


def _overlap_problems(cfg: Config, plan: sharding.Plan) -> list[str]:
  """rollout.overlap runs the sampler's and the learner's programs at the
  same time: only where they cannot interleave collectives."""
  if not cfg.rollout.overlap or not (
      plan.size > 1 or cfg.mesh.sampler_shape or jax.process_count() > 1):
    return []
  return [f'rollout.overlap: needs a one-device mesh in one process (mesh '
          f'of {plan.size} devices, mesh.sampler_shape='
          f'{tuple(cfg.mesh.sampler_shape)}, {jax.process_count()} '
          'processes): concurrent sampler and learner programs on several '
          'devices could interleave their collectives and deadlock; set '
          'mesh.shape=(1, 1, 1) or rollout.overlap=False']


def _mesh_problems(cfg: Config, plan: sharding.Plan) -> list[str]:
  """Train batches shard B over the `batch` axes: they must divide it."""
  size = 1
  for axis in plan.axes_for('batch'):
    size *= plan.mesh.shape[axis]
  if _minibatch(cfg) % size == 0:
    return []
  return [f'mesh.shape: {tuple(plan.mesh.shape.values())}: the batch axes '
          f'{plan.axes_for("batch")} span {size} devices, which must divide '
          f'the prompts per minibatch ({_minibatch(cfg)} = rl.batch_prompts '
          '/ rl.num_minibatches); change mesh.shape or rl.batch_prompts']


def _log_memory(log, train_step, train_state, ref_params, cfg: Config,
                plan: sharding.Plan, task, pack_chunks: int) -> None:
  """Compiles the largest train step ahead of time and logs its memory."""
  b, g, t = _minibatch(cfg), cfg.rl.group_size, cfg.sampling.max_new_tokens
  p = task.train_prompts.shape[1]
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
  batch = learner.Batch(
      prompt=spec((b, p), jnp.int32), prompt_mask=spec((b, p), bool),
      response=spec((b, g, t), jnp.int32), loss_mask=spec((b, g, t), bool),
      old_logp=spec((b, g, t), jnp.float32), rewards=spec((b, g), jnp.float32),
      group_mask=spec((b, g), bool),
      behaviour_logp=spec((b, g, t), jnp.float32),
      entropy=spec((b, g, t), jnp.float32),
      values=spec((b,), jnp.float32) if 'values' in objectives.reads(
          cfg.objective.advantage) else None, **rollouts.MODES.get(cfg.rollout.mode).batch_fields(
          cfg, b, g))
  if pack_chunks:  # At most one row per sample.
    rows = spec((pack_chunks, packing.max_rows(b * g, pack_chunks),
                 p + t - 1), jnp.int32)
    batch = batch._replace(packed=packing.Packed(
        tokens=rows, positions=rows, bundle=rows, branch=rows,
        src=spec((b, g, t), jnp.int32)))
  stats = sharding.memory_stats(train_step, train_state, ref_params, batch)
  if stats:
    fmt = sharding.format_bytes
    log.message(
        f'train step [B={b}, G={g}, T={t}] memory per device: arguments '
        f'{fmt(stats["argument"])}, temporaries {fmt(stats["temp"])}, '
        f'outputs {fmt(stats["output"])} (donated {fmt(stats["alias"])})')
