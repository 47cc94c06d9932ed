"""Rollout modes: one place that turns `rollout.mode` into what the trainer
consumes (a step's training groups, their metrics, and the Batch).

  static      the jitted sampler (`sampler.py`): one batch per call, as long
              as its longest response;
  continuous  the slot engine (`engine.ContinuousSampler`), a drop-in for
              the static sampler: same Rollout, finished slots refilled;
  april       APRIL (`partial.AprilSampler`) drives the step: the next
              prompts in data order top the flight up to N' groups, the
              first B groups to finish are trained on, the others wait in
              the partial buffer (checkpointed under 'partial' with the
              data cursor) and resume first at the next step;
  tree        tree rollouts (`tree.TreeSampler`): W = G leaves per prompt
              sharing decoded prefixes; their path ids reach the Batch for
              the `tree` / `treerl` advantages.

static, continuous and tree go through `Curriculum.collect` with a
`rollout_fn`, so every selector and filter works with them (tree needs the
fixed allocator: one tree of W leaves per prompt). The engine modes
(continuous, april, tree) sample on one device: on a larger mesh the
weights are copied there every step.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rlx import learner
from rlx.actor import Actor
from rlx.config import Config, rollout_engine_sizes
from rlx.curriculum import estimators as est
from rlx.curriculum.controller import Collected, Curriculum, epoch_order
from rlx.replay import partial_buffer as pb
from rlx.rewards import chain_arith as chain_arith_reward
from rlx.rewards import math_answer
from rlx.sampling import engine as en
from rlx.sampling import partial
from rlx.sampling import tree as tree_lib
from rlx.sampling import tree_rules

_CHUNK_STEPS = 16  # rollout.chunk_steps = 0.
_PREFILL_BUCKET = 16  # rollout.prefill_bucket = 0.


@dataclasses.dataclass
class StepGroups(Collected):
  """A step's training groups (the curriculum's `Collected`) plus what the
  learner's Batch needs beyond it."""
  prompt: np.ndarray | None = None  # [B, P] int32, left-padded.
  prompt_mask: np.ndarray | None = None  # [B, P] bool.
  metrics: dict = dataclasses.field(default_factory=dict)  # rollout/ and
  # tree/ metrics of the step.


class TreeRows(NamedTuple):
  """A tree rollout as the curriculum sees it: the sampler's Rollout fields
  (non-leaf slots are RUNNING, so the curriculum drops them) plus the
  per-leaf tree for the advantages."""
  tokens: jax.Array  # [B, W, T]
  loss_mask: jax.Array  # [B, W, T]
  logp: jax.Array  # [B, W, T]
  entropy: jax.Array  # [B, W, T]
  lengths: jax.Array  # [B, W]
  finish: jax.Array  # [B, W]
  path_ids: jax.Array  # [B, W, W]
  depth_start: jax.Array  # [B, W, W]


def latr_mix(cfg: Config, step: int) -> float:
  """LATR's tree share at RL step `step`, annealed linearly from
  rollout.tree.mix to mix_end over mix_anneal_steps."""
  tr = cfg.rollout.tree
  if not tr.mix_anneal_steps:
    return tr.mix
  frac = min(step / tr.mix_anneal_steps, 1.0)
  return tr.mix + (tr.mix_end - tr.mix) * frac


def data_order(seed: int, start: int, count: int, n: int) -> np.ndarray:
  """Prompts at data positions [start, start + count): the same epoch
  permutations the uniform curriculum walks (`epoch_order`)."""
  return np.concatenate([epoch_order(seed, p, 1, n)
                         for p in range(start, start + count)])


def _one_device(tree):
  """`tree` on the first device (the engine's), copied there if needed."""
  dev = jax.devices()[0]
  if all(isinstance(x, jax.Array) and x.sharding.device_set == {dev}
         for x in jax.tree.leaves(tree)):
    return tree
  return jax.device_put(tree, jax.sharding.SingleDeviceSharding(dev))


class _Tally:
  """Per-step sums over the sampler calls of one step."""

  def __init__(self):
    self.busy = self.capacity = self.decoded = 0
    self.calls = {'decode_calls': 0, 'insert_calls': 0, 'prefill_calls': 0}
    self.tree: list[dict] = []


def tree_stop_fn(cfg: Config, tokenizer):
  """TreePO's answer-found rule for the run (`rollout.tree.stop_on_answer`;
  math_files, config-checked): a path ends at its first complete
  \\boxed{...}. None when off."""
  if not cfg.rollout.tree.stop_on_answer:
    return None
  return tree_rules.text_stop_fn(tokenizer.decode,
                                 math_answer.first_boxed_end)


class Rollouts:
  """The trainer's rollout side for one `rollout.mode`.

  Args:
    cfg: the run config.
    model: the policy's Transformer (engine and tree samplers are built
      from it).
    task: the task (prompts and verifier).
    curriculum: the run's curriculum (selection, estimator state).
    actor: the trainer's static actor (the static mode samples with it;
      the other samplers take its stop tokens).
  """

  def __init__(self, cfg: Config, *, model, task, curriculum: Curriculum,
               actor: Actor):
    self.cfg, self.task, self.curriculum = cfg, task, curriculum
    self.mode = cfg.rollout.mode
    self._tally = _Tally()
    self._step = self._version = 0
    self._precompiled = False
    tok, s = task.tokenizer, cfg.sampling
    self.actor = actor
    if self.mode in ('continuous', 'april'):
      slots, rows, prompts = rollout_engine_sizes(cfg)
      self.engine = en.transformer_engine(model, en.EngineConfig(
          num_slots=slots, prompt_len=task.train_prompts.shape[1],
          max_new_tokens=s.max_new_tokens, stop_tokens=actor.stop_tokens,
          pad_id=tok.pad_id, top_k=s.top_k,
          chunk_steps=cfg.rollout.chunk_steps or _CHUNK_STEPS,
          insert_rows=rows, prefill_prompts=prompts,
          prefill_bucket=cfg.rollout.prefill_bucket or _PREFILL_BUCKET))
    if self.mode == 'continuous':
      self._sampler = en.ContinuousSampler(self.engine)
      self.actor = Actor(model, task, s.max_new_tokens, top_k=s.top_k,
                         sampler=self._continuous)
    elif self.mode == 'april':
      self.april = partial.AprilSampler(
          self.engine, partial.AprilConfig(
              target_groups=cfg.rl.batch_prompts,
              inflight_groups=cfg.rollout.inflight_groups,
              keep_kv=cfg.rollout.resume == 'keep_kv'),
          group_size=cfg.rl.group_size)
    elif self.mode == 'tree':
      answer = None
      if cfg.task.name == 'chain_arith':  # Distinct answers, not texts.
        answer = lambda x: chain_arith_reward.extract_answer(tok.decode(x))
      self._tree = tree_lib.transformer_tree_sampler(
          model, self._tree_config(), answer_fn=answer,
          stop_fn=tree_stop_fn(cfg, tok))
      self.actor = Actor(model, task, s.max_new_tokens, top_k=s.top_k,
                         sampler=self._tree_sample)

  def _tree_config(self) -> tree_lib.TreeConfig:
    cfg, tr = self.cfg, self.cfg.rollout.tree
    return tree_lib.TreeConfig(
        kind=tr.kind, max_new_tokens=cfg.sampling.max_new_tokens,
        stop_tokens=self.actor.stop_tokens,
        pad_id=self.task.tokenizer.pad_id, top_k=cfg.sampling.top_k,
        segment_len=tr.segment_len, init_divergence=tr.init_divergence,
        divergence=tr.divergence, allocation=tr.allocation,
        fallback=tr.fallback, repeat_ngram=tr.repeat_ngram,
        repeat_count=tr.repeat_count, chunk_steps=tr.chunk_steps,
        tau_abs=tr.tau_abs, tau_rel=tr.tau_rel,
        lookahead=tuple(tr.lookahead), prune_edit_dist=tr.prune_edit_dist,
        max_branches=tr.max_branches, num_chains=tr.num_chains,
        fork_points=tr.fork_points, fork_branches=tr.fork_branches,
        rounds=tr.rounds, fork_score=tr.fork_score,
        fork_distinct=tr.fork_distinct)

  # Samplers behind the actor (they tally the step's statistics) ----------

  def _precompile(self, params, *, resume: bool) -> None:
    if not self._precompiled:  # Every prefill width, before any timing.
      en.precompile(self.engine, params, resume=resume)
      self._precompiled = True

  def _continuous(self, params, prompts, prompt_mask, key, temperature,
                  top_p=1.0, *, num_samples):
    self._precompile(params, resume=False)
    out = self._sampler(params, prompts, prompt_mask, key, temperature,
                        top_p, num_samples=num_samples,
                        version=self._version)
    stats, t = self._sampler.last_stats, self._tally
    t.busy += stats['busy_slot_steps']
    t.capacity += self.engine.cfg.num_slots * stats['decode_steps']
    for k in t.calls:
      t.calls[k] += stats.get(k, 0)
    return out

  def _tree_sample(self, params, prompts, prompt_mask, key, temperature,
                   top_p=1.0, *, num_samples):
    out = self._tree(params, prompts, prompt_mask, key, temperature, top_p,
                     num_leaves=num_samples,
                     mix=latr_mix(self.cfg, self._step))
    self._tally.decoded += out.decoded_tokens
    self._tally.tree.append(out.metrics)
    return TreeRows(*out.rollout, path_ids=out.path_ids,
                    depth_start=out.depth_start)

  def _rollout_fn(self, params, rows, key, num_samples):
    task, s = self.task, self.cfg.sampling
    scored = self.actor.rollout(
        params, task.train_prompts[rows], task.train_prompt_mask[rows],
        [task.train.answers[i] for i in rows], key, num_samples=num_samples,
        temperature=s.temperature, top_p=s.top_p)
    if self.mode == 'static':  # Rows x decode steps the batch ran for.
      lengths = np.asarray(scored.rollout.lengths)
      self._tally.busy += int(lengths.sum())
      self._tally.capacity += lengths.size * int(lengths.max())
    return scored.rollout, scored.rewards

  # One step ----------------------------------------------------------------

  def collect(self, cur_state, partial_state: dict, params, key, step: int,
              version: int | None = None
              ) -> tuple[StepGroups, object, dict, dict]:
    """Samples and scores one step's training groups.

    Args:
      cur_state: the curriculum state.
      partial_state: this mode's checkpointed state (`init_partial`).
      params: the policy weights (placed for the sampler).
      key: this step's key.
      step: the RL step (the learner's policy version, against which
        APRIL's tokens count as off-policy; LATR's mix schedule).
      version: the version of `params` (the RL step whose update they
        precede), stamped on the tokens; None: `step`. With
        rollout.overlap it is step - 1.

    Returns:
      (groups, new curriculum state, new partial state, curriculum/
      metrics); `groups.metrics` holds the rollout/ and tree/ metrics.
    """
    self._tally, self._step = _Tally(), step
    self._version = step if version is None else version
    if self.mode != 'static':
      params = _one_device(params)
    if self.mode == 'april':
      return self._collect_april(cur_state, partial_state, params, key, step)
    got, cur_state, cur_metrics = self.curriculum.collect(
        cur_state, params, key, self._rollout_fn, step)
    groups = StepGroups(**{f.name: getattr(got, f.name)
                           for f in dataclasses.fields(Collected)},
                        prompt=self.task.train_prompts[got.ids],
                        prompt_mask=self.task.train_prompt_mask[got.ids])
    t = self._tally
    if self.mode == 'tree':
      # Forward passes of live slots: shared prefixes count once.
      groups.decoded_tokens = t.decoded
      groups.metrics = _mean_metrics(t.tree)
      groups.metrics['tree/decoded_tokens'] = float(t.decoded)
    else:
      groups.metrics['rollout/slot_utilisation'] = t.busy / max(
          t.capacity, 1)
      if self.mode == 'continuous':
        groups.metrics.update({f'rollout/{k}': float(v)
                               for k, v in t.calls.items()})
    return groups, cur_state, partial_state, cur_metrics

  def _collect_april(self, cur_state, partial_state, params, key, step):
    cfg, task = self.cfg, self.task
    b, g = cfg.rl.batch_prompts, cfg.rl.group_size
    self._precompile(params, resume=True)
    buf, cursor = partial_state['buffer'], int(partial_state['cursor'])
    n = self.april.prompts_needed(buf)
    ids = data_order(self.curriculum.seed, cursor, n, self.curriculum.pool)
    batch, buf, metrics = self.april(
        params, buf, task.train_prompts[ids], task.train_prompt_mask[ids],
        ids, key, cfg.sampling.temperature, cfg.sampling.top_p,
        version=self._version)
    ro = jax.tree.map(np.asarray, batch.rollout)
    pid = np.asarray(batch.prompt_id)
    rewards = _score(task, ro.tokens, pid)
    values = np.asarray(est.mean(cur_state.stats))[pid]
    cur_state = self.curriculum.observe(cur_state, pid, rewards.sum(-1),
                                        np.full(b, g))
    token_version = np.asarray(batch.version)  # Per token.
    # Tokens sampled now: the returned groups' and the buffered ones'.
    decoded = int(metrics['rollout/sampled_tokens'])
    loss_mask = partial.off_policy_loss_mask(
        batch, current_version=step, mode=cfg.rollout.off_policy)
    # Groups the loss cannot see: in 'mask' mode, those that had finished
    # before this step (several groups can finish in the chunk that
    # reaches N; the surplus waits in the buffer and comes back stale).
    metrics['rollout/no_loss_group_frac'] = float(
        np.mean(~np.asarray(loss_mask).any(axis=(1, 2))))
    if self._version != step:  # rollout.overlap: staleness vs the learner.
      metrics.update(partial.rollout_metrics(
          token_version, batch.rollout.loss_mask, current_version=step))
    groups = StepGroups(
        ids=pid, tokens=ro.tokens, loss_mask=np.asarray(loss_mask),
        logp=ro.logp, entropy=ro.entropy, lengths=ro.lengths,
        finish=ro.finish, rewards=rewards, group_mask=np.ones((b, g), bool),
        values=values.astype(np.float32), counts=np.full(b, g),
        rollouts=b * g, decoded_tokens=decoded,
        # Per-token policy versions, for analyses; the learner gets the
        # behaviour log-probs (and the loss mask in 'mask' mode) instead.
        extras={'version': token_version},
        prompt=np.asarray(batch.prompt),
        prompt_mask=np.asarray(batch.prompt_mask), metrics=metrics)
    zero = np.ptp(rewards, axis=1) == 0
    cur_metrics = {'curriculum/zero_var_frac': float(zero.mean()),
                   'curriculum/selected_pass_mean': float(values.mean())}
    new_state = {'buffer': buf,
                 'cursor': np.asarray(cursor + n, np.int64)}
    return groups, cur_state, new_state, cur_metrics

  # The learner's batch -----------------------------------------------------

  def batch(self, groups: StepGroups, *, rewards, old_logp) -> learner.Batch:
    """The learner's Batch of a step (rewards after any shaping; old
    log-probs from the sampler or recomputed)."""
    extras = groups.extras
    opt = lambda name: (None if name not in extras else
                        jnp.asarray(extras[name], jnp.int32))
    return learner.Batch(
        prompt=jnp.asarray(groups.prompt),
        prompt_mask=jnp.asarray(groups.prompt_mask),
        response=groups.tokens, loss_mask=groups.loss_mask,
        old_logp=old_logp, rewards=jnp.asarray(rewards),
        group_mask=groups.group_mask, behaviour_logp=groups.logp,
        entropy=groups.entropy, values=groups.values,
        path_ids=opt('path_ids'), depth_start=opt('depth_start'))


def init_partial(cfg: Config, task) -> dict:
  """The checkpoint's 'partial' entry: APRIL's partial buffer and data
  cursor (numpy arrays, so it also serves as the restore target); {} for
  the other modes."""
  if cfg.rollout.mode != 'april':
    return {}
  b = cfg.rl.batch_prompts
  inflight = cfg.rollout.inflight_groups or 2 * b
  return {'buffer': pb.init(inflight - b, group_size=cfg.rl.group_size,
                            prompt_len=task.train_prompts.shape[1],
                            max_new_tokens=cfg.sampling.max_new_tokens,
                            pad_id=task.tokenizer.pad_id),
          'cursor': np.zeros((), np.int64)}


def abstract_batch_fields(cfg: Config, b: int, g: int) -> dict:
  """Shapes of the Batch fields a mode adds (for ahead-of-time compiles)."""
  if cfg.rollout.mode != 'tree':
    return {}
  spec = jax.ShapeDtypeStruct((b, g, g), jnp.int32)
  return {'path_ids': spec, 'depth_start': spec}


def _score(task, tokens: np.ndarray, ids: np.ndarray) -> np.ndarray:
  """Verifier rewards [B, G] of responses tokens [B, G, T] to prompts ids."""
  tok, g = task.tokenizer, tokens.shape[1]
  texts = [tok.decode(row) for group in tokens for row in group]
  answers = [task.train.answers[i] for i in ids for _ in range(g)]
  return np.asarray(task.reward_fn(texts, answers),
                    np.float32).reshape(tokens.shape[:2])


def _mean_metrics(rows: list[dict]) -> dict:
  """Mean of each key over a step's sampler calls (one call, usually)."""
  keys = {k for r in rows for k in r}
  return {k: float(np.mean([r[k] for r in rows if k in r]))
          for k in sorted(keys)}


