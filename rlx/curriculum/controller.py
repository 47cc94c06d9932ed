"""One RL step's rollouts under a curriculum: select, allocate, filter.

The host loop of DESIGN.md section 3 up to the learner:

  skip (optional)  -> eligible prompts (posterior says: not all-equal)
  DOTS (optional)  -> reference rollouts, predicted pass rates
  select           -> B prompt ids (jitted selector; likelihood: the B of
                      K * B candidates whose reference solution the policy
                      finds closest to even odds, one forward pass)
  allocate         -> rollouts per prompt, one or two rounds
  filter (dapo)    -> all-equal groups replaced by fresh prompts (bounded)
  update           -> estimator (every rollout is evidence), GDRO weights

Rollouts with variable group sizes are sampled as flat rows (one response
per row, rows padded to a bucket so the sampler compiles once per bucket)
and scattered back into [B, Gc, T] with a group mask, Gc the largest count
rounded up to a multiple of 4.
"""

import dataclasses
import functools
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rlx.curriculum import allocators as alloc_lib
from rlx.curriculum import estimators as est
from rlx.curriculum import selectors as sel
from rlx.learner import round_up
from rlx.types import FinishReason

_ROW_BUCKET = 32  # Flat rollout rows are padded to a multiple of this.
_GROUP_BUCKET = 4  # The group axis is padded to a multiple of this.
NUM_HIST_BINS = 5  # Histogram of selected prompts' estimated pass rates.


@dataclasses.dataclass
class Collected:
  """A step's training groups on the host, [B, Gc, ...] with a group mask."""
  ids: np.ndarray  # [B] prompt ids (into the pool).
  tokens: np.ndarray  # [B, Gc, T] int32.
  loss_mask: np.ndarray  # [B, Gc, T] bool.
  logp: np.ndarray  # [B, Gc, T] float32 behaviour log-probs.
  entropy: np.ndarray  # [B, Gc, T] float32.
  lengths: np.ndarray  # [B, Gc] int32.
  finish: np.ndarray  # [B, Gc] int32.
  rewards: np.ndarray  # [B, Gc] float32 verifier rewards (0 where masked).
  group_mask: np.ndarray  # [B, Gc] bool: sampled and kept for the loss.
  values: np.ndarray  # [B] posterior mean pass rate before this step.
  counts: np.ndarray  # [B] responses sampled per group.
  rollouts: int  # Responses sampled this step (references and retries in).
  decoded_tokens: int  # Tokens sampled this step.
  extras: dict = dataclasses.field(default_factory=dict)  # Per-response
  # fields a rollout carries beyond the sampler's Rollout (e.g. a tree's
  # path_ids [B, Gc, D]), -1 where no response.


@dataclasses.dataclass
class _Groups:
  """Growing per-prompt lists of sampled responses (host)."""
  rows: list  # [B] lists of one response's rollout row (a NamedTuple)
  rewards: list  # [B] lists of float

  @classmethod
  def empty(cls, b: int):
    return cls([[] for _ in range(b)], [[] for _ in range(b)])

  def counts(self) -> np.ndarray:
    return np.array([len(r) for r in self.rewards])

  def successes(self) -> np.ndarray:
    return np.array([float(np.sum(r)) for r in self.rewards])


@functools.lru_cache(maxsize=8)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


def epoch_order(seed: int, step: int, batch: int, n: int) -> np.ndarray:
  """Prompts of step `step` in data order: slices of per-epoch permutations
  of the n prompts (each prompt once per epoch), a function of (seed, step).
  When `batch` does not divide n, a batch that spans two epochs can hold a
  prompt twice (the end of one permutation and the start of the next; about
  a (batch - a) / n repeats for a split at a), as with any
  shuffle-and-repeat loader; the uniform baselines of every benchmark walk
  this order, so it is kept.
  """
  pos = np.arange(step * batch, (step + 1) * batch)
  return np.array([_epoch_permutation(seed, int(p // n), n)[p % n]
                   for p in pos])


def resolve_estimator(name: str, selector: str, advantage: str) -> str:
  """'auto' -> the estimator each method's paper uses (else 'beta')."""
  if name != 'auto':
    return name
  if selector == 'spo' or advantage == 'spo':
    return 'spo'
  return {'vade': 'vade', 'cures': 'count'}.get(selector, 'beta')


def dots_remember(dots: sel.DotsState, ids) -> sel.DotsState:
  """DOTS history: `ids` (this step's prompts) become the newest
  references; older copies of them and the oldest beyond the buffer go."""
  ids = np.unique(np.asarray(ids, np.int32))
  old = np.asarray(dots.ref_ids)
  old = old[(old >= 0) & ~np.isin(old, ids)]
  refs = np.concatenate([ids, old])[:len(dots.ref_ids)]
  refs = np.pad(refs, (0, len(dots.ref_ids) - len(refs)), constant_values=-1)
  return dots._replace(ref_ids=jnp.asarray(refs, jnp.int32))


def zero_variance(rewards: list) -> bool:
  """Whether a group's rewards are all equal (no GRPO signal)."""
  return len(rewards) == 0 or float(np.ptp(rewards)) == 0.0


class Curriculum:
  """Selection, allocation and filtering over a pool of N train prompts.

  Args:
    cfg: the curriculum config (rlx.config.CurriculumConfig).
    rl: the RL config (batch_prompts B, group_size G).
    pool: N, the number of train prompts selectable.
    embed_fn: (params, prompt ids [n]) -> [n, D] prompt embeddings (DOTS).
    score_fn: (params, prompt ids [n]) -> [n] log-probability of each
      prompt's reference solution under the policy (the likelihood
      selector).
  """

  def __init__(self, cfg, rl, pool: int, *, advantage: str = 'grpo',
               embed_fn: Optional[Callable] = None,
               score_fn: Optional[Callable] = None, seed: int = 0):
    self.cfg, self.rl, self.pool, self.seed = cfg, rl, pool, seed
    g = rl.group_size
    self.estimator_name = resolve_estimator(cfg.estimator, cfg.selector,
                                            advantage)
    self.max_group = cfg.max_group or 2 * g
    self.estimator = est.make(
        self.estimator_name, lam=cfg.discount, gamma=cfg.vade_decay,
        rho=cfg.spo_discount, alpha0=cfg.prior_alpha, beta0=cfg.prior_beta)
    self.dots_history = cfg.selector == 'dots' and cfg.dots_refs == 'history'
    dots = dict(history=self.dots_history, scale=self._dots_scale(),
                prior=cfg.dots_prior, alpha0=cfg.prior_alpha,
                beta0=cfg.prior_beta,
                ridge=cfg.dots_ridge if cfg.dots_readout == 'ridge' else None,
                halflife=cfg.dots_ref_halflife if self.dots_history else 0.0)
    self._select = jax.jit(
        sel.make(cfg.selector, mmr1_mix=cfg.mmr1_mix,
                 spo_floor=cfg.spo_floor, dots_tau=cfg.dots_tau,
                 dots_explore=cfg.dots_explore, **dots),
        static_argnums=2)
    self._dots_predict = jax.jit(sel.dots_predictor(**dots))
    self.allocator = alloc_lib.make(
        cfg.allocator, group_size=rl.group_size, min_group=cfg.min_group,
        max_group=self.max_group,
        first_round=cfg.first_round or max(g // 2, cfg.min_group),
        dars_schedule=cfg.dars_schedule, xrpo_bonus=cfg.xrpo_bonus,
        num_bins=cfg.gdro_bins)
    self._update = jax.jit(self.estimator.update)
    self._prob_same = jax.jit(est.prob_all_same, static_argnums=2)
    self.embed_fn = embed_fn
    if cfg.selector == 'likelihood' and score_fn is None:
      raise ValueError('the likelihood selector needs score_fn (the '
                       "policy's log-probability of reference solutions)")
    self.score_fn = score_fn
    self._likelihood_pick = jax.jit(sel.likelihood_pick, static_argnums=2)
    self._scored = [0, 0.0]  # Candidates scored this step, seconds.
    self.filters = set(cfg.filter.split('+')) - {'none'}

  # State -----------------------------------------------------------------

  def init(self, params=None) -> sel.CurriculumState:
    """The initial state; DOTS embeds the pool with `params` here."""
    embed = self.embed_pool(params) if self.cfg.selector == 'dots' else None
    return self._init(embed)

  def abstract(self, embed_dim: int):
    """Shapes of the state, for restoring a checkpoint."""
    embed = jnp.zeros((self.pool, embed_dim))
    return jax.eval_shape(lambda: self._init(
        embed if self.cfg.selector == 'dots' else None))

  def _dots_scale(self) -> Optional[float]:
    """Attention inverse temperature (None: the card's 1 / sqrt(D))."""
    cosine = self.cfg.dots_similarity == 'cosine'
    return self.cfg.dots_cosine_scale if cosine else None

  def _init(self, embed) -> sel.CurriculumState:
    refs = 1
    if embed is not None:
      refs = (self.cfg.dots_history_refs if self.dots_history
              else self.cfg.dots_ref_prompts)
    dots = sel.DotsState(
        embed=jnp.zeros((1, 1)) if embed is None else embed,
        ref_ids=jnp.full((refs,), -1, jnp.int32),
        ref_rates=jnp.zeros((refs,)))
    return sel.CurriculumState(stats=self.estimator.init(self.pool),
                               gdro=sel.gdro_init(self.cfg.gdro_bins),
                               dots=dots)

  def embed_pool(self, params) -> jax.Array:
    """[N, D] prompt embeddings of the whole pool (DOTS)."""
    if self.embed_fn is None or params is None:
      raise ValueError('the dots selector needs prompt embeddings: pass '
                       'embed_fn and params')
    chunk = 1024
    parts = [self.embed_fn(params, np.arange(i, min(i + chunk, self.pool)))
             for i in range(0, self.pool, chunk)]
    embed = jnp.concatenate(parts).astype(jnp.float32)
    if self.cfg.dots_similarity == 'cosine':
      embed = sel.centre_and_normalise(embed)
    return embed

  def eligible(self, state) -> Optional[jax.Array]:
    """Pre-rollout skip: prompts whose group is not predicted all-equal."""
    if 'skip' not in self.filters:
      return None
    s = state.stats
    same = self._prob_same(s.alpha, s.beta, self.rl.group_size)
    return same < self.cfg.skip_threshold

  # One step --------------------------------------------------------------

  def collect(self, state, params, key, rollout_fn, step: int):
    """Samples one step's training groups.

    Args:
      state: CurriculumState.
      params: policy parameters (DOTS embedding refreshes).
      key: this step's key.
      rollout_fn: (params, prompt ids [R], key, num_samples) -> (sampler
        Rollout [R, num_samples, ...], rewards [R, num_samples]); ids may
        repeat. The rollout may be any NamedTuple with the Rollout's
        fields and more (carried to `Collected.extras`); a response still
        RUNNING is no response (an unused tree slot) and is left out.
      step: the RL step (embedding refresh schedule).

    Returns:
      (Collected, new state, metrics dict).
    """
    cfg, b = self.cfg, self.rl.batch_prompts
    # The first round samples with `key` itself; the rest fold it in.
    k1 = key
    k_ref, k_sel, k2, k_dapo = (jax.random.fold_in(key, i)
                                for i in range(1, 5))
    metrics, evidence = {}, []
    spent = [0, 0]  # rollouts, tokens
    free = [0, 0]  # the same, uncharged (curriculum.dapo_free_refills)

    sample = lambda ids, key, per_id, tally=spent: self._sample_rows(
        params, ids, key, rollout_fn, tally, per_id)
    # Reads `state` when called: after the DOTS refresh below, as before.
    pick = lambda key, n, tiers: self._pick(state, params, key, n, tiers)[0]
    self._scored = [0, 0.0]

    eligible = self.eligible(state)
    if eligible is not None:
      metrics['curriculum/eligible_frac'] = float(jnp.mean(eligible))
    if cfg.selector == 'dots':
      state = self._dots_refresh(state, params, k_ref, eligible, sample,
                                 evidence, step, metrics)
    if cfg.selector == 'uniform' and eligible is None:
      # Plain data order: a seeded permutation of the pool per epoch.
      ids, p_sel = epoch_order(self.seed, step, b, self.pool), None
    else:
      ids, p_sel = self._pick(state, params, k_sel, b, eligible)
    if p_sel is None:  # The likelihood selector's estimate, else the
      # estimator's.
      p_sel = np.asarray(est.mean(state.stats))[ids]
    if cfg.selector == 'dots':  # What DOTS predicted for its picks.
      metrics['curriculum/dots_pred_mean'] = float(
          np.mean(np.asarray(self._dots_predict(state))[ids]))
    screen = functools.partial(self._screen, pick, key=k_dapo, sample=(
        functools.partial(sample, tally=free)), evidence=evidence,
                               metrics=metrics)
    if cfg.oracle_screen > 1 and cfg.oracle_probe:
      # Difficulty oracle: choose by free probes, then roll out afresh.
      ids, _ = screen(ids, None)
      p_sel = np.asarray(est.mean(state.stats))[ids]
    groups = _Groups.empty(b)
    counts, m = self.allocator.first(p_sel)
    metrics.update({f'curriculum/{k}': v for k, v in m.items()})
    self._extend(groups, ids, counts, k1, sample)
    if self.allocator.second is not None:
      extra, m = self.allocator.second(groups.successes(), groups.counts())
      metrics.update({f'curriculum/{k}': v for k, v in m.items()})
      self._extend(groups, ids, extra, k2, sample)
    zero = np.array([zero_variance(r) for r in groups.rewards])
    metrics['curriculum/zero_var_frac'] = float(zero.mean())
    evidence.append((ids, groups.successes(), groups.counts()))
    keep = np.ones(b, bool)
    if 'dapo' in self.filters or cfg.allocator == 'dars':
      refill = (functools.partial(sample, tally=free)
                if cfg.dapo_free_refills else sample)
      ids, groups, keep = self._refill(pick, ids, groups, zero, eligible,
                                       k_dapo, refill, evidence, metrics)
    if cfg.oracle_screen > 1 and not cfg.oracle_probe:
      # Outcome oracle: train on the most mixed of the groups themselves.
      ids, groups = screen(ids, groups)
      p_sel = np.asarray(est.mean(state.stats))[ids]  # Of the trained ids.
      metrics['curriculum/screen_zero_frac'] = float(np.mean(
          [zero_variance(r) for r in groups.rewards]))
      # Only the trained groups are charged; the rest moves to `free`.
      trained = [int(groups.counts().sum()),
                 sum(int(r.lengths) for rows in groups.rows for r in rows)]
      free[:] = [f + s - t for f, s, t in zip(free, spent, trained)]
      spent[:] = trained
    if cfg.dapo_free_refills or cfg.oracle_screen > 1:
      metrics['curriculum/uncharged_rollouts'] = free[0]
    if cfg.selector == 'likelihood':
      metrics['curriculum/likelihood_scored'] = self._scored[0]
      metrics['time/likelihood_score_s'] = self._scored[1]
    stats_before = state.stats
    state = state._replace(stats=self._observe(state.stats, evidence))
    if self.dots_history:
      seen = np.concatenate([i[np.asarray(n) > 0] for i, _, n in evidence])
      state = state._replace(dots=dots_remember(state.dots, seen))
    if cfg.selector == 'prompt_gdro':
      # Every group the selector drew this step, the all-equal ones DAPO
      # replaced included (they are the bins' hardest and easiest evidence).
      drawn = np.concatenate([i for i, _, _ in evidence])
      succ = np.concatenate([s for _, s, _ in evidence])
      cnt = np.concatenate([np.asarray(n) for _, _, n in evidence])
      rolled = cnt > 0
      fail = 1.0 - succ[rolled] / cnt[rolled]
      state = state._replace(gdro=sel.gdro_update(
          state.gdro, stats_before, jnp.asarray(drawn[rolled]),
          jnp.asarray(fail),
          eta=cfg.gdro_eta, decay=cfg.gdro_ema, explore=cfg.gdro_explore))
    out = self._assemble(ids, groups, keep,
                         np.asarray(est.mean(stats_before))[ids], spent)
    metrics.update(self._metrics(p_sel, out))
    return out, state, metrics

  def _pick(self, state, params, key, n: int, tiers):
    """n distinct prompt ids by the selector, tier by tier (`tiers`: the
    skip filter's eligible mask, a refill's int tiers, or None), and for
    the likelihood selector their estimated pass rates (else None).

    likelihood: K * n candidates (K = curriculum.likelihood_candidates, at
    most the pool) drawn uniformly within the tiers, scored by the policy's
    log-probability of their reference solutions (`score_fn`, one forward
    pass each, no rollout), combined with each candidate's own evidence
    (`selectors.likelihood_estimate`); the n with p_hat nearest 0.5 are
    kept, the tiers still first.
    """
    cfg = self.cfg
    if cfg.selector != 'likelihood':
      return np.asarray(self._select(state, key, n, tiers)), None
    k_draw, k_pick = jax.random.split(key)
    m = min(cfg.likelihood_candidates * n, self.pool)
    cand = np.asarray(self._select(state, k_draw, m, tiers))
    start = time.time()
    loglik = np.asarray(self.score_fn(params, cand), np.float32)
    self._scored[0] += m
    self._scored[1] += time.time() - start
    succ, fail = self.estimator.evidence(state.stats)
    p_hat = np.asarray(sel.likelihood_estimate(
        jnp.asarray(loglik), succ[cand], fail[cand], cfg.likelihood_prior))
    cand_tiers = None if tiers is None else jnp.asarray(tiers)[cand]
    pos = np.asarray(self._likelihood_pick(k_pick, jnp.asarray(p_hat), n,
                                           cand_tiers))
    return cand[pos], p_hat[pos]

  def _sample_rows(self, params, ids, key, rollout_fn, spent, per_id=1):
    """Rolls out `per_id` responses per id, flattened id-major.

    With per_id == 1 (ragged groups flattened to rows) the rows are padded
    to a bucket so the sampler compiles once per bucket; equal groups are
    sampled as groups (one prefill per prompt).
    """
    r = len(ids)
    padded = r if per_id > 1 else round_up(r, _ROW_BUCKET, 1 << 30)
    rows = np.concatenate([ids, np.full(padded - r, ids[0])]).astype(int)
    ro, rewards = rollout_fn(params, rows, key, per_id)
    flat = lambda x: np.asarray(x)[:r].reshape((r * per_id,) + x.shape[2:])
    ro = jax.tree.map(flat, ro)
    spent[0] += r * per_id
    spent[1] += int(ro.lengths.sum())
    return ro, flat(np.asarray(rewards))

  def _extend(self, groups: _Groups, ids, counts, key, sample):
    """Adds counts[i] responses to prompt slot i."""
    counts = np.asarray(counts, int)
    if counts.sum() == 0:
      return
    slot = np.repeat(np.arange(len(ids)), counts)
    if np.all(counts == counts[0]):
      ro, rewards = sample(np.asarray(ids), key, int(counts[0]))
    else:
      ro, rewards = sample(np.asarray(ids)[slot], key, 1)
    running = np.asarray(ro.finish) == int(FinishReason.RUNNING)
    for j, i in enumerate(slot):
      if not running[j]:
        groups.rows[i].append(type(ro)(*(np.asarray(x)[j] for x in ro)))
        groups.rewards[i].append(float(rewards[j]))

  def _refill(self, pick, ids, groups, zero, eligible, key, sample,
              evidence, metrics):
    """DAPO dynamic sampling: replace all-equal groups, bounded retries.

    Replacement prompts come from the same selector with G rollouts each,
    never a prompt already used this step (the skip filter's ineligible
    prompts only when the eligible ones run out); once every prompt of the
    pool is used, the remaining holes stay. Groups still all-equal after
    `dapo_max_retries` rounds stay in the batch with their mask off.
    With the DARS allocator (without 'dapo') no resampling happens: the
    card's merged groups with accuracy 0 or 1 are just dropped.
    """
    cfg, g = self.cfg, self.rl.group_size
    retries = cfg.dapo_max_retries if 'dapo' in self.filters else 0
    used = np.zeros(self.pool, bool)
    used[ids] = True
    ids = ids.copy()
    done = 0
    for attempt in range(retries):
      holes = np.flatnonzero(zero)[:np.sum(~used)]
      if not len(holes):
        break
      done = attempt + 1
      new, fresh = self._draw_unused(pick, used, len(holes), key, attempt,
                                     g, sample, evidence, eligible)
      for hole, j in zip(holes, range(len(new))):
        if not zero_variance(fresh.rewards[j]):
          ids[hole] = new[j]
          groups.rows[hole] = fresh.rows[j]
          groups.rewards[hole] = fresh.rewards[j]
          zero[hole] = False
    metrics['curriculum/dapo_retries'] = done
    metrics['curriculum/dapo_bound_hit'] = float(retries > 0 and zero.any())
    return ids, groups, ~zero

  def _draw_unused(self, pick, used, n, key, attempt, per_id, sample,
                   evidence, eligible=None):
    """n more prompts by the selector (`pick`: (key, n, tiers) -> ids),
    none of them `used` (updated), with `per_id` rollouts each (keys folded
    from `attempt`), as evidence.

    Tiers: eligible and unused first, then unused, used ones last.
    """
    tiers = np.where(used, 2, 0 if eligible is None else
                     np.where(np.asarray(eligible), 0, 1)).astype(np.int32)
    new = pick(jax.random.fold_in(key, attempt), n, jnp.asarray(tiers))
    used[new] = True
    fresh = _Groups.empty(len(new))
    self._extend(fresh, new, np.full(len(new), per_id),
                 jax.random.fold_in(key, 1000 + attempt), sample)
    evidence.append((new, fresh.successes(), fresh.counts()))
    return new, fresh

  def _screen(self, pick, ids, first, *, key, sample, evidence, metrics):
    """The oracle screen (analysis): the B most mixed of K * B groups.

    (K - 1) * B more prompts, never one already drawn this step, get G
    rollouts each (curriculum.oracle_probe > 0: that many; and so do `ids`
    when `first`, their groups, is None); of all K * B groups the B with
    the largest reward variance are kept, ties broken at random. Every
    group is evidence. Returns their ids and groups.
    """
    b, k = len(ids), self.cfg.oracle_screen
    g = self.cfg.oracle_probe or self.rl.group_size
    if first is None:
      first = _Groups.empty(b)
      self._extend(first, ids, np.full(b, g), jax.random.fold_in(key, 3000),
                   sample)
      evidence.append((np.asarray(ids), first.successes(), first.counts()))
    used = np.zeros(self.pool, bool)
    used[ids] = True
    cand_ids, cand = [np.asarray(ids)], [first]
    for r in range(k - 1):
      if used.all():
        break
      new, fresh = self._draw_unused(pick, used, min(b, int(np.sum(~used))),
                                     key, r, g, sample, evidence)
      cand_ids.append(new)
      cand.append(fresh)
    all_ids = np.concatenate(cand_ids)
    rows = [x for c in cand for x in c.rows]
    rewards = [x for c in cand for x in c.rewards]
    # Sorted: groups with the same rewards get bit-equal variances (a tie).
    var = np.array([np.var(np.sort(r)) if r else -1.0 for r in rewards])
    tie = np.asarray(jax.random.uniform(jax.random.fold_in(key, 2000),
                                        (len(var),)))
    best = np.lexsort((tie, -var))[:b]  # Largest variance first.
    metrics['curriculum/screen_candidates'] = len(var)
    metrics['curriculum/screen_var_mean'] = float(np.mean(var[best]))
    return all_ids[best], _Groups([rows[i] for i in best],
                                  [rewards[i] for i in best])

  def observe(self, state, ids, successes, counts):
    """The state after observing groups sampled outside `collect` (e.g.
    APRIL's): ids [n], successes [n] and responses [n] per group."""
    return state._replace(stats=self._observe(
        state.stats, [(np.asarray(ids), np.asarray(successes, float),
                       np.asarray(counts))]))

  def _observe(self, stats, evidence):
    """One estimator update with every group observed this step."""
    ids = np.concatenate([e[0] for e in evidence])
    succ = np.concatenate([e[1] for e in evidence])
    cnt = np.concatenate([e[2] for e in evidence])
    uniq, inv = np.unique(ids, return_inverse=True)
    s = np.bincount(inv, succ, len(uniq))
    n = np.bincount(inv, cnt, len(uniq))
    return self._update(stats, jnp.asarray(uniq), jnp.asarray(s),
                        jnp.asarray(n))

  def _dots_refresh(self, state, params, key, eligible, sample, evidence,
                    step, metrics):
    """DOTS: roll out a random reference set, store its pass rates."""
    cfg = self.cfg
    dots = state.dots
    if cfg.dots_embed_every and step and step % cfg.dots_embed_every == 0:
      dots = dots._replace(embed=self.embed_pool(params))
    if self.dots_history:  # The references are the trained prompts.
      return state._replace(dots=dots)
    k1, k2 = jax.random.split(key)
    ref = np.asarray(sel.uniform(state, k1, cfg.dots_ref_prompts, eligible))
    groups = _Groups.empty(len(ref))
    self._extend(groups, ref, np.full(len(ref), cfg.dots_ref_samples), k2,
                 sample)
    rates = groups.successes() / groups.counts()
    evidence.append((ref, groups.successes(), groups.counts()))
    dots = dots._replace(ref_ids=jnp.asarray(ref, jnp.int32),
                         ref_rates=jnp.asarray(rates, jnp.float32))
    metrics['curriculum/dots_ref_pass_mean'] = float(rates.mean())
    return state._replace(dots=dots)

  def _assemble(self, ids, groups: _Groups, keep, values, spent):
    counts = groups.counts()
    gc = round_up(int(counts.max()), _GROUP_BUCKET, 1 << 30)
    b = len(ids)
    first = next(r[0] for r in groups.rows if r)
    t = first.tokens.shape[-1]
    arr = lambda shape, dtype: np.zeros((b, gc) + shape, dtype)
    out = Collected(
        ids=np.asarray(ids), tokens=arr((t,), np.int32),
        loss_mask=arr((t,), bool), logp=arr((t,), np.float32),
        entropy=arr((t,), np.float32), lengths=arr((), np.int32),
        finish=arr((), np.int32), rewards=arr((), np.float32),
        group_mask=arr((), bool), values=np.asarray(values, np.float32),
        counts=counts, rollouts=spent[0], decoded_tokens=spent[1])
    fields = ('tokens', 'loss_mask', 'logp', 'entropy', 'lengths', 'finish')
    extra = [f for f in first._fields if f not in fields]
    out.extras = {f: np.full((b, gc) + np.shape(getattr(first, f)), -1,
                             np.asarray(getattr(first, f)).dtype)
                  for f in extra}
    for i in range(b):
      for j, row in enumerate(groups.rows[i]):
        for name in fields:
          getattr(out, name)[i, j] = getattr(row, name)
        for name in extra:
          out.extras[name][i, j] = getattr(row, name)
        out.rewards[i, j] = groups.rewards[i][j]
        out.group_mask[i, j] = keep[i]
    return out

  def _metrics(self, p_sel, out: Collected) -> dict:
    hist = np.histogram(p_sel, bins=NUM_HIST_BINS, range=(0, 1))[0]
    kept = out.group_mask.sum(-1)
    varied = np.array([np.ptp(out.rewards[i, :max(int(c), 1)]) > 0
                       for i, c in enumerate(out.counts)])
    row = {
        'curriculum/selected_pass_mean': float(np.mean(p_sel)),
        'curriculum/rollouts': out.rollouts,
        'curriculum/effective_samples': int(kept[varied].sum()),
        'curriculum/kept_groups': int((kept > 0).sum()),
        'curriculum/group_size_max': int(out.counts.max()),
        'curriculum/group_size_min': int(out.counts.min()),
    }
    for i, h in enumerate(hist):
      row[f'curriculum/selected_pass_hist/{i}'] = int(h)
    return row
