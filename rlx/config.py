"""Config: frozen dataclasses, built from an `ml_collections.ConfigDict`.

The dataclasses below, and the sections that modules own (`section`:
lora, optim, warmstart, eval, log, mesh, backend at the top level, and
method subsections), are the single source of every default and of the one
comment each field carries; `configs/common.py` turns them into the
ConfigDict that recipes override and absl flags patch. `build` converts back,
rejecting unknown keys, wrong types and impossible combinations with a
message naming the key, before anything is compiled. ConfigDicts never enter
jitted code.
"""

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from typing import Any

import ml_collections

from rlx import errors
from rlx import registry
from rlx import sections
from rlx.errors import ConfigError
# The section machinery (rlx/sections.py), used here and by method modules
# as config.section(...).
from rlx.sections import (_fields, owned_sections, RENAMED, section, Section,
                          upgrade, warn_renamed)


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  name: str = 'chain_arith'  # chain_arith (generated, rlx's own model and
  # character tokenizer) | math_files (problems from local files; needs
  # model.hf_dir, whose tokenizer encodes them).
  data_dir: str = '~/tensorflow_datasets'  # chain_arith: where TFDS
  # prepares the data.
  num_train: int = 20_000  # chain_arith: training prompts generated;
  # math_files: at most this many problems read from train_files.
  num_test: int = 512  # Held-out prompts (disjoint from train); math_files:
  # at most this many read from test_files.
  max_steps: int = 12  # chain_arith: longest chain (<= 16): the hardest
  # prompts.
  zipf_s: float = 0.8  # chain_arith: P(steps = n) ~ n^-zipf_s: the long
  # tail of lengths.
  seed: int = 0  # chain_arith: dataset generation seed.
  prompt_len: int = 40  # P: prompts are left-padded to this many tokens
  # (chain_arith needs 3 * max_steps + 3; math_files drops longer prompts
  # and logs how many).
  train_files: str = ''  # math_files: .jsonl/.json/.parquet files or glob
  # patterns, comma-separated.
  test_files: str = ''  # math_files: the same for held-out problems; '':
  # hold out the last num_test problems read from train_files (at most half
  # of them).
  problem_field: str = 'problem'  # math_files: field with the problem
  # text (dots for nested JSON, a number indexes a list: prompt.0.content).
  # Repeated problems are read once, and train skips those in test.
  answer_field: str = 'answer'  # math_files: field with the gold answer.
  answer_extract: str = 'none'  # math_files: none | boxed (last \\boxed{}
  # of the answer field, e.g. MATH solutions) | hashes (text after the last
  # '####', GSM8K).
  chat_template: bool = True  # math_files: encode prompts with the model
  # family's chat template (else the text as is, bos where the family has
  # one).
  system_prompt: str = ''  # math_files: system message ('' none; Qwen2's
  # template then adds its default one).
  user_template: str = '{problem}'  # math_files: the user turn; {problem}
  # is replaced by the problem text.


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  hf_dir: str = ''  # '': rlx's own transformer, sized by the fields below;
  # a path: load that Hugging Face model directory (architecture and sizes
  # from its config.json; leave the size fields below at their defaults).
  vocab_size: int = 0  # 0: take the tokenizer's vocabulary size.
  num_layers: int = 4  # Transformer blocks.
  embed_dim: int = 128  # Residual width D.
  num_heads: int = 4  # Query heads N.
  num_kv_heads: int = 2  # Key/value heads K (GQA); divides num_heads.
  head_dim: int = 32  # Width of one head H.
  mlp_dim: int = 384  # SwiGLU hidden width.
  rope_theta: float = 10_000.0  # RoPE base.
  qk_norm: bool = False  # RMSNorm on queries and keys.
  tie_embeddings: bool = True  # Share input embedding and output projection.
  dtype: str = 'float32'  # Activation dtype (bfloat16 on accelerators);
  # also applies to a model.hf_dir model.
  param_dtype: str = 'float32'  # Parameter dtype (model.hf_dir: weights are
  # cast to it on load).


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  temperature: float = 1.0  # Rollout temperature; the learner uses it too.
  top_p: float = 1.0  # Nucleus mass; 1 disables.
  top_k: int = 0  # Top-k filter; 0 disables.
  max_new_tokens: int = 80  # T: response budget (chain_arith needs
  # 6 * max_steps + 4).


@dataclasses.dataclass(frozen=True)
class RLConfig:
  num_steps: int = 50  # RL steps (one rollout batch each).
  batch_prompts: int = 16  # B: prompts per step.
  group_size: int = 8  # G: responses per prompt.
  num_minibatches: int = 1  # Optimizer updates per rollout batch (split by
  # prompts; batch-whitened advantages are computed before the split).
  max_rollouts: int = 0  # Also stop once this many responses were sampled
  # (an equal-budget comparison); 0: no limit.
  recompute_old_logp: bool = False  # Old policy log-probs from the learner
  # instead of the sampler's behaviour log-probs (equal up to float error
  # when the sampler and learner hold the same weights).


@dataclasses.dataclass(frozen=True)
class CurriculumConfig(Section, path='curriculum'):
  """Which prompts get rollouts and how many (ALGORITHMS.md section C)."""
  selector: str = 'uniform'  # uniform | vade | insight | cures | mmr1_vas
  # | prompt_gdro | spo | dots | likelihood: how the B prompts of a step are
  # chosen.
  allocator: str = 'fixed'  # fixed | cures | rollout_gdro | xrpo | dars:
  # rollouts per prompt; all spend exactly B * G per step.
  filter: str = 'none'  # none | dapo | skip | dapo+skip: dapo replaces
  # all-equal groups by fresh prompts; skip avoids prompts predicted to
  # give an all-equal group.
  estimator: str = 'auto'  # auto | beta | vade | count | spo: per-prompt
  # Beta posterior update (auto: the selector's own; beta otherwise).
  pool_size: int = 0  # Select from the first this many train prompts; 0: all.
  prior_alpha: float = 1.0  # Beta prior pseudo-successes.
  prior_beta: float = 1.0  # Beta prior pseudo-failures.
  discount: float = 0.9  # beta/vade: weight of old evidence per update.
  vade_decay: float = 0.99  # vade: decay toward the prior per step.
  spo_discount: float = 0.9  # spo tracker: forgetting factor rho.
  min_group: int = 2  # Fewest rollouts an allocator gives a prompt.
  max_group: int = 0  # Most rollouts per prompt; 0: 2 * rl.group_size.
  first_round: int = 0  # dars/xrpo round-one rollouts per prompt;
  # 0: rl.group_size // 2 (at least min_group).
  dars_schedule: str = 'et'  # dars: et (equal treatment) | hw (hardness
  # weighted).
  xrpo_bonus: float = 0.1  # xrpo: exploration bonus c / sqrt(n).
  mmr1_mix: float = 0.5  # mmr1_vas: share of the batch drawn by p(1-p).
  spo_floor: float = 0.05  # spo: priority floor in sqrt(v(1-v)) + floor.
  skip_threshold: float = 0.5  # skip: drop prompts whose posterior
  # P(group all-equal) is at least this.
  dapo_max_retries: int = 3  # dapo: refill rounds before giving up (then
  # all-equal groups stay masked out; curriculum/dapo_bound_hit = 1).


@dataclasses.dataclass(frozen=True)
class RolloutConfig(Section, path='rollout'):
  """How responses are generated (rlx/rollouts/)."""
  mode: str = 'static'  # static: one jitted batch per call, as long as its
  # longest response; continuous: slot engine refilling finished slots;
  # april: continuous + over-provisioned groups, stopping at B finished
  # groups and carrying the rest over; tree: prefix-sharing tree rollouts.
  overlap: bool = False  # One-step off-policy (asynchronous) training:
  # step s + 1's rollout is sampled, in a background thread, by the weights
  # from before step s's update while the learner trains on step s, so
  # sampling and learning overlap and every batch is one policy version
  # stale (april stamps its tokens so; correct with objective.correction=
  # tis|icepop or objective.loss=decoupled plus rl.recompute_old_logp).
  # Needs a one-device mesh (concurrent multi-device programs could
  # interleave their collectives) and one process.


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig(Section, path='objective'):
  advantage: str = 'grpo'  # Advantage estimator (rlx.objectives registry).
  loss: str = 'ppo_clip'  # Policy loss (rlx.objectives registry).
  clip_eps: float = 0.2  # Clip range, low side (and high side when unset).
  clip_eps_high: float = 0.0  # High side of the clip; 0: the loss's default
  # (clip_eps for ppo_clip / dual_clip / decoupled, 0.28 for dapo / gppo /
  # cispo).
  correction: str = 'none'  # Sampler/learner mismatch: none | tis | icepop.
  aggregation: str = 'token-mean'  # How token losses become one scalar.
  adv_eps: float = 1e-6  # Added to std denominators of advantages.
  kl_beta: float = 0.0  # Weight of the KL to the reference; 0 disables.
  kl_estimator: str = 'k3'  # k1 | k2 | k3.
  kl_in_reward: bool = False  # Fold the sequence KL into the reward
  # (r - kl_beta * sum_t KL_t) instead of adding a loss term.
  entropy_coef: float = 0.0  # Entropy bonus: loss -= coef * entropy.
  overlong_buffer: int = 0  # DAPO overlong shaping buffer Lc (tokens) below
  # sampling.max_new_tokens; 0 disables.
  norm_len: int = 0  # Constant for seq-mean-token-sum-norm; 0: max_new_tokens.


@dataclasses.dataclass(frozen=True)
class Config(Section, path=''):
  """The whole config; its owned sections: lora (rlx/models/lora.py), optim
  (rlx/learner.py), warmstart, eval (rlx/evaluation.py), log (rlx/logbook.py),
  mesh (rlx/sharding.py), backend."""
  seed: int = 0  # Seeds init, prompt order and sampling.
  task: TaskConfig = TaskConfig()
  model: ModelConfig = ModelConfig()
  sampling: SamplingConfig = SamplingConfig()
  rl: RLConfig = RLConfig()
  curriculum: CurriculumConfig = CurriculumConfig()
  rollout: RolloutConfig = RolloutConfig()
  objective: ObjectiveConfig = ObjectiveConfig()


def default_config_dict() -> ml_collections.ConfigDict:
  """The defaults as a ConfigDict (what recipes start from)."""
  return ml_collections.ConfigDict(to_dict(Config()))


def _convert(cls, value: Any, path: str, problems: list[str]):
  """Converts a ConfigDict subtree into dataclass `cls`. Unknown keys and
  values of the wrong type are added to `problems` (the field keeps its
  default), so that one pass finds them all."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if not isinstance(value, dict):
    problems.append(f'{path or "config"}: must be a group of fields, got '
                    f'{type(value).__name__} {value!r}')
    return cls()
  fields = {f.name for f in _fields(cls)}
  owned = owned_sections(path)
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for key, val in value.items():
    name = '.'.join(filter(None, [path, key]))
    if key in owned:
      kwargs[key] = _convert(owned[key], val, name, problems)
      continue
    if key not in fields:
      problems.append(unknown_key(name))
      continue
    try:
      kwargs[key] = _check_type(hints[key], val, name, problems)
    except ConfigError as e:
      problems.append(str(e))
  return cls(**kwargs)


def _check_type(hint, val, name, problems):
  if dataclasses.is_dataclass(hint):
    return _convert(hint, val, name, problems)
  origin = typing.get_origin(hint)
  if hint is tuple or origin is tuple:
    if not isinstance(val, (tuple, list)):
      raise ConfigError(f'{name}: must be a tuple, got {val!r}')
    return tuple(val)
  if origin in (typing.Union, types.UnionType):
    return val
  if hint is float and isinstance(val, int) and not isinstance(val, bool):
    val = float(val)
  if hint is bool and not isinstance(val, bool):
    raise ConfigError(f'{name}: must be a bool, got {val!r}')
  if not isinstance(val, hint) or (hint is int and isinstance(val, bool)):
    raise ConfigError(f'{name}: must be {hint.__name__}, got '
                      f'{type(val).__name__} {val!r}')
  if hint is float and not math.isfinite(val):
    raise ConfigError(f'{name}: must be a finite number, got {val!r}')
  return val


def _leaf_keys(cls=None, prefix: str = '') -> list[str]:
  """Every dotted field name of the config, owned sections' included
  (groups excluded)."""
  cls = cls or Config
  out = []
  hints = typing.get_type_hints(cls)
  for f in _fields(cls):
    if dataclasses.is_dataclass(hints[f.name]):
      out += _leaf_keys(hints[f.name], f'{prefix}{f.name}.')
    else:
      out.append(prefix + f.name)
  for name, sub in owned_sections(prefix[:-1]).items():
    out += _leaf_keys(sub, f'{prefix}{name}.')
  return out


def unknown_key(name: str) -> str:
  """The problem line for an unknown dotted key, with a did-you-mean: the
  known keys nearest to it, whole or by its last part."""
  known = _leaf_keys()
  close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
  last = name.rsplit('.', 1)[-1]
  close += [k for k in known if k.rsplit('.', 1)[-1] == last or
            k.split('.')[0] == last]
  close += [k for k in known for m in difflib.get_close_matches(
      last, [k.rsplit('.', 1)[-1]], cutoff=0.8) if m]
  close = list(dict.fromkeys(close))[:3]
  if close:
    return f'{name}: unknown config key; did you mean {" or ".join(close)}?'
  group = name.rsplit('.', 1)[0] if '.' in name else ''
  keys = sorted({k[len(group) + 1:].split('.')[0] if group else
                 k.split('.')[0] for k in known
                 if not group or k.startswith(group + '.')})
  return (f'{name}: unknown config key; known keys under '
          f'{group or "config"}: {", ".join(keys)}')


_require = errors.require


def validate(cfg: Config) -> Config:
  """Rejects impossible combinations: one ConfigError listing every
  problem, one line each, naming its key."""
  problems = validation_problems(cfg)
  if problems:
    raise ConfigError('\n'.join(problems))
  return cfg


def validation_problems(cfg: Config) -> list[str]:
  """Every problem of `cfg`, one line each ('key: what is wrong').

  Each section is checked in full; a check that cannot even be computed
  because of a problem already found in its section (a division by a zero
  the section has named) ends that section only.
  """
  # The generic sections, then the checks of the modules that own one
  # (rlx.registry.config_check) and of every registry.
  with errors.collecting() as problems:
    for section in list(_SECTIONS) + registry.CHECKS:
      before = len(problems)
      try:
        section(cfg)
      except ConfigError as e:  # Raised directly (e.g. a registry's check).
        problems.extend(str(e).splitlines())
      except (ArithmeticError, TypeError, ValueError, KeyError, IndexError):
        if len(problems) == before:
          raise  # A bug, not the consequence of a problem named above.
    return list(dict.fromkeys(problems))


def _validate_basics(cfg: Config) -> None:
  """rl, sampling and objective.adv_eps fields (the owned sections are
  checked by their modules)."""
  rl, s = cfg.rl, cfg.sampling
  _require(rl.batch_prompts > 0, 'rl.batch_prompts', 'must be positive')
  _require(rl.num_steps >= 0, 'rl.num_steps', 'must be >= 0')
  _require(rl.num_minibatches > 0 and rl.batch_prompts % rl.num_minibatches
           == 0, 'rl.num_minibatches', f'{rl.num_minibatches} must divide '
           f'rl.batch_prompts={rl.batch_prompts}')
  _require(s.temperature > 0, 'sampling.temperature', 'must be > 0')
  _require(0 < s.top_p <= 1, 'sampling.top_p', 'must be in (0, 1]')
  _require(s.top_k >= 0, 'sampling.top_k', 'must be >= 0')
  _require(s.max_new_tokens > 0, 'sampling.max_new_tokens', 'must be > 0')
  _require(cfg.objective.adv_eps > 0, 'objective.adv_eps', 'must be > 0')


DTYPES = ('float32', 'bfloat16', 'float16')  # model.dtype, param_dtype.
# ModelConfig fields that a model.hf_dir's config.json decides.
HF_SIZE_FIELDS = ('vocab_size', 'num_layers', 'embed_dim', 'num_heads',
                  'num_kv_heads', 'head_dim', 'mlp_dim', 'rope_theta',
                  'qk_norm', 'tie_embeddings')


def _validate_task_and_model(cfg: Config) -> None:
  """Model fields and task.prompt_len; the task's own checks are its
  registry's (rlx/data/task.py)."""
  task, model = cfg.task, cfg.model
  _require(model.num_kv_heads > 0 and model.num_heads % model.num_kv_heads
           == 0, 'model.num_kv_heads', f'{model.num_kv_heads} must divide '
           f'model.num_heads={model.num_heads}')
  for key in ('dtype', 'param_dtype'):
    _require(getattr(model, key) in DTYPES, f'model.{key}',
             f'{getattr(model, key)!r} is not one of {list(DTYPES)}')
  _require(task.prompt_len > 0, 'task.prompt_len', 'must be positive')
  if model.hf_dir:
    default = ModelConfig()
    for key in HF_SIZE_FIELDS:
      _require(getattr(model, key) == getattr(default, key), f'model.{key}',
               f'is {getattr(model, key)!r}, but model.hf_dir is set: the '
               'architecture comes from its config.json; leave model.'
               f'{key} at its default ({getattr(default, key)!r})')


_SECTIONS = (_validate_basics, _validate_task_and_model)


def build(config: ml_collections.ConfigDict | dict) -> Config:
  """ConfigDict -> validated frozen `Config` (overrides from strings and
  recipe files: rlx/recipes.py).

  Raises:
    ConfigError: every problem found (unknown keys, wrong types, bad
      values, impossible combinations), one line each.
  """
  if isinstance(config, ml_collections.ConfigDict):
    config = config.to_dict()
  config, problems = upgrade(config, to_dict(Config()), warn=True)
  cfg = _convert(Config, config, '', problems)
  problems += validation_problems(cfg)
  if problems:
    raise ConfigError('\n'.join(dict.fromkeys(problems)))
  return cfg


def to_dict(cfg) -> dict:
  """A config (or a section) as a nested dict, owned sections included."""
  out = {f.name: getattr(cfg, f.name) for f in _fields(cfg)}
  out = {k: to_dict(v) if dataclasses.is_dataclass(v) else v
         for k, v in out.items()}
  if isinstance(cfg, Section):
    out.update((k, to_dict(v)) for k, v in cfg._owned.resolved().items())
  return out


def fingerprint(value: Any) -> str:
  """Stable short hash of a JSON-able value (configs, cache keys)."""
  blob = json.dumps(value, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def _as_json(value: Any) -> Any:
  """Tuples as lists: a config saved as JSON (a checkpoint's) reads tuple
  fields back as lists, which are the same setting."""
  if isinstance(value, (tuple, list)):
    return [_as_json(v) for v in value]
  return value


def fill_defaults(saved: dict, defaults: dict | None = None) -> dict:
  """`saved` (e.g. a checkpoint's config) with the keys it lacks taken from
  today's defaults: a field added after that checkpoint was written, left
  at its default, is not a change. Deprecated flat keys are read under
  their new names first."""
  defaults = to_dict(Config()) if defaults is None else defaults
  saved, _ = upgrade(saved, defaults)
  return _fill(saved, defaults)


def _fill(saved: dict, defaults: dict) -> dict:
  out = dict(defaults)
  for key, value in saved.items():
    if isinstance(value, dict) and isinstance(defaults.get(key), dict):
      value = _fill(value, defaults[key])
    out[key] = value
  return out


def diff(a: dict, b: dict, prefix: str = '') -> list[str]:
  """Dotted keys whose values differ between two nested dicts."""
  out = []
  for key in sorted(set(a) | set(b)):
    name = f'{prefix}{key}'
    va, vb = a.get(key), b.get(key)
    if isinstance(va, dict) and isinstance(vb, dict):
      out += diff(va, vb, name + '.')
    elif _as_json(va) != _as_json(vb):
      out.append(name)
  return out
