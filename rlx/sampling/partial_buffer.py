"""APRIL's partial-rollout buffer: unfinished groups carried to the next step.

A fixed-capacity pytree of arrays (a `NamedTuple`), so it is saved and
restored with the train state (orbax) and a resumed run continues the very
responses an interrupted one left unfinished. Rows [0, count) hold groups,
oldest first; each keeps its prompt, the dataset id the trainer needs to
score it, and per sample the response so far: tokens, behaviour log-probs,
entropies, the policy version of every token, length and finish reason
(RUNNING for a partial response, STOP/LENGTH for a finished member of an
unfinished group). Operations run on the host (numpy) between RL steps.
"""

from typing import NamedTuple

import jax
import numpy as np

from rlx.sampling.engine import Tracks, empty_tracks
from rlx.types import Array, FinishReason


class Groups(NamedTuple):
  """n prompt groups with their (partial) responses."""
  prompt_id: Array  # [n] int32 caller's prompt id (e.g. dataset index).
  prompt: Array  # [n, P] int32, left-padded.
  prompt_mask: Array  # [n, P] bool.
  tracks: Tracks  # [n, G, ...] responses so far.


class PartialBuffer(NamedTuple):
  """Fixed capacity C; `groups` rows [0, count) are held, oldest first."""
  count: Array  # scalar int32.
  groups: Groups  # [C, ...].


def empty_groups(n: int, *, group_size: int, prompt_len: int,
                 max_new_tokens: int, pad_id: int = 0) -> Groups:
  return Groups(prompt_id=np.full((n,), -1, np.int32),
                prompt=np.full((n, prompt_len), pad_id, np.int32),
                prompt_mask=np.zeros((n, prompt_len), bool),
                tracks=empty_tracks((n, group_size), max_new_tokens,
                                    pad_id=pad_id))


def init(capacity: int, *, group_size: int, prompt_len: int,
         max_new_tokens: int, pad_id: int = 0) -> PartialBuffer:
  """An empty buffer of `capacity` groups."""
  if capacity < 0:
    raise ValueError(f'buffer capacity must be >= 0, got {capacity}')
  return PartialBuffer(
      count=np.zeros((), np.int32),
      groups=empty_groups(capacity, group_size=group_size,
                          prompt_len=prompt_len,
                          max_new_tokens=max_new_tokens, pad_id=pad_id))


def size(buf: PartialBuffer) -> int:
  return int(buf.count)


def capacity(buf: PartialBuffer) -> int:
  return int(np.shape(buf.groups.prompt_id)[0])


def select(groups: Groups, index) -> Groups:
  """Rows `index` of every field, as numpy arrays (a copy)."""
  return jax.tree.map(lambda x: np.asarray(x)[index], groups)


def validate(buf: PartialBuffer, *, max_new_tokens: int) -> None:
  """Checks a buffer read from outside (a checkpoint) before it is resumed.

  Raises:
    ValueError: naming the first inconsistency: a count beyond the
      capacity, a response width other than `max_new_tokens`, a held group
      without a prompt id or prompt token, a finish reason that is not one,
      a running response with no room left (length not in [0, T)) or a
      finished one longer than T, or token versions not set exactly on the
      tokens before each length.
  """
  n, cap = size(buf), capacity(buf)
  if not 0 <= n <= cap:
    raise ValueError(f'partial buffer: count {n} not in [0, capacity {cap}]')
  held = select(buf.groups, np.arange(n))
  tr, t = held.tracks, np.shape(buf.groups.tracks.tokens)[-1]
  if t != max_new_tokens:
    raise ValueError(f'partial buffer: responses of {t} tokens, but '
                     f'sampling.max_new_tokens is {max_new_tokens}')
  if np.any(held.prompt_id < 0) or np.any(~held.prompt_mask.any(-1)):
    raise ValueError('partial buffer: a held group has no prompt id or no '
                     'prompt token')
  running = tr.finish == int(FinishReason.RUNNING)
  known = np.isin(tr.finish, [int(f) for f in FinishReason])
  ok = known & np.where(running, (tr.length >= 0) & (tr.length < t),
                        (tr.length >= 0) & (tr.length <= t))
  if not ok.all():
    g, i = np.argwhere(~ok)[0]
    raise ValueError(
        f'partial buffer: group {g} sample {i} has length {tr.length[g, i]} '
        f'and finish {tr.finish[g, i]}; a running response needs a length '
        f'in [0, {t}), a finished one in [0, {t}]')
  written = np.arange(t) < tr.length[..., None]
  if np.any((tr.version >= 0) != written):
    g, i = np.argwhere(np.any((tr.version >= 0) != written, -1))[0]
    raise ValueError(f'partial buffer: group {g} sample {i} has token '
                     'versions that do not match its length')


def concat(a: Groups, b: Groups) -> Groups:
  return jax.tree.map(lambda x, y: np.concatenate([np.asarray(x),
                                                   np.asarray(y)]), a, b)


def take(buf: PartialBuffer) -> tuple[Groups, PartialBuffer]:
  """Removes and returns every held group (oldest first)."""
  n = size(buf)
  held = select(buf.groups, np.arange(n))
  return held, buf._replace(count=np.zeros((), np.int32))


def put(buf: PartialBuffer, groups: Groups) -> PartialBuffer:
  """Appends `groups` after the held ones.

  Raises:
    ValueError: if the buffer would exceed its capacity.
  """
  n, add, cap = size(buf), len(groups.prompt_id), capacity(buf)
  if n + add > cap:
    raise ValueError(f'partial buffer overflow: {n} held + {add} new > '
                     f'capacity {cap}')
  rows = np.arange(n, n + add)

  def write(dst, src):
    dst = np.array(dst)  # A copy; `buf` is not mutated.
    dst[rows] = src
    return dst

  return PartialBuffer(count=np.asarray(n + add, np.int32),
                       groups=jax.tree.map(write, buf.groups, groups))
