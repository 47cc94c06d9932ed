"""rollout.mode=tree: tree rollouts (`sampling.tree.TreeSampler`): W = G
leaves per prompt sharing decoded prefixes; their path ids reach the Batch
for the `tree` / `treerl` advantages. Needs the fixed allocator (one tree
of W leaves per prompt); samples on one device."""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlx import config as config_lib
from rlx import curriculum as curriculum_lib
from rlx import errors
from rlx.actor import Actor
from rlx.data import task as task_lib
from rlx.rollouts import base
from rlx.sampling import tree as tree_lib
from rlx.sampling import tree_rules

# rollout.tree fields that are not the sampler's (the trainer's own).
_TRAINER_FIELDS = ('mix', 'mix_end', 'mix_anneal_steps', 'stop_on_answer')


@config_lib.section('rollout.tree.treepo', renamed={k: k for k in (
    'segment_len', 'init_divergence', 'divergence', 'allocation', 'fallback',
    'repeat_ngram', 'repeat_count', 'stop_on_answer')})
@dataclasses.dataclass(frozen=True)
class TreepoConfig:
  """TreePO trees (rollout.tree.kind=treepo): rollout.tree.treepo.*."""
  segment_len: int = 8  # treepo: tokens decoded between branch decisions.
  init_divergence: int = 2  # treepo: paths the root opens with.
  divergence: int = 2  # treepo: most paths one live path becomes at a
  # segment boundary.
  allocation: str = 'even'  # treepo: unused budget split evenly over live
  # paths (even) or by their cumulative log-probs (logp).
  fallback: bool = True  # treepo: when every path of a prompt ended early,
  # re-branch from a finished one so it still gets W leaves.
  repeat_ngram: int = 0  # treepo: end a path that repeats an n-gram
  # (n <= this) repeat_count times in a row; 0: off.
  repeat_count: int = 4  # treepo: copies that count as a repetition.
  stop_on_answer: bool = False  # treepo: end a path at its first complete
  # \\boxed{...} answer (task.name=math_files; chain_arith answers already
  # end at the stop token).


@config_lib.section('rollout.tree.latr', renamed={k: k for k in (
    'chunk_steps', 'tau_abs', 'tau_rel', 'lookahead', 'prune_edit_dist',
    'max_branches', 'mix', 'mix_end', 'mix_anneal_steps')})
@dataclasses.dataclass(frozen=True)
class LatrConfig:
  """LATR trees (rollout.tree.kind=latr): rollout.tree.latr.*."""
  chunk_steps: int = 16  # latr: decode steps per jitted call.
  tau_abs: float = 0.15  # latr: branch iff p2 > tau_abs ...
  tau_rel: float = 0.25  # latr: ... and p1 - p2 < tau_rel (card: math).
  lookahead: tuple = (6, 12)  # latr: a child is compared with its parent
  # after this many own tokens (the card's 20..50 exceed most responses
  # here).
  prune_edit_dist: float = 0.4  # latr: prune a child whose normalised edit
  # distance to its parent's continuation is below this.
  max_branches: int = 0  # latr: branch events per prompt; 0: the budget W.
  mix: float = 1.0  # latr: share of each group grown as a tree at step 0
  # (the rest are independent samples).
  mix_end: float = 1.0  # latr: share after mix_anneal_steps (linear).
  mix_anneal_steps: int = 0  # latr: RL steps over which mix goes to
  # mix_end; 0: mix throughout.


@config_lib.section('rollout.tree.eptree', renamed={k: k for k in (
    'num_chains', 'fork_points', 'fork_branches', 'rounds', 'fork_score',
    'fork_distinct')})
@dataclasses.dataclass(frozen=True)
class EptreeConfig:
  """EPTree trees (rollout.tree.kind=eptree): rollout.tree.eptree.*."""
  num_chains: int = 2  # eptree M: independent chains per prompt.
  fork_points: int = 1  # eptree N: fork points per chain and round.
  fork_branches: int = 3  # eptree T: branches per fork point.
  rounds: int = 1  # eptree L: forking rounds; needs M <= W <= M (1 + L N T).
  fork_score: str = 'entropy'  # eptree: fork at the highest behaviour
  # entropy (entropy) or surprisal -logp (surprisal).
  fork_distinct: bool = False  # eptree: a branch's first token is sampled
  # without its parent's token there, so every branch diverges at its fork
  # (recorded log-probs stay the policy's: biased, like LATR's runner-up).


@config_lib.section('rollout.tree')
@dataclasses.dataclass(frozen=True)
class TreeRolloutConfig(config_lib.Section):
  """Tree rollouts (rollout.mode=tree; rlx/sampling/tree.py). Every prompt
  gets W = rl.group_size leaves; the defaults suit chain_arith's short
  responses (10..80 tokens). Each kind's knobs are in its own section
  (treepo, latr, eptree above)."""
  kind: str = 'treepo'  # treepo | latr | eptree (ALGORITHMS.md section D).


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
  rollout.tree.latr.mix to mix_end over mix_anneal_steps."""
  tr = cfg.rollout.tree.latr
  if not tr.mix_anneal_steps:
    return tr.mix
  frac = min(step / tr.mix_anneal_steps, 1.0)
  return tr.mix + (tr.mix_end - tr.mix) * frac


def tree_config(cfg, stop_tokens, pad_id: int) -> tree_lib.TreeConfig:
  """The sampler's flat TreeConfig: the fields of the same names of
  rollout.tree and its kinds' sections, and the run's budget and stop
  tokens."""
  tr = cfg.rollout.tree
  shared = {'kind': tr.kind}
  for section in (tr.treepo, tr.latr, tr.eptree):
    shared.update((f.name, getattr(section, f.name))
                  for f in dataclasses.fields(section)
                  if f.name not in _TRAINER_FIELDS)
  shared['lookahead'] = tuple(shared['lookahead'])
  return tree_lib.TreeConfig(
      max_new_tokens=cfg.sampling.max_new_tokens, stop_tokens=stop_tokens,
      pad_id=pad_id, top_k=cfg.sampling.top_k, **shared)


def tree_stop_fn(cfg, task):
  """TreePO's answer-found rule for the run
  (`rollout.tree.treepo.stop_on_answer`):
  a path ends where the task's answer is complete (math_files: its first
  \\boxed{...}). None when off."""
  if not cfg.rollout.tree.treepo.stop_on_answer:
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
  sections = {'treepo': tr.treepo, 'latr': tr.latr, 'eptree': tr.eptree}

  def knobs(*keys):  # (dotted key, value) of kind.field names.
    return [(f'rollout.tree.{k}', getattr(sections[k.split('.')[0]],
                                          k.split('.')[1])) for k in keys]
  errors.one_of(tr.kind, tree_lib.KINDS, 'rollout.tree.kind')
  for (key, value), known in zip(knobs('treepo.allocation',
                                       'eptree.fork_score'),
                                 (('even', 'logp'), ('entropy', 'surprisal'))):
    errors.one_of(value, known, key)
  for key, value in knobs('treepo.segment_len', 'treepo.init_divergence',
                          'treepo.divergence', 'latr.chunk_steps',
                          'eptree.num_chains', 'eptree.fork_points',
                          'eptree.fork_branches'):
    require(value >= 1, key, 'must be >= 1')
  for key, value in knobs('treepo.repeat_ngram', 'latr.max_branches',
                          'latr.mix_anneal_steps', 'eptree.rounds'):
    require(value >= 0, key, 'must be >= 0')
  require(tr.treepo.repeat_count >= 2, 'rollout.tree.treepo.repeat_count',
          'must be >= 2')
  ends = task_lib.TASKS.get(cfg.task.name).answer_end if (
      cfg.task.name in task_lib.TASKS) else False
  require(not tr.treepo.stop_on_answer or (tr.kind == 'treepo' and ends),
          'rollout.tree.treepo.stop_on_answer', 'is a TreePO rule for boxed '
          'answers: it needs rollout.tree.kind=treepo and task.name='
          f'math_files (are {tr.kind!r}, {cfg.task.name!r})')
  require(not tr.eptree.fork_distinct or tr.kind == 'eptree',
          'rollout.tree.eptree.fork_distinct', 'is an EPTree rule (forks '
          'inside a path): it needs rollout.tree.kind=eptree (is '
          f'{tr.kind!r})')
  for key, value in knobs('latr.mix', 'latr.mix_end', 'latr.tau_abs',
                          'latr.tau_rel'):
    require(0 <= value <= 1, key, f'{value} not in [0, 1]')
  latr = tr.latr
  require(latr.prune_edit_dist >= 0, 'rollout.tree.latr.prune_edit_dist',
          'must be >= 0')
  require(len(latr.lookahead) > 0 and all(
      isinstance(n, int) and n >= 1 for n in latr.lookahead),
          'rollout.tree.latr.lookahead', f'{latr.lookahead!r} must be '
          'positive token counts')
  if tr.kind == 'eptree':
    ep = tr.eptree
    m = ep.num_chains
    most = m * (1 + ep.rounds * ep.fork_points * ep.fork_branches)
    for key, w in curriculum_lib.group_sizes(cfg):
      require(m <= w <= most, key, f'{w} leaves per prompt must be in '
              f'[M, M (1 + L N T)] = [{m}, {most}] for eptree '
              '(rollout.tree.eptree.num_chains, rounds, fork_points, '
              'fork_branches)')
