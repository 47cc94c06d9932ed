"""The trainable policy: all model parameters, or LoRA adapters on a base.

The model is rlx's own transformer (sized by `model.*`) or a local Hugging
Face directory (`model.hf_dir`, loaded by `rlx.models.from_pretrained`
straight into the learner's shardings).

Full fine-tuning (`lora.rank = 0`) trains every parameter: the train state
holds them, and the sampler receives them (resharded when it has its own
mesh).

LoRA (`lora.rank > 0`, rlx/models/lora.py) trains only the adapters. The
train state holds the adapters and their optimizer state; the frozen base
is the train step's second, never donated, argument (the `ref_params`
slot, see `learner.make_train_step(merge_fn=...)`), and it is also the KL
reference: the policy with its adapters off. Checkpoints hold the adapters
(+ optimizer state); the base is reloaded from `model.hf_dir` (or the
warm-start cache) on resume.

The sampler receives merged parameters: each adapter folded into its
kernel once per RL step, one pass over the targeted kernels (their only
copies; every other leaf is the base's own array). Applying A and B inside
the sampler's forward instead would cost extra work on every decoded token
and a model change. With a separate sampler mesh the base is resharded
once, and only the adapters move to it per step.

Adapter shardings: replicated. An adapter is r * (in + out) numbers per
kernel (about 1% of a 1.5B model at r = 32 on every projection), so
splitting it would save little memory; replicated A and B keep the merge's
low-rank product local, and GSPMD slices it to the kernel's sharding.
"""

import dataclasses
import functools
import os
from typing import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from rlx import backend
from rlx import learner
from rlx import lm_head
from rlx import sharding
from rlx import warmstart
from rlx.config import Config, ConfigError
from rlx.data import loader
from rlx.data import task as task_lib
from rlx.models import kv_cache
from rlx.models import hf_tokenizer
from rlx.models import lora
from rlx.models import transformer
from rlx.models.hf import config as hf_config
from rlx.models.hf import pretrained
from rlx.types import Params, PRNGKey, PyTree


def _hf_dir(cfg: Config) -> str:
  return os.path.expanduser(cfg.model.hf_dir)


def load_tokenizer(cfg: Config) -> hf_tokenizer.HFTokenizer | None:
  """The HF tokenizer of `model.hf_dir`; None for rlx's own model.

  Raises:
    ConfigError: naming model.hf_dir and the missing directory or file.
  """
  if not cfg.model.hf_dir:
    return None
  if not os.path.isdir(_hf_dir(cfg)):
    raise ConfigError(f'model.hf_dir: {cfg.model.hf_dir}: no such model '
                      'directory (set --config.model.hf_dir)')
  try:
    return hf_tokenizer.HFTokenizer.from_dir(_hf_dir(cfg))
  except (OSError, ValueError) as e:
    raise ConfigError(f'model.hf_dir: {e}') from e


def model_config(cfg: Config, vocab_size: int
                 ) -> transformer.TransformerConfig:
  """The architecture: `model.*`, or `model.hf_dir`'s config.json.

  Args:
    cfg: the run config.
    vocab_size: the tokenizer's vocabulary; the embedding must cover it.

  Raises:
    ConfigError: naming the key (or config.json) at fault.
  """
  if cfg.model.hf_dir:
    try:
      tcfg = hf_config.transformer_config(
          hf_config.read_config(_hf_dir(cfg)), dtype=cfg.model.dtype,
          param_dtype=cfg.model.param_dtype,
          where=os.path.join(_hf_dir(cfg), hf_config.CONFIG_FILE))
    except (OSError, ValueError) as e:
      raise ConfigError(f'model.hf_dir: {e}') from e
    if tcfg.vocab_size < vocab_size:
      raise ConfigError(
          f'model.hf_dir: {cfg.model.hf_dir} has {tcfg.vocab_size} embedding '
          f'rows, fewer than its tokenizer\'s {vocab_size} ids')
    return tcfg
  fields = dataclasses.asdict(cfg.model)
  fields.pop('hf_dir')
  fields['vocab_size'] = fields['vocab_size'] or vocab_size
  if fields['vocab_size'] < vocab_size:
    raise ConfigError(
        f'model.vocab_size={fields["vocab_size"]} is smaller than the '
        f'tokenizer vocabulary ({vocab_size})')
  return transformer.TransformerConfig(**fields)


def initial_params(cfg: Config, model_cfg: transformer.TransformerConfig,
                   key: PRNGKey, shardings: PyTree) -> Params:
  """`model.hf_dir`'s weights, or a random init, built in `shardings`.

  Raises:
    ConfigError: naming model.hf_dir and the file or tensor at fault.
  """
  if cfg.model.hf_dir:
    try:
      return pretrained.from_pretrained(
          _hf_dir(cfg), dtype=cfg.model.dtype,
          param_dtype=cfg.model.param_dtype, shardings=shardings).params
    except (OSError, ValueError) as e:
      raise ConfigError(f'model.hf_dir: {e}') from e
  init = functools.partial(transformer.init_params, model_cfg)
  return jax.jit(init, out_shardings=shardings)(key)


def lora_config(cfg: Config) -> lora.LoraConfig | None:
  if not cfg.lora.rank:
    return None
  return lora.LoraConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                         targets=tuple(cfg.lora.targets))


def _kernels(tree: PyTree, adapters: PyTree) -> PyTree:
  """The sub-tree of `tree` holding just the kernels `adapters` adapt."""
  flat = flax.traverse_util.flatten_dict(tree)
  paths = {p[:-1] + ('kernel',) for p in
           flax.traverse_util.flatten_dict(adapters)}
  return flax.traverse_util.unflatten_dict({p: flat[p] for p in paths})


def _overlay(tree: PyTree, part: PyTree) -> PyTree:
  """`tree` with the leaves of `part` replacing its own."""
  flat = flax.traverse_util.flatten_dict(tree)
  flat.update(flax.traverse_util.flatten_dict(part))
  return flax.traverse_util.unflatten_dict(flat)


class Policy:
  """What the trainer trains, where it lives, and what the sampler gets.

  Attributes:
    lora: the adapter config; None for full fine-tuning.
    abstract_trainable: shapes of the train state's params.
    trainable_shardings: their shardings on the learner mesh.
    base: the frozen base (LoRA; after `set_base`), else None.
  """

  def __init__(self, cfg: Config, *, plan: sharding.Plan,
               sampler_plan: sharding.Plan, abstract_params: PyTree,
               param_shardings: PyTree, sampler_param_shardings: PyTree):
    """Plans the trainable tree and its shardings.

    Args:
      cfg: the run config (lora.*).
      plan: the learner's mesh.
      sampler_plan: the sampler's mesh (may be `plan`).
      abstract_params: shapes of the full model parameters.
      param_shardings: their shardings on the learner mesh.
      sampler_param_shardings: and on the sampler mesh.
    """
    self.lora = lora_config(cfg)
    self._plan, self._splan = plan, sampler_plan
    self._param_sh = param_shardings
    self._sampler_param_sh = sampler_param_shardings
    # The full model's shapes and learner shardings (what a warm start,
    # the KL reference and LoRA's base are placed in).
    self.abstract_params, self.param_shardings = (abstract_params,
                                                  param_shardings)
    self.base = None
    self._sampler_base = None
    if self.lora is None:
      self.abstract_trainable = abstract_params
      self.trainable_shardings = param_shardings
      return
    self.abstract_trainable = jax.eval_shape(
        lambda: lora.init_adapters(jax.random.key(0), abstract_params,
                                   self.lora))
    self.trainable_shardings = jax.tree.map(lambda _: plan.replicated,
                                            self.abstract_trainable)
    merge = functools.partial(lora.merge, cfg=self.lora)
    # Only the targeted kernels are produced (in their base shardings); the
    # other leaves are reused, never copied.
    self._merge = jax.jit(merge, out_shardings=_kernels(
        param_shardings, self.abstract_trainable))
    self._sampler_merge = self._merge if sampler_plan is plan else jax.jit(
        merge, out_shardings=_kernels(sampler_param_shardings,
                                      self.abstract_trainable))
    self._sampler_adapter_sh = jax.tree.map(lambda _: sampler_plan.replicated,
                                            self.abstract_trainable)

  @property
  def merge_fn(self) -> Callable[[Params, Params], Params] | None:
    """For `learner.make_train_step(merge_fn=...)`; None: full fine-tuning."""
    if self.lora is None:
      return None
    return functools.partial(lora.merge, cfg=self.lora)

  def set_base(self, base: Params) -> None:
    """Freezes `base` (in the learner's param shardings) under the adapters.
    """
    self.base = base
    self._sampler_base = (base if self._splan is self._plan else
                          jax.device_put(base, self._sampler_param_sh))

  def init_trainable(self, params: Params, key: PRNGKey) -> Params:
    """The trainable tree at step 0: `params` itself, or fresh adapters
    (B = 0: the policy starts equal to the base)."""
    if self.lora is None:
      return params
    return self._plan.put(lora.init_adapters(key, params, self.lora),
                          self.trainable_shardings)

  def merged(self, trainable: Params) -> Params:
    """Full model parameters on the learner mesh."""
    if self.lora is None:
      return trainable
    return _overlay(self.base, self._merge(_kernels(self.base, trainable),
                                           trainable))

  def for_sampler(self, trainable: Params) -> Params:
    """Full model parameters on the sampler mesh (only the adapters move
    between meshes under LoRA)."""
    if self.lora is None:
      if self._splan is self._plan:
        return trainable
      return jax.device_put(trainable, self._sampler_param_sh)
    if self._splan is not self._plan:
      trainable = jax.device_put(trainable, self._sampler_adapter_sh)
    return _overlay(self._sampler_base, self._sampler_merge(
        _kernels(self._sampler_base, trainable), trainable))


def build_model(cfg: Config, vocab_size: int):
  """(model, logits_fn): rlx's transformer sized by `model.*`, or the
  architecture of `model.hf_dir` (weights: `policy.initial_params`)."""
  mcfg = model_config(cfg, vocab_size)
  # The attention kernel is a runtime choice per platform: parameters,
  # checkpoints and the warm-start cache key (cfg.model) do not depend on it.
  attention = backend.resolve_attention(
      cfg.backend.attention, backend.platform(), mcfg,
      capability=backend.compute_capability())
  mcfg = dataclasses.replace(mcfg, attention=attention,
                             attention_chunk=cfg.backend.attention_chunk,
                             causal_block=cfg.backend.causal_block)
  model = transformer.Transformer(mcfg)

  def logits_fn(params, tokens, positions, mask):
    return model.apply({'params': params}, tokens, positions, mask)[0]

  return model, logits_fn


def split_model(model: transformer.Transformer) -> lm_head.SplitLM:
  """The model split at its output projection (`optim.logits_chunk`)."""
  return lm_head.SplitLM(
      hidden=lambda params, tokens, positions, mask: model.apply(
          {'params': params}, tokens, positions, mask)[2],
      unembedding=functools.partial(transformer.unembedding, model.cfg),
      dtype=jnp.dtype(model.cfg.dtype))


def warm_started_policy(cfg: Config):
  """(task, model, params) of the warm-started policy, unsharded: what the
  benchmarks sample from (the warm start is trained on first use)."""
  task = task_lib.load_task(cfg.task)
  model, logits_fn = build_model(cfg, task.tokenizer.vocab_size)
  init_p = transformer.init_params(model.cfg,
                                   jax.random.key(cfg.warmstart.seed))
  params, _ = warmstart.load_or_train(cfg, logits_fn, task, init_p)
  return task, model, params


def reference_logprob_fn(cfg: Config, logits_fn, split: lm_head.SplitLM,
                         task, pool: int):
  """(params, prompt ids [n]) -> [n] float32 log-probability of each
  prompt's reference solution and its eos under the policy, at
  sampling.temperature (the likelihood selector); -inf where the solution
  does not fit in sampling.max_new_tokens (no sample can be it).

  One forward pass per prompt, in chunks of the learner's micro-batch rows
  (B G / (rl.num_minibatches optim.num_microbatches): what a train step
  already holds), the last padded; the ids go through sorted by solution
  length, each chunk cut to its longest solution rounded up to 16 tokens
  and its longest prompt rounded up to 8 (little padding, a few shapes to
  compile).

  Raises:
    ConfigError: when a selectable prompt has no reference solution
      (task.name=math_files keeps final answers only), before any work.
  """
  solutions = task.train.solutions[:pool]
  empty = sum(not s for s in solutions)
  if empty:
    raise ConfigError(
        "curriculum.selector: 'likelihood' scores the policy's "
        f'log-probability of each prompt\'s reference solution, but {empty} '
        f'of the {pool} selectable train prompts have none (task.name='
        f'{cfg.task.name!r} keeps final answers only); choose another '
        'selector')
  tok, t = task.tokenizer, cfg.sampling.max_new_tokens
  # Token rows stay ragged; each chunk is padded when it is scored.
  solution_rows = [tok.encode(sol, add_eos=True) for sol in solutions]
  lengths = np.array([len(r) for r in solution_rows])
  fits = lengths <= t
  p = task.train_prompts.shape[1]
  prompt_lengths = task.train_prompt_mask[:pool].sum(-1)
  mini = cfg.rl.batch_prompts // cfg.rl.num_minibatches
  chunk = max(1, mini * cfg.rl.group_size // cfg.optim.num_microbatches)

  @jax.jit
  def score(params, prompt, prompt_mask, resp, resp_mask):
    logp, _ = learner.response_logprobs(
        logits_fn, params, prompt, prompt_mask, resp,
        temperature=cfg.sampling.temperature, split=split,
        logits_chunk=cfg.optim.logits_chunk)
    return jnp.sum(jnp.where(resp_mask, logp, 0.0), -1)

  def fn(params, ids):
    ids = np.asarray(ids, int)
    # Chunks of similar lengths pad less (the result is in `ids` order).
    order = np.argsort(lengths[ids], kind='stable')
    out = np.empty(len(ids), np.float32)
    for s in range(0, len(ids), chunk):
      part = ids[order[s:s + chunk]]
      rows = np.concatenate([part, np.full(chunk - len(part), part[0])])
      width = learner.round_up(int(lengths[part].max()), 16, t)
      left = p - learner.round_up(int(prompt_lengths[part].max()), 8, p)
      response, mask = loader.pad_rows(
          [solution_rows[i][:width] for i in rows], length=width,
          pad_id=tok.pad_id, left=False)
      out[order[s:s + chunk]] = sharding.to_host(score(
          params, task.train_prompts[rows, left:],
          task.train_prompt_mask[rows, left:], response, mask))[:len(part)]
    return np.where(fits[ids], out, -np.inf).astype(np.float32)

  return fn


def prompt_embed_fn(model, task):
  """(params, prompt ids) -> [n, D] mean final hidden state over the prompt."""
  @jax.jit
  def embed(params, tokens, mask):
    positions = kv_cache.positions_from_mask(mask)
    attn = kv_cache.causal_mask(mask, query_len=tokens.shape[1],
                                cache_index=0)
    hidden = model.apply({'params': params}, tokens, positions, attn)[2]
    w = mask[..., None].astype(hidden.dtype)
    return jnp.sum(hidden * w, 1) / jnp.maximum(jnp.sum(w, 1), 1.0)

  return lambda params, ids: embed(params, task.train_prompts[ids],
                                   task.train_prompt_mask[ids])
