"""Sampler: fake models of known output, filtering, layout, recompiles."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx import learner
from rlx import testing
from rlx.models import kv_cache
from rlx.models import transformer as tr
from rlx.sampling import sampler as sampler_lib
from rlx.types import FinishReason

V = 12
EOS = 2


def _fake_sampler(sequence, *, max_new_tokens, stop=(EOS,), sharpness=50.0):
  apply_fn, init_cache = testing.fixed_sequence_model(
      np.array(sequence), V, sharpness=sharpness)
  return sampler_lib.make_sampler(apply_fn, init_cache, sampler_lib.SamplerConfig(
      max_new_tokens=max_new_tokens, stop_tokens=stop))


def _prompts(b=2, p=4):
  toks = np.full((b, p), 0, np.int32)
  mask = np.zeros((b, p), bool)
  for i in range(b):  # Different prompt lengths per row.
    toks[i, p - 1 - i:] = 5
    mask[i, p - 1 - i:] = True
  return jnp.asarray(toks), jnp.asarray(mask)


def test_fake_model_output_and_logprobs_are_returned_exactly():
  seq = [7, 3, 9, EOS, 4, 4]
  sample = _fake_sampler(seq, max_new_tokens=6, sharpness=3.0)
  prompts, mask = _prompts()
  # top_k=1-like certainty via low temperature still records the tempered
  # distribution's log-prob; here use temperature 0.05 so sampling is
  # (numerically) greedy and check the logp of the chosen token.
  temp = 0.05
  out = sample(None, prompts, mask, jax.random.key(0), temp, 1.0,
               num_samples=3)
  chex.assert_shape(out.tokens, (2, 3, 6))
  expected = np.array([7, 3, 9, EOS, 0, 0])
  np.testing.assert_array_equal(out.tokens, np.broadcast_to(expected, (2, 3, 6)))
  np.testing.assert_array_equal(out.lengths, 4)
  np.testing.assert_array_equal(out.finish, int(FinishReason.STOP))
  np.testing.assert_array_equal(out.loss_mask[0, 0], [1, 1, 1, 1, 0, 0])
  logits = np.zeros(V)
  logits[7] = 3.0
  scaled = logits / temp
  ref_lp = scaled[7] - np.log(np.sum(np.exp(scaled - scaled.max()))) - scaled.max()
  np.testing.assert_allclose(out.logp[..., :4], ref_lp, atol=1e-5)
  np.testing.assert_array_equal(out.logp[..., 4:], 0.0)
  p = np.exp(scaled - scaled.max())
  p /= p.sum()
  ref_ent = -np.sum(p * np.log(np.maximum(p, 1e-30)))
  np.testing.assert_allclose(out.entropy[..., :4], ref_ent, atol=1e-5)
  np.testing.assert_array_equal(out.entropy[..., 4:], 0.0)


def test_behaviour_logprob_at_temperature_one():
  sample = _fake_sampler([6, EOS], max_new_tokens=4, sharpness=2.0)
  prompts, mask = _prompts(1)
  out = sample(None, prompts, mask, jax.random.key(1), 1.0, 1.0,
               num_samples=64)
  toks = np.asarray(out.tokens)[0, :, 0]
  lps = np.asarray(out.logp)[0, :, 0]
  z = np.log(np.exp(2.0) + (V - 1))
  for t, lp in zip(toks, lps):
    np.testing.assert_allclose(lp, (2.0 if t == 6 else 0.0) - z, atol=1e-5)
  # Some of 64 draws leave the mode at temperature 1 (p(6) ~ 0.4).
  assert 0 < np.mean(toks == 6) < 1


def test_length_limit_and_stop_tokens():
  sample = _fake_sampler([4, 5, 6, 7, 8, 9], max_new_tokens=3,
                         stop=(EOS, 6))
  prompts, mask = _prompts()
  out = sample(None, prompts, mask, jax.random.key(0), 0.01, 1.0,
               num_samples=1)
  np.testing.assert_array_equal(out.tokens[:, 0], [[4, 5, 6]] * 2)
  np.testing.assert_array_equal(out.finish, int(FinishReason.STOP))
  sample = _fake_sampler([4, 5, 6, 7], max_new_tokens=2)
  out = sample(None, prompts, mask, jax.random.key(0), 0.01, 1.0,
               num_samples=1)
  np.testing.assert_array_equal(out.tokens[:, 0], [[4, 5]] * 2)
  np.testing.assert_array_equal(out.finish, int(FinishReason.LENGTH))
  np.testing.assert_array_equal(out.lengths, 2)


def _np_filter(logits, temperature, top_p, top_k):
  """Independent numpy reference of temperature + top-k + top-p."""
  x = logits / temperature
  keep = np.ones_like(x, bool)
  if top_k:
    kth = np.sort(x)[::-1][top_k - 1]
    keep &= x >= kth
  order = np.argsort(-x)
  probs = np.exp(x - x.max()) * keep
  probs /= probs.sum()
  cum = 0.0
  nucleus = np.zeros_like(keep)
  for i in order:
    if not keep[i]:
      continue
    if cum < top_p:
      nucleus[i] = True
    cum += probs[i]
  return keep & nucleus


@pytest.mark.parametrize('temperature,top_p,top_k', [
    (1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 0.5, 0), (1.0, 1.0, 3),
    (0.8, 0.6, 4), (1.0, 0.01, 0)])
@pytest.mark.parametrize('jit', [False, True])
def test_process_logits_matches_numpy(temperature, top_p, top_k, jit):
  # jit: top_p is traced, so the nucleus branch is chosen at run time.
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, V)).astype(np.float32) * 2
  fn = functools.partial(sampler_lib.process_logits, top_k=top_k)
  sample_lp, behaviour = (jax.jit(fn) if jit else fn)(
      jnp.asarray(logits), jnp.float32(temperature), jnp.float32(top_p))
  if top_p == 1.0 and not top_k:  # Nothing filtered: the same array.
    np.testing.assert_array_equal(sample_lp, behaviour)
  for r in range(5):
    keep = _np_filter(logits[r], temperature, top_p, top_k)
    np.testing.assert_array_equal(np.isfinite(sample_lp[r]), keep)
    x = logits[r] / temperature
    ref = x - x.max() - np.log(np.sum(np.exp(x - x.max())))
    np.testing.assert_allclose(behaviour[r], ref, atol=1e-5)
    kept = np.where(keep, x, -np.inf)
    ref_s = kept - x.max() - np.log(np.sum(np.exp(kept - x.max())))
    np.testing.assert_allclose(sample_lp[r][keep], ref_s[keep], atol=1e-5)


def _np_nucleus(x, top_p):
  """float64 reference: token j stays iff the mass of tokens with larger
  logits is below top_p (ties stay or go together)."""
  x = x.astype(np.float64)
  probs = np.exp(x - x.max())
  probs /= probs.sum()
  return np.array([probs[x > xj].sum() < top_p for xj in x])


@pytest.mark.parametrize('case', ['normal', 'ties', 'masked', 'flat', 'peak'])
def test_nucleus_cutoff_matches_float64_reference(case):
  rng = np.random.default_rng(len(case))
  x = rng.normal(size=(6, 300)) * 3
  if case == 'ties':
    x = np.round(x)
  elif case == 'masked':  # Top-k left only some tokens finite.
    x[:, ::3] = -np.inf
  elif case == 'flat':
    x = np.zeros_like(x)
  elif case == 'peak':
    x[:, 7] = 60.0
  x = x.astype(np.float32)
  for top_p in (0.05, 0.3, 0.5, 0.9, 0.95):
    cutoff = jax.jit(sampler_lib.nucleus_cutoff)(x, jnp.float32(top_p))
    for r in range(x.shape[0]):
      np.testing.assert_array_equal(x[r] >= cutoff[r], _np_nucleus(
          x[r], top_p), err_msg=f'{case} top_p={top_p} row {r}')
      if case == 'flat':  # Every token ties: all stay.
        assert np.all(x[r] >= cutoff[r])
      if case == 'peak':  # One token holds all the mass.
        assert np.flatnonzero(x[r] >= cutoff[r]).tolist() == [7]


def _tiny_model():
  cfg = tr.TransformerConfig(vocab_size=V, num_layers=2, embed_dim=32,
                             num_heads=2, num_kv_heads=1, head_dim=16,
                             mlp_dim=64)
  model = tr.Transformer(cfg)
  return model, tr.init_params(cfg, jax.random.key(0))


def test_no_recompilation_across_calls_of_one_shape():
  model, params = _tiny_model()
  cfg = sampler_lib.SamplerConfig(max_new_tokens=5, stop_tokens=(EOS,))
  # One compilation traces the model twice (prefill and the loop body); a
  # second compilation would trace it a third time and fail here.
  apply = chex.assert_max_traces(
      lambda p, *a: model.apply({'params': p}, *a)[:2], n=2)
  init = lambda b, s: kv_cache.init_cache(num_layers=2, batch=b, length=s,
                                          num_kv_heads=1, head_dim=16)
  sample = sampler_lib.make_sampler(apply, init, cfg)
  prompts, mask = _prompts(2, 4)
  for i, (t, p) in enumerate([(1.0, 1.0), (0.5, 0.9), (2.0, 0.3)]):
    # New prompts, keys, temperatures and top-p: same compiled program.
    prompts = (prompts + i) % V
    sample(params, prompts, mask, jax.random.key(i), t, p, num_samples=2)


def test_learner_reproduces_behaviour_logprobs():
  model, params = _tiny_model()
  sample = sampler_lib.transformer_sampler(
      model, sampler_lib.SamplerConfig(max_new_tokens=8, stop_tokens=(EOS,)))
  prompts, mask = _prompts(3, 5)
  out = sample(params, prompts, mask, jax.random.key(3), 0.8, 0.95,
               num_samples=2)
  logits_fn = lambda p, *a: model.apply({'params': p}, *a)[0]
  logp, _ = learner.response_logprobs(
      logits_fn, params, jnp.repeat(prompts, 2, 0), jnp.repeat(mask, 2, 0),
      out.tokens.reshape(6, 8), temperature=0.8)
  m = np.asarray(out.loss_mask).reshape(6, 8)
  np.testing.assert_allclose(np.where(m, logp, 0),
                             np.asarray(out.logp).reshape(6, 8), atol=1e-4)


def test_shared_prefill_equals_prefilling_every_row():
  # Each prompt is prefilled once and its cache copied to its G rows: the
  # same rollout, token for token, as G prefilled copies of the prompt
  # (left padding of different lengths included).
  model, params = _tiny_model()
  sample = sampler_lib.transformer_sampler(
      model, sampler_lib.SamplerConfig(max_new_tokens=8, stop_tokens=(EOS,)))
  prompts, mask = _prompts(3, 5)
  mask = mask.at[0, :2].set(False)
  prompts = jnp.where(mask, prompts, 0)
  key = jax.random.key(4)
  shared = sample(params, prompts, mask, key, 1.0, 1.0, num_samples=4)
  each = sample(params, jnp.repeat(prompts, 4, 0), jnp.repeat(mask, 4, 0),
                key, 1.0, 1.0, num_samples=1)
  flat = lambda x: np.asarray(x).reshape((12,) + x.shape[2:])
  np.testing.assert_array_equal(flat(shared.tokens), flat(each.tokens))
  np.testing.assert_array_equal(flat(shared.lengths), flat(each.lengths))
  np.testing.assert_allclose(flat(shared.logp), flat(each.logp), atol=1e-6)
