"""Sequence packing for the learner: the forward pass over real tokens only.

A rollout batch `[B, G, T]` behind left-padded prompts `[B, P]` is mostly
padding: prompts are padded to the longest in the batch and responses to
the longest response (on chain_arith over half of the `B*G*(P+T)` slots),
and every response repeats its prompt.
`pack` lays the real tokens of every trained response into rows of length
`L = P + T - 1` (any one sequence fits a row), longest first, each after a
copy of its prompt already in the row when there is one (a bundle: one
prompt and some of its group's responses), else after a new copy:

    row:   [prompt_b | resp_b,0 | resp_b,3 | prompt_c | resp_c,1 | pad ...]
    bundle  1          1          1          2          2          0
    branch  0          1          4          0          2          0

A token attends to earlier tokens of its own bundle that are on the prompt
(branch 0) or on its own response (same branch), so every response sees
exactly its prompt and its own prefix, at the positions the sampler used
(counted over real tokens): the log-probs equal the unpacked forward's up
to float rounding (tests/test_packing.py). Only the response tokens whose
log-prob is needed are laid out: up to the last one in the loss mask, and
none of a sample outside the group mask. Response token t's log-prob is read
from the logits at the position before it (the prompt's last token for
t = 0), which `src` records.

Rows are split into `chunks`: chunk c packs the prompts
`[c * B/C, (c + 1) * B/C)`, so that micro-batches (which split the prompts)
and the batch sharding (which splits the leading axis) each get their own
rows. The row count per chunk is rounded up (`row_multiple`), so the train
step compiles once per bucket.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rlx import lm_head
from rlx import objectives
from rlx.types import Array


class Packed(NamedTuple):
  """A batch's real tokens in rows; see the module docstring."""
  tokens: Array  # [C, R, L] int32 model inputs (0 on padding).
  positions: Array  # [C, R, L] int32, counted over the sequence's tokens.
  bundle: Array  # [C, R, L] int32 prompt-sharing unit within a row, 1..;
  # 0 on padding.
  branch: Array  # [C, R, L] int32: 0 on a bundle's prompt, g + 1 on
  # response g.
  src: Array  # [B, G, T] int32 index r * L + l, within its chunk's rows, of
  # the position whose logits give response token t; -1: not laid out.


def needed_lengths(loss_mask: np.ndarray, group_mask: np.ndarray
                   ) -> np.ndarray:
  """`[B, G]` response tokens whose log-prob the loss can use: up to the
  last loss-mask token; 0 for samples outside the group mask."""
  t = loss_mask.shape[-1]
  last = np.where(loss_mask, np.arange(t), -1).max(-1)
  return np.where(group_mask, last + 1, 0).astype(np.int32)


def row_multiple(chunks: int) -> int:
  """Rows per chunk are rounded up to this: about 16 rows in all per bucket
  (finer buckets cost more compiles than they save)."""
  return max(1, 16 // chunks)


def max_rows(samples: int, chunks: int) -> int:
  """Rows per chunk at most (one per sample, rounded up): `pack`'s largest
  shape for `samples` responses in `chunks` chunks."""
  m = row_multiple(chunks)
  return -(-(samples // chunks) // m) * m


def pack(prompt: np.ndarray, prompt_mask: np.ndarray, response: np.ndarray,
         lengths: np.ndarray, *, chunks: int = 1) -> Packed:
  """Packs `[B, P]` left-padded prompts and `[B, G, T]` responses, of which
  the first `lengths[b, g]` tokens are needed, into `Packed` rows of
  `L = P + T - 1`.

  Args:
    prompt, prompt_mask: [B, P] left-padded prompt ids and real-token mask.
    response: [B, G, T] response ids.
    lengths: [B, G] needed response tokens per sample (0: skip it).
    chunks: C, which must divide B.
  """
  prompt, prompt_mask = np.asarray(prompt), np.asarray(prompt_mask, bool)
  response, lengths = np.asarray(response), np.asarray(lengths)
  b, g, t = response.shape
  p = prompt.shape[1]
  if b % chunks:
    raise ValueError(f'chunks={chunks} must divide the {b} prompts')
  if lengths.shape != (b, g) or lengths.min(initial=0) < 0 or (
      lengths.max(initial=0) > t):
    raise ValueError(f'lengths must be [{b}, {g}] in [0, {t}]; got shape '
                     f'{lengths.shape}, range [{lengths.min(initial=0)}, '
                     f'{lengths.max(initial=0)}]')
  empty = (prompt_mask.sum(1) == 0) & (lengths.max(1, initial=0) > 0)
  if empty.any():
    raise ValueError(f'prompts {np.flatnonzero(empty).tolist()} have no real '
                     'token (prompt_mask all False) but responses to train on')
  row_len = p + t - 1
  per = b // chunks
  src = np.full((b, g, t), -1, np.int32)
  packed_chunks = []
  for c in range(chunks):
    rows = _pack_chunk(prompt, prompt_mask, response, lengths, src,
                       range(c * per, (c + 1) * per), row_len)
    packed_chunks.append(rows)
  n_rows = max(1, max(len(r[0]) for r in packed_chunks))
  n_rows = -(-n_rows // row_multiple(chunks)) * row_multiple(chunks)
  out = np.zeros((4, chunks, n_rows, row_len), np.int32)
  for c, rows in enumerate(packed_chunks):
    for k, field in enumerate(rows):
      if field:
        out[k, c, :len(field)] = np.stack(field)
  return Packed(tokens=out[0], positions=out[1], bundle=out[2],
                branch=out[3], src=src)


def _pack_chunk(prompt, prompt_mask, response, lengths, src, prompts,
                row_len):
  """Packs one chunk's responses; fills `src` in place.

  First fit, longest response first: a response goes after its prompt in
  the first row that already holds that prompt and has room for it, else
  into the first row with room for a new copy of the prompt and it, else
  into a new row. Bundle tokens need not be contiguous (the mask uses bundle
  and branch ids), only the prompt must come first.

  Returns per-row lists (tokens, positions, bundle, branch) of [L] arrays.
  """
  fields = ([], [], [], [])  # tokens, positions, bundle, branch per row
  fill, bundles = [], []  # Per row: next free slot, bundles started.
  placed = {}  # prompt -> [(row, bundle id, slot of its last token)]
  real = {bi: prompt[bi][prompt_mask[bi]] for bi in prompts}
  todo = [(bi, gi) for bi in prompts for gi in np.nonzero(lengths[bi])[0]]
  todo.sort(key=lambda x: -lengths[x])  # Stable: ties keep batch order.

  def write(row, at, values, pos, bundle_id, branch_id):
    sl = slice(at, at + len(values))
    fields[0][row][sl], fields[1][row][sl] = values, pos
    fields[2][row][sl], fields[3][row][sl] = bundle_id, branch_id
    fill[row] = at + len(values)

  for bi, gi in todo:
    n, n_p = int(lengths[bi, gi]), len(real[bi])
    # Response inputs: its first n - 1 tokens (the last needed one is only
    # a target).
    spot = next(((r, k, last) for r, k, last in placed.get(bi, ())
                 if fill[r] + n - 1 <= row_len), None)
    if spot is None:
      row = next((r for r, used in enumerate(fill)
                  if used + n_p + n - 1 <= row_len), None)
      if row is None:
        for field in fields:
          field.append(np.zeros(row_len, np.int32))
        fill.append(0)
        bundles.append(0)
        row = len(fill) - 1
      bundles[row] += 1
      spot = (row, bundles[row], fill[row] + n_p - 1)
      write(row, fill[row], real[bi], np.arange(n_p), spot[1], 0)
      placed.setdefault(bi, []).append(spot)
    row, bundle_id, last_prompt = spot
    at = fill[row]
    write(row, at, response[bi, gi, :n - 1], n_p + np.arange(n - 1),
          bundle_id, gi + 1)
    src[bi, gi, 0] = row * row_len + last_prompt
    src[bi, gi, 1:n] = row * row_len + at + np.arange(n - 1)
  return fields


def attention_mask(bundle: Array, branch: Array) -> Array:
  """`[R, L] x2 -> [R, L, L]`: query q sees key k iff k <= q in the same
  bundle, on the prompt or on q's own response."""
  l = bundle.shape[-1]
  causal = jnp.arange(l)[None, :] <= jnp.arange(l)[:, None]  # [q, k]
  same = (bundle[:, :, None] == bundle[:, None, :]) & (
      bundle[:, None, :] > 0)
  visible = (branch[:, None, :] == 0) | (branch[:, None, :] ==
                                         branch[:, :, None])
  return same & visible & causal[None]


def logprobs(logits_fn, params, packed: Packed, response: Array, *,
             temperature=1.0, fill_logp: Array | None = None,
             split: lm_head.SplitLM | None = None, logits_chunk: int = 0
             ) -> tuple[Array, Array]:
  """Log-probs and entropies `[B, G, T]` of the responses from the packed
  forward; positions not laid out get `fill_logp` (default 0) and entropy 0.

  Args:
    logits_fn: `(params, tokens, positions, mask) -> logits` (no cache).
    params: model parameters.
    packed: the batch's `Packed` rows (`pack`), chunks leading.
    response: [B, G, T] the response ids (the log-prob targets).
    temperature: logits are divided by it (as in the sampler).
    fill_logp: [B, G, T] values for positions not laid out.
    split, logits_chunk: with `logits_chunk > 0`, the output projection runs
      on `logits_chunk` slots at a time (rlx/lm_head.py; `split` is the
      model split at it) instead of materialising `[slots, V]` logits.
  """
  c, r, l = packed.tokens.shape
  flat = lambda x: x.reshape(c * r, l)
  inputs = (flat(packed.tokens), flat(packed.positions),
            attention_mask(flat(packed.bundle), flat(packed.branch)))
  shape = response.shape
  src = packed.src.reshape(c, -1)
  idx = jnp.maximum(src, 0)
  targets = response.reshape(c, -1)
  if logits_chunk:
    hidden = split.hidden(params, *inputs)
    # Every chunk's slot indices are offset to its rows in the flat axis.
    slot = (idx + jnp.arange(c)[:, None] * (r * l)).reshape(-1)
    logp, ent = lm_head.logprobs(
        split, params, hidden.reshape(c * r * l, -1), slot,
        targets.reshape(-1), chunk=logits_chunk, temperature=temperature)
    logp, ent = logp.reshape(c, -1), ent.reshape(c, -1)
  else:
    logits = logits_fn(params, *inputs) / temperature
    logp_all = jax.nn.log_softmax(logits, axis=-1).reshape(c, r * l, -1)
    entropy = objectives.token_entropy(logits).reshape(c, r * l)
    logp = jax.vmap(lambda a, i, k: a[i, k])(logp_all, idx, targets)
    ent = jax.vmap(lambda e, i: e[i])(entropy, idx)
  laid = src >= 0
  fill = (jnp.zeros(shape, logp.dtype) if fill_logp is None
          else fill_logp).reshape(c, -1)
  logp = jnp.where(laid, logp, fill)
  ent = jnp.where(laid, ent, 0.0)
  return logp.reshape(shape), ent.reshape(shape)
