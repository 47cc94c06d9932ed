"""Sequence packing: the layout by hand, and log-probs equal to the padded
forward's (rlx/packing.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlx import learner
from rlx import packing
from rlx import sharding
from rlx import testing
from rlx import config as config_lib
from rlx import policy as policy_lib
from rlx import trainer
from rlx.models import transformer

V = 20


def test_pack_layout_by_hand():
  # P = 3, T = 4: rows of L = 6. Prompt 0 is [5, 6] (left-padded), prompt 1
  # is [7, 8, 9]. Needed tokens: (0,0) 3, (0,1) 1, (1,0) 4, (1,1) none.
  prompt = np.array([[0, 5, 6], [7, 8, 9]])
  prompt_mask = prompt > 0
  response = np.array([[[11, 12, 13, 14], [15, 16, 17, 18]],
                       [[21, 22, 23, 24], [25, 26, 27, 28]]])
  lengths = np.array([[3, 1], [4, 0]])
  pk = packing.pack(prompt, prompt_mask, response, lengths)
  # Longest first: (1,0) fills row 0 (3 prompt + 3 inputs); (0,0) opens
  # row 1 with prompt 0; (0,1) needs no input token and reuses that prompt.
  assert pk.tokens.shape == (1, 16, 6)  # Rows rounded up to 16.
  np.testing.assert_array_equal(pk.tokens[0, :2], [[7, 8, 9, 21, 22, 23],
                                                   [5, 6, 11, 12, 0, 0]])
  np.testing.assert_array_equal(pk.positions[0, :2], [[0, 1, 2, 3, 4, 5],
                                                      [0, 1, 2, 3, 0, 0]])
  np.testing.assert_array_equal(pk.bundle[0, :2], [[1, 1, 1, 1, 1, 1],
                                                   [1, 1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(pk.branch[0, :2], [[0, 0, 0, 1, 1, 1],
                                                   [0, 0, 1, 1, 0, 0]])
  assert not pk.bundle[0, 2:].any()
  # src: the slot (row * 6 + column) whose logits give each token.
  np.testing.assert_array_equal(pk.src[1, 0], [2, 3, 4, 5])
  np.testing.assert_array_equal(pk.src[0, 0], [7, 8, 9, -1])
  np.testing.assert_array_equal(pk.src[0, 1], [7, -1, -1, -1])
  np.testing.assert_array_equal(pk.src[1, 1], [-1] * 4)


def test_attention_mask_by_hand():
  # One row: prompt (bundle 1) | response 1 | response 2 | prompt of
  # bundle 2 | its response 1 | padding.
  bundle = jnp.array([[1, 1, 1, 1, 2, 2, 0]])
  branch = jnp.array([[0, 1, 2, 2, 0, 1, 0]])
  mask = np.asarray(packing.attention_mask(bundle, branch))[0].astype(int)
  np.testing.assert_array_equal(mask, [
      [1, 0, 0, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0, 0],
      [1, 0, 1, 0, 0, 0, 0],  # Response 2 skips response 1.
      [1, 0, 1, 1, 0, 0, 0],
      [0, 0, 0, 0, 1, 0, 0],  # Bundle 2 sees only itself.
      [0, 0, 0, 0, 1, 1, 0],
      [0, 0, 0, 0, 0, 0, 0],  # Padding attends nowhere.
  ])


def test_pack_rejects_bad_input():
  prompt, mask = np.ones((4, 3), int), np.ones((4, 3), bool)
  response = np.ones((4, 2, 5), int)
  with pytest.raises(ValueError, match='chunks=3 must divide the 4 prompts'):
    packing.pack(prompt, mask, response, np.ones((4, 2), int), chunks=3)
  with pytest.raises(ValueError, match=r'lengths must be \[4, 2\] in \[0, 5\]'):
    packing.pack(prompt, mask, response, np.full((4, 2), 6))
  mask[2] = False
  with pytest.raises(ValueError, match=r'prompts \[2\] have no real token'):
    packing.pack(prompt, mask, response, np.ones((4, 2), int))


def test_pack_nothing_to_train():
  # Every sample outside the group mask (or no loss token): one bucket of
  # empty rows, nothing laid out.
  pk = packing.pack(np.ones((2, 3), int), np.ones((2, 3), bool),
                    np.ones((2, 2, 4), int), np.zeros((2, 2), int))
  assert pk.tokens.shape == (1, 16, 6) and not pk.bundle.any()
  assert (pk.src == -1).all()


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  c = testing.tiny_config_dict(str(tmp_path_factory.mktemp('packing')))
  mod, logits_fn = policy_lib.build_model(config_lib.build(c), vocab_size=V)
  params = transformer.init_params(mod.cfg, jax.random.key(1))
  return logits_fn, params


@pytest.mark.parametrize('chunks', [1, 2, 3])
def test_packed_logprobs_equal_padded(model, chunks):
  logits_fn, params = model
  prompt, prompt_mask, response, lengths = testing.random_responses(
      chunks, vocab=V)
  b, g, t = response.shape
  pk = packing.pack(prompt, prompt_mask, response, lengths, chunks=chunks)
  # The case exercises sharing: a bundle with several responses, and rows
  # with several bundles.
  assert any(len(np.unique(pk.branch[c, r][pk.bundle[c, r] == k])) > 2
             for c in range(chunks) for r in range(pk.bundle.shape[1])
             for k in range(1, pk.bundle[c, r].max() + 1))
  assert (pk.bundle.max(-1) >= 2).any()
  fill = np.full((b, g, t), -7.0, np.float32)
  logp, ent = jax.jit(
      lambda pr, pk, r, f: packing.logprobs(logits_fn, pr, pk, r,
                                            temperature=0.7, fill_logp=f))(
                                                params, pk, response, fill)
  ref_logp, ref_ent = learner.response_logprobs(
      logits_fn, params, np.repeat(prompt, g, 0), np.repeat(prompt_mask, g, 0),
      response.reshape(b * g, t), temperature=0.7)
  needed = np.arange(t) < lengths[..., None]
  np.testing.assert_allclose(np.asarray(logp)[needed],
                             np.asarray(ref_logp).reshape(b, g, t)[needed],
                             atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(ent)[needed],
                             np.asarray(ref_ent).reshape(b, g, t)[needed],
                             atol=2e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(logp)[~needed], -7.0)
  np.testing.assert_array_equal(np.asarray(ent)[~needed], 0.0)
  # Nothing needed is left out, and every row slot is used at most once.
  assert (pk.src[needed] >= 0).all() and (pk.src[~needed] == -1).all()


def test_needed_lengths():
  loss_mask = np.array([[[1, 1, 0, 0], [0, 1, 0, 1]],
                        [[0, 0, 0, 0], [1, 1, 1, 1]]], bool)
  group_mask = np.array([[True, True], [True, False]])
  np.testing.assert_array_equal(
      packing.needed_lengths(loss_mask, group_mask), [[2, 4], [0, 0]])


@pytest.mark.parametrize('shape,micro,batch,want', [
    ((1, 1, 1), 1, 4, 1),
    ((1, 1, 1), 2, 4, 2),
    ((4, 2, 1), 1, 8, 8),  # Batch over data x fsdp: one chunk per shard.
    ((4, 2, 1), 2, 8, 0),  # 2 x 8 chunks do not divide 8 prompts: off.
    ((1, 1, 8), 2, 4, 2),  # Tensor parallelism does not split the batch.
])
def test_trainer_pack_chunks(tmp_path, shape, micro, batch, want):
  c = testing.tiny_config_dict(str(tmp_path))
  c.mesh.shape, c.optim.num_microbatches = shape, micro
  c.rl.batch_prompts = batch
  cfg = config_lib.build(c)
  plan = sharding.Plan.from_config(cfg.mesh)
  messages = []
  assert trainer._pack_chunks(cfg, plan, messages.append) == want
  assert bool(messages) == (want == 0)
  c.optim.packing = False
  assert trainer._pack_chunks(config_lib.build(c), plan, print) == 0
