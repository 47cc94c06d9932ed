"""The learner: log-probs, loss, gradients and the optimizer update.

One jitted step with donated state. The rollout batch keeps its group axis;
rows are flattened to `[B*G, P+T]` only inside the forward pass. Micro-batches
split the prompts (so a group never straddles two) and accumulate gradients
with a `lax.scan`; denominators come from the whole batch, so the accumulated
gradient equals the full-batch one.
"""

import functools
from typing import Callable, NamedTuple

import einops
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlx import objectives
from rlx.config import Config, OptimConfig
from rlx.models import kv_cache
from rlx.types import Array, Params

# (params, tokens [R, L], positions [R, L], mask [R, L, L]) -> logits [R, L, V]
LogitsFn = Callable[..., Array]


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
  return batch._replace(
      prompt=batch.prompt[:, p_full - p:],
      prompt_mask=batch.prompt_mask[:, p_full - p:],
      response=batch.response[..., :t], loss_mask=batch.loss_mask[..., :t],
      old_logp=batch.old_logp[..., :t])


def response_logprobs(logits_fn: LogitsFn, params: Params, prompt: Array,
                      prompt_mask: Array, response: Array, *,
                      temperature=1.0) -> tuple[Array, Array]:
  """Log-probs and entropies of response tokens given left-padded prompts.

  Uses the sampler's conventions (positions counted over real tokens), so on
  the same weights it reproduces the sampler's behaviour log-probs.

  Args:
    logits_fn: full-sequence forward (no cache).
    params: model parameters.
    prompt: [R, P]; prompt_mask: [R, P].
    response: [R, T].
    temperature: logits are divided by it (as in the sampler).

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


def _microbatch_loss(logits_fn: LogitsFn, cfg: Config, params, ref_params,
                     mb: Batch, advantages: Array, totals: dict):
  """Loss of one micro-batch, normalised by whole-batch totals."""
  b, g, t = mb.response.shape
  prompt = einops.repeat(mb.prompt, 'b p -> (b g) p', g=g)
  prompt_mask = einops.repeat(mb.prompt_mask, 'b p -> (b g) p', g=g)
  temp = cfg.sampling.temperature
  logp, entropy = response_logprobs(logits_fn, params, prompt, prompt_mask,
                                    _flat(mb.response), temperature=temp)
  logp = logp.reshape(b, g, t)
  entropy = entropy.reshape(b, g, t)
  mask = mb.loss_mask & mb.group_mask[..., None]
  obj = cfg.objective
  agg = dict(total_tokens=totals['tokens'], total_seqs=totals['seqs'],
             norm_len=obj.norm_len or cfg.sampling.max_new_tokens)
  loss, metrics = objectives.policy_loss(
      obj.loss, logp, mb.old_logp, advantages, mask,
      aggregation=obj.aggregation, clip_eps=obj.clip_eps,
      clip_eps_high=obj.clip_eps_high, **agg)
  if obj.kl_beta:
    ref_logp, _ = response_logprobs(logits_fn, ref_params, prompt,
                                    prompt_mask, _flat(mb.response),
                                    temperature=temp)
    kl = objectives.kl_penalty(logp, jax.lax.stop_gradient(
        ref_logp.reshape(b, g, t)), obj.kl_estimator)
    loss = loss + obj.kl_beta * objectives.aggregate(
        kl, mask, obj.aggregation, **agg)
    metrics['kl_ref'] = objectives.masked_mean(kl, mask)
  metrics['entropy'] = objectives.masked_mean(entropy, mask)
  return loss, metrics


def make_train_step(logits_fn: LogitsFn,
                    optimizer: optax.GradientTransformation, cfg: Config):
  """Returns `step(state, ref_params, batch) -> (state, metrics)`, jitted.

  `state` is donated. `ref_params` is the frozen reference for the KL term
  (ignored when objective.kl_beta == 0; pass the params or None).
  """
  num_micro = cfg.optim.num_microbatches
  obj = cfg.objective
  loss_fn = functools.partial(_microbatch_loss, logits_fn, cfg)

  def step(state: TrainState, ref_params, batch: Batch):
    advantages = objectives.compute_advantages(
        obj.advantage, batch.rewards, batch.group_mask, eps=obj.adv_eps)
    mask = batch.loss_mask & batch.group_mask[..., None]
    totals = {'tokens': jnp.sum(mask),
              'seqs': jnp.sum(batch.group_mask)}
    split = lambda x: einops.rearrange(x, '(m b) ... -> m b ...', m=num_micro)
    micro = jax.tree.map(split, (batch, advantages))

    def accumulate(carry, mb):
      grads_acc, loss_acc = carry
      mb_batch, mb_adv = mb
      (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state.params, ref_params, mb_batch, mb_adv, totals)
      grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
      return (grads_acc, loss_acc + loss), metrics

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, loss), metrics = jax.lax.scan(
        accumulate, (zeros, jnp.zeros((), jnp.float32)), micro)
    # Micro-batch metrics: means of per-micro-batch values (maxima for max).
    metrics = {k: jnp.max(v) if k.endswith('/max') else jnp.mean(v)
               for k, v in metrics.items()}
    updates, opt_state = optimizer.update(grads, state.opt_state,
                                          state.params)
    params = optax.apply_updates(state.params, updates)
    adv_valid = batch.group_mask
    metrics.update({
        'loss': loss,
        'grad_norm': optax.global_norm(grads),
        'adv/mean': objectives.masked_mean(advantages, adv_valid),
        'adv/std': jnp.sqrt(objectives.masked_mean(advantages ** 2,
                                                   adv_valid)),
        'adv/abs_max': jnp.max(jnp.abs(advantages)),
    })
    new_state = TrainState(step=state.step + 1, params=params,
                           opt_state=opt_state)
    return new_state, metrics

  return jax.jit(step, donate_argnums=(0,))
