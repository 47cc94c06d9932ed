"""Loads chain-arithmetic splits and turns them into token arrays.

The splits are small, so a split is read whole into host memory. Token arrays
are numpy; callers move them to devices themselves.
"""

from collections.abc import Sequence
import dataclasses

import numpy as np

from rlx.data import tfds_builder
from rlx.models import tokenizer as tokenizer_lib

SPLITS = ('train', 'test')


@dataclasses.dataclass(frozen=True)
class TaskData:
  """One split, in memory, in id order.

  Attributes:
    prompts: [N] prompts, e.g. '7+3*2-5?'.
    solutions: [N] worked solutions without eos.
    answers: [N] final answers.
    num_steps: [N] int32 number of steps of each problem.
  """

  prompts: list[str]
  solutions: list[str]
  answers: list[str]
  num_steps: np.ndarray

  def __len__(self) -> int:
    return len(self.prompts)


def load_chain_arith(
    split: str,
    *,
    data_dir: str,
    **values,
) -> TaskData:
  """Reads one split, generating the dataset on disk on first use.

  Args:
    split: 'train' or 'test'.
    data_dir: TFDS data directory; the files go under
      data_dir/chain_arith/<config name>/<version>/ and are reused by later
      calls with the same values.
    **values: generation settings (num_train, num_test, max_steps, zipf_s,
      seed), as `tfds_builder.make_config` takes them, with its defaults.

  Returns:
    The split, in id order.

  Raises:
    ValueError: on an unknown split.
  """
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  config = tfds_builder.make_config(**values)
  builder = tfds_builder.ChainArith(
      config=config, data_dir=data_dir, file_format='array_record'
  )
  builder.download_and_prepare()
  source = builder.as_data_source(split=split)
  records = source.__getitems__(range(len(source)))
  # Records are written in id order, but sorting keeps that a checked fact
  # rather than an assumption about TFDS's writer.
  records = sorted(records, key=lambda r: int(r['id']))
  ids = np.array([r['id'] for r in records], dtype=np.int64)
  if not np.array_equal(ids, np.arange(len(records))):
    raise ValueError(f'{split} split ids are not 0..{len(records) - 1}')
  return TaskData(
      prompts=[r['prompt'].decode() for r in records],
      solutions=[r['solution'].decode() for r in records],
      answers=[r['answer'].decode() for r in records],
      num_steps=np.array([r['num_steps'] for r in records], dtype=np.int32),
  )


def pad_rows(
    rows: Sequence[list[int]], *, length: int, pad_id: int, left: bool
) -> tuple[np.ndarray, np.ndarray]:
  """Packs rows of ids into a padded [N, length] array and its mask."""
  tokens = np.full((len(rows), length), pad_id, dtype=np.int32)
  mask = np.zeros((len(rows), length), dtype=bool)
  for i, row in enumerate(rows):
    span = slice(length - len(row), length) if left else slice(0, len(row))
    tokens[i, span] = row
    mask[i, span] = True
  return tokens, mask


def _check_lengths(
    rows: Sequence[list[int]],
    texts: Sequence[str],
    *,
    what: str,
    special: str,
    limit_name: str,
    limit: int,
) -> None:
  """Raises a ValueError naming the first row longer than `limit`."""
  for i, row in enumerate(rows):
    if len(row) > limit:
      raise ValueError(
          f'{what} {i} ({texts[i]!r}) is {len(row)} tokens long with '
          f'{special}, more than {limit_name}={limit}'
      )


def _encode_prompts(
    tokenizer: tokenizer_lib.Tokenizer,
    prompts: Sequence[str],
    *,
    length: int,
    name: str,
) -> tuple[np.ndarray, np.ndarray]:
  """`encode_prompts`, with the caller's name for `length` in errors."""
  rows = [tokenizer.encode(p, add_bos=True) for p in prompts]
  _check_lengths(
      rows,
      prompts,
      what='prompt',
      special='bos',
      limit_name=name,
      limit=length,
  )
  return pad_rows(rows, length=length, pad_id=tokenizer.pad_id, left=True)


def encode_prompts(
    tokenizer: tokenizer_lib.Tokenizer,
    prompts: Sequence[str],
    *,
    max_len: int,
) -> tuple[np.ndarray, np.ndarray]:
  """Tokenizes prompts as a left-padded batch.

  Left padding puts every prompt's last token in the last column, so that
  sampling can start for the whole batch at the same position.

  Args:
    tokenizer: the tokenizer.
    prompts: [N] prompt strings.
    max_len: width of the arrays.

  Returns:
    tokens: int32 [N, max_len]; row i is pad ids, then bos and the prompt.
    mask: bool [N, max_len]; True on the bos and prompt tokens.

  Raises:
    ValueError: if a prompt with its bos is longer than max_len.
  """
  return _encode_prompts(tokenizer, prompts, length=max_len, name='max_len')


def encode_demonstrations(
    tokenizer: tokenizer_lib.Tokenizer,
    prompts: Sequence[str],
    solutions: Sequence[str],
    *,
    prompt_len: int,
    response_len: int,
) -> dict[str, np.ndarray]:
  """Tokenizes prompt/solution pairs for a supervised warm start.

  Args:
    tokenizer: the tokenizer.
    prompts: [N] prompt strings.
    solutions: [N] demonstration responses, without eos.
    prompt_len: width of the prompt arrays.
    response_len: width of the response arrays.

  Returns:
    A dict of numpy arrays:
      'prompt': int32 [N, prompt_len], left-padded as by `encode_prompts`.
      'prompt_mask': bool [N, prompt_len], True on bos and prompt tokens.
      'response': int32 [N, response_len], right-padded; row i is the
        solution's tokens then eos.
      'response_mask': bool [N, response_len], True on the solution's tokens
        and the eos.

  Raises:
    ValueError: if the two lists differ in length, or a prompt or a response
      (with its eos) does not fit.
  """
  if len(prompts) != len(solutions):
    raise ValueError(
        f'got {len(prompts)} prompts but {len(solutions)} solutions'
    )
  prompt, prompt_mask = _encode_prompts(
      tokenizer, prompts, length=prompt_len, name='prompt_len'
  )
  rows = [tokenizer.encode(s, add_eos=True) for s in solutions]
  _check_lengths(
      rows,
      solutions,
      what='solution',
      special='eos',
      limit_name='response_len',
      limit=response_len,
  )
  response, response_mask = pad_rows(
      rows, length=response_len, pad_id=tokenizer.pad_id, left=False
  )
  return {
      'prompt': prompt,
      'prompt_mask': prompt_mask,
      'response': response,
      'response_mask': response_mask,
  }
