"""A trainer run read back from its workdir, for the tools that use its
policy after training: evaluate, sample, export.

  run = runs.load('runs/grpo')            # its newest finished checkpoint
  run = runs.load('runs/grpo', step=20)   # or a given one
  run.params      # the policy (LoRA adapters merged into their base)
  run.cfg, run.task, run.model, run.logits_fn

The config is the one the checkpoint was made with (fields added to rlx
since take their defaults); `overrides` (dotted keys, e.g.
{'task.test_files': 'x.jsonl'}) change it before it is built, as
`--config.a.b=v` does for a training run. Everything lives on the default
device, unsharded.
"""

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from rlx import checkpoint
from rlx import config as config_lib
from rlx import policy as policy_lib
from rlx import recipes
from rlx import warmstart
from rlx.config import Config
from rlx.data.task import Task, load_task
from rlx.models import lora
from rlx.models import transformer
from rlx.types import Params


@dataclasses.dataclass(frozen=True)
class SavedRun:
  """One checkpoint of a run, ready to sample from."""
  workdir: str  # The run's directory (holds checkpoints/).
  step: int  # The checkpoint's RL step.
  cfg: Config  # The run's config (with `overrides` applied).
  task: Task
  model: transformer.Transformer
  logits_fn: Callable[..., jax.Array]  # (params, tokens, positions, mask).
  params: Params  # The policy's full parameters (LoRA merged).
  adapters: Params | None  # LoRA: the trained adapters; else None.
  base: Params | None  # LoRA: the frozen base; else None.


def saved_config(workdir: str, step: int = 0,
                 overrides: dict[str, Any] | None = None
                 ) -> tuple[Config, str, int]:
  """(config, checkpoints folder, step) of a run's checkpoint `step` (0:
  the newest finished one).

  Raises:
    CheckpointError: no such run or step, or unreadable metadata.
    ConfigError: an override names an unknown key or a bad value.
  """
  folder, step = checkpoint.run_step(workdir, step)
  ckpt = checkpoint.Checkpointer(folder)
  try:
    saved = ckpt.meta(step).get('config')
  finally:
    ckpt.close()
  if not isinstance(saved, dict):
    raise checkpoint.CheckpointError(
        f'{folder}/{step}: its metadata holds no config (not a trainer '
        'checkpoint)')
  config = ml_collections.ConfigDict(config_lib.fill_defaults(saved))
  return recipes.build(config, [f'{k}={v}' for k, v in
                                (overrides or {}).items()]), folder, step


def load(workdir: str, *, step: int = 0,
         overrides: dict[str, Any] | None = None) -> SavedRun:
  """Reads checkpoint `step` (0: the newest) of the run in `workdir`.

  Raises:
    CheckpointError: no such run or step, or parameters that are not this
      config's model's.
    ConfigError: a bad override, or a task or model the run names that can
      no longer be read (e.g. model.hf_dir moved).
  """
  cfg, folder, step = saved_config(workdir, step, overrides)
  task = load_task(cfg.task, policy_lib.load_tokenizer(cfg))
  model, logits_fn = policy_lib.build_model(cfg, task.tokenizer.vocab_size)
  key = jax.random.key(cfg.warmstart.seed)
  abstract = jax.eval_shape(functools.partial(transformer.init_params,
                                              model.cfg), key)
  lora_cfg = policy_lib.lora_config(cfg)
  if lora_cfg is None:
    params = checkpoint.run_params(folder, step, abstract)
    adapters = base = None
  else:
    # The frozen base: model.hf_dir's weights, or the warm start the run
    # cached (never trained again here: on another machine it could come
    # out different from the base the adapters were trained on).
    base = policy_lib.initial_params(cfg, model.cfg, key, None)
    if cfg.warmstart.num_steps:
      base = warmstart.load_cached(cfg, base)
      if base is None:
        raise checkpoint.CheckpointError(
            f"{folder}/{step}: the run's LoRA adapters sit on its warm "
            f'start, cached at {warmstart.cache_path(cfg)}, which is '
            'missing; copy it there from the machine that trained the run')
    like = jax.eval_shape(lambda: lora.init_adapters(key, abstract,
                                                     lora_cfg))
    adapters = checkpoint.run_params(folder, step, like)
    params = jax.jit(functools.partial(lora.merge, cfg=lora_cfg))(
        base, adapters)
  return SavedRun(workdir=workdir, step=step, cfg=cfg, task=task,
                  model=model, logits_fn=logits_fn,
                  params=jax.tree.map(jnp.asarray, params),
                  adapters=adapters, base=base)
