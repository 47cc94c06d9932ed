"""rollout.mode=april: APRIL (`sampling.partial.AprilSampler`) over the slot
engine. The next prompts in the curriculum's data order top the flight up
to N' groups; the first B groups to finish are trained on; the others wait
in the partial buffer (checkpointed with the data cursor as the mode's
state) and resume first at the next step. The curriculum observes every
trained group, as in the other modes."""

import dataclasses

import jax
import numpy as np

from rlx import config as config_lib
from rlx import errors
from rlx.rollouts import base
from rlx.rollouts import continuous
from rlx.sampling import engine as en
from rlx.sampling import partial
from rlx.sampling import partial_buffer as pb


ROLLOUT_RESUME = ('prefill', 'keep_kv')  # rollout.april.resume.
OFF_POLICY = ('keep', 'mask')  # rollout.april.off_policy.


@config_lib.section('rollout.april', renamed={k: k for k in (
    'inflight_groups', 'resume', 'off_policy')})
@dataclasses.dataclass(frozen=True)
class AprilRolloutConfig:
  """APRIL (rollout.mode=april): rollout.april.*."""
  inflight_groups: int = 0  # april: groups in flight N' (> B); 0: 2 B.
  resume: str = 'prefill'  # april: how unfinished responses continue at
  # the next step. prefill: prompt + partial response re-prefilled under the
  # new weights (APRIL); keep_kv: they keep their slot and KV cache and go
  # on decoding under the new weights over the old weights' keys and values
  # (PipelineRL's in-flight update; no re-prefill; tokens sampled over a
  # kept cache carry its older version, so they count as off-policy).
  off_policy: str = 'keep'  # april: tokens sampled by an older policy stay
  # in the loss (keep; correct them with objective.correction=tis|icepop
  # or objective.loss=decoupled, which need rl.recompute_old_logp) or are
  # masked out of it (mask).


@base.MODES.check
def _check_april_knobs(cfg) -> None:
  """rollout.april.* (whichever the mode)."""
  ap = cfg.rollout.april
  errors.require(ap.inflight_groups >= 0, 'rollout.april.inflight_groups',
                 'must be >= 0')
  errors.require(ap.resume in ROLLOUT_RESUME, 'rollout.april.resume',
                 f'{ap.resume!r} not in {list(ROLLOUT_RESUME)}')
  errors.one_of(ap.off_policy, OFF_POLICY, 'rollout.april.off_policy')


@base.MODES.register('april')
class April(base.Mode):
  """APRIL's own step: data order, first B finished groups trained."""
  carries_over = True

  def __init__(self, cfg, *, model, task, curriculum, actor):
    super().__init__(cfg, model=model, task=task, curriculum=curriculum,
                     actor=actor)
    self.engine = continuous.make_engine(cfg, model, task, actor.stop_tokens)
    self.april = partial.AprilSampler(
        self.engine, partial.AprilConfig(
            target_groups=cfg.rl.batch_prompts,
            inflight_groups=cfg.rollout.april.inflight_groups,
            keep_kv=cfg.rollout.april.resume == 'keep_kv'),
        group_size=cfg.rl.group_size)
    self._compiled = False

  @classmethod
  def init_state(cls, cfg, task):
    """The partial buffer (N' - B groups) and the data cursor."""
    b = cfg.rl.batch_prompts
    inflight = cfg.rollout.april.inflight_groups or 2 * b
    return {'buffer': pb.init(inflight - b, group_size=cfg.rl.group_size,
                              prompt_len=task.train_prompts.shape[1],
                              max_new_tokens=cfg.sampling.max_new_tokens,
                              pad_id=task.tokenizer.pad_id),
            'cursor': np.zeros((), np.int64)}

  @classmethod
  def check_state(cls, cfg, state):
    """The carried responses fit the run (before any is resumed)."""
    pb.validate(state['buffer'], max_new_tokens=cfg.sampling.max_new_tokens)

  @staticmethod
  def check(cfg):
    _check_april(cfg)

  def collect(self, params, state, request):
    cfg, task, cur = self.cfg, self.task, self.curriculum
    b, g = cfg.rl.batch_prompts, cfg.rl.group_size
    params = base.one_device(params)
    if not self._compiled:  # Every prefill width, before any timing.
      en.precompile(self.engine, params, resume=True)
      self._compiled = True
    buf, cursor = state.mode['buffer'], int(state.mode['cursor'])
    n = self.april.prompts_needed(buf)
    ids = cur.in_order(cursor, n)
    batch, buf, metrics = self.april(
        params, buf, task.train_prompts[ids], task.train_prompt_mask[ids],
        ids, request.key, cfg.sampling.temperature, cfg.sampling.top_p,
        version=request.version)
    ro = jax.tree.map(np.asarray, batch.rollout)
    pid = np.asarray(batch.prompt_id)
    rewards = base.score(task, ro.tokens, pid)
    cur_state, values, cur_metrics = cur.observe_trained(
        state.curriculum, pid, rewards)
    token_version = np.asarray(batch.version)  # Per token.
    loss_mask = partial.off_policy_loss_mask(
        batch, current_version=request.step, mode=cfg.rollout.april.off_policy)
    # Groups the loss cannot see: in 'mask' mode, those that had finished
    # before this step (several groups can finish in the chunk that
    # reaches N; the surplus waits in the buffer and comes back stale).
    metrics['rollout/no_loss_group_frac'] = float(
        np.mean(~np.asarray(loss_mask).any(axis=(1, 2))))
    if request.version != request.step:  # overlap: staleness vs learner.
      metrics.update(partial.rollout_metrics(
          token_version, batch.rollout.loss_mask,
          current_version=request.step))
    groups = base.StepGroups(
        ids=pid, tokens=ro.tokens, loss_mask=np.asarray(loss_mask),
        logp=ro.logp, entropy=ro.entropy, lengths=ro.lengths,
        finish=ro.finish, rewards=rewards, group_mask=np.ones((b, g), bool),
        values=values.astype(np.float32), counts=np.full(b, g),
        rollouts=b * g,
        # Tokens sampled now: the returned groups' and the buffered ones'.
        decoded_tokens=int(metrics['rollout/sampled_tokens']),
        # Per-token policy versions, for analyses; the learner gets the
        # behaviour log-probs (and the loss mask in 'mask' mode) instead.
        extras={'version': token_version},
        prompt=np.asarray(batch.prompt),
        prompt_mask=np.asarray(batch.prompt_mask))
    metrics.update(cur_metrics)
    mode = {'buffer': buf, 'cursor': np.asarray(cursor + n, np.int64)}
    return groups, base.RolloutState(cur_state, mode), metrics


def _check_april(cfg) -> None:
  ro, cur = cfg.rollout, cfg.curriculum
  inflight = ro.april.inflight_groups
  errors.require(not inflight or inflight > cfg.rl.batch_prompts,
                 'rollout.april.inflight_groups', f'{inflight} must be 0 '
                 f'(2 B) or > rl.batch_prompts={cfg.rl.batch_prompts}: APRIL '
                 'over-provisions (with N\' = B nothing is ever carried over; '
                 'that is rollout.mode=continuous)')
  # APRIL takes prompts in data order and returns whichever B groups
  # finish first: no selection, allocation or refill can act on them.
  for key, value, need in (('selector', cur.selector, 'uniform'),
                           ('allocator', cur.allocator, 'fixed'),
                           ('filter', cur.filter, 'none')):
    errors.require(value == need, f'curriculum.{key}', f'{value!r} is not '
                   f'supported with rollout.mode=april (needs {need!r})')
  errors.require(not (ro.overlap and ro.april.off_policy == 'mask'),
                 'rollout.april.off_policy',
                 "'mask' with rollout.overlap would drop every token (all "
                 "are sampled by the previous weights); use 'keep'")
