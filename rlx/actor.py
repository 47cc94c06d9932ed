"""The actor: scored rollouts (prompts -> sampler -> verifier rewards)."""

import dataclasses
from typing import Sequence

import jax
import numpy as np

from rlx import sharding
from rlx.data.task import Task
from rlx.sampling import sampler as sampler_lib
from rlx.types import Params, PRNGKey


@dataclasses.dataclass
class ScoredRollout:
  """A rollout on the host plus its rewards."""
  rollout: sampler_lib.Rollout  # Host arrays, [B, G, T].
  rewards: np.ndarray  # [B, G] float32.
  texts: list[list[str]]  # [B][G] decoded responses.


class Actor:
  """Samples G responses per prompt and scores them with the task verifier.

  The sampler is compiled once per (B, G, P) bucket; verifiers run on the
  host in Python (they are arbitrary user code). With a sharding `plan`,
  prompts are placed with B over the batch axes and the sampler's state is
  pinned to them; the rollout comes back to the host whole (on every process).
  """

  def __init__(self, model, task: Task, max_new_tokens: int, *,
               top_k: int = 0, plan: sharding.Plan | None = None,
               sampler=None):
    tok = task.tokenizer
    self.task = task
    self.plan = plan
    # Chat models end a turn with their own token (<|im_end|>, <|eot_id|>,
    # <end_of_turn>), not only eos: HF tokenizers list them all in stop_ids.
    self.stop_tokens = tuple(getattr(tok, 'stop_ids', (tok.eos_id,)))
    self.sample_fn = sampler_lib.transformer_sampler(
        model, sampler_lib.SamplerConfig(
            max_new_tokens=max_new_tokens, stop_tokens=self.stop_tokens,
            pad_id=tok.pad_id, top_k=top_k),
        constrain=plan.constrain if plan else None)
    if sampler is not None:
      # A drop-in with the static sampler's signature, returning a NamedTuple
      # with its fields (rlx/rollouts/: continuous engine, trees).
      self.sample_fn = sampler

  def rollout(self, params: Params, prompts: np.ndarray,
              prompt_mask: np.ndarray, answers: Sequence[str], key: PRNGKey,
              *, num_samples: int, temperature: float, top_p: float = 1.0
              ) -> ScoredRollout:
    if self.plan is not None:
      prompts, prompt_mask = self.plan.put_batch((prompts, prompt_mask))
    out = self.sample_fn(params, prompts, prompt_mask, key, temperature,
                         top_p, num_samples=num_samples)
    out = jax.tree.map(sharding.to_host, out)
    tokens = out.tokens
    tok = self.task.tokenizer
    texts = [[tok.decode(row) for row in group] for group in tokens]
    flat_answers = [a for a in answers for _ in range(num_samples)]
    flat_texts = [t for group in texts for t in group]
    rewards = self.task.reward_fn(flat_texts, flat_answers).reshape(
        tokens.shape[:2])
    return ScoredRollout(rollout=out, rewards=rewards, texts=texts)
