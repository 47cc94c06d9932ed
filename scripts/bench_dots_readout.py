r"""How well do prompt embeddings predict the warm start's pass rates?

  python scripts/bench_dots_readout.py --config=grpo_hardmix \
      --workdir=runs/bench_dots_readout

DOTS (`curriculum.selector=dots`) predicts each prompt's pass rate from
reference prompts whose rates were measured, and draws prompts with
P ~ exp(-|p_hat - 0.5| / tau). This bench measures the prediction without
any RL: the recipe's warm start samples --samples responses to --prompts
train prompts (cached in --workdir), every prompt is embedded as the
trainer embeds it (mean final hidden state over the prompt, centred over
the sampled prompts and normalised: `dots.similarity=cosine`), and then

- open loop: R random prompts serve as references, the rest are predicted
  by attention (`dots.readout=attention`, inverse temperature --scale) and
  by the ridge probe (`dots.readout=ridge`, each --lams), --repeats random
  splits per R. Reported: the correlation of predicted and measured rates,
  and the fraction of all-equal groups (all --samples responses right or
  all wrong) expected among prompts drawn with the selector's weights (the
  waste DOTS exists to avoid; 'uniform' is the fraction over all prompts).
- closed loop: --sim_steps steps of --sim_batch prompts drawn from those
  not drawn yet, each step's prompts becoming the newest references (at
  most --sim_refs), as `dots.refs=history` does; a drawn prompt's rate is
  its measured one. Reported: the all-equal fraction of the draws, per
  quarter of the steps, mean over --sim_seeds. The policy does not change
  here, unlike in training, and drawing without replacement uses up the
  learnable middle of a finite sample (on the hard mix about a quarter of
  the prompts): keep sim_steps x sim_batch well below --prompts / 4.
  --halflives adds ridge (lambda 1) loops whose references weigh 0.5^(k /
  half-life) by recency (`dots.ref_halflife`); with a fixed policy this
  shows only what forgetting costs, not what it gains when pass rates move.

--checkpoint=RUN_DIR measures the pass rates under the policy a trainer
run saved (its latest checkpoint, or --checkpoint_step) instead of the
warm start, so every table shows the prompts as they look late in a run;
the embeddings stay the warm start's, as the trainer's DOTS keeps them
unless `dots.embed_every` is set (--embed_policy: that policy's instead).

Both readouts are rlx's own (`rlx.curriculum.selectors.dots_predict` for
attention, `ridge_readout` for the probe).

Last, the likelihood selector's estimate (`curriculum.selector=likelihood`):
q = the policy's probability of sampling each prompt's reference solution
(`policy_lib.reference_logprob_fn`, under the same policy as the rates), its
correlation with the measured rates, the all-equal fraction of draws
weighted as above, and of the B = --sim_batch most mixed by q(1 - q) among
16 B uniform candidates (the selector's default K), mean over 2000 draws.
"""

import hashlib
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from rlx import checkpoint
from rlx import config as config_lib
from rlx import policy as policy_lib
from rlx.actor import Actor
from rlx.curriculum import dots as sel

_CONFIG = flags.DEFINE_string('config', 'grpo_hardmix', 'configs/<name>.py')
_PROMPTS = flags.DEFINE_integer('prompts', 4096, 'Train prompts sampled.')
_SAMPLES = flags.DEFINE_integer('samples', 8, 'Responses per prompt.')
_REFS = flags.DEFINE_list('refs', ['16', '64', '256'], 'Reference set sizes.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Random splits per size.')
_LAMS = flags.DEFINE_list('lams', ['0.1', '0.3', '1', '3'], 'Ridge lambdas.')
_SCALE = flags.DEFINE_float('scale', 20.0, 'Attention inverse temperature '
                            '(dots.cosine_scale).')
_TAU = flags.DEFINE_float('tau', 0.1, 'Selection temperature (dots.tau).')
_SIM_STEPS = flags.DEFINE_integer('sim_steps', 64, 'Closed-loop steps.')
_SIM_BATCH = flags.DEFINE_integer('sim_batch', 8, 'Prompts per step.')
_SIM_REFS = flags.DEFINE_integer('sim_refs', 256, 'References kept '
                                 '(dots.history_refs).')
_SIM_SEEDS = flags.DEFINE_integer('sim_seeds', 6, 'Closed-loop seeds.')
_HALFLIVES = flags.DEFINE_list('halflives', ['0'], 'Closed loop: ridge '
                               'reference half-lives '
                               '(dots.ref_halflife; 0: equal weights).')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/bench_dots_readout',
                               'Where the sampled rates are cached.')
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', '', 'A trainer run of the same config (its workdir or '
    'its checkpoints folder): pass rates under its saved policy; empty: '
    'the warm start.')
_CHECKPOINT_STEP = flags.DEFINE_integer(
    'checkpoint_step', 0, 'Which step of --checkpoint (0: the latest).')
_EMBED_POLICY = flags.DEFINE_bool(
    'embed_policy', False, "Embed the prompts by --checkpoint's policy (what "
    '`dots.embed_every` would give at that step) instead of the warm start.')


def measure(cfg, path: str, saved: tuple[str, int] | None):
  """(pass rate [n], embedding [n, D], chain steps [n], reference-solution
  log-probability [n]) of random train prompts: rates and log-probabilities
  under the warm start or the policy `saved` (checkpoints folder, step) by
  a run (rates cached in `path`), embeddings by the warm start or, with
  --embed_policy, by that policy."""
  task, model, params = policy_lib.warm_started_policy(cfg)
  cached = os.path.exists(path)
  policy = params
  if saved is not None:
    policy = checkpoint.run_params(*saved, params)
  if cached:
    d = np.load(path)
    ids, rates = d['ids'], d['rates']
  else:
    n, g, batch = _PROMPTS.value, _SAMPLES.value, 64
    ids = np.random.default_rng(0).choice(len(task.train), n, replace=False)
    actor = Actor(model, task, cfg.sampling.max_new_tokens)
    rates = np.zeros(n)
    for s in range(0, n, batch):
      idx = ids[s:s + batch]
      scored = actor.rollout(
          policy, task.train_prompts[idx], task.train_prompt_mask[idx],
          [task.train.answers[i] for i in idx], jax.random.key(s),
          num_samples=g, temperature=cfg.sampling.temperature)
      rates[s:s + batch] = (np.asarray(scored.rewards) > 0.5).mean(-1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, ids=ids, rates=rates)
  embed = policy_lib.prompt_embed_fn(model, task)(  # pylint: disable=protected-access
      policy if _EMBED_POLICY.value else params, ids)
  _, logits_fn = policy_lib.build_model(cfg, task.tokenizer.vocab_size)
  loglik = policy_lib.reference_logprob_fn(
      cfg, logits_fn, policy_lib.split_model(model), task, len(task.train))(
          policy, ids)
  return (rates, np.asarray(embed), np.asarray(task.train.num_steps)[ids],
          loglik)


def predict(embed, refs, rates, readout: str, lam: float,
            halflife: float = 0.0) -> np.ndarray:
  """p_hat [n] from references `refs` (newest first) with their measured
  rates; a ridge half-life weighs them by recency as
  `dots_history_predict` does."""
  if readout == 'attention':
    dots = sel.DotsState(jnp.asarray(embed, jnp.float32),
                         jnp.asarray(refs, jnp.int32),
                         jnp.asarray(rates[refs], jnp.float32))
    return np.asarray(sel.dots_predict(dots, _SCALE.value))
  weight = None
  if halflife > 0:
    weight = jnp.asarray(0.5 ** (np.arange(len(refs)) / halflife),
                         jnp.float32)
  return np.asarray(sel.ridge_readout(
      jnp.asarray(embed, jnp.float32), jnp.asarray(refs, jnp.int32),
      jnp.asarray(rates[refs], jnp.float32), jnp.ones(len(refs), bool), lam,
      weight)[0])


def weights(p: np.ndarray) -> np.ndarray:
  w = np.exp(-np.abs(p - 0.5) / _TAU.value)
  return w / w.sum()


def main(argv):
  del argv
  cfg = config_lib.build(
      importlib.import_module(f'configs.{_CONFIG.value}').get_config())
  if _EMBED_POLICY.value and not _CHECKPOINT.value:
    raise app.UsageError('--embed_policy needs --checkpoint')
  name = f'{_CONFIG.value}_n{_PROMPTS.value}_g{_SAMPLES.value}'
  saved = None
  if _CHECKPOINT.value:  # One cache per run and step.
    saved = checkpoint.run_step(_CHECKPOINT.value, _CHECKPOINT_STEP.value)
    folder, step = saved
    name += f'_ck{step}_' + hashlib.sha1(folder.encode()).hexdigest()[:10]
  rates, embed, steps, loglik = measure(
      cfg, os.path.join(_WORKDIR.value, name + '.npz'), saved)
  embed = np.asarray(sel.centre_and_normalise(jnp.asarray(embed,
                                                        jnp.float32)))
  n = len(rates)
  same = (rates == 0) | (rates == 1)
  print(f'{n} prompts x {_SAMPLES.value} samples; all-equal groups '
        f'{same.mean():.3f}\n\n| chain steps | prompts | pass rate | '
        'all-equal | all right | all-equal if every prompt had the '
        'mean rate |\n|---|---|---|---|---|---|')
  for k in np.unique(steps):
    m = steps == k
    mean = rates[m].mean()
    print(f'| {k} | {m.sum()} | {mean:.3f} | {same[m].mean():.3f} | '
          f'{(rates[m] == 1).mean():.3f} | '
          f'{mean ** _SAMPLES.value + (1 - mean) ** _SAMPLES.value:.3f} |')

  readouts = [('attention', 0.0)] + [('ridge', float(x)) for x in _LAMS.value]
  print('\nOpen loop: all-equal fraction of weighted draws (correlation of '
        'prediction and rate), mean over splits\n')
  print('| references | uniform | ' + ' | '.join(
      'attention' if r == 'attention' else f'ridge {lam:g}'
      for r, lam in readouts) + ' | true rates |')
  print('|---' * (len(readouts) + 3) + '|')
  rng = np.random.default_rng(1)
  for size in (int(x) for x in _REFS.value):
    cells = {x: [] for x in readouts}
    base, best = [], []
    for _ in range(_REPEATS.value):
      refs = rng.choice(n, size, replace=False)
      test = np.setdiff1d(np.arange(n), refs)
      base.append(same[test].mean())
      best.append(weights(rates[test]) @ same[test])
      for readout, lam in readouts:
        p = predict(embed, refs, rates, readout, lam)[test]
        cells[(readout, lam)].append(
            (weights(p) @ same[test], np.corrcoef(p, rates[test])[0, 1]))
    row = [f'{np.mean(v, 0)[0]:.3f} ({np.mean(v, 0)[1]:.2f})'
           for v in cells.values()]
    print(f'| {size} | {np.mean(base):.3f} | ' + ' | '.join(row) +
          f' | {np.mean(best):.3f} |')

  quarters = 4
  print(f'\nClosed loop ({_SIM_STEPS.value} steps x {_SIM_BATCH.value}, '
        f'{_SIM_REFS.value} newest references): all-equal fraction of the '
        f'draws per quarter, mean over {_SIM_SEEDS.value} seeds\n')
  print('| readout | ' + ' | '.join(f'Q{q + 1}' for q in range(quarters)) +
        ' | all |\n' + '|---' * (quarters + 2) + '|')
  loops = [('attention', 0.0, 0.0)] + [
      ('ridge', float(x), 0.0) for x in _LAMS.value] + [
          ('ridge', 1.0, float(h)) for h in _HALFLIVES.value if float(h) > 0]
  for readout, lam, halflife in loops:
    fracs = []
    for seed in range(_SIM_SEEDS.value):
      key = np.random.default_rng(100 + seed)
      history, used, frac = [], np.zeros(n, bool), []
      for _ in range(_SIM_STEPS.value):
        if history:
          p = predict(embed, np.array(history[:_SIM_REFS.value]), rates,
                      readout, lam, halflife)
        else:
          p = np.full(n, 0.5)
        w = np.where(used, 0.0, np.exp(-np.abs(p - 0.5) / _TAU.value))
        # Gumbel top-k: weighted draws without replacement.
        g = np.log(np.maximum(w, 1e-30)) + key.gumbel(size=n)
        picks = np.argsort(-g)[:_SIM_BATCH.value]
        used[picks] = True
        frac.append(same[picks].mean())
        history = list(picks) + history
      fracs.append(frac)
    f = np.mean(fracs, 0)
    parts = np.array_split(f, quarters)
    name = 'attention' if readout == 'attention' else f'ridge {lam:g}'
    if halflife:
      name += f', half-life {halflife:g} references'
    print(f'| {name} | ' + ' | '.join(f'{x.mean():.3f}' for x in parts) +
          f' | {f.mean():.3f} |')

  q = np.exp(loglik)
  b = _SIM_BATCH.value
  key = np.random.default_rng(2)
  top = []
  for _ in range(2000):
    cand = key.choice(n, min(16 * b, n), replace=False)
    pick = cand[np.argsort(-(q[cand] * (1 - q[cand])), kind='stable')[:b]]
    top.append(same[pick].mean())
  print('\nReference-solution likelihood q (the likelihood selector): '
        f'correlation with the rates {np.corrcoef(q, rates)[0, 1]:.2f}; '
        f'mean q {q.mean():.3f} against mean rate {rates.mean():.3f}; '
        f'all-equal of draws weighted by q {weights(q) @ same:.3f}; of the '
        f'{b} most mixed by q of {16 * b} uniform candidates '
        f'{np.mean(top):.3f} (uniform {same.mean():.3f})')


if __name__ == '__main__':
  app.run(main)
