"""The jit-compiled sampler: one prefill, then a `lax.while_loop` decode.

Prompts arrive left-padded `[B, P]`; each is repeated G times and decoded
with a KV cache of P + max_new_tokens slots. The loop stops when every row
has emitted a stop token or max_new_tokens is reached. Outputs keep the group
axis: tokens, loss mask and behaviour log-probs are `[B, G, T]`.

The model is a `tokens_to_logits`-style callback (see `make_sampler`), so
tests can plug in fake models with known output. Temperature and top-p are
array arguments (sweeping them does not recompile); top-k, max_new_tokens and
the stop tokens are static. One compilation per (B, G, P) shape bucket.
"""

import dataclasses
from typing import Callable, NamedTuple

import einops
import jax
import jax.numpy as jnp

from rlx.models import kv_cache
from rlx.types import Array, FinishReason, Params, PRNGKey

# (params, tokens [B, L], positions [B, L], mask [B, L, S], cache, index)
#   -> (logits [B, L, V] float32, new cache)
ApplyFn = Callable[..., tuple[Array, kv_cache.Cache]]
# (batch, length) -> empty cache
InitCacheFn = Callable[[int, int], kv_cache.Cache]


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Static sampler settings (changing any of these recompiles)."""
  max_new_tokens: int  # T: response budget.
  stop_tokens: tuple[int, ...]  # Ending a response (kept in it).
  pad_id: int = 0  # Written after a response ends.
  top_k: int = 0  # 0 disables top-k filtering.


class Rollout(NamedTuple):
  """Sampled responses; the group axis is explicit."""
  tokens: Array  # [B, G, T] int32, pad after the end.
  loss_mask: Array  # [B, G, T] bool, True on sampled tokens (stop included).
  logp: Array  # [B, G, T] f32 behaviour log-probs (temperature applied).
  entropy: Array  # [B, G, T] f32 entropy of the behaviour distribution.
  lengths: Array  # [B, G] int32, sampled tokens per response.
  finish: Array  # [B, G] int32 `FinishReason`.


class _LoopState(NamedTuple):
  step: Array  # scalar: tokens sampled so far per row.
  tokens: Array  # [R, T]
  logp: Array  # [R, T]
  entropy: Array  # [R, T]
  done: Array  # [R]
  lengths: Array  # [R]
  finish: Array  # [R]
  next_pos: Array  # [R] RoPE position of the next token to feed.
  kv_valid: Array  # [R, S]
  cache: kv_cache.Cache
  key: PRNGKey


def _order_key(x: Array) -> Array:
  """float32 -> uint32 with the same order (total: -0.0 sorts below 0.0)."""
  bits = jax.lax.bitcast_convert_type(x, jnp.int32)
  bits = jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
  return jax.lax.bitcast_convert_type(bits, jnp.uint32) ^ jnp.uint32(
      0x80000000)


def nucleus_cutoff(logits: Array, top_p: Array) -> Array:
  """`[R, V] -> [R, 1]`: the smallest logit whose tokens stay in the nucleus.

  Nucleus (top-p) filtering keeps the smallest set of most probable tokens
  whose mass reaches `top_p`: token j stays iff the mass of the tokens
  strictly more probable than it is below `top_p` (so the token that crosses
  the threshold stays, and tied tokens stay or go together); equivalently
  iff `logits[j] >= cutoff`, where `cutoff` is the smallest logit value v
  with mass(logits > v) < top_p. Found by bisection over the float's bits:
  32 masked sums over the vocabulary instead of a sort (a sort of
  [64, 152k] takes seconds on a CPU: scripts/bench_logits.py), exact up to
  the rounding of those sums. `top_p` in (0, 1).
  """
  probs = jax.nn.softmax(logits, axis=-1)
  keys = _order_key(logits)
  # The answer lies in (lo, hi]: mass(keys > hi) = 0 < top_p, and key 0 is
  # below every float (-inf included), so mass(keys > 0) is all of it.
  lo, hi = jnp.zeros_like(keys[:, 0]), jnp.max(keys, axis=-1)

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    fits = jnp.sum(jnp.where(keys > mid[:, None], probs, 0.0), -1) < top_p
    return jnp.where(fits, lo, mid), jnp.where(fits, mid, hi)

  _, hi = jax.lax.fori_loop(0, 32, halve, (lo, hi))  # 2^32 keys.
  return jnp.min(jnp.where(keys >= hi[:, None], logits, jnp.inf), axis=-1,
                 keepdims=True)


def process_logits(logits: Array, temperature: Array, top_p: Array, *,
                   top_k: int) -> tuple[Array, Array]:
  """Returns (log-probs to sample from, behaviour log-probs).

  Args:
    logits: [R, V] float32.
    temperature: scalar > 0.
    top_p: scalar in (0, 1]; 1 disables nucleus filtering.
    top_k: static; 0 disables.

  Returns:
    sample_logp: [R, V] log-probs after temperature, top-k and top-p (masked
      entries are -inf); tokens are drawn from it.
    behaviour_logp: [R, V] log-softmax(logits / temperature), the policy the
      learner reproduces; recorded for each sampled token.
  """
  scaled = logits / temperature
  behaviour = jax.nn.log_softmax(scaled, axis=-1)
  filtered = scaled
  if top_k:
    kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
    filtered = jnp.where(scaled < kth, -jnp.inf, filtered)

  def nucleus(filtered):
    cutoff = nucleus_cutoff(filtered, top_p)
    return jax.nn.log_softmax(jnp.where(filtered < cutoff, -jnp.inf,
                                        filtered), axis=-1)

  # top_p = 1 (the default) keeps every token: no nucleus search over the
  # vocabulary and, without top-k, no second log-softmax
  # (scripts/bench_logits.py times both paths).
  unfiltered = ((lambda f: behaviour) if not top_k else
                (lambda f: jax.nn.log_softmax(f, axis=-1)))
  return jax.lax.cond(top_p < 1.0, nucleus, unfiltered, filtered), behaviour


def make_sampler(apply_fn: ApplyFn, init_cache_fn: InitCacheFn,
                 cfg: SamplerConfig, *, constrain=None):
  """Builds `sample(params, prompts, prompt_mask, key, temperature, top_p,
  num_samples=G) -> Rollout`, jitted with G static.

  `constrain(tree, names)` (e.g. `rlx.sharding.Plan.constrain`) pins the
  sharding of the loop state inside jit: rows over the batch axes, the KV
  cache's heads by the `kv_heads` rule. None: let XLA propagate.
  """
  if constrain is None:
    constrain = lambda tree, names=None: tree

  def pin(state: _LoopState) -> _LoopState:
    return constrain(state._replace(
        cache=constrain(state.cache, ('batch', 'kv_heads'))))
  stop = jnp.asarray(cfg.stop_tokens, jnp.int32)
  t_max = cfg.max_new_tokens

  def pick(state_key, logits, temperature, top_p):
    key, sub = jax.random.split(state_key)
    sample_logp, behaviour = process_logits(logits, temperature, top_p,
                                            top_k=cfg.top_k)
    token = jax.random.categorical(sub, sample_logp, axis=-1)
    lp = jnp.take_along_axis(behaviour, token[:, None], -1)[:, 0]
    ent = -jnp.sum(jnp.exp(behaviour) * behaviour, axis=-1)
    return key, token.astype(jnp.int32), (lp, ent)

  def record(state: _LoopState, token, stats) -> _LoopState:
    """Stores sampled tokens for rows still running and updates done."""
    lp, ent = stats
    live = ~state.done
    i = state.step
    token = jnp.where(live, token, cfg.pad_id)
    tokens = state.tokens.at[:, i].set(token)
    logp = state.logp.at[:, i].set(jnp.where(live, lp, 0.0))
    entropy = state.entropy.at[:, i].set(jnp.where(live, ent, 0.0))
    hit_stop = live & jnp.isin(token, stop)
    hit_len = live & ~hit_stop & (i + 1 >= t_max)
    finish = jnp.where(hit_stop, int(FinishReason.STOP), state.finish)
    finish = jnp.where(hit_len, int(FinishReason.LENGTH), finish)
    return state._replace(
        step=i + 1, tokens=tokens, logp=logp, entropy=entropy, finish=finish,
        lengths=state.lengths + live.astype(jnp.int32),
        done=state.done | hit_stop | hit_len)

  def sample(params: Params, prompts: Array, prompt_mask: Array,
             key: PRNGKey, temperature, top_p, *, num_samples: int):
    b, p = prompts.shape
    g = num_samples
    rows = b * g
    pmask = prompt_mask.astype(bool)
    temperature = jnp.asarray(temperature, jnp.float32)
    top_p = jnp.asarray(top_p, jnp.float32)

    # Prefill each prompt once into slots [0, P), then give its G rows
    # copies of the cache (as the engine does): the same numbers as
    # prefilling every row, at 1/G of the prefill work.
    s = p + t_max
    kv_valid = jnp.concatenate([pmask, jnp.zeros((b, t_max), bool)], 1)
    positions = kv_cache.positions_from_mask(pmask)
    mask = kv_cache.causal_mask(kv_valid, query_len=p, cache_index=0)
    logits, cache = apply_fn(params, prompts, positions, mask,
                             init_cache_fn(b, s), 0)
    per_row = lambda x: jnp.repeat(x, g, axis=0)  # (b g) order.
    cache, logits = jax.tree.map(per_row, cache), per_row(logits[:, -1:])
    kv_valid, positions = per_row(kv_valid), per_row(positions)
    state = _LoopState(
        step=jnp.zeros((), jnp.int32),
        tokens=jnp.full((rows, t_max), cfg.pad_id, jnp.int32),
        logp=jnp.zeros((rows, t_max), jnp.float32),
        entropy=jnp.zeros((rows, t_max), jnp.float32),
        done=jnp.zeros((rows,), bool),
        lengths=jnp.zeros((rows,), jnp.int32),
        finish=jnp.zeros((rows,), jnp.int32),
        next_pos=positions[:, -1] + 1,
        kv_valid=kv_valid, cache=cache, key=key)
    k, token, stats = pick(state.key, logits[:, -1], temperature, top_p)
    state = pin(record(state._replace(key=k), token, stats))

    def cond(st: _LoopState):
      return (st.step < t_max) & ~jnp.all(st.done)

    def body(st: _LoopState):
      # Feed the token sampled last into slot P + step - 1.
      index = p + st.step - 1
      last = st.tokens[:, st.step - 1]
      kv_valid = st.kv_valid.at[:, index].set(True)
      mask = kv_cache.causal_mask(kv_valid, query_len=1, cache_index=index)
      logits, cache = apply_fn(params, last[:, None], st.next_pos[:, None],
                               mask, st.cache, index)
      st = st._replace(kv_valid=kv_valid, cache=cache,
                       next_pos=st.next_pos + 1)
      k, token, stats = pick(st.key, logits[:, 0], temperature, top_p)
      return pin(record(st._replace(key=k), token, stats))

    state = jax.lax.while_loop(cond, body, state)
    loss_mask = jnp.arange(t_max)[None, :] < state.lengths[:, None]
    split = lambda x: constrain(
        einops.rearrange(x, '(b g) ... -> b g ...', g=g))
    return Rollout(tokens=split(state.tokens), loss_mask=split(loss_mask),
                   logp=split(state.logp), entropy=split(state.entropy),
                   lengths=split(state.lengths),
                   finish=split(state.finish))

  return jax.jit(sample, static_argnames=('num_samples',))


def transformer_fns(model) -> tuple[ApplyFn, InitCacheFn]:
  """(apply_fn, init_cache_fn) for an `rlx.models.transformer.Transformer`
  (shared by this sampler and the continuous engine)."""
  mcfg = model.cfg

  def apply_fn(params, tokens, positions, mask, cache, index):
    logits, new_cache, _ = model.apply({'params': params}, tokens, positions,
                                       mask, cache, index)
    return logits, new_cache

  def init_cache_fn(batch, length):
    return kv_cache.init_cache(
        num_layers=mcfg.num_layers, batch=batch, length=length,
        num_kv_heads=mcfg.num_kv_heads, head_dim=mcfg.head_dim,
        dtype=jnp.dtype(mcfg.dtype))

  return apply_fn, init_cache_fn


def transformer_sampler(model, cfg: SamplerConfig, *, constrain=None):
  """`make_sampler` for an `rlx.models.transformer.Transformer`."""
  return make_sampler(*transformer_fns(model), cfg, constrain=constrain)
