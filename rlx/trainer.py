"""The RL loop: select -> generate -> reward -> update -> log/checkpoint.

The Python loop only moves batches, runs verifiers, logs and checkpoints;
everything numeric happens in the jitted sampler and train step. Every
random choice is a function of (seed, step), and the prompt order is a
seeded permutation per epoch, so a run resumed from a checkpoint ends at
the same result as an uninterrupted one.

With rollout.overlap the rollout of step s + 1 runs in a background thread
(by the weights before step s's update, which the checkpoint keeps) while
step s trains: one-step off-policy training.
"""

from concurrent import futures
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from rlx import checkpoint
from rlx import config as config_lib
from rlx import evaluation
from rlx import learner
from rlx import lm_head
from rlx import packing
from rlx import policy as policy_lib
from rlx import sharding
from rlx import warmstart
from rlx import workdir as workdir_lib
from rlx.actor import Actor
from rlx.config import Config
from rlx.data import loader
from rlx.data.task import load_task
from rlx import logbook
from rlx.logbook import Logbook
from rlx.logbook import read_metrics
from rlx.rewards import shaping
from rlx.curriculum.controller import Curriculum
from rlx.models import kv_cache
from rlx.models import lora
from rlx.models import transformer
from rlx.replay import partial_buffer as pb
from rlx.sampling import modes

# Config keys that may change when a run is resumed (schedule and logging);
# anything else differing from the checkpoint's config is an error.
RESUMABLE_CHANGES = ('rl.num_steps', 'eval.every', 'log.', 'mesh.',
                     'backend.', 'optim.max_nonfinite')


def build_model(cfg: Config, vocab_size: int):
  """(model, logits_fn): rlx's transformer sized by `model.*`, or the
  architecture of `model.hf_dir` (weights: `policy.initial_params`)."""
  mcfg = policy_lib.model_config(cfg, vocab_size)
  from rlx import backend  # pylint: disable=g-import-not-at-top
  # The attention kernel is a runtime choice per platform: parameters,
  # checkpoints and the warm-start cache key (cfg.model) do not depend on it.
  attention = backend.resolve_attention(
      cfg.backend.attention, backend.platform(), mcfg,
      capability=backend.compute_capability())
  mcfg = dataclasses.replace(mcfg, attention=attention,
                             attention_chunk=cfg.backend.attention_chunk,
                             causal_block=cfg.backend.causal_block)
  model = transformer.Transformer(mcfg)

  def logits_fn(params, tokens, positions, mask):
    return model.apply({'params': params}, tokens, positions, mask)[0]

  return model, logits_fn


def split_model(model: transformer.Transformer) -> lm_head.SplitLM:
  """The model split at its output projection (`optim.logits_chunk`)."""
  return lm_head.SplitLM(
      hidden=lambda params, tokens, positions, mask: model.apply(
          {'params': params}, tokens, positions, mask)[2],
      unembedding=functools.partial(transformer.unembedding, model.cfg),
      dtype=jnp.dtype(model.cfg.dtype))


def _restore(ckpt: checkpoint.Checkpointer, abstract: dict, cfg: Config,
             say) -> tuple[int, dict | None, dict | None]:
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
      if state['partial']:  # APRIL's carried responses, before sampling.
        try:
          pb.validate(state['partial']['buffer'],
                      max_new_tokens=cfg.sampling.max_new_tokens)
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
    return _train(cfg, workdir, stop_after)
  finally:
    if held is not None:
      held.release()


def _train(cfg: Config, workdir: str, stop_after: int | None
           ) -> dict[str, Any]:
  """`train` in a locked workdir."""
  primary = jax.process_index() == 0
  # The console before the logbook exists (it opens at the resume step).
  say = lambda text: tqdm.tqdm.write(text, file=sys.stderr) if primary else None
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                 max_to_keep=cfg.log.keep)
  if ckpt.latest_step() is None and primary:
    dropped = workdir_lib.set_aside_unfinished(workdir)
    if dropped:
      say(f'{workdir} has no finished checkpoint: starting over; the '
          f'{dropped} rows of the earlier start are in metrics.jsonl.dropped')
  run_start = time.time()

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
  model, logits_fn = build_model(cfg, task.tokenizer.vocab_size)
  split = split_model(model)
  optimizer = learner.make_optimizer(cfg.optim)
  init_fn = functools.partial(transformer.init_params, model.cfg)
  seed_key = jax.random.key(cfg.warmstart.seed)
  logical = transformer.logical_specs(model.cfg)
  abstract_params = jax.eval_shape(init_fn, seed_key)
  param_sh = plan.params(abstract_params, logical)
  sampler_param_sh = splan.params(abstract_params, logical)
  policy = policy_lib.Policy(cfg, plan=plan, sampler_plan=splan,
                             abstract_params=abstract_params,
                             param_shardings=param_sh,
                             sampler_param_shardings=sampler_param_sh)
  # Random init or model.hf_dir's weights; loaded only when needed (a full
  # fine-tuning run resumes from its checkpoint alone).
  init_params = lambda: policy_lib.initial_params(cfg, model.cfg, seed_key,
                                                  param_sh)
  warm_start = functools.partial(warmstart.load_or_train, cfg, logits_fn,
                                 task, log=say,
                                 progress=cfg.log.progress and primary)
  pool = cfg.curriculum.pool_size or len(task.train)
  score_fn = (reference_logprob_fn(cfg, logits_fn, split, task, pool)
              if cfg.curriculum.selector == 'likelihood' else None)
  curriculum = Curriculum(cfg.curriculum, cfg.rl, pool,
                          advantage=cfg.objective.advantage,
                          embed_fn=_embed_fn(model, task), score_fn=score_fn,
                          seed=cfg.seed)
  abstract_state = jax.eval_shape(functools.partial(
      learner.init_state, optimizer=optimizer), policy.abstract_trainable)
  state_sh = sharding.train_state_shardings(plan, optimizer, abstract_state,
                                            policy.trainable_shardings)
  # LoRA: the KL reference is the frozen base, never checkpointed.
  own_ref = bool(cfg.objective.kl_beta) and policy.lora is None
  abstract = {'train': sharding.with_shardings(abstract_state, state_sh),
              'ref': sharding.with_shardings(abstract_params, param_sh)
                     if own_ref else {},
              'curriculum': plan.global_abstract(
                  curriculum.abstract(model.cfg.embed_dim)),
              # APRIL's partial buffer and data cursor ({} in other modes).
              'partial': modes.init_partial(cfg, task)}
  if cfg.rollout.overlap:  # The weights sampling the next step.
    abstract['sampler'] = sharding.with_shardings(abstract_state.params,
                                                  state_sh.params)
  # learner/nonfinite_run: the current streak of skipped updates.
  counters = {'rollouts/total': 0, 'tokens/decoded_total': 0,
              'learner/nonfinite_total': 0, 'learner/nonfinite_run': 0,
              'elapsed_s': 0.0}
  if policy.lora is not None:  # The base: fresh start and resume alike.
    base, _ = warm_start(init_params())
    policy.set_base(plan.put(base, param_sh))
    say(f'LoRA rank {cfg.lora.rank} on {list(cfg.lora.targets)}: '
        f'{lora.count_params(policy.abstract_trainable):,} trainable of '
        f'{transformer.count_params(abstract_params):,} parameters')
  start_step, state, meta = _restore(ckpt, abstract, cfg, say)
  if start_step:
    counters.update(meta['counters'])
    say(f'resumed from step {start_step} ({ckpt.directory})')
  else:
    if policy.lora is None:
      params, _ = warm_start(init_params())
      params = plan.put(params, param_sh)
    else:
      params = policy.base
    trainable = policy.init_trainable(
        params, jax.random.fold_in(jax.random.key(cfg.seed), 3))
    # The reference is a copy: the train state's buffers are donated.
    state = {'train': jax.jit(functools.partial(
        learner.init_state, optimizer=optimizer), out_shardings=state_sh)(
            trainable),
             'ref': jax.tree.map(jnp.copy, params) if own_ref else {},
             'curriculum': curriculum.init(params),
             'partial': modes.init_partial(cfg, task)}
  # Only process 0 writes (and starts W&B); if that fails, all stop.
  log = sharding.together(
      Logbook, workdir, total_steps=max(cfg.rl.num_steps, start_step),
      resume_step=start_step, tensorboard=cfg.log.tensorboard,
      progress=cfg.log.progress, primary=primary, config=cfg)
  train_state, ref_params = state['train'], state['ref'] or None
  if policy.lora is not None:
    # The train step's frozen, non-donated argument: base and KL reference.
    ref_params = policy.base
  # Host-local again (on many hosts it was restored as a global array).
  cur_state = jax.tree.map(lambda x: jnp.asarray(sharding.to_host(x)),
                           state['curriculum'])
  partial_state = state['partial']

  base_elapsed = counters.pop('elapsed_s')  # Wall time of earlier runs.
  elapsed = lambda: base_elapsed + time.time() - run_start
  actor = Actor(model, task, cfg.sampling.max_new_tokens,
                top_k=cfg.sampling.top_k, plan=splan)
  train_step = learner.make_train_step(
      logits_fn, optimizer, cfg,
      shardings=(state_sh, param_sh if ref_params is not None else
                 plan.replicated, plan.batch((_minibatch(cfg),)),
                 plan.replicated), merge_fn=policy.merge_fn, split=split)
  pack_chunks = _pack_chunks(cfg, plan, say)
  if start_step == 0 and cfg.log.memory_stats:
    _log_memory(log, train_step, train_state, ref_params, cfg, plan, task,
                pack_chunks)
  to_sampler = policy.for_sampler  # LoRA: merged once per call.

  # rollout.mode: the sampler behind the curriculum, or APRIL's own step.
  # Evaluation always uses the static `actor` (same draws in every mode).
  rollouts = modes.Rollouts(cfg, model=model, task=task,
                            curriculum=curriculum, actor=actor)

  # Old-policy log-probs from the learner's forward (packed or padded, as
  # the train step's), for rl.recompute_old_logp.
  recompute_jit = jax.jit(lambda p, part: learner.forward_logp(
      logits_fn, cfg, p, part, split)[0])
  recompute_logp = lambda p, part: recompute_jit(policy.merged(p), part)
  base_key = jax.random.key(cfg.seed)
  eval_key = evaluation.eval_key(cfg.seed)  # Same draws every eval.

  def run_eval(step: int) -> dict:
    row, records = evaluation.evaluate(
        actor, to_sampler(train_state.params), cfg.eval, eval_key,
        max_new_tokens=cfg.sampling.max_new_tokens, records=True)
    row = {'step': step, **row, 'time/elapsed_s': elapsed()}
    log.write(row)
    log.log_samples(step, records)
    log.message(f'eval step {step}: pass@1 {row["eval/pass@1"]:.3f}')
    return row

  last_eval = run_eval(0) if start_step == 0 else _last_eval(workdir)
  end = cfg.rl.num_steps
  if end < start_step:
    log.message(f'{workdir} is already at step {start_step}, past '
                f'rl.num_steps={end}: nothing to train (raise rl.num_steps '
                'to extend the run)')
    end = start_step
  if stop_after is not None:
    end = min(end, start_step + stop_after)
  rl = cfg.rl

  def collect(step, weights, version, cur_state, partial_state):
    """Step `step`'s rollout by `weights` (trainable params of `version`);
    returns collect's outputs and the seconds it took."""
    start = time.time()
    key = jax.random.fold_in(jax.random.fold_in(base_key, 1), step)
    out = rollouts.collect(cur_state, partial_state, to_sampler(weights),
                           key, step, version=version)
    return out, time.time() - start

  # rollout.overlap: step s + 1 is sampled in this thread by the weights
  # before step s's update (`sampler`, checkpointed) while step s trains.
  overlap = futures.ThreadPoolExecutor(1) if cfg.rollout.overlap else None

  def launch(*args) -> futures.Future:
    if overlap is not None:
      return overlap.submit(collect, *args)
    done = futures.Future()
    done.set_result(collect(*args))
    return done

  # (version of the sampling weights, future): the step to train next.
  pending = None
  sampler = state.get('sampler')  # Restored (overlap): the next weights.
  try:
    for step in range(start_step, end):
      t0 = time.time()
      if pending is None:  # Not launched by the step before.
        version = step if sampler is None else step - 1
        pending = version, launch(
            step, train_state.params if sampler is None else sampler,
            version, cur_state, partial_state)
      (version, future), pending = pending, None
      (got, cur_state, partial_state, cur_metrics), busy = future.result()
      t1 = time.time()
      counters['rollouts/total'] += got.rollouts
      counters['tokens/decoded_total'] += got.decoded_tokens
      spent = bool(rl.max_rollouts and counters['rollouts/total']
                   >= rl.max_rollouts)
      if overlap is not None:
        # A copy: the train step donates train_state's buffers.
        sampler = jax.tree.map(jnp.copy, train_state.params)
        if step + 1 < end and not spent:
          pending = step, launch(step + 1, sampler, step, cur_state,
                                 partial_state)
      rewards = got.rewards
      if cfg.objective.overlong_buffer:  # DAPO overlong shaping.
        rewards = rewards + np.asarray(shaping.overlong_penalty(
            got.lengths, max_len=cfg.sampling.max_new_tokens,
            buffer=cfg.objective.overlong_buffer))
      batch = rollouts.batch(got, rewards=rewards, old_logp=got.logp)
      if not pack_chunks:  # Packed rows have a fixed length instead.
        batch = learner.trim_batch(batch)
      parts = learner.minibatches(batch, cfg)
      if pack_chunks:
        parts = [learner.pack_batch(p, chunks=pack_chunks) for p in parts]
      if rl.recompute_old_logp:  # Under the weights before this step's updates.
        parts = [p._replace(old_logp=recompute_logp(train_state.params, p))
                 for p in parts]
      metrics, skipped = {}, 0
      for part in parts:
        train_state, metrics = train_step(train_state, ref_params,
                                          plan.put_batch(part))
        skipped += metrics['nonfinite']
      metrics = jax.device_get({**metrics, 'nonfinite': skipped})
      counters['learner/nonfinite_total'] += int(metrics['nonfinite'])
      nonfinite_run = (counters['learner/nonfinite_run'] + 1
                       if metrics['nonfinite'] else 0)
      counters['learner/nonfinite_run'] = nonfinite_run
      if pack_chunks:  # Rows per minibatch, and the share of slots used.
        rows = [p.packed.bundle for p in parts]
        metrics['pack_rows'] = np.mean([r.shape[0] * r.shape[1] for r in rows])
        metrics['pack_fill'] = np.mean([np.mean(r > 0) for r in rows])
      sampled = np.arange(got.rewards.shape[1]) < got.counts[:, None]
      lengths = got.lengths[sampled]
      row = {
          'step': step + 1,
          # Verifier rewards (before any shaping) of the trained groups.
          'reward/mean': float(got.rewards[sampled].mean()),
          'reward/zero_var_group_frac': cur_metrics[
              'curriculum/zero_var_frac'],
          'response/len_mean': float(lengths.mean()),
          'response/len_max': int(lengths.max()),
          'response/truncated_frac': float(np.mean(got.finish[sampled] == 2)),
          'rollouts/total': counters['rollouts/total'],
          'tokens/decoded_total': counters['tokens/decoded_total'],
          'learner/nonfinite_total': counters['learner/nonfinite_total'],
          # Waiting for the rollout (all of it unless rollout.overlap).
          'time/rollout_s': t1 - t0,
          'time/train_s': time.time() - t1,
          'time/elapsed_s': elapsed(),
          **{f'learner/{k}': float(v) for k, v in metrics.items()},
          **cur_metrics,
          **got.metrics,  # rollout/ (engine modes) and tree/ metrics.
      }
      if overlap is not None:  # The rollout's own time, and the staleness.
        row['time/rollout_busy_s'] = busy
        row['rollout/policy_lag'] = step - version
      last = step + 1 == cfg.rl.num_steps or spent
      if (step + 1) % cfg.log.every == 0 or last or nonfinite_run:
        log.write(row)
      if nonfinite_run >= cfg.optim.max_nonfinite:
        raise learner.NonFiniteUpdates(
            f'step {step + 1}: {nonfinite_run} RL steps in a row had a '
            'non-finite loss or gradient (optim.max_nonfinite='
            f'{cfg.optim.max_nonfinite}); their updates were skipped and the '
            f'run stops. The newest checkpoint (step {ckpt.latest_step()}) '
            'is finite; see learner/nonfinite and reward/mean in '
            'metrics.jsonl (a reward of NaN or inf, or too high a learning '
            'rate?)')
      if (step + 1) % cfg.eval.every == 0 or last:
        last_eval = run_eval(step + 1)
      log.advance(row['reward/mean'], last_eval.get('eval/pass@1'))
      if (step + 1) % cfg.log.checkpoint_every == 0 or step + 1 == end or spent:
        # LoRA: the adapters and their optimizer state; the base is not saved.
        saved = {'train': train_state, 'ref': state['ref'],
                 'curriculum': plan.to_global(cur_state),
                 'partial': partial_state}
        if overlap is not None:
          saved['sampler'] = sampler
        ckpt.save(step + 1, saved,
                  {'counters': {**counters, 'elapsed_s': elapsed()},
                   'config': config_lib.to_dict(cfg)},
                  finite=('train', 'ref', 'sampler'))
      if spent:
        log.message(f'stopping after step {step + 1}: rl.max_rollouts='
                    f'{rl.max_rollouts} responses sampled')
        end = step + 1
        break
  finally:
    if overlap is not None:
      overlap.shutdown(wait=True, cancel_futures=True)
    log.close()
    ckpt.close()
  out = {'params': policy.merged(train_state.params), 'step': end,
         'last_eval': last_eval}
  if policy.lora is not None:
    out.update(adapters=train_state.params, base=policy.base)
  return out


def warm_started_policy(cfg: Config):
  """(task, model, params) of the warm-started policy, unsharded: what the
  benchmarks sample from (the warm start is trained on first use)."""
  task = load_task(cfg.task)
  model, logits_fn = build_model(cfg, task.tokenizer.vocab_size)
  init_p = transformer.init_params(model.cfg,
                                   jax.random.key(cfg.warmstart.seed))
  params, _ = warmstart.load_or_train(cfg, logits_fn, task, init_p)
  return task, model, params


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
  if cfg.rollout.mode != 'static' and jax.process_count() > 1:
    # The engine and tree samplers run on one device of this process.
    problems.append(
        f'rollout.mode: {cfg.rollout.mode!r} samples on one device and does '
        f'not run with {jax.process_count()} processes; use '
        'rollout.mode=static for multi-host runs')
  if problems:
    raise config_lib.ConfigError('\n'.join(problems))


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
      values=spec((b,), jnp.float32) if cfg.objective.advantage == 'spo'
      else None, **modes.abstract_batch_fields(cfg, b, g))
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


def reference_logprob_fn(cfg: Config, logits_fn, split: lm_head.SplitLM,
                         task, pool: int):
  """(params, prompt ids [n]) -> [n] float32 log-probability of each
  prompt's reference solution and its eos under the policy, at
  sampling.temperature (the likelihood selector); -inf where the solution
  does not fit in sampling.max_new_tokens (no sample can be it).

  One forward pass per prompt, in chunks of the learner's micro-batch rows
  (B G / (rl.num_minibatches optim.num_microbatches): what a train step
  already holds), the last padded; the ids go through sorted by solution
  length, each chunk cut to its longest solution rounded up to 16 tokens
  and its longest prompt rounded up to 8 (little padding, a few shapes to
  compile).

  Raises:
    ConfigError: when a selectable prompt has no reference solution
      (task.name=math_files keeps final answers only), before any work.
  """
  solutions = task.train.solutions[:pool]
  empty = sum(not s for s in solutions)
  if empty:
    raise config_lib.ConfigError(
        "curriculum.selector: 'likelihood' scores the policy's "
        f'log-probability of each prompt\'s reference solution, but {empty} '
        f'of the {pool} selectable train prompts have none (task.name='
        f'{cfg.task.name!r} keeps final answers only); choose another '
        'selector')
  tok, t = task.tokenizer, cfg.sampling.max_new_tokens
  # Token rows stay ragged; each chunk is padded when it is scored.
  solution_rows = [tok.encode(sol, add_eos=True) for sol in solutions]
  lengths = np.array([len(r) for r in solution_rows])
  fits = lengths <= t
  p = task.train_prompts.shape[1]
  prompt_lengths = task.train_prompt_mask[:pool].sum(-1)
  chunk = max(1, _minibatch(cfg) * cfg.rl.group_size //
              cfg.optim.num_microbatches)

  @jax.jit
  def score(params, prompt, prompt_mask, resp, resp_mask):
    logp, _ = learner.response_logprobs(
        logits_fn, params, prompt, prompt_mask, resp,
        temperature=cfg.sampling.temperature, split=split,
        logits_chunk=cfg.optim.logits_chunk)
    return jnp.sum(jnp.where(resp_mask, logp, 0.0), -1)

  def fn(params, ids):
    ids = np.asarray(ids, int)
    # Chunks of similar lengths pad less (the result is in `ids` order).
    order = np.argsort(lengths[ids], kind='stable')
    out = np.empty(len(ids), np.float32)
    for s in range(0, len(ids), chunk):
      part = ids[order[s:s + chunk]]
      rows = np.concatenate([part, np.full(chunk - len(part), part[0])])
      width = learner.round_up(int(lengths[part].max()), 16, t)
      left = p - learner.round_up(int(prompt_lengths[part].max()), 8, p)
      response, mask = loader.pad_rows(
          [solution_rows[i][:width] for i in rows], length=width,
          pad_id=tok.pad_id, left=False)
      out[order[s:s + chunk]] = sharding.to_host(score(
          params, task.train_prompts[rows, left:],
          task.train_prompt_mask[rows, left:], response, mask))[:len(part)]
    return np.where(fits[ids], out, -np.inf).astype(np.float32)

  return fn


def _embed_fn(model, task):
  """(params, prompt ids) -> [n, D] mean final hidden state over the prompt."""
  @jax.jit
  def embed(params, tokens, mask):
    positions = kv_cache.positions_from_mask(mask)
    attn = kv_cache.causal_mask(mask, query_len=tokens.shape[1],
                                cache_index=0)
    hidden = model.apply({'params': params}, tokens, positions, attn)[2]
    w = mask[..., None].astype(hidden.dtype)
    return jnp.sum(hidden * w, 1) / jnp.maximum(jnp.sum(w, 1), 1.0)

  return lambda params, ids: embed(params, task.train_prompts[ids],
                                   task.train_prompt_mask[ids])
