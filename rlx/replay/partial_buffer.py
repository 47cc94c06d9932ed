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
from rlx.types import Array


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
