"""The learner: log-probs, loss, gradients and the optimizer update.

One jitted step with donated state. The rollout batch keeps its group axis;
the forward pass runs on its real tokens packed into rows (`Batch.packed`,
rlx/packing.py) or, unpacked, on `[B*G, P+T]` rows. Micro-batches
split the prompts (so a group never straddles two) and accumulate gradients
with a `lax.scan`; denominators come from the whole batch, so the accumulated
gradient equals the full-batch one.
"""

import dataclasses
import functools
from typing import Callable, NamedTuple

import einops
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlx import lm_head
from rlx import objectives
from rlx import packing
from rlx import config as config_lib
from rlx import errors
from rlx import registry
from rlx.config import Config, ObjectiveConfig
from rlx.models import kv_cache
from rlx.types import Array, Params

# (params, tokens [R, L], positions [R, L], mask [R, L, L]) -> logits [R, L, V]
LogitsFn = Callable[..., Array]


@config_lib.section('optim')
@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float = 2e-4  # Peak AdamW learning rate.
  warmup_steps: int = 5  # Linear warmup (optimizer updates).
  weight_decay: float = 0.0  # AdamW decoupled weight decay.
  b1: float = 0.9  # Adam beta1.
  b2: float = 0.99  # Adam beta2.
  max_grad_norm: float = 1.0  # Global-norm gradient clipping.
  num_microbatches: int = 1  # Gradient accumulation: splits the prompts.
  packing: bool = True  # The learner's forward runs on the real tokens
  # only, packed into rows with each group's prompt shared
  # (rlx/packing.py); False: the padded [B*G, P+T] batch. Same log-probs
  # up to float rounding.
  logits_chunk: int = 0  # > 0: the learner's output projection runs on
  # this many positions at a time, recomputed in the backward pass
  # (rlx/lm_head.py), so [positions, vocab] logits are never held at once;
  # set it for large vocabularies (e.g. 1024 for 150k tokens). 0: all
  # positions at once. Same log-probs up to float rounding.
  max_nonfinite: int = 3  # An update whose loss or gradient is not finite
  # (NaN/inf) is skipped: parameters and optimizer state stay as they were
  # (counted in learner/nonfinite and learner/nonfinite_total). This many
  # RL steps in a row with a skipped update stop the run with an error.


@registry.config_check
def _check_optim_section(cfg) -> None:
  """optim.*, and its microbatches against the rl.* batch."""
  rl, opt = cfg.rl, cfg.optim
  if rl.num_minibatches > 0:  # Else the rl.num_minibatches check says so.
    mini = rl.batch_prompts // rl.num_minibatches
    errors.require(
        opt.num_microbatches > 0 and mini % opt.num_microbatches == 0,
        'optim.num_microbatches', f'{opt.num_microbatches} must divide the '
        f'prompts per minibatch ({mini} = rl.batch_prompts / '
        'rl.num_minibatches)')
  errors.require(opt.logits_chunk >= 0, 'optim.logits_chunk', 'must be >= 0')
  errors.require(opt.learning_rate > 0, 'optim.learning_rate', 'must be > 0')
  errors.require(opt.max_nonfinite >= 1, 'optim.max_nonfinite',
                 'must be >= 1')
  for key in ('warmup_steps', 'weight_decay'):
    errors.require(getattr(opt, key) >= 0, f'optim.{key}', 'must be >= 0')
  errors.require(opt.max_grad_norm > 0, 'optim.max_grad_norm', 'must be > 0')
  for key in ('b1', 'b2'):
    errors.require(0 <= getattr(opt, key) < 1, f'optim.{key}',
                   f'{getattr(opt, key)} not in [0, 1)')


@flax.struct.dataclass
class TrainState:
  step: Array  # Optimizer updates applied.
  params: Params
  opt_state: optax.OptState


class Batch(NamedTuple):
  """One rollout batch, group axis explicit."""
  prompt: Array  # [B, P] int32, left-padded.
  prompt_mask: Array  # [B, P] bool.
  response: Array  # [B, G, T] int32.
  loss_mask: Array  # [B, G, T] bool.
  old_logp: Array  # [B, G, T] f32, log-probs of the policy that sampled.
  rewards: Array  # [B, G] f32.
  group_mask: Array  # [B, G] bool, valid samples (variable group sizes).
  behaviour_logp: Array | None = None  # [B, G, T] sampler log-probs (mu);
  # None: same as old_logp.
  entropy: Array | None = None  # [B, G, T] sampler entropies (D3S).
  values: Array | None = None  # [B] per-prompt baseline v(x) from the
  # curriculum's value tracker (SPO).
  path_ids: Array | None = None  # [B, G, D] int32 tree node per depth, -1
  # past a leaf's last node (tree rollouts; the tree/treerl advantages).
  depth_start: Array | None = None  # [B, G, D] int32 first response token
  # of each of those nodes, -1 likewise (treerl).
  packed: packing.Packed | None = None  # The real tokens in rows
  # (`pack_batch`); when set, the forward pass runs on them.
  advantages: Array | None = None  # [B, G] computed over the whole rollout
  # batch before it was split into minibatches (`minibatches`); None: the
  # train step computes them from the batch it gets.


class NonFiniteUpdates(RuntimeError):
  """Too many RL steps in a row had a non-finite loss or gradient."""


def round_up(n: int, multiple: int, cap: int) -> int:
  return min(-(-max(n, 1) // multiple) * multiple, cap)


def trim_batch(batch: Batch, *, response_multiple: int = 16,
               prompt_multiple: int = 8) -> Batch:
  """Drops all-padding columns (prompt left, response right), rounded to
  shape buckets so that the train step compiles once per bucket.

  Log-probs are unchanged: positions are counted over real tokens only.
  """
  t_full, p_full = batch.response.shape[-1], batch.prompt.shape[-1]
  # Last masked column + 1 (masks are contiguous from 0 in practice, but
  # never drop a valid token if one is not).
  used = np.any(np.asarray(batch.loss_mask).reshape(-1, t_full), axis=0)
  t = round_up(int(np.max(np.nonzero(used)[0], initial=-1)) + 1,
               response_multiple, t_full)
  p = round_up(int(np.max(np.sum(np.asarray(batch.prompt_mask), -1))),
               prompt_multiple, p_full)
  cut = lambda x: None if x is None else x[..., :t]
  return batch._replace(
      prompt=batch.prompt[:, p_full - p:],
      prompt_mask=batch.prompt_mask[:, p_full - p:],
      response=cut(batch.response), loss_mask=cut(batch.loss_mask),
      old_logp=cut(batch.old_logp), behaviour_logp=cut(batch.behaviour_logp),
      entropy=cut(batch.entropy))


def minibatches(batch: Batch, cfg: Config) -> list[Batch]:
  """The rollout batch split by prompts into `rl.num_minibatches` parts,
  one optimizer update each.

  Estimators that whiten over the batch (declared `whole_batch`) get their
  advantages computed here, over the whole batch, so that the split does
  not change them (the card's "whitened over the whole batch"); the
  group-relative ones are the same either way and stay in the step.
  """
  obj, n = cfg.objective, cfg.rl.num_minibatches
  if n > 1 and objectives.ADVANTAGES.get(obj.advantage).whole_batch:
    # Whitened estimators do not read the step (only D3S's schedule does).
    batch = batch._replace(advantages=np.asarray(_whole_batch_advantages(
        obj, batch, 0)))
  size = batch.rewards.shape[0] // n
  return [jax.tree.map(lambda x, m=m: x[m * size:(m + 1) * size], batch)
          for m in range(n)]


def _advantages(obj: ObjectiveConfig, batch: Batch, step) -> Array:
  """The configured estimator's advantages of `batch`, its inputs and
  knobs as its registry entry declares them."""
  entry = objectives.ADVANTAGES.get(obj.advantage)
  return entry(batch.rewards, batch.group_mask,
               **entry.kwargs(obj, batch, step))


_whole_batch_advantages = jax.jit(_advantages, static_argnums=0)


def pack_batch(batch: Batch, *, chunks: int = 1) -> Batch:
  """The batch with `packed` set: its needed tokens in rows (rlx/packing.py).

  `chunks` must divide B; use (micro-batches) x (devices the batch is
  sharded over), so each micro-batch and each shard packs its own prompts.
  Leave the batch untrimmed: the row length is fixed by P + T, so only the
  row count varies between steps.
  """
  lengths = packing.needed_lengths(np.asarray(batch.loss_mask),
                                   np.asarray(batch.group_mask))
  return batch._replace(packed=packing.pack(
      batch.prompt, batch.prompt_mask, batch.response, lengths,
      chunks=chunks))


def response_logprobs(logits_fn: LogitsFn, params: Params, prompt: Array,
                      prompt_mask: Array, response: Array, *,
                      temperature=1.0, split: lm_head.SplitLM | None = None,
                      logits_chunk: int = 0) -> tuple[Array, Array]:
  """Log-probs and entropies of response tokens given left-padded prompts.

  Uses the sampler's conventions (positions counted over real tokens), so on
  the same weights it reproduces the sampler's behaviour log-probs.

  Args:
    logits_fn: full-sequence forward (no cache).
    params: model parameters.
    prompt: [R, P]; prompt_mask: [R, P].
    response: [R, T].
    temperature: logits are divided by it (as in the sampler).
    split, logits_chunk: with `logits_chunk > 0`, the output projection runs
      on that many positions at a time (rlx/lm_head.py).

  Returns:
    logp [R, T] and entropy [R, T] of softmax(logits / temperature).
  """
  p = prompt.shape[1]
  tokens = jnp.concatenate([prompt, response], axis=1)[:, :-1]
  valid = jnp.concatenate(
      [prompt_mask.astype(bool), jnp.ones_like(response, bool)], 1)[:, :-1]
  positions = kv_cache.positions_from_mask(valid)
  mask = kv_cache.causal_mask(valid, query_len=tokens.shape[1],
                              cache_index=0)
  if logits_chunk:
    hidden = split.hidden(params, tokens, positions, mask)[:, p - 1:]
    logp, entropy = lm_head.logprobs(
        split, params, hidden.reshape(-1, hidden.shape[-1]),
        jnp.arange(response.size), response.reshape(-1), chunk=logits_chunk,
        temperature=temperature)
    return logp.reshape(response.shape), entropy.reshape(response.shape)
  logits = logits_fn(params, tokens, positions, mask)[:, p - 1:]
  logits = logits / temperature
  logp_all = jax.nn.log_softmax(logits, axis=-1)
  logp = jnp.take_along_axis(logp_all, response[..., None], -1)[..., 0]
  return logp, objectives.token_entropy(logits)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; linear warmup, then constant."""
  schedule = optax.join_schedules(
      # The first update already moves (lr / warmup, not 0).
      [optax.linear_schedule(cfg.learning_rate / max(cfg.warmup_steps, 1),
                             cfg.learning_rate, max(cfg.warmup_steps, 1)),
       optax.constant_schedule(cfg.learning_rate)], [cfg.warmup_steps])
  return optax.chain(
      optax.clip_by_global_norm(cfg.max_grad_norm),
      optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2,
                  weight_decay=cfg.weight_decay))


def init_state(params: Params,
               optimizer: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params))


def _flat(x: Array) -> Array:
  return einops.rearrange(x, 'b g ... -> (b g) ...')


def _behaviour(batch: Batch) -> Array:
  return batch.old_logp if batch.behaviour_logp is None else (
      batch.behaviour_logp)


def forward_logp(logits_fn, cfg: Config, params, batch: Batch,
                 split: lm_head.SplitLM | None = None):
  """Log-probs and entropies `[B, G, T]` of a (micro-)batch's responses.

  Packed batches: positions the loss cannot use (not laid out) get the
  old log-probs (a ratio of exactly 1) and entropy 0. `split` (the model
  split at its output projection) is needed when `optim.logits_chunk > 0`.
  """
  chunk = cfg.optim.logits_chunk
  if chunk and split is None:
    raise ValueError(f'optim.logits_chunk={chunk} needs the model split at '
                     'its output projection (split=policy.split_model(...))')
  head = dict(temperature=cfg.sampling.temperature, split=split,
              logits_chunk=chunk)
  if batch.packed is not None:
    return packing.logprobs(logits_fn, params, batch.packed, batch.response,
                            fill_logp=batch.old_logp, **head)
  b, g, t = batch.response.shape
  logp, entropy = response_logprobs(
      logits_fn, params, einops.repeat(batch.prompt, 'b p -> (b g) p', g=g),
      einops.repeat(batch.prompt_mask, 'b p -> (b g) p', g=g),
      _flat(batch.response), **head)
  return logp.reshape(b, g, t), entropy.reshape(b, g, t)


def _microbatch_loss(logits_fn: LogitsFn, cfg: Config, split, params,
                     ref_params, mb: Batch, advantages: Array, totals: dict):
  """Loss of one micro-batch, normalised by whole-batch totals."""
  logp, entropy = forward_logp(logits_fn, cfg, params, mb, split)
  mask = mb.loss_mask & mb.group_mask[..., None]
  obj = cfg.objective
  agg = dict(total_tokens=totals['tokens'], total_seqs=totals['seqs'],
             norm_len=obj.norm_len or cfg.sampling.max_new_tokens)
  loss, metrics = objectives.policy_loss(
      obj.loss, logp, mb.old_logp, advantages, mask,
      behaviour_logp=_behaviour(mb), aggregation=obj.aggregation,
      correction=obj.correction, tis_cap=obj.tis.cap,
      icepop_low=obj.icepop.low, icepop_high=obj.icepop.high,
      **objectives.LOSSES.get(obj.loss).kwargs(obj), **agg)
  if obj.kl_beta and not obj.kl_in_reward:
    ref_logp, _ = forward_logp(logits_fn, cfg, ref_params, mb, split)
    kl = objectives.kl_penalty(logp, jax.lax.stop_gradient(ref_logp),
                               obj.kl_estimator)
    loss = loss + obj.kl_beta * objectives.aggregate(
        kl, mask, obj.aggregation, **agg)
    metrics['kl_ref'] = objectives.masked_mean(kl, mask)
  if obj.entropy_coef:
    loss = loss - obj.entropy_coef * objectives.aggregate(
        entropy, mask, obj.aggregation, **agg)
  metrics['entropy'] = objectives.masked_mean(entropy, mask)
  return loss, metrics


def _shape_rewards(logits_fn, cfg: Config, split, ref_params, batch: Batch):
  """KL folded into the reward: r - kl_beta * sum_t KL_t (no gradient)."""
  obj = cfg.objective
  ref_logp, _ = forward_logp(logits_fn, cfg, ref_params, batch, split)
  kl = objectives.kl_penalty(batch.old_logp, ref_logp, obj.kl_estimator)
  seq_kl = jnp.sum(kl * batch.loss_mask, -1)
  return batch.rewards - obj.kl_beta * seq_kl, jnp.mean(seq_kl)


def _update_if_finite(optimizer: optax.GradientTransformation,
                      state: TrainState, grads: Params, finite: Array
                      ) -> TrainState:
  """The optimizer's update of `state` by `grads`, or, when `finite` is
  False (a NaN or inf loss or gradient; optim.max_nonfinite), `state` as
  it was, bit for bit. The update runs inside the cond, so it still writes
  in place (a select between new and old states would hold both)."""
  def update(args):
    params, opt_state, grads = args
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = jax.lax.cond(finite, update, lambda args: args[:2],
                                   (state.params, state.opt_state, grads))
  return TrainState(step=state.step + finite.astype(state.step.dtype),
                    params=params, opt_state=opt_state)


def make_train_step(logits_fn: LogitsFn,
                    optimizer: optax.GradientTransformation, cfg: Config, *,
                    shardings: tuple | None = None,
                    merge_fn: Callable[[Params, Params], Params] | None = None,
                    split: lm_head.SplitLM | None = None):
  """Returns `step(state, ref_params, batch) -> (state, metrics)`, jitted.

  `state` is donated. `ref_params` is the frozen reference for the KL term
  (ignored when objective.kl_beta == 0; pass the params or None).

  Adapter training (LoRA, `merge_fn` set): `state.params` holds only the
  trainable adapters and `ref_params` is the frozen base, required even
  without a KL term. The policy is `merge_fn(base, state.params)`, merged
  inside the step so that gradients reach the adapters only; the KL
  reference is the base itself (adapters off), so no second copy of the
  base exists. The base is never donated.

  Args:
    logits_fn: full-sequence forward.
    optimizer: the optax transformation of the state.
    cfg: the run config.
    shardings: optional (state, ref_params, batch, replicated) shardings
      (rlx/sharding.py); `batch` is one sharding for every Batch leaf (all
      lead with B). The state comes back in its input sharding and the
      metrics replicated. None: single-device jit.
    merge_fn: `(base, trainable) -> model params` (e.g. `lora.merge` with
      its config bound); None: `state.params` are the model params.
    split: the model split at its output projection; needed when
      `optim.logits_chunk > 0` (`policy.split_model`).
  """
  num_micro = cfg.optim.num_microbatches
  obj = cfg.objective
  estimator = objectives.ADVANTAGES.get(obj.advantage)
  loss_fn = functools.partial(_microbatch_loss, logits_fn, cfg, split)

  def step(state: TrainState, ref_params, batch: Batch):
    if merge_fn is None:
      model_params = lambda p: p
    elif ref_params is None:
      raise ValueError('with merge_fn the second argument is the frozen '
                       'base; got None')
    else:
      model_params = functools.partial(merge_fn, ref_params)
    extra = {}
    if obj.kl_beta and obj.kl_in_reward:
      rewards, extra['kl_ref_seq'] = _shape_rewards(logits_fn, cfg, split,
                                                    ref_params, batch)
      batch = batch._replace(rewards=rewards)
    advantages = batch.advantages
    if advantages is None:
      advantages = _advantages(obj, batch, state.step)
    if estimator.loss_masks is not None:
      # The estimator also decides which samples and tokens carry gradient
      # (mc_grpo's pivot, d3s's selection): they leave the masks, and so
      # the loss's denominators, not only get A = 0.
      group_mask, loss_mask = estimator.loss_masks(
          batch.rewards, batch.group_mask, batch.loss_mask,
          estimator.kwargs(obj, batch, state.step))
      batch = batch._replace(group_mask=group_mask, loss_mask=loss_mask)
    mask = batch.loss_mask & batch.group_mask[..., None]
    totals = {'tokens': jnp.sum(mask),
              # Sequences with a token in the loss, as `aggregate` counts
              # them (an APRIL 'mask' group or a D3S drop may have none).
              'seqs': jnp.sum(jnp.any(mask, -1))}
    to_micro = lambda x: einops.rearrange(x, '(m b) ... -> m b ...',
                                          m=num_micro)
    micro = jax.tree.map(to_micro, (batch, advantages))

    def accumulate(carry, mb):
      grads_acc, loss_acc = carry
      mb_batch, mb_adv = mb
      (loss, metrics), grads = jax.value_and_grad(
          lambda p, *args: loss_fn(model_params(p), *args), has_aux=True)(
              state.params, ref_params, mb_batch, mb_adv, totals)
      grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
      return (grads_acc, loss_acc + loss), metrics

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, loss), metrics = jax.lax.scan(
        accumulate, (zeros, jnp.zeros((), jnp.float32)), micro)
    # Micro-batch metrics: means of per-micro-batch values (maxima for max).
    metrics = {k: jnp.max(v) if k.endswith('/max') else jnp.mean(v)
               for k, v in metrics.items()}
    adv_valid = batch.group_mask if advantages.ndim == 2 else mask
    metrics.update(extra)
    metrics.update({
        'loss': loss,
        'grad_norm': optax.global_norm(grads),
        'adv/mean': objectives.masked_mean(advantages, adv_valid),
        'adv/std': jnp.sqrt(objectives.masked_mean(advantages ** 2,
                                                   adv_valid)),
        'adv/abs_max': jnp.max(jnp.abs(advantages)),
    })
    finite = jnp.isfinite(loss) & jnp.isfinite(metrics['grad_norm'])
    metrics['nonfinite'] = (~finite).astype(jnp.float32)
    return _update_if_finite(optimizer, state, grads, finite), metrics

  if shardings is None:
    return jax.jit(step, donate_argnums=(0,))
  state_sh, ref_sh, batch_sh, replicated = shardings
  return jax.jit(step, donate_argnums=(0,),
                 in_shardings=(state_sh, ref_sh, batch_sh),
                 out_shardings=(state_sh, replicated))
