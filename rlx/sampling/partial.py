"""APRIL: active partial rollouts over the continuous-batching engine.

Zhou et al., "APRIL: Active Partial Rollouts in Reinforcement Learning to
Tame Long-tail Generation" (2025). Each RL step wants N finished groups but
keeps N' > N groups in flight (default 2N) and stops as soon as N groups
are complete, instead of waiting for the slowest response. The other
N' - N groups go to a partial buffer (`partial_buffer.py`) with
their tokens, behaviour log-probs and the policy version of every token;
the next step resumes them first (prompt + partial response re-prefilled
under the new weights, with the remaining budget T - length) and tops the
flight up with N new prompts. Nothing is discarded and nothing duplicated:
every admitted prompt is returned exactly once.

With `keep_kv` (config `rollout.april.resume=keep_kv`) the responses still
decoding when the step stops keep their slot and KV cache, and the next
step simply continues them under the new weights (PipelineRL's in-flight
weight update): no re-prefill, but the new tokens attend to keys and values
that the previous weights computed, so they are stamped with that older
version (`SlotState.kv_version`) and count as off-policy. Their behaviour
log-probs are those they were really sampled with, so TIS and the
decoupled clip correct them exactly. The kept caches are not checkpointed:
a restored buffer (or any buffer that is not the one the sampler returned)
resumes by re-prefill.

The tokens a resumed response kept from earlier steps are off-policy
(version < current). `off_policy_loss_mask` drops them from the loss
(mode 'mask'); otherwise ('keep') the learner corrects them through
`Batch.behaviour_logp` (TIS or the decoupled clip), which needs old
log-probs recomputed under the current weights.
"""

import dataclasses
from typing import NamedTuple, Optional

import jax.numpy as jnp
import numpy as np

from rlx.sampling import partial_buffer as pb
from rlx.sampling import engine as engine_lib
from rlx.sampling import sampler as sampler_lib
from rlx.types import Array, FinishReason, Params, PRNGKey

OFF_POLICY_MODES = ('keep', 'mask')
STALENESS_BUCKETS = 4  # Histogram keys 0, 1, 2 and '3+' (steps behind).


@dataclasses.dataclass(frozen=True)
class AprilConfig:
  """How many groups an APRIL step returns and keeps in flight."""
  target_groups: int  # N: finished groups returned per step (B).
  inflight_groups: int = 0  # N': groups in flight; 0: 2N.
  keep_kv: bool = False  # Unfinished responses keep their slot and cache
  # for the next step instead of being re-prefilled there.

  def __post_init__(self):
    if self.target_groups < 1:
      raise ValueError(f'AprilConfig.target_groups={self.target_groups} '
                       'must be >= 1')
    if self.inflight_groups and self.inflight_groups < self.target_groups:
      raise ValueError(
          f'AprilConfig.inflight_groups={self.inflight_groups} must be >= '
          f'target_groups={self.target_groups} (or 0 for 2 * target)')

  @property
  def inflight(self) -> int:
    return self.inflight_groups or 2 * self.target_groups


class AprilBatch(NamedTuple):
  """N finished groups, as the learner's Batch wants them."""
  rollout: sampler_lib.Rollout  # [N, G, T] (behaviour logp per token).
  version: Array  # [N, G, T] int32 policy version per token (-1: padding).
  prompt_id: Array  # [N] int32 the caller's prompt ids.
  prompt: Array  # [N, P] int32, left-padded to the engine's window.
  prompt_mask: Array  # [N, P] bool.


class AprilSampler:
  """One APRIL rollout step per call; the partial buffer is explicit state.

  Usage per RL step:
    n = sampler.prompts_needed(buf)   # N' at the first step, then N.
    batch, buf, metrics = sampler(params, buf, prompts[:n], masks[:n],
                                  ids[:n], key, temperature, top_p,
                                  version=step)
  `buf` (from `init_buffer`) belongs in the checkpoint.
  """

  def __init__(self, engine: engine_lib.Engine, cfg: AprilConfig, *,
               group_size: int):
    self.engine, self.cfg, self.group_size = engine, cfg, group_size
    self._state = None
    # keep_kv: (slots, their jobs in the next call's queue, and the prompt,
    # tokens and length each job must have there).
    self._kept: Optional[tuple[np.ndarray, ...]] = None

  def init_buffer(self) -> pb.PartialBuffer:
    ecfg = self.engine.cfg
    return pb.init(self.cfg.inflight - self.cfg.target_groups,
                   group_size=self.group_size, prompt_len=ecfg.prompt_len,
                   max_new_tokens=ecfg.max_new_tokens, pad_id=ecfg.pad_id)

  def prompts_needed(self, buf: pb.PartialBuffer) -> int:
    return self.cfg.inflight - pb.size(buf)

  def __call__(self, params: Params, buf: pb.PartialBuffer, prompts,
               prompt_mask, prompt_ids, key: PRNGKey, temperature,
               top_p=1.0, *, version: int
               ) -> tuple[AprilBatch, pb.PartialBuffer, dict]:
    """Runs one step: resume `buf`, admit the new prompts, stop at N.

    Args:
      params: current policy weights (version `version`).
      buf: the partial buffer from the previous step (not mutated).
      prompts: [n, P'] int32 new prompts, n = `prompts_needed(buf)`;
        prompt_mask: [n, P'] bool; prompt_ids: [n] int ids (returned with
        the batch, e.g. dataset indices for the verifier).
      key: sampling key of this step.
      temperature, top_p: sampling settings.
      version: policy version stamped on the tokens sampled now (the RL
        step, or any counter that increases when the weights change).

    Returns:
      (AprilBatch of N groups, the new buffer, metrics under `rollout/`).
    """
    n_new, g = self.prompts_needed(buf), self.group_size
    ecfg = self.engine.cfg
    if len(prompts) != n_new or len(prompt_ids) != n_new:
      raise ValueError(
          f'APRIL needs {n_new} new prompts (inflight {self.cfg.inflight} - '
          f'{pb.size(buf)} buffered), got {len(prompts)} prompts and '
          f'{len(prompt_ids)} ids')
    prompts, prompt_mask = engine_lib.pad_prompts(
        np.asarray(prompts), np.asarray(prompt_mask), ecfg.prompt_len)
    held, _ = pb.take(buf)
    fresh = pb.empty_groups(n_new, group_size=g, prompt_len=ecfg.prompt_len,
                            max_new_tokens=ecfg.max_new_tokens,
                            pad_id=ecfg.pad_id)
    fresh = fresh._replace(prompt_id=np.asarray(prompt_ids, np.int32),
                           prompt=prompts, prompt_mask=prompt_mask)
    groups = pb.concat(held, fresh)  # Buffered groups first: resumed first.
    tracks, stats = self._decode(params, groups, key, temperature, top_p,
                                 version, resident=self._resident(held))
    complete = np.all(tracks.finish != int(FinishReason.RUNNING), axis=1)
    chosen = np.flatnonzero(complete)[:self.cfg.target_groups]
    rest = np.setdiff1d(np.arange(len(complete)), chosen)
    groups = groups._replace(tracks=tracks)
    new_buf = pb.put(self.init_buffer(), pb.select(groups, rest))
    if self.cfg.keep_kv:
      self._keep(stats['slot_job'], rest, pb.take(new_buf)[0])
    out = pb.select(groups, chosen)
    batch = AprilBatch(
        rollout=engine_lib.to_rollout(
            engine_lib.Tracks(*(x.reshape((-1,) + x.shape[2:])
                                for x in out.tracks)), g),
        version=jnp.asarray(out.tracks.version),
        prompt_id=jnp.asarray(out.prompt_id), prompt=jnp.asarray(out.prompt),
        prompt_mask=jnp.asarray(out.prompt_mask))
    metrics = rollout_metrics(batch.version, batch.rollout.loss_mask,
                              current_version=version)
    metrics.update({
        'rollout/slot_utilisation': stats['slot_utilisation'],
        'rollout/buffer_groups': float(pb.size(new_buf)),
        'rollout/resumed_groups': float(np.sum(chosen < len(held.prompt_id))),
        'rollout/decoded_tokens': float(stats['busy_slot_steps']),
        # Tokens sampled in this call (decode steps plus the one sampled
        # at each insert), whatever version they are stamped with.
        'rollout/sampled_tokens': float(np.sum(groups.tracks.length) -
                                        np.sum(held.tracks.length)),
        'rollout/insert_calls': float(stats['insert_calls']),
        'rollout/prefill_calls': float(stats['prefill_calls']),
    })
    if self.cfg.keep_kv:  # Responses continued on their kept cache.
      metrics['rollout/kept_kv_rows'] = float(stats['resident_jobs'])
    return batch, new_buf, metrics

  def _keep(self, slot_job: np.ndarray, rest: np.ndarray,
            buffered: pb.Groups) -> None:
    """Records the responses left live in their slots, numbered as jobs
    of the next call (buffered group i comes first there, as job i G + s)."""
    g = self.group_size
    slots = np.flatnonzero(slot_job >= 0)
    where = np.full(self.cfg.inflight, -1)  # Group -> buffer row.
    where[rest] = np.arange(len(rest))
    group, sample = where[slot_job[slots] // g], slot_job[slots] % g
    assert np.all(group >= 0), 'a returned group still has a live response'
    self._kept = (slots, group * g + sample, buffered.prompt[group],
                  buffered.tracks.tokens[group, sample],
                  buffered.tracks.length[group, sample])

  def _resident(self, held: pb.Groups) -> Optional[np.ndarray]:
    """The engine's `resident` map for this call's queue, or None.

    Kept slots are used only if `held` (the buffer passed in) is the one
    the previous call returned, for those rows: same prompt, tokens and
    length. Otherwise (a restored or edited buffer) the slots are freed
    and their responses are re-prefilled like any other.
    """
    kept, self._kept = self._kept, None
    if kept is None:
      return None
    slots, jobs, prompt, tokens, length = kept
    g = self.group_size
    group, sample = jobs // g, jobs % g
    same = (np.all(group < len(held.prompt_id)) and
            np.array_equal(held.prompt[group], prompt) and
            np.array_equal(held.tracks.length[group, sample], length) and
            np.array_equal(held.tracks.tokens[group, sample], tokens) and
            np.all(held.tracks.finish[group, sample] ==
                   int(FinishReason.RUNNING)))
    if not same:  # `run` frees slots that `resident` does not name.
      return None
    resident = np.full(self.engine.cfg.num_slots, -1)
    resident[slots] = jobs
    return resident

  def _decode(self, params, groups: pb.Groups, key, temperature, top_p,
              version, resident=None) -> tuple[engine_lib.Tracks, dict]:
    """Runs the group-major jobs until N groups are complete."""
    g, n_target = self.group_size, self.cfg.target_groups
    flat = lambda x: np.asarray(x).reshape((-1,) + np.shape(x)[2:])
    stop = lambda done: np.sum(np.all(done.reshape(-1, g), 1)) >= n_target
    if self._state is None:
      self._state = self.engine.init(key)
    tracks = engine_lib.Tracks(*(flat(x) for x in groups.tracks))
    self._state, out, stats = engine_lib.run(
        self.engine, params, engine_lib.with_key(self._state, key),
        groups.prompt, groups.prompt_mask, tracks, temperature=temperature,
        top_p=top_p, version=version,
        job_prompt=np.arange(len(tracks.length)) // g, stop=stop,
        resident=resident, hold=self.cfg.keep_kv)
    tracks = engine_lib.Tracks(*(x.reshape((-1, g) + x.shape[1:])
                                 for x in out))
    return tracks, stats


def off_policy_mask(version: Array, loss_mask: Array,
                    current_version: int) -> Array:
  """[B, G, T] bool: loss tokens sampled by an older policy."""
  return loss_mask & (version < current_version)


def off_policy_loss_mask(batch: AprilBatch, *, current_version: int,
                         mode: str) -> Array:
  """The loss mask for the learner's Batch under an off-policy mode.

  Args:
    batch: an APRIL batch.
    current_version: the version of the weights the learner updates.
    mode: 'mask' removes off-policy tokens from the loss; 'keep' leaves
      them in (correct them with TIS or the decoupled clip through
      `Batch.behaviour_logp`).

  Returns:
    [B, G, T] bool.
  """
  if mode not in OFF_POLICY_MODES:
    raise ValueError(f'unknown off-policy mode {mode!r}; known: '
                     f'{list(OFF_POLICY_MODES)}')
  mask = batch.rollout.loss_mask
  if mode == 'mask':
    mask = mask & ~off_policy_mask(batch.version, mask, current_version)
  return mask


def rollout_metrics(version: Array, loss_mask: Array, *,
                    current_version: int) -> dict[str, float]:
  """Off-policy token fraction and the staleness histogram (fractions of
  response tokens that are 0, 1, 2 or 3+ policy versions old)."""
  version, mask = np.asarray(version), np.asarray(loss_mask, bool)
  total = max(int(mask.sum()), 1)
  stale = np.minimum(current_version - version[mask], STALENESS_BUCKETS - 1)
  hist = np.bincount(stale, minlength=STALENESS_BUCKETS) / total
  out = {'rollout/off_policy_token_frac': float(hist[1:].sum())}
  for i, frac in enumerate(hist):
    name = f'{i}+' if i == STALENESS_BUCKETS - 1 else str(i)
    out[f'rollout/staleness/{name}'] = float(frac)
  return out
