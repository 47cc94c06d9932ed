"""LoRA adapters for the rlx transformer, as a pure transform of parameters.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021).
A target kernel W [in..., out...] becomes W + (alpha / rank) * A @ B with
A [in, r] and B [r, out] (in/out flattened); B starts at zero, so a fresh
adapter leaves the model unchanged. Adapters are a separate pytree that
mirrors the parameter nesting:

  {'layer_0': {'attn': {'q': {'lora_a': [D, r], 'lora_b': [r, N*H]}, ...}}}

Two ways to train only the adapters:
  * `merge(base, adapters, cfg)` inside your own loss, differentiating with
    respect to `adapters` only (the base is an argument, never a jit
    constant);
  * with the unchanged `rlx.learner`: params `combine(base, adapters)`,
    `make_logits_fn(logits_fn, cfg)` and `optimizer(inner)`. The base gets
    no gradient (stop_gradient) and no update or optimizer state.
The sampler needs only the adapters after each step: it keeps its own copy
of the base and calls `merge` (see `merged_params`).
"""

import dataclasses
import math
from typing import Callable

import flax
import jax
import jax.numpy as jnp
import optax

from rlx import config as config_lib
from rlx import errors
from rlx import registry
from rlx.types import Array, Params, PRNGKey

# Target name -> number of leading kernel axes that are inputs.
TARGETS = {'q': 1, 'k': 1, 'v': 1, 'o': 2, 'gate': 1, 'up': 1, 'down': 1}
# HF module names accepted as aliases of the rlx ones.
_ALIASES = {'q_proj': 'q', 'k_proj': 'k', 'v_proj': 'v', 'o_proj': 'o',
            'gate_proj': 'gate', 'up_proj': 'up', 'down_proj': 'down'}
BASE, LORA = 'base', 'lora'


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which kernels get adapters, and how large."""
  rank: int  # r: inner dimension of A @ B.
  alpha: float  # Update scale is alpha / rank.
  targets: tuple[str, ...] = ('q', 'k', 'v', 'o')  # Names in `TARGETS`
  # (or HF's q_proj, ..., down_proj).

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f'lora.rank={self.rank} must be >= 1')
    unknown = [t for t in self.targets if t not in TARGETS and
               t not in _ALIASES]
    if unknown or not self.targets:
      raise ValueError(f'lora.targets: {list(self.targets)} has unknown '
                       f'{unknown}; choose from {sorted(TARGETS)}')

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @property
  def modules(self) -> frozenset[str]:
    return frozenset(_ALIASES.get(t, t) for t in self.targets)


@config_lib.section('lora')
@dataclasses.dataclass(frozen=True)
class LoraSection:
  """LoRA adapters (rlx/models/lora.py): train low-rank updates only."""
  rank: int = 0  # r of A [in, r] @ B [r, out]; 0: full fine-tuning (every
  # parameter trained, no adapters).
  alpha: float = 16.0  # The update is (alpha / rank) * A @ B.
  targets: tuple = ('q', 'k', 'v', 'o')  # Kernels that get adapters:
  # q, k, v, o, gate, up, down (or HF's q_proj, ..., down_proj).


@registry.config_check
def _check_lora_section(cfg) -> None:
  """The config's lora.* section (`cfg`: the whole rlx Config)."""
  lo = cfg.lora
  errors.require(lo.rank >= 0, 'lora.rank',
                 'must be >= 0 (0: full fine-tuning)')
  if lo.rank:
    errors.require(lo.alpha > 0, 'lora.alpha', 'must be > 0')
    try:
      LoraConfig(rank=lo.rank, alpha=lo.alpha, targets=lo.targets)
    except ValueError as e:  # Its message names lora.targets.
      raise errors.ConfigError(str(e)) from e


def _targets(params: Params, cfg: LoraConfig) -> dict[tuple, Array]:
  """Flattened {path to a targeted module: its kernel}."""
  flat = flax.traverse_util.flatten_dict(params)
  found = {p[:-1]: x for p, x in flat.items()
           if p[-1] == 'kernel' and len(p) >= 2 and p[-2] in cfg.modules}
  if not found:
    raise ValueError(f'no kernel named {sorted(cfg.modules)} in params')
  return found


def init_adapters(key: PRNGKey, params: Params, cfg: LoraConfig, *,
                  dtype=jnp.float32) -> Params:
  """Fresh adapters for every targeted kernel of `params`.

  A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's default), B = 0.

  Args:
    key: PRNG key.
    params: transformer parameters (only shapes are read).
    cfg: the LoRA config.
    dtype: adapter dtype (float32 even for a bfloat16 base, by default).

  Returns:
    The adapter pytree (see module docstring).
  """
  out = {}
  targets = _targets(params, cfg)
  for i, (path, kernel) in enumerate(sorted(targets.items())):
    num_in = TARGETS[path[-1]]
    fan_in = math.prod(kernel.shape[:num_in])
    fan_out = math.prod(kernel.shape[num_in:])
    bound = fan_in ** -0.5
    out[path + ('lora_a',)] = jax.random.uniform(
        jax.random.fold_in(key, i), (fan_in, cfg.rank), dtype, -bound, bound)
    out[path + ('lora_b',)] = jnp.zeros((cfg.rank, fan_out), dtype)
  return flax.traverse_util.unflatten_dict(out)


def merged_kernel(kernel: Array, lora_a: Array, lora_b: Array,
                  scale: float) -> Array:
  """kernel + scale * A @ B (reshaped like `kernel` [in..., out...]),
  summed in float32 and rounded once to the kernel's dtype. With a
  bfloat16 base an update smaller than half the kernel's rounding step at
  an entry still leaves that entry unchanged in the forward pass (as in
  any bfloat16 forward); the adapters themselves stay float32."""
  update = scale * (lora_a.astype(jnp.float32) @ lora_b.astype(jnp.float32))
  return (kernel.astype(jnp.float32) +
          update.reshape(kernel.shape)).astype(kernel.dtype)


def merge(params: Params, adapters: Params, cfg: LoraConfig) -> Params:
  """Base parameters with every adapter folded into its kernel.

  Args:
    params: base transformer parameters.
    adapters: from `init_adapters` (possibly trained).
    cfg: the LoRA config the adapters were made with.

  Returns:
    A parameter pytree shaped like `params`.
  """
  flat = flax.traverse_util.flatten_dict(params)
  ad = flax.traverse_util.flatten_dict(adapters)
  for path in {p[:-1] for p in ad}:
    kernel = flat[path + ('kernel',)]
    flat[path + ('kernel',)] = merged_kernel(
        kernel, ad[path + ('lora_a',)], ad[path + ('lora_b',)], cfg.scale)
  return flax.traverse_util.unflatten_dict(flat)


def combine(base: Params, adapters: Params) -> dict[str, Params]:
  """The {'base', 'lora'} pytree that `make_logits_fn` and `optimizer` use."""
  return {BASE: base, LORA: adapters}


def make_logits_fn(logits_fn: Callable[..., Array],
                   cfg: LoraConfig) -> Callable[..., Array]:
  """Wraps `logits_fn(params, ...)` to take `combine(base, adapters)`.

  The base is behind `stop_gradient`, so its gradient is exactly zero.
  """
  def wrapped(params, *args, **kwargs):
    base = jax.lax.stop_gradient(params[BASE])
    return logits_fn(merge(base, params[LORA], cfg), *args, **kwargs)
  return wrapped


def optimizer(inner: optax.GradientTransformation
              ) -> optax.GradientTransformation:
  """`inner` on the adapters; the base gets zero updates and no state."""
  return optax.multi_transform(
      {BASE: optax.set_to_zero(), LORA: inner},
      lambda params: {BASE: jax.tree.map(lambda _: BASE, params[BASE]),
                      LORA: jax.tree.map(lambda _: LORA, params[LORA])})


def merged_params(params: dict[str, Params], cfg: LoraConfig) -> Params:
  """Plain parameters for the sampler from a `combine`d pytree."""
  return merge(params[BASE], params[LORA], cfg)


def count_params(adapters: Params) -> int:
  """Number of trainable adapter parameters."""
  return sum(x.size for x in jax.tree.leaves(adapters))
