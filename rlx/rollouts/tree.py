"""rollout.mode=tree: tree rollouts (`sampling.tree.TreeSampler`): W = G
leaves per prompt sharing decoded prefixes; their path ids reach the Batch
for the `tree` / `treerl` advantages. Needs the fixed allocator (one tree
of W leaves per prompt); samples on one device."""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlx import curriculum as curriculum_lib
from rlx import errors
from rlx.actor import Actor
from rlx.data import task as task_lib
from rlx.rollouts import base
from rlx.sampling import tree as tree_lib
from rlx.sampling import tree_rules

# rollout.tree fields that are not the sampler's (the trainer's own).
_TRAINER_FIELDS = ('mix', 'mix_end', 'mix_anneal_steps', 'stop_on_answer')


class TreeRows(NamedTuple):
  """A tree rollout as the curriculum sees it: the sampler's Rollout fields
  (non-leaf slots are RUNNING, so the curriculum drops them) plus the
  per-leaf tree for the advantages."""
  tokens: jax.Array  # [B, W, T]
  loss_mask: jax.Array  # [B, W, T]
  logp: jax.Array  # [B, W, T]
  entropy: jax.Array  # [B, W, T]
  lengths: jax.Array  # [B, W]
  finish: jax.Array  # [B, W]
  path_ids: jax.Array  # [B, W, W]
  depth_start: jax.Array  # [B, W, W]


def latr_mix(cfg, step: int) -> float:
  """LATR's tree share at RL step `step`, annealed linearly from
  rollout.tree.mix to mix_end over mix_anneal_steps."""
  tr = cfg.rollout.tree
  if not tr.mix_anneal_steps:
    return tr.mix
  frac = min(step / tr.mix_anneal_steps, 1.0)
  return tr.mix + (tr.mix_end - tr.mix) * frac


def tree_config(cfg, stop_tokens, pad_id: int) -> tree_lib.TreeConfig:
  """The sampler's TreeConfig: rollout.tree's fields of the same names,
  and the run's budget and stop tokens."""
  tr = cfg.rollout.tree
  shared = {f.name: getattr(tr, f.name) for f in dataclasses.fields(tr)
            if f.name not in _TRAINER_FIELDS}
  shared['lookahead'] = tuple(shared['lookahead'])
  return tree_lib.TreeConfig(
      max_new_tokens=cfg.sampling.max_new_tokens, stop_tokens=stop_tokens,
      pad_id=pad_id, top_k=cfg.sampling.top_k, **shared)


def tree_stop_fn(cfg, task):
  """TreePO's answer-found rule for the run (`rollout.tree.stop_on_answer`):
  a path ends where the task's answer is complete (math_files: its first
  \\boxed{...}). None when off."""
  if not cfg.rollout.tree.stop_on_answer:
    return None
  return tree_rules.text_stop_fn(task.tokenizer.decode, task.answer_end_fn)


@base.MODES.register('tree')
class Tree(base.CurriculumMode):
  """The tree sampler behind the curriculum."""
  # It counts its decoded tokens itself (shared prefixes once), so the
  # analysis bounds' uncharged tokens could not be split off.
  curriculum_tallies = False

  def __init__(self, cfg, *, model, task, curriculum, actor):
    super().__init__(cfg, model=model, task=task, curriculum=curriculum,
                     actor=actor)
    tok = task.tokenizer
    # The task's answer rule: distinct answers, not distinct texts, where
    # the task has one.
    answer = None
    if task.answer_key_fn is not None:
      answer = lambda x: task.answer_key_fn(tok.decode(x))
    self._tree = tree_lib.transformer_tree_sampler(
        model, tree_config(cfg, actor.stop_tokens, tok.pad_id),
        answer_fn=answer, stop_fn=tree_stop_fn(cfg, task))
    s = cfg.sampling
    self.actor = Actor(model, task, s.max_new_tokens, top_k=s.top_k,
                       sampler=self._sample)

  @classmethod
  def batch_fields(cls, cfg, b, g):
    spec = jax.ShapeDtypeStruct((b, g, g), jnp.int32)
    return {'path_ids': spec, 'depth_start': spec}

  @staticmethod
  def check(cfg):
    _check_tree(cfg)

  def collect(self, params, state, request):
    return super().collect(base.one_device(params), state, request)

  def start_step(self, params, request):
    self._step, self._decoded, self._calls = request.step, 0, []

  def _sample(self, params, prompts, prompt_mask, key, temperature,
              top_p=1.0, *, num_samples):
    out = self._tree(params, prompts, prompt_mask, key, temperature, top_p,
                     num_leaves=num_samples,
                     mix=latr_mix(self.cfg, self._step))
    self._decoded += out.decoded_tokens
    self._calls.append(out.metrics)
    return TreeRows(*out.rollout, path_ids=out.path_ids,
                    depth_start=out.depth_start)

  def step_metrics(self, groups):
    # Forward passes of live slots: shared prefixes count once.
    groups.decoded_tokens = self._decoded
    return {**base.mean_metrics(self._calls),
            'tree/decoded_tokens': float(self._decoded)}


def _check_tree(cfg) -> None:
  tr = cfg.rollout.tree
  require = errors.require
  require(cfg.curriculum.allocator == 'fixed', 'curriculum.allocator',
          f'{cfg.curriculum.allocator!r} is not supported with '
          "rollout.mode=tree (needs 'fixed': a tree has W = rl.group_size "
          'leaves)')
  for key, known in (('kind', tree_lib.KINDS),
                     ('allocation', ('even', 'logp')),
                     ('fork_score', ('entropy', 'surprisal'))):
    errors.one_of(getattr(tr, key), known, f'rollout.tree.{key}')
  for key in ('segment_len', 'init_divergence', 'divergence', 'chunk_steps',
              'num_chains', 'fork_points', 'fork_branches'):
    require(getattr(tr, key) >= 1, f'rollout.tree.{key}', 'must be >= 1')
  for key in ('repeat_ngram', 'max_branches', 'mix_anneal_steps', 'rounds'):
    require(getattr(tr, key) >= 0, f'rollout.tree.{key}', 'must be >= 0')
  require(tr.repeat_count >= 2, 'rollout.tree.repeat_count', 'must be >= 2')
  ends = task_lib.TASKS.get(cfg.task.name).answer_end if (
      cfg.task.name in task_lib.TASKS) else False
  require(not tr.stop_on_answer or (tr.kind == 'treepo' and ends),
          'rollout.tree.stop_on_answer', 'is a TreePO rule for boxed '
          'answers: it needs rollout.tree.kind=treepo and task.name='
          f'math_files (are {tr.kind!r}, {cfg.task.name!r})')
  require(not tr.fork_distinct or tr.kind == 'eptree',
          'rollout.tree.fork_distinct', 'is an EPTree rule (forks inside a '
          f'path): it needs rollout.tree.kind=eptree (is {tr.kind!r})')
  for key in ('mix', 'mix_end', 'tau_abs', 'tau_rel'):
    value = getattr(tr, key)
    require(0 <= value <= 1, f'rollout.tree.{key}', f'{value} not in [0, 1]')
  require(tr.prune_edit_dist >= 0, 'rollout.tree.prune_edit_dist',
          'must be >= 0')
  require(len(tr.lookahead) > 0 and all(
      isinstance(n, int) and n >= 1 for n in tr.lookahead),
          'rollout.tree.lookahead', f'{tr.lookahead!r} must be positive '
          'token counts')
  if tr.kind == 'eptree':
    m = tr.num_chains
    most = m * (1 + tr.rounds * tr.fork_points * tr.fork_branches)
    for key, w in curriculum_lib.group_sizes(cfg):
      require(m <= w <= most, key, f'{w} leaves per prompt must be in '
              f'[M, M (1 + L N T)] = [{m}, {most}] for eptree '
              '(rollout.tree.num_chains, rounds, fork_points, '
              'fork_branches)')
