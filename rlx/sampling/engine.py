"""Continuous batching: a fixed pool of decode slots over one KV cache.

The engine holds R slots, each with a preallocated cache row of
S = P + T columns: the prompt is left-padded into columns [0, P), the
response follows from column P. Every slot has its own response length,
RoPE position and `kv_valid` row, so slots advance independently and the
cache is written at a per-row index.

Three jitted functions do the work, with fixed shapes (decode compiles
once, prefill and insert once per width, whatever is inserted):

  prefill(params, prompts, ...)  prefills U prompts together over their
      real tokens (not the left padding of the window): a `PromptCache`;
  insert(params, state, pool, requests, ...)  puts M rows into the slots
      they name, each from a copy of its prompt's cache (a group's rows
      share one prompt prefill), resumed rows prefilling their partial
      responses over it, and samples each row's next token;
  decode(params, state, ...)  runs up to `chunk_steps` decode steps in a
      `lax.while_loop`, leaving early once enough slots have finished to
      make a full insert worthwhile.

`run` is the host loop around them: it refills free slots from a queue of
jobs, harvests finished rows, and stops when the queue is drained or a
caller's predicate says so (APRIL, `rlx/sampling/partial.py`). Every
sampled token carries its behaviour log-prob and the policy version that
produced it. `ContinuousSampler` wraps `run` with the static sampler's
signature, so it can replace `sampler.make_sampler` in the actor.
"""

import collections
import dataclasses
import itertools
import time
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rlx.models import kv_cache
from rlx.sampling import sampler as sampler_lib
from rlx.types import Array, FinishReason, Params, PRNGKey

_RUNNING = int(FinishReason.RUNNING)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """Static engine settings (changing any of these recompiles)."""
  num_slots: int  # R: sequences decoded at once (rows of the KV cache).
  prompt_len: int  # P: prompt window; prompts are left-padded to it.
  max_new_tokens: int  # T: response budget, resumed prefix included.
  stop_tokens: tuple[int, ...]  # Ending a response (kept in it).
  pad_id: int = 0  # Written after a response ends.
  top_k: int = 0  # 0 disables top-k filtering.
  chunk_steps: int = 16  # k: most decode steps per jitted call.
  insert_rows: int = 0  # M: rows inserted per insert; 0: max(1, R // 8).
  prefill_prompts: int = 0  # U: prompts prefilled together in one prompt
  # prefill; inserts then copy each prompt's cache to its group's rows (a
  # group's samples share it); 0: max(1, R // 4).
  prefill_bucket: int = 16  # Prefills compute a multiple of this many
  # columns: a prompt prefill its longest prompt's real tokens (not the
  # left padding of the window), a resume its longest partial response
  # (over a copy of the prompt's cache): at most P / prefill_bucket + 1
  # prompt and T / prefill_bucket + 1 resume widths, one compilation each.

  def __post_init__(self):
    for name in ('num_slots', 'prompt_len', 'max_new_tokens', 'chunk_steps',
                 'prefill_bucket'):
      if getattr(self, name) < 1:
        raise ValueError(f'EngineConfig.{name}={getattr(self, name)} must '
                         'be >= 1')
    if not 0 <= self.insert_rows <= self.num_slots:
      raise ValueError(f'EngineConfig.insert_rows={self.insert_rows} must be '
                       f'in [0, num_slots={self.num_slots}]')
    if self.prefill_prompts < 0:
      raise ValueError(f'EngineConfig.prefill_prompts={self.prefill_prompts} '
                       'must be >= 0')

  @property
  def rows_per_insert(self) -> int:
    return self.insert_rows or max(1, self.num_slots // 8)

  @property
  def prompts_per_prefill(self) -> int:
    return self.prefill_prompts or max(1, self.num_slots // 4)

  @property
  def cache_len(self) -> int:
    return self.prompt_len + self.max_new_tokens

  def width(self, span: int, *, resume: bool) -> int:
    """Columns a prefill computes for real spans of at most `span` tokens
    (a prompt's, from its first real token to the end of the window; or,
    resuming, a partial response's): the next multiple of
    `prefill_bucket`, at most P (prompts) or T (resume)."""
    b = self.prefill_bucket
    cap = self.max_new_tokens if resume else self.prompt_len
    return min(-(-max(span, 1) // b) * b, cap)

  def widths(self, *, resume: bool) -> list[int]:
    """Every width `width` can return (what `precompile` compiles)."""
    top = self.max_new_tokens if resume else self.prompt_len
    return sorted({self.width(n, resume=resume) for n in range(1, top + 1)})


class Tracks(NamedTuple):
  """Per-response records; leading axes `[...]` are rows (or [B, G])."""
  tokens: Array  # [..., T] int32, pad after the end.
  logp: Array  # [..., T] f32 behaviour log-probs (temperature applied).
  entropy: Array  # [..., T] f32 entropy of the behaviour distribution.
  version: Array  # [..., T] int32 policy version per token; -1 unsampled.
  length: Array  # [...] int32 tokens sampled so far.
  finish: Array  # [...] int32 `FinishReason` (RUNNING: unfinished).


class SlotState(NamedTuple):
  """The engine's device state: R slots."""
  tracks: Tracks  # [R, ...] the response in each slot.
  live: Array  # [R] bool, slot is decoding.
  next_pos: Array  # [R] int32 RoPE position of the next token to feed.
  kv_valid: Array  # [R, S] bool, cache columns holding real tokens.
  cache: kv_cache.Cache  # R rows of S columns.
  key: PRNGKey
  busy: Array  # scalar int32: live slot-steps decoded so far.
  steps: Array  # scalar int32: decode steps run so far.
  kv_version: Array  # [R] int32 policy version that prefilled the row's
  # cache (its oldest entries); a token sampled over it is stamped with the
  # older of this and the current version.


class PromptCache(NamedTuple):
  """U prompts prefilled together (`Engine.prefill`); `Engine.insert`
  copies each one's cache to the rows that continue it."""
  cache: kv_cache.Cache  # U rows of P columns.
  valid: Array  # [U, P] bool, real prompt tokens.
  last_pos: Array  # [U] int32 RoPE position of the last prompt token.
  logits: Array  # [U, V] float32, predicting the first response token.


class Requests(NamedTuple):
  """M rows to insert; padding rows name slot R and are dropped."""
  slot: Array  # [M] int32 target slot.
  source: Array  # [M] int32 row of the `PromptCache` each row continues.
  prefix: Tracks  # [M, ...] response so far (length 0: a fresh prompt).


class Engine(NamedTuple):
  """The jitted engine functions (see the module docstring)."""
  cfg: EngineConfig
  init: Callable[[PRNGKey], SlotState]
  prefill: Callable[..., PromptCache]
  insert: Callable[..., SlotState]
  decode: Callable[..., SlotState]


def empty_tracks(shape: tuple[int, ...], max_new_tokens: int, *,
                 pad_id: int = 0, xp=np) -> Tracks:
  """Tracks of `shape` rows with no sampled token (numpy or jnp via xp)."""
  full = shape + (max_new_tokens,)
  return Tracks(tokens=xp.full(full, pad_id, xp.int32),
                logp=xp.zeros(full, xp.float32),
                entropy=xp.zeros(full, xp.float32),
                version=xp.full(full, -1, xp.int32),
                length=xp.zeros(shape, xp.int32),
                finish=xp.full(shape, _RUNNING, xp.int32))


def _record(tr: Tracks, live: Array, token: Array, lp: Array, ent: Array,
            version: Array, *, stop: Array, t_max: int
            ) -> tuple[Tracks, Array]:
  """Appends one token to each live row of `tr [R, ...]`.

  Returns the new tracks and the rows still live afterwards.
  """
  r = live.shape[0]
  rows = jnp.arange(r)
  col = jnp.where(live, tr.length, t_max)  # Out of range: dropped.
  put = lambda a, x: a.at[rows, col].set(x, mode='drop')
  hit_stop = live & jnp.isin(token, stop)
  hit_len = live & ~hit_stop & (tr.length + 1 >= t_max)
  finish = jnp.where(hit_stop, int(FinishReason.STOP), tr.finish)
  finish = jnp.where(hit_len, int(FinishReason.LENGTH), finish)
  tr = Tracks(tokens=put(tr.tokens, token), logp=put(tr.logp, lp),
              entropy=put(tr.entropy, ent),
              version=put(tr.version, jnp.broadcast_to(version, (r,))),
              length=tr.length + live.astype(jnp.int32), finish=finish)
  return tr, live & ~hit_stop & ~hit_len


def _scatter_rows(dst: Array, slot: Array, src: Array) -> Array:
  """dst[slot[m], :d1, :d2, ...] = src[m] (src may be narrower than dst)."""
  index = (slot,) + tuple(slice(0, d) for d in src.shape[1:])
  return dst.at[index].set(src.astype(dst.dtype), mode='drop')


def make_engine(apply_fn: sampler_lib.ApplyFn,
                init_cache_fn: sampler_lib.InitCacheFn,
                cfg: EngineConfig) -> Engine:
  """Builds the jitted `Engine` for a `tokens_to_logits`-style model.

  Args:
    apply_fn: `(params, tokens [B, L], positions [B, L], mask [B, L, S],
      cache, index) -> (logits [B, L, V], cache)`; `index` is the int 0 for
      a prefill and an int array [B] (per-row cache column) for decoding.
    init_cache_fn: `(batch, length) -> empty cache`.
    cfg: engine settings.
  """
  r, p, t_max, s = (cfg.num_slots, cfg.prompt_len, cfg.max_new_tokens,
                    cfg.cache_len)
  stop = jnp.asarray(cfg.stop_tokens, jnp.int32)
  record = lambda *a: _record(*a, stop=stop, t_max=t_max)

  def pick(key, logits, temperature, top_p):
    """Samples from logits [R, V]; returns (key, token, logp, entropy)."""
    key, sub = jax.random.split(key)
    sample_logp, behaviour = sampler_lib.process_logits(
        logits, temperature, top_p, top_k=cfg.top_k)
    token = jax.random.categorical(sub, sample_logp, axis=-1).astype(jnp.int32)
    lp = jnp.take_along_axis(behaviour, token[:, None], -1)[:, 0]
    ent = -jnp.sum(jnp.exp(behaviour) * behaviour, axis=-1)
    return key, token, lp, ent

  def init(key: PRNGKey) -> SlotState:
    return SlotState(
        tracks=empty_tracks((r,), t_max, pad_id=cfg.pad_id, xp=jnp),
        live=jnp.zeros((r,), bool), next_pos=jnp.zeros((r,), jnp.int32),
        kv_valid=jnp.zeros((r, s), bool), cache=init_cache_fn(r, s), key=key,
        busy=jnp.zeros((), jnp.int32), steps=jnp.zeros((), jnp.int32),
        kv_version=jnp.zeros((r,), jnp.int32))

  def prefill(params: Params, prompts: Array, prompt_mask: Array, *,
              width: int) -> PromptCache:
    """Prefills U left-padded prompts [U, P] over their last `width`
    (static) columns: the longest prompt's real tokens rounded up
    (`cfg.width`), not the window's left padding, which stays invalid."""
    n, lead = prompts.shape[0], p - width
    valid = prompt_mask.astype(bool)
    positions = kv_cache.positions_from_mask(valid)
    logits, cache = apply_fn(
        params, prompts[:, lead:], positions[:, lead:],
        kv_cache.causal_mask(valid, query_len=width, cache_index=lead),
        init_cache_fn(n, p), lead)
    return PromptCache(cache=cache, valid=valid, last_pos=positions[:, -1],
                       logits=logits[:, -1])

  def insert(params: Params, state: SlotState, pool: PromptCache,
             req: Requests, temperature, top_p, version, *,
             width: int) -> SlotState:
    """Inserts `req` rows into their slots and samples one token each.

    Every row starts from a copy of its prompt's cache in `pool`. Fresh
    rows (`width` 0, static; the prefix is ignored) need no model call.
    Resumed rows prefill their partial responses, `width` columns from
    column P (the longest rounded up: `cfg.width`), over that copy.
    """
    m = req.slot.shape[0]
    cache = jax.tree.map(lambda x: x[req.source], pool.cache)
    kv_valid, last_pos = pool.valid[req.source], pool.last_pos[req.source]
    if width:
      prefix = req.prefix
      kv_valid = jnp.concatenate(
          [kv_valid, jnp.arange(width)[None] < prefix.length[:, None]], 1)
      # Response token j sits at column P + j, position (prompt length) + j.
      positions = last_pos[:, None] + 1 + jnp.arange(width)[None]
      # Into a cache of P + width columns (`init_cache_fn`'s layout).
      cache = jax.tree.map(
          lambda dst, x: dst.at[tuple(slice(0, d) for d in x.shape)].set(x),
          init_cache_fn(m, p + width), cache)
      logits, cache = apply_fn(
          params, prefix.tokens[:, :width], positions,
          kv_cache.causal_mask(kv_valid, query_len=width, cache_index=p),
          cache, p)
      first = logits[jnp.arange(m), prefix.length - 1]
    else:
      prefix = empty_tracks((m,), t_max, pad_id=cfg.pad_id, xp=jnp)
      first = pool.logits[req.source]
    key, token, lp, ent = pick(state.key, first, temperature, top_p)
    tracks, live = record(prefix._replace(finish=jnp.full(
        (m,), _RUNNING, jnp.int32)), jnp.ones((m,), bool), token, lp, ent,
                          version)
    kv_valid = jnp.concatenate(
        [kv_valid, jnp.zeros((m, s - kv_valid.shape[1]), bool)], 1)
    put = lambda dst, x: _scatter_rows(dst, req.slot, x)
    return state._replace(
        tracks=jax.tree.map(put, state.tracks, tracks),
        live=put(state.live, live),
        next_pos=put(state.next_pos, last_pos + 1 + prefix.length),
        kv_valid=put(state.kv_valid, kv_valid),
        cache=jax.tree.map(put, state.cache, cache), key=key,
        kv_version=put(state.kv_version,
                       jnp.broadcast_to(version, (m,))))

  def step(params, st: SlotState, temperature, top_p, version) -> SlotState:
    """One decode step for every slot (rows not live are left unchanged)."""
    rows = jnp.arange(r)
    live = st.live
    length = jnp.maximum(st.tracks.length, 1)
    last = st.tracks.tokens[rows, length - 1]
    index = p + length - 1  # Cache column of `last`.
    kv_valid = st.kv_valid.at[rows, jnp.where(live, index, s)].set(
        True, mode='drop')
    mask = kv_cache.causal_mask(kv_valid, query_len=1, cache_index=index)
    logits, cache = apply_fn(params, last[:, None], st.next_pos[:, None],
                             mask, st.cache, index)
    key, token, lp, ent = pick(st.key, logits[:, 0], temperature, top_p)
    # A row kept across a weight update (`run(..., hold=True)`) decodes
    # over a cache computed by older weights: its tokens carry that version.
    tracks, still = record(st.tracks, live, token, lp, ent,
                           jnp.minimum(st.kv_version, version))
    return st._replace(
        tracks=tracks, live=still, kv_valid=kv_valid, cache=cache, key=key,
        next_pos=st.next_pos + live.astype(jnp.int32),
        busy=st.busy + jnp.sum(live, dtype=jnp.int32), steps=st.steps + 1)

  def decode(params: Params, state: SlotState, temperature, top_p, version,
             refill_at) -> SlotState:
    """Up to `chunk_steps` steps; stops early when no slot is live or when
    `refill_at` (int32 scalar) slots have finished since the call began."""
    started = state.live

    def cond(carry):
      i, st = carry
      finished = jnp.sum(started & ~st.live)
      return (i < cfg.chunk_steps) & jnp.any(st.live) & (finished < refill_at)

    def body(carry):
      i, st = carry
      return i + 1, step(params, st, temperature, top_p, version)

    return jax.lax.while_loop(cond, body, (0, state))[1]

  def init_committed(key: PRNGKey) -> SlotState:
    # Committed to one device, like the outputs of insert and decode: jit
    # keys its cache on committedness, so mixing them would recompile.
    return jax.device_put(jax.jit(init)(key), jax.devices()[0])

  return Engine(
      cfg=cfg, init=init_committed,
      prefill=jax.jit(prefill, static_argnames=('width',)),
      insert=jax.jit(insert, static_argnames=('width',), donate_argnums=1),
      decode=jax.jit(decode, donate_argnums=1))


def precompile(engine: Engine, params: Params, *, resume: bool = True
               ) -> None:
  """Compiles every prefill and insert width and the decode chunk up front
  (on a scratch state whose inserts are all padding rows), so that no
  compilation lands inside a timed or latency-sensitive rollout. `resume`
  False skips the resume widths (callers that never resume)."""
  cfg = engine.cfg
  m, u, p = cfg.rows_per_insert, cfg.prompts_per_prefill, cfg.prompt_len
  state = engine.init(jax.random.key(0))
  sampling = (jnp.float32(1.0), jnp.float32(1.0), jnp.int32(0))
  prompts, mask = np.zeros((u, p), np.int32), np.ones((u, p), bool)
  for width in cfg.widths(resume=False):
    pool = engine.prefill(params, prompts, mask, width=width)
  req = Requests(slot=np.full((m,), cfg.num_slots, np.int32),
                 source=np.zeros((m,), np.int32),
                 prefix=empty_tracks((m,), cfg.max_new_tokens,
                                     pad_id=cfg.pad_id))
  for width in [0] + (cfg.widths(resume=True) if resume else []):
    state = engine.insert(params, state, pool, req, *sampling, width=width)
  jax.block_until_ready(engine.decode(params, state, *sampling, jnp.int32(1)))


def with_key(state: SlotState, key: PRNGKey) -> SlotState:
  """The state with a new sampling key, placed like the state (committed)."""
  return state._replace(key=jax.device_put(key, state.live.sharding))


def transformer_engine(model, cfg: EngineConfig) -> Engine:
  """`make_engine` for an `rlx.models.transformer.Transformer`."""
  return make_engine(*sampler_lib.transformer_fns(model), cfg)


def _take(tracks: Tracks, index) -> Tracks:
  return Tracks(*(np.asarray(x)[index] for x in tracks))


def _put(dst: Tracks, index, src: Tracks) -> None:
  for d, x in zip(dst, src):
    d[index] = x


def _chunks(jobs: np.ndarray, job_prompt: np.ndarray, *, rows: int,
            prompts: int) -> list[np.ndarray]:
  """Splits `jobs` in order into runs of <= `rows` jobs that use <=
  `prompts` distinct prompts."""
  out, cur, seen = [], [], set()
  for j in jobs:
    if len(cur) == rows or (job_prompt[j] not in seen and
                            len(seen) == prompts):
      out.append(np.array(cur))
      cur, seen = [], set()
    cur.append(j)
    seen.add(job_prompt[j])
  return out + ([np.array(cur)] if cur else [])


def _prompt_spans(prompt_mask) -> np.ndarray:
  """[U] columns from each prompt's first real token to the window's end."""
  mask = np.asarray(prompt_mask, bool)
  return np.where(mask.any(1), mask.shape[1] - np.argmax(mask, 1), 0)


def _distinct(values, limit: int) -> list:
  """The first `limit` distinct items of an iterable, in order."""
  seen = {}
  for v in values:
    seen.setdefault(v)
    if len(seen) == limit:
      break
  return list(seen)


class _PromptPool:
  """The prompt caches of one `run` call (so of its weights): up to U
  prompts at a time, prefilled together whenever an insert needs a prompt
  that is not there (that prompt first, then the next ones in queue
  order, so a group's rows and the groups after it find theirs)."""

  def __init__(self, engine: Engine, params, prompts, prompt_mask):
    self.engine, self.params = engine, params
    self.prompts, self.prompt_mask = prompts, prompt_mask
    self.spans = _prompt_spans(prompt_mask)
    self.ids = np.full(engine.cfg.prompts_per_prefill, -1)
    self.cache: Optional[PromptCache] = None
    self.calls = 0

  def rows(self, prompts: np.ndarray, upcoming) -> np.ndarray:
    """The pool row of each of `prompts` (prompt rows; at most U distinct),
    after a prefill of them and then `upcoming` (an iterable of prompt
    rows) when one of them is missing."""
    need = _distinct(prompts.tolist(), len(prompts))
    if not np.all(np.isin(need, self.ids)):
      u = len(self.ids)
      ids = _distinct(itertools.chain(need, upcoming), u)
      ids = np.array(ids + ids[:1] * (u - len(ids)))  # Pad with a repeat.
      width = self.engine.cfg.width(int(self.spans[ids].max()),
                                    resume=False)
      self.cache = self.engine.prefill(self.params, self.prompts[ids],
                                       self.prompt_mask[ids], width=width)
      self.ids = ids
      self.calls += 1
    row_of = {}
    for row, j in enumerate(self.ids.tolist()):
      row_of.setdefault(j, row)
    return np.array([row_of[j] for j in prompts.tolist()])


def _insert_jobs(engine: Engine, params, state: SlotState, slots, jobs, *,
                 job_prompt, pool: _PromptPool, pending, out: Tracks,
                 sampling) -> tuple[SlotState, int]:
  """Inserts `jobs` (rows of `out`) into `slots`, `jobs[i]` into
  `slots[i]`, M rows per call, each from its prompt's cache in `pool`:
  fresh jobs in queue order, then partial ones resumed, by length (a
  resume's width fits its longest partial response). `pending` (the jobs
  queued after these) tells the pool which prompts come next.

  Returns the new state and the number of insert calls.
  """
  cfg = engine.cfg
  slot_of = dict(zip(jobs.tolist(), slots.tolist()))
  lengths = out.length[jobs]
  fresh, resumed = np.flatnonzero(lengths == 0), np.flatnonzero(lengths)
  resumed = resumed[np.argsort(lengths[resumed], kind='stable')]
  parts = [part for sel in (fresh, resumed)
           for part in _chunks(jobs[sel], job_prompt,
                               rows=cfg.rows_per_insert,
                               prompts=cfg.prompts_per_prefill)]
  for i, part in enumerate(parts):
    pad = cfg.rows_per_insert - len(part)
    later = itertools.chain((job_prompt[j] for q in parts[i + 1:] for j in q),
                            (job_prompt[j] for j in pending))
    source = pool.rows(job_prompt[part], later)
    # Padding rows repeat the first job and target slot R: dropped.
    idx = np.concatenate([part, np.full(pad, part[0])])
    req = Requests(
        slot=np.concatenate([[slot_of[j] for j in part],
                             np.full(pad, cfg.num_slots)]).astype(np.int32),
        source=np.concatenate([source, np.full(pad, source[0])]).astype(
            np.int32),
        prefix=_take(out, idx))
    longest = int(out.length[part].max())  # 0: fresh jobs.
    width = longest and cfg.width(longest, resume=True)
    state = engine.insert(params, state, pool.cache, req, *sampling,
                          width=width)
  return state, len(parts)


def run(engine: Engine, params: Params, state: SlotState, prompts: np.ndarray,
        prompt_mask: np.ndarray, prefix: Tracks, *, temperature: float,
        top_p: float, version: int, job_prompt: Optional[np.ndarray] = None,
        stop: Optional[Callable[[np.ndarray], bool]] = None,
        resident: Optional[np.ndarray] = None, hold: bool = False
        ) -> tuple[SlotState, Tracks, dict]:
  """Decodes a queue of J jobs through the slots (the host loop).

  Jobs enter free slots in index order; a job with a partial prefix
  (length > 0, RUNNING) is resumed, one already finished is returned as is.
  Between decode chunks finished rows are harvested and slots refilled.

  A job can also start *resident*: still live in the slot where an earlier
  `run(..., hold=True)` stopped it, with its cache. It then continues
  there without a prefill, under `params` over a cache that the earlier
  weights computed (PipelineRL's in-flight weight update); its new tokens
  carry the cache's version (`SlotState.kv_version`), not `version`.

  Args:
    engine: from `make_engine`.
    params: model parameters.
    state: slot state (from `engine.init`; no slot live). Donated.
    prompts: [Q, P] int32 left-padded; prompt_mask: [Q, P] bool.
    prefix: host `Tracks [J, ...]`, e.g. `empty_tracks((J,), T)`.
    temperature, top_p: sampling settings (no recompilation).
    version: policy version recorded on every token sampled now.
    job_prompt: [J] int, the prompt row of each job (jobs sharing a prompt
      share its prefill, made under `params`); None: job j uses prompt row
      j (Q = J).
    stop: optional predicate on `done [J]` bool, checked between chunks;
      True ends the call with the unfinished jobs handed back.
    resident: optional [R] int, the job each slot already holds (-1: free),
      from the `slot_job` stat of a `hold=True` call (jobs renumbered to
      this call's queue); those slots must still be live in `state` with
      the job's response so far (`prefix` row) in them. Every other slot
      is treated as free.
    hold: when `stop` ends the call, leave the unfinished jobs live in
      their slots (reported in `slot_job`) instead of freeing the slots.

  Returns:
    (state, tracks [J, ...] on the host: finished jobs with their finish
    reason, the others RUNNING with their partial response, stats) where
    stats has `decode_steps`, `busy_slot_steps`, `slot_utilisation`
    (busy / (R * steps)), `decode_calls`, `insert_calls`, `prefill_calls`
    (prompt prefills), `resident_jobs`
    (jobs continued from `resident`), `seconds`, and `slot_job` ([R] job
    per slot still live: -1 everywhere unless `hold` kept some).
  """
  r, start = engine.cfg.num_slots, time.perf_counter()
  out = Tracks(*(np.array(x) for x in prefix))
  job_prompt = np.asarray(np.arange(len(out.length)) if job_prompt is None
                          else job_prompt)
  done = out.finish != _RUNNING
  slot_job = _resident_slots(state, out, done, resident, r)
  # Any other slot is free, whatever an earlier call left in it.
  state = state._replace(live=state.live & jnp.asarray(slot_job >= 0))
  queued = ~done
  queued[slot_job[slot_job >= 0]] = False
  calls = collections.Counter(resident_jobs=int(np.sum(slot_job >= 0)),
                              insert_calls=0, decode_calls=0)
  pending = collections.deque(np.flatnonzero(queued).tolist())
  pool = _PromptPool(engine, params, prompts, prompt_mask)
  sampling = (jnp.float32(temperature), jnp.float32(top_p),
              jnp.int32(version))
  base = np.asarray(jax.device_get((state.busy, state.steps)))
  state = _drive(engine, params, state, out, done, slot_job, pending,
                 stop=stop, job_prompt=job_prompt, pool=pool,
                 sampling=sampling, calls=calls)
  held = np.flatnonzero(slot_job >= 0)
  if len(held):  # Stopped early: hand back the partial responses.
    _put(out, slot_job[held], _take(jax.device_get(state.tracks), held))
    if not hold:
      state = state._replace(live=jnp.zeros_like(state.live))
      slot_job[:] = -1
  busy, steps = np.asarray(jax.device_get((state.busy, state.steps))) - base
  stats = {'decode_steps': int(steps), 'busy_slot_steps': int(busy),
           'slot_utilisation': float(busy / max(r * steps, 1)),
           'seconds': time.perf_counter() - start, 'slot_job': slot_job,
           'prefill_calls': pool.calls, **calls}
  return state, out, stats


def _drive(engine: Engine, params, state: SlotState, out: Tracks,
           done: np.ndarray, slot_job: np.ndarray, pending, *, stop,
           job_prompt, pool: _PromptPool, sampling, calls) -> SlotState:
  """`run`'s loop: fills free slots from `pending`, decodes a chunk,
  harvests finished rows into `out` (updating `done` and `slot_job` in
  place), until no slot is live or `stop(done)`."""
  cfg, r = engine.cfg, engine.cfg.num_slots
  while not (stop is not None and stop(done)):
    free = np.flatnonzero(slot_job < 0)[:len(pending)]
    jobs = np.array([pending.popleft() for _ in free], np.int64)
    if len(jobs):
      slot_job[free] = jobs
      state, n = _insert_jobs(engine, params, state, free, jobs,
                              job_prompt=job_prompt, pool=pool,
                              pending=pending, out=out, sampling=sampling)
      calls['insert_calls'] += n
    if np.all(slot_job < 0):
      break
    refill_at = min(cfg.rows_per_insert, len(pending)) if pending else r + 1
    state = engine.decode(params, state, *sampling, jnp.int32(refill_at))
    calls['decode_calls'] += 1
    finish = np.asarray(state.tracks.finish)
    fin = np.flatnonzero((slot_job >= 0) & (finish != _RUNNING))
    if len(fin):
      _put(out, slot_job[fin], _take(jax.device_get(state.tracks), fin))
      done[slot_job[fin]] = True
      slot_job[fin] = -1
  return state


def _resident_slots(state: SlotState, out: Tracks, done: np.ndarray,
                    resident: Optional[np.ndarray], r: int) -> np.ndarray:
  """The checked `resident` map ([R] job per slot, -1 free).

  Raises:
    ValueError: if the map's shape is wrong, names a job twice, a finished
      job or an unknown one, or a slot that is not live with the job's
      response length (the slot's cache would not be the job's).
  """
  slot_job = np.full(r, -1)
  if resident is None:
    return slot_job
  resident = np.asarray(resident)
  if resident.shape != (r,):
    raise ValueError(f'resident must be [num_slots={r}] job indices, got '
                     f'shape {resident.shape}')
  slots = np.flatnonzero(resident >= 0)
  jobs = resident[slots]
  live, length = (np.asarray(x)[slots] for x in jax.device_get(
      (state.live, state.tracks.length)))
  problems = []
  if len(np.unique(jobs)) != len(jobs):
    problems.append('a job is resident in two slots')
  if np.any(jobs >= len(done)):
    problems.append(f'jobs {jobs[jobs >= len(done)].tolist()} are not in '
                    f'the queue of {len(done)}')
  else:
    bad = slots[~live | done[jobs] | (length != out.length[jobs])]
    if len(bad):
      problems.append(f'slots {bad.tolist()} are not live with their job\'s '
                      'unfinished response')
  if problems:
    raise ValueError('resident slots do not match the jobs: ' +
                     '; '.join(problems))
  slot_job[slots] = jobs
  return slot_job


def pad_prompts(prompts: np.ndarray, prompt_mask: np.ndarray,
                prompt_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads `[B, P'] -> [B, P]` (P' <= P = the engine's prompt window)."""
  b, width = prompts.shape
  if width > prompt_len:
    raise ValueError(f'prompts are {width} tokens wide but the engine\'s '
                     f'prompt window is EngineConfig.prompt_len={prompt_len}')
  pad = prompt_len - width
  return (np.concatenate([np.zeros((b, pad), np.int32),
                          np.asarray(prompts, np.int32)], 1),
          np.concatenate([np.zeros((b, pad), bool),
                          np.asarray(prompt_mask, bool)], 1))


def to_rollout(tracks: Tracks, group_size: int) -> sampler_lib.Rollout:
  """Host tracks `[B*G, ...]` (group-major) -> `Rollout [B, G, T]`."""
  g = group_size
  split = lambda x: jnp.asarray(x.reshape((-1, g) + x.shape[1:]))
  loss_mask = np.arange(tracks.tokens.shape[-1]) < tracks.length[..., None]
  return sampler_lib.Rollout(
      tokens=split(tracks.tokens), loss_mask=split(loss_mask),
      logp=split(tracks.logp), entropy=split(tracks.entropy),
      lengths=split(tracks.length), finish=split(tracks.finish))


class ContinuousSampler:
  """Continuous batching behind the static sampler's call signature.

  `sampler(params, prompts [B, P'], prompt_mask, key, temperature, top_p,
  num_samples=G) -> Rollout [B, G, T]`, like `sampler.make_sampler`'s
  function, so the actor can use either. The B*G responses queue for the
  R slots. The slot state (KV cache) is allocated once and reused; the
  statistics of the last call are in `last_stats`.
  """

  def __init__(self, engine: Engine):
    self.engine = engine
    self.last_stats: dict = {}
    self._state: Optional[SlotState] = None

  def __call__(self, params: Params, prompts, prompt_mask, key: PRNGKey,
               temperature, top_p=1.0, *, num_samples: int, version: int = 0
               ) -> sampler_lib.Rollout:
    cfg = self.engine.cfg
    prompts, prompt_mask = pad_prompts(np.asarray(prompts),
                                       np.asarray(prompt_mask),
                                       cfg.prompt_len)
    jobs = len(prompts) * num_samples
    if self._state is None:
      self._state = self.engine.init(key)
    self._state, out, self.last_stats = run(
        self.engine, params, with_key(self._state, key), prompts, prompt_mask,
        empty_tracks((jobs,), cfg.max_new_tokens, pad_id=cfg.pad_id),
        temperature=temperature, top_p=top_p, version=version,
        job_prompt=np.arange(jobs) // num_samples)
    return to_rollout(out, num_samples)
