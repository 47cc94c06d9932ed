"""Tree rollouts vs independent sampling at equal leaves per prompt.

  python scripts/bench_tree.py --prompts=16 --leaves=8 --steps=2

Workload: the warm-started default chain_arith policy (configs default,
`warmstart.load_or_train`, reused from its cache) sampling its own
responses at temperature 1 on training prompts; every mode gets the same
prompts, --leaves responses (leaves) per prompt and the response budget T
of the default config:

  independent  the static jitted sampler (rlx.sampling.sampler), G = W;
  treepo       segment trees (--segment_len, --init_divergence,
               --divergence), budget re-spent, fallback re-branching;
  latr         top-2 branching with lookahead pruning (--tau_abs, --tau_rel,
               --lookahead, --prune_edit_dist, --mix);
  eptree       M chains forked at their N most uncertain tokens into T
               branches for L rounds (--num_chains, --fork_points,
               --fork_branches, --rounds); needs W = M (1 + L N T) or less;
               --fork_distinct: every branch's first token differs from its
               parent's there.

Prints, per mode, decoded tokens per leaf (forward passes the model made,
shared prefixes counted once; for independent sampling the sum of the
response lengths), their ratio to independent sampling, wall seconds per
step (after one untimed compile step) and its ratio, and tree metrics. The
leaf reward is the mean reward of the sampled leaves under the fixed
warm-started policy (no training): it shows how branching shifts the
sampled distribution, it is not the held-out pass@1 after RL.

--rl_steps > 0 runs the RL comparison instead (held-out pass@1 after that
many RL steps with each tree kind against independent sampling, the
issue's second acceptance number): it hands over to
scripts/bench_rl_modes.py with --modes=static,<kinds> and --seeds.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import numpy as np

from rlx import config as config_lib
from rlx import policy as policy_lib
from rlx.models import transformer
from rlx.rewards import chain_arith as chain_arith_reward
from rlx.sampling import sampler as sampler_lib
from rlx.sampling import tree

_PROMPTS = flags.DEFINE_integer('prompts', 16, 'B: prompts per step.')
_LEAVES = flags.DEFINE_integer('leaves', 8, 'W: leaves (responses) per '
                               'prompt, the same for every mode.')
_STEPS = flags.DEFINE_integer('steps', 2, 'Timed steps per mode (after one '
                              'untimed warm-up step).')
_KINDS = flags.DEFINE_list('kinds', list(tree.KINDS), 'Tree kinds to run.')
_SEGMENT = flags.DEFINE_integer('segment_len', 8, 'TreePO segment length.')
_INIT_DIV = flags.DEFINE_integer('init_divergence', 2, 'TreePO first '
                                 'fan-out.')
_DIV = flags.DEFINE_integer('divergence', 2, 'TreePO paths per path per '
                            'boundary.')
_TAU_ABS = flags.DEFINE_float('tau_abs', 0.15, 'LATR: p2 > tau_abs.')
_TAU_REL = flags.DEFINE_float('tau_rel', 0.25, 'LATR: p1 - p2 < tau_rel.')
_LOOKAHEAD = flags.DEFINE_list('lookahead', ['6', '12'], 'LATR pruning '
                               'checkpoints (own tokens of a child).')
_PRUNE = flags.DEFINE_float('prune_edit_dist', 0.4, 'LATR: prune below '
                            'this normalised edit distance.')
_MIX = flags.DEFINE_float('mix', 1.0, 'LATR: tree fraction of each group.')
_CHAINS = flags.DEFINE_integer('num_chains', 2, 'EPTree M.')
_POINTS = flags.DEFINE_integer('fork_points', 1, 'EPTree N.')
_BRANCHES = flags.DEFINE_integer('fork_branches', 3, 'EPTree T.')
_ROUNDS = flags.DEFINE_integer('rounds', 1, 'EPTree L.')
_DISTINCT = flags.DEFINE_bool('fork_distinct', False, 'EPTree: branches '
                              'diverge at their fork (with --rl_steps: the '
                              'eptree_distinct mode instead of eptree).')
_RL_STEPS = flags.DEFINE_integer('rl_steps', 0, 'RL steps per mode before '
                                 'a held-out pass@1 (through '
                                 'scripts/bench_rl_modes.py); 0: sampling '
                                 'only.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1'], 'RL seeds (--rl_steps).')


def _setup():
  cfg = config_lib.build(config_lib.default_config_dict())
  return (cfg, *policy_lib.warm_started_policy(cfg))


def _distinct(kind: str) -> bool:
  """--fork_distinct applies to this kind (an EPTree rule)."""
  return _DISTINCT.value and kind == 'eptree'


def _tree_cfg(kind, cfg, tok) -> tree.TreeConfig:
  return tree.TreeConfig(
      kind=kind, max_new_tokens=cfg.sampling.max_new_tokens,
      stop_tokens=(tok.eos_id,), pad_id=tok.pad_id,
      segment_len=_SEGMENT.value, init_divergence=_INIT_DIV.value,
      divergence=_DIV.value, tau_abs=_TAU_ABS.value, tau_rel=_TAU_REL.value,
      lookahead=tuple(int(x) for x in _LOOKAHEAD.value),
      prune_edit_dist=_PRUNE.value, num_chains=_CHAINS.value,
      fork_points=_POINTS.value, fork_branches=_BRANCHES.value,
      rounds=_ROUNDS.value, fork_distinct=_distinct(kind))


def _rewards(task, idx, tokens, mask) -> float:
  """Mean reward of the valid leaves [B, W]."""
  tok = task.tokenizer
  texts = [tok.decode(row) for group in np.asarray(tokens) for row in group]
  answers = [task.train.answers[i] for i in idx for _ in range(tokens.shape[1])]
  r = task.reward_fn(texts, answers).reshape(mask.shape)
  return float(r[mask].mean())


def _run_mode(name, sample, task) -> dict:
  """Warm-up + timed steps; `sample(idx, key) -> (tokens [B, W, T], leaf
  mask [B, W], decoded tokens, metrics)`."""
  b = _PROMPTS.value
  sample(np.arange(b) % len(task.train), jax.random.key(0))  # Compiles.
  decoded = leaves = 0
  reward, metrics = [], {}
  start = time.perf_counter()
  for i in range(1, _STEPS.value + 1):
    idx = np.arange(i * b, (i + 1) * b) % len(task.train)
    tokens, mask, n, metrics = sample(idx, jax.random.key(i))
    decoded, leaves = decoded + n, leaves + int(mask.sum())
    reward.append(_rewards(task, idx, tokens, mask))
  seconds = (time.perf_counter() - start) / _STEPS.value
  return {'name': name, 'per_leaf': decoded / leaves, 's_step': seconds,
          'reward': float(np.mean(reward)), **metrics}


def main(argv):
  del argv
  if _RL_STEPS.value:  # The trainer with rollout.mode=tree per kind.
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          'bench_rl_modes.py')
    kinds = [k + '_distinct' * _distinct(k) for k in _KINDS.value]
    os.execv(sys.executable, [
        sys.executable, script, f'--rl_steps={_RL_STEPS.value}',
        '--modes=' + ','.join(['static'] + kinds),
        '--seeds=' + ','.join(_SEEDS.value)])
  cfg, task, model, params = _setup()
  tok, w = task.tokenizer, _LEAVES.value
  prompts, pmask = task.train_prompts, task.train_prompt_mask
  print(f'device: {jax.devices()[0].device_kind}; model '
        f'{transformer.count_params(params):,} parameters; {_PROMPTS.value} '
        f'prompts x {w} leaves; T={cfg.sampling.max_new_tokens}; '
        f'{_STEPS.value} timed steps')

  static = sampler_lib.transformer_sampler(model, sampler_lib.SamplerConfig(
      max_new_tokens=cfg.sampling.max_new_tokens, stop_tokens=(tok.eos_id,),
      pad_id=tok.pad_id))

  def independent(idx, key):
    out = static(params, prompts[idx], pmask[idx], key, 1.0, 1.0,
                 num_samples=w)
    lengths = np.asarray(out.lengths)
    distinct = np.mean([len({answer(x) for x in group})
                        for group in np.asarray(out.tokens)])
    return (out.tokens, lengths > 0, int(lengths.sum()),
            {'tree/distinct_answers': float(distinct)})

  answer = lambda x: chain_arith_reward.extract_answer(tok.decode(x))
  rows = [_run_mode('independent', independent, task)]
  for kind in _KINDS.value:
    sampler = tree.transformer_tree_sampler(
        model, _tree_cfg(kind, cfg, tok), answer_fn=answer)

    def run(idx, key, sampler=sampler):
      out = sampler(params, prompts[idx], pmask[idx], key, 1.0,
                    num_leaves=w, mix=_MIX.value)
      return (out.rollout.tokens, np.asarray(out.leaf_mask),
              out.decoded_tokens, out.metrics)

    rows.append(_run_mode(kind + '_distinct' * _distinct(kind), run, task))

  base = rows[0]
  print('\n| mode | decoded tok/leaf | x indep. | s/step | x indep. | '
        'shared prefix | depth max/mean | distinct answers | leaf reward |')
  print('|---|---|---|---|---|---|---|---|---|')
  for row in rows:
    tree_cols = ('| 0 | 0/0 ' if row['name'] == 'independent' else
                 f"| {row['tree/shared_prefix_frac']:.2f} | "
                 f"{row['tree/depth_max']:.0f}/{row['tree/depth_mean']:.1f} ")
    tree_cols += f"| {row['tree/distinct_answers']:.2f} "
    print(f"| {row['name']} | {row['per_leaf']:.1f} | "
          f"{row['per_leaf'] / base['per_leaf']:.2f} | {row['s_step']:.2f} | "
          f"{row['s_step'] / base['s_step']:.2f} {tree_cols}| "
          f"{row['reward']:.3f} |")
  for row in rows[1:]:
    extra = {k: v for k, v in row.items() if k.startswith('tree/') and k
             not in ('tree/shared_prefix_frac', 'tree/depth_max',
                     'tree/depth_mean', 'tree/distinct_answers')}
    print(f"{row['name']} (last step): " + ', '.join(
        f"{k[5:]} {v:.2f}" for k, v in extra.items()))
  print('held-out pass@1 after RL steps: --rl_steps=N (runs '
        'scripts/bench_rl_modes.py)')


if __name__ == '__main__':
  app.run(main)
