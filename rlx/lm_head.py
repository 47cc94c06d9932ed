"""The learner's output projection in chunks (`optim.logits_chunk`).

The learner needs, per response token, its log-prob and the entropy of its
position's distribution. Computing them from the full logits materialises
`[positions, V]` floats (and as much again for the log-softmax and its
gradient): with a 150k-token vocabulary, 16k positions are 10 GB each. Here
the model stops at its final hidden states `[positions, D]`; each
position's log-normaliser and entropy are computed `chunk` positions at a
time under `jax.checkpoint` (the backward pass recomputes each chunk's
logits, so `[chunk, V]` is the largest temporary), and a token's logit is
the dot product of its position's hidden state with the token's output
embedding. Same values as the materialised path up to float rounding
(tests/test_lm_head.py); the same FLOPs.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from rlx.types import Array


class SplitLM(NamedTuple):
  """A language model split at its output projection."""
  hidden: Callable[..., Array]  # (params, tokens [R, L], positions [R, L],
  # mask [R, L, L]) -> final (normed) hidden states [R, L, D].
  unembedding: Callable[[Any], Array]  # params -> [V, D] output embeddings;
  # logits = hidden @ unembedding.T in `dtype`, then float32.
  dtype: Any  # The projection's matmul dtype (the model's `dtype`).


def position_stats(split: SplitLM, params, hidden: Array, *, chunk: int,
                   temperature) -> tuple[Array, Array]:
  """`hidden [N, D]` -> (log-normaliser, entropy) `[N]` of
  softmax(logits / temperature), `chunk` positions at a time."""
  n, d = hidden.shape
  out = split.unembedding(params).astype(split.dtype)
  pad = -n % chunk

  @jax.checkpoint
  def stats(h):
    logits = jnp.dot(h.astype(split.dtype), out.T).astype(jnp.float32)
    logits = logits / temperature
    lse = jax.nn.logsumexp(logits, axis=-1)
    logp = logits - lse[:, None]
    return lse, -jnp.sum(jnp.exp(logp) * logp, axis=-1)

  blocks = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(-1, chunk, d)
  lse, entropy = jax.lax.map(stats, blocks)
  return lse.reshape(-1)[:n], entropy.reshape(-1)[:n]


def token_logits(split: SplitLM, params, hidden: Array, tokens: Array, *,
                 temperature) -> Array:
  """`hidden [N, D]`, `tokens [N]` -> the logit of each token at its
  position, divided by the temperature, `[N]` float32."""
  rows = split.unembedding(params)[tokens].astype(split.dtype)
  logit = jnp.einsum('nd,nd->n', hidden.astype(split.dtype), rows,
                     preferred_element_type=jnp.float32)
  # Rounded like the projection's output (a no-op in float32).
  return logit.astype(split.dtype).astype(jnp.float32) / temperature


def logprobs(split: SplitLM, params, hidden: Array, slot: Array,
             tokens: Array, *, chunk: int, temperature
             ) -> tuple[Array, Array]:
  """Log-probs and entropies `[N]` of `tokens [N]`, token n read at
  position `slot[n]` of `hidden [S, D]` (several tokens may share one: a
  packed prompt's last position starts every response of its bundle)."""
  lse, entropy = position_stats(split, params, hidden, chunk=chunk,
                                temperature=temperature)
  logit = token_logits(split, params, hidden[slot], tokens,
                       temperature=temperature)
  return logit - lse[slot], entropy[slot]
