r"""Sample from a run's policy or a local Hugging Face model.

  rlx-sample --workdir=runs/grpo [--step=20] --prompt='7a+3b*2c-5?'
  rlx-sample --model_dir=/models/Qwen3-0.6B \
      --prompt='What is 2+3?' --prompt='Name a prime.' --max_new_tokens=64

--workdir: the run's checkpoint (LoRA adapters merged into their base);
prompts are task text, encoded as the run's task encodes its own prompts:
a chain ('7a+3b*2c-5?') with bos for chain_arith, a problem through the
task's user template, chat template and system prompt for math_files.
--max_new_tokens defaults to the run's sampling.max_new_tokens.

--model_dir: prompts go through the family's chat template unless --nochat
(then the text is encoded as is, with bos where the family uses one).

--temperature=0 (the default) is greedy decoding.
"""

import errno
import os
from typing import Sequence

from absl import app
from absl import flags
import jax
import numpy as np

from rlx import runs
from rlx.actor import Actor
from rlx.cli import launch
from rlx.config import ConfigError
import rlx.models
from rlx.sampling import sampler as sampler_lib
from rlx.types import Params

_WORKDIR = flags.DEFINE_string('workdir', None,
                               "A run's directory (its policy).")
_STEP = flags.DEFINE_integer('step', 0, 'With --workdir: the checkpoint '
                             'step; 0: the newest.', lower_bound=0)
_MODEL_DIR = flags.DEFINE_string('model_dir', None, 'HF model directory.')
_PROMPT = flags.DEFINE_multi_string('prompt', None, 'Prompt (repeatable).',
                                    required=True)
_CHAT = flags.DEFINE_bool('chat', True, 'With --model_dir: apply the chat '
                          'template.')
_SYSTEM = flags.DEFINE_string('system', None, 'With --model_dir: system '
                              'message (chat only).')
_MAX_NEW = flags.DEFINE_integer(
    'max_new_tokens', None, "Response budget; default: the run's "
    'sampling.max_new_tokens, or 128.', lower_bound=1)
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, '0 = greedy.',
                                  lower_bound=0.0)
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus mass, in (0, 1].',
                            upper_bound=1.0)
flags.register_validator('top_p', lambda v: v > 0,
                         message='--top_p must be in (0, 1]')
_TOP_K = flags.DEFINE_integer('top_k', 0, '0 disables top-k.', lower_bound=0)
_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1, 'Samples per prompt.',
                                    lower_bound=1)
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_DTYPE = flags.DEFINE_string('dtype', None,
                             "With --model_dir: 'float32' or 'bfloat16'; "
                             "default: the checkpoint's.")

_DEFAULT_MAX_NEW = 128  # --model_dir's response budget.


def encode(tokenizer, prompts, *, chat: bool, system=None):
  """Left-padded ids [B, P] int32 and mask [B, P] bool."""
  rows = []
  for text in prompts:
    if chat:
      messages = [{'role': 'system', 'content': system}] if system else []
      rows.append(tokenizer.encode_chat(
          messages + [{'role': 'user', 'content': text}]))
    else:
      rows.append(tokenizer.encode(text, add_bos=tokenizer.prepends_bos))
  width = max(len(r) for r in rows)
  tokens = np.full((len(rows), width), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(rows), width), bool)
  for i, row in enumerate(rows):
    tokens[i, width - len(row):], mask[i, width - len(row):] = row, True
  return tokens, mask


def _draw(sample_fn, tok, params: Params, tokens: np.ndarray,
          mask: np.ndarray, *, greedy: bool, temperature: float,
          top_p: float, num_samples: int, seed: int) -> list[list[str]]:
  """Decoded responses [B][G] of a sampler (built with top_k=1 when
  `greedy`: then the temperature is 1, any would do)."""
  out = sample_fn(params, tokens, mask, jax.random.key(seed),
                  1.0 if greedy else temperature, top_p,
                  num_samples=num_samples)
  return [[tok.decode(row) for row in group]
          for group in np.asarray(out.tokens)]


def generate(model_dir, prompts, *, chat=True, system=None,
             max_new_tokens=_DEFAULT_MAX_NEW, temperature=0.0, top_p=1.0,
             top_k=0, num_samples=1, seed=0, dtype=None) -> list[list[str]]:
  """Returns num_samples decoded responses for each prompt, [B][G]."""
  model, params, tok = rlx.models.from_pretrained(model_dir, dtype=dtype,
                                                  param_dtype=dtype)
  tokens, mask = encode(tok, prompts, chat=chat, system=system)
  greedy = temperature == 0
  sample = sampler_lib.transformer_sampler(model, sampler_lib.SamplerConfig(
      max_new_tokens=max_new_tokens, stop_tokens=tok.stop_ids,
      pad_id=tok.pad_id, top_k=1 if greedy else top_k))
  return _draw(sample, tok, params, tokens, mask, greedy=greedy,
               temperature=temperature, top_p=top_p,
               num_samples=num_samples, seed=seed)


def sample_run(run: runs.SavedRun, prompts: Sequence[str], *,
               max_new_tokens: int | None = None, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, num_samples: int = 1,
               seed: int = 0) -> list[list[str]]:
  """Samples a run's policy: num_samples decoded responses per prompt.

  Args:
    run: the loaded run (`runs.load`).
    prompts: task texts, encoded as the task encodes its prompts
      (`Task.encode`).
    max_new_tokens: the response budget; None: the run's
      sampling.max_new_tokens.
    temperature: 0: greedy.
    top_p: nucleus mass.
    top_k: 0 disables top-k.
    num_samples: responses per prompt.
    seed: the sampling key's seed.

  Returns:
    [B][G] decoded responses, as the run's actor decodes them (to the
    first stop token).

  Raises:
    ConfigError: a prompt the task's tokenizer cannot encode.
  """
  try:
    tokens, mask = run.task.encode(prompts)
  except ValueError as e:
    raise ConfigError(f'--prompt: {e}') from e
  greedy = temperature == 0
  # The trainer's actor: the task's stop tokens and padding.
  actor = Actor(run.model, run.task,
                max_new_tokens or run.cfg.sampling.max_new_tokens,
                top_k=1 if greedy else top_k)
  return _draw(actor.sample_fn, run.task.tokenizer, run.params, tokens,
               mask, greedy=greedy, temperature=temperature, top_p=top_p,
               num_samples=num_samples, seed=seed)


def _check_flags() -> None:
  """Exactly one source, and no --model_dir-only flag with --workdir."""
  if (_WORKDIR.value is None) == (_MODEL_DIR.value is None):
    raise ConfigError('give exactly one of --workdir (a run) and '
                      '--model_dir (a Hugging Face model directory)')
  if _WORKDIR.value is not None:
    for name in ('chat', 'system', 'dtype'):
      if flags.FLAGS[name].present:
        raise ConfigError(
            f'--{name} is for --model_dir; with --workdir prompts are '
            "encoded as the run's task does (task.chat_template, "
            'task.system_prompt) in its model.dtype')
  elif flags.FLAGS['step'].present:
    raise ConfigError('--step is for --workdir (a run\'s checkpoint)')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  _check_flags()
  options = dict(temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
                 top_k=_TOP_K.value, num_samples=_NUM_SAMPLES.value,
                 seed=_SEED.value)
  if _WORKDIR.value is not None:
    workdir = _WORKDIR.value
    if not os.path.isdir(workdir):  # Before the log file would create it.
      raise FileNotFoundError(errno.ENOENT,
                              'no such run directory (--workdir)', workdir)
    launch.library_logs_to(os.path.join(workdir, 'log.txt'))
    texts = sample_run(runs.load(workdir, step=_STEP.value), _PROMPT.value,
                       max_new_tokens=_MAX_NEW.value, **options)
  else:
    try:
      texts = generate(
          _MODEL_DIR.value, _PROMPT.value, chat=_CHAT.value,
          system=_SYSTEM.value,
          max_new_tokens=_MAX_NEW.value or _DEFAULT_MAX_NEW,
          dtype=_DTYPE.value, **options)
    except ValueError as e:  # An unreadable model directory.
      raise ConfigError(f'--model_dir={_MODEL_DIR.value}: {e}') from e
  for prompt, group in zip(_PROMPT.value, texts):
    print(f'=== {prompt}')
    for i, text in enumerate(group):
      print(f'--- sample {i}\n{text}')


def run():
  """The `rlx-sample` console entry point."""
  launch.entry(main)
