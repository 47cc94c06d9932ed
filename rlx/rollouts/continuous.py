"""rollout.mode=continuous: the slot engine (`engine.ContinuousSampler`), a
drop-in for the static sampler: the same Rollout, finished slots refilled.
Samples on one device: on a larger mesh the weights are copied there every
step."""

import dataclasses

from rlx import config as config_lib
from rlx import errors
from rlx.actor import Actor
from rlx.rollouts import base
from rlx.sampling import engine as en

_CHUNK_STEPS = 16  # rollout.engine.chunk_steps = 0.
_PREFILL_BUCKET = 16  # rollout.engine.prefill_bucket = 0.
_CALLS = ('decode_calls', 'insert_calls', 'prefill_calls')


@config_lib.section('rollout.engine', renamed={k: k for k in (
    'num_slots', 'chunk_steps', 'insert_rows', 'prefill_prompts',
    'prefill_bucket')})
@dataclasses.dataclass(frozen=True)
class RolloutEngineConfig:
  """The slot engine of the continuous and APRIL modes: rollout.engine.*."""
  num_slots: int = 0  # continuous/april: R decode slots (KV-cache rows);
  # 0: max(B * G / 2, G) (a static batch of B * G rows is half idle on the
  # long tail).
  chunk_steps: int = 0  # continuous/april: decode steps per jitted call
  # between refills; 0: 16.
  insert_rows: int = 0  # continuous/april: rows put into free slots per
  # insert call; 0: max(1, R / 8).
  prefill_prompts: int = 0  # continuous/april: prompts prefilled together
  # in one call, ahead of the inserts that copy each one's cache to its
  # group's rows (fresh or resumed); 0: max(1, R / 4).
  prefill_bucket: int = 0  # continuous/april: prefills compute a multiple
  # of this many columns: a prompt prefill its longest prompt's real tokens
  # (not the left padding of the window), a resume its longest partial
  # response (over a copy of the prompt's cache); each width compiles once
  # (all of them before the first rollout); 0: 16.


def engine_sizes(cfg) -> tuple[int, int, int]:
  """(slots R, rows per insert M, prompts per prompt prefill U) of the
  continuous engine, with the engine section's 0 defaults resolved."""
  ro, g = cfg.rollout.engine, cfg.rl.group_size
  slots = ro.num_slots or max(cfg.rl.batch_prompts * g // 2, g)
  rows = ro.insert_rows or max(1, slots // 8)
  prompts = ro.prefill_prompts or max(1, slots // 4)
  return slots, rows, prompts


def make_engine(cfg, model, task, stop_tokens) -> en.Engine:
  """The slot engine of the continuous and APRIL modes."""
  slots, rows, prompts = engine_sizes(cfg)
  s = cfg.sampling
  return en.transformer_engine(model, en.EngineConfig(
      num_slots=slots, prompt_len=task.train_prompts.shape[1],
      max_new_tokens=s.max_new_tokens, stop_tokens=stop_tokens,
      pad_id=task.tokenizer.pad_id, top_k=s.top_k,
      chunk_steps=cfg.rollout.engine.chunk_steps or _CHUNK_STEPS,
      insert_rows=rows, prefill_prompts=prompts,
      prefill_bucket=cfg.rollout.engine.prefill_bucket or _PREFILL_BUCKET))


@base.MODES.check
def check_engine(cfg) -> None:
  """The engine's sizes (continuous and APRIL; checked in every mode, so
  that inconsistent rollout.engine.* sizes are never silently unused)."""
  for f in dataclasses.fields(RolloutEngineConfig):
    errors.require(getattr(cfg.rollout.engine, f.name) >= 0,
                   f'rollout.engine.{f.name}', 'must be >= 0')
  slots, rows, _ = engine_sizes(cfg)
  errors.require(rows <= slots, 'rollout.engine.insert_rows',
                 f'{rows} must be <= rollout.engine.num_slots ({slots})')


@base.MODES.register('continuous')
class Continuous(base.CurriculumMode):
  """The slot engine behind the curriculum."""

  def __init__(self, cfg, *, model, task, curriculum, actor):
    super().__init__(cfg, model=model, task=task, curriculum=curriculum,
                     actor=actor)
    self.engine = make_engine(cfg, model, task, actor.stop_tokens)
    self._sampler = en.ContinuousSampler(self.engine)
    self._compiled = False
    s = cfg.sampling
    self.actor = Actor(model, task, s.max_new_tokens, top_k=s.top_k,
                       sampler=self._sample)

  def collect(self, params, state, request):
    return super().collect(base.one_device(params), state, request)

  def start_step(self, params, request):
    self._version = request.version
    self._busy = self._capacity = 0
    self._calls = dict.fromkeys(_CALLS, 0)
    if not self._compiled:  # Every prefill width, before any timing.
      en.precompile(self.engine, params, resume=False)
      self._compiled = True

  def _sample(self, params, prompts, prompt_mask, key, temperature,
              top_p=1.0, *, num_samples):
    out = self._sampler(params, prompts, prompt_mask, key, temperature,
                        top_p, num_samples=num_samples,
                        version=self._version)
    stats = self._sampler.last_stats
    self._busy += stats['busy_slot_steps']
    self._capacity += self.engine.cfg.num_slots * stats['decode_steps']
    for k in self._calls:
      self._calls[k] += stats.get(k, 0)
    return out

  def step_metrics(self, groups):
    return {'rollout/slot_utilisation': self._busy / max(self._capacity, 1),
            **{f'rollout/{k}': float(v) for k, v in self._calls.items()}}
