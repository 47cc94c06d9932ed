"""Objectives: advantages, policy losses, KL and aggregation, by name.

Entry points:
  compute_advantages(name, rewards, mask, **kwargs) -> [B, Gmax]
      ([B, Gmax, T] for the token-level d3s and treerl)
  policy_loss(name, logp, old_logp, advantages, loss_mask, *,
              behaviour_logp=None, correction='none', **kwargs)
      -> (scalar loss, metrics dict)
Unknown names fail with the list of known ones. Advantage estimators:
`ADVANTAGES`; policy losses: `LOSSES` (ppo_clip, dapo, dual_clip, gspo,
gppo, cispo, decoupled); both are registries (rlx/objectives/entries.py)
whose entries declare what they take, iterable as their names. Train /
sampler mismatch corrections: `CORRECTIONS` (none, tis, icepop).

Importing this package registers the estimators and losses and their
config checks (`config.build` runs them). It does not import rlx.config.
"""

import jax.numpy as jnp

from rlx.errors import ConfigError
from rlx.objectives import entries
from rlx.objectives.advantages import ADVANTAGES
from rlx.objectives.advantages import batch_whiten
from rlx.objectives.advantages import d3s_keep_ratio
from rlx.objectives.advantages import d3s_sample_mask
from rlx.objectives.advantages import d3s_token_mask
from rlx.objectives.advantages import mc_grpo_pivot
from rlx.objectives.advantages import mean_sampler_logp
from rlx.objectives.advantages import reads
from rlx.objectives.losses import aggregate
from rlx.objectives.losses import AGGREGATIONS
from rlx.objectives.losses import CORRECTIONS
from rlx.objectives.losses import kl_penalty
from rlx.objectives.losses import KL_ESTIMATORS
from rlx.objectives.losses import LOSSES
from rlx.objectives.losses import masked_max
from rlx.objectives.losses import masked_mean
from rlx.objectives.losses import mismatch_correction
from rlx.objectives.losses import token_entropy


def _lookup(registry: entries.Registry, kind: str, name: str):
  if name not in registry:
    raise ValueError(f'unknown {kind} {name!r}; known: {sorted(registry)}')
  return registry.get(name)


def compute_advantages(name: str, rewards, mask, **kwargs):
  """Advantages `[B, Gmax]` from rewards `[B, Gmax]` and a validity mask."""
  return _lookup(ADVANTAGES, 'advantage', name)(rewards, mask, **kwargs)


def policy_loss(name: str, logp, old_logp, advantages, loss_mask, *,
                behaviour_logp=None, aggregation: str = 'token-mean',
                total_tokens=None, total_seqs=None, norm_len: int = 1,
                correction: str = 'none', tis_cap: float = 2.0,
                icepop_low: float = 0.5, icepop_high: float = 5.0,
                **hparams):
  """Aggregated policy loss and its metrics (masked means over tokens).

  The per-token loss of `LOSSES.get(name)` is multiplied by the mismatch
  correction's factor (`mismatch_correction`), then aggregated; tokens
  IcePop drops stay in the denominator. For GSPO's sequence form, whose
  per-token loss is the sequence loss broadcast, a response's gradient is
  thus scaled by the mean factor over its tokens. An entropy bonus, where
  used, is the caller's: it subtracts alpha * aggregate(entropy, loss_mask,
  aggregation) from this loss.

  Args:
    name: a name in `LOSSES`.
    logp, old_logp: [B, G, T] log-probs of the sampled tokens under the
      current and the old policy.
    advantages: [B, G] or [B, G, T] (`gspo`: [B, G] only).
    loss_mask: [B, G, T] bool.
    behaviour_logp: [B, G, T] sampler log-probs; needed by `decoupled` and
      by any correction other than 'none'.
    aggregation, total_tokens, total_seqs, norm_len: see `aggregate`.
    correction: 'none', 'tis' or 'icepop'; composes with any loss.
    tis_cap: TIS cap C on w = exp(old_logp - behaviour_logp).
    icepop_low, icepop_high: the band of w IcePop keeps.
    **hparams: the loss's hyper-parameters.

  Returns:
    (loss scalar, {'clip_frac/low', 'clip_frac/high', 'ratio/mean',
    'ratio/max', 'approx_kl_old'}, plus, when a correction is active,
    'correction/weight_mean' (mean w, before capping or masking) and
    'correction/masked_frac' (fraction of tokens IcePop dropped; 0 for TIS),
    and for TIS 'correction/capped_frac' (fraction with w > C)).

  Raises:
    ValueError: for an unknown loss or correction, or a missing
      behaviour_logp.
  """
  fn = _lookup(LOSSES, 'policy loss', name).fn
  if correction not in CORRECTIONS:
    raise ValueError(f'unknown correction {correction!r}; known: '
                     f'{list(CORRECTIONS)}')
  if correction != 'none' and behaviour_logp is None:
    raise ValueError(f'correction {correction!r} needs behaviour_logp')
  per_token, diag = fn(logp, old_logp, advantages, loss_mask,
                       behaviour_logp=behaviour_logp, **hparams)
  metrics = {}
  if correction != 'none':
    factor, w, acted = mismatch_correction(
        correction, old_logp, behaviour_logp, tis_cap=tis_cap,
        icepop_low=icepop_low, icepop_high=icepop_high)
    per_token = per_token * factor
    metrics['correction/weight_mean'] = masked_mean(w, loss_mask)
    if correction == 'tis':
      metrics['correction/masked_frac'] = jnp.zeros((), jnp.float32)
      metrics['correction/capped_frac'] = masked_mean(acted, loss_mask)
    else:
      metrics['correction/masked_frac'] = masked_mean(acted, loss_mask)
  loss = aggregate(per_token, loss_mask, aggregation,
                   total_tokens=total_tokens, total_seqs=total_seqs,
                   norm_len=norm_len)
  ratio = diag['ratio']
  metrics.update({
      'clip_frac/low': masked_mean(diag['clipped_low'], loss_mask),
      'clip_frac/high': masked_mean(diag['clipped_high'], loss_mask),
      'ratio/mean': masked_mean(ratio, loss_mask),
      'ratio/max': masked_max(ratio, loss_mask),
      # k3 estimate of KL(old || current) on the sampled tokens.
      'approx_kl_old': masked_mean(kl_penalty(old_logp, logp, 'k3'),
                                   loss_mask),
  })
  return loss, metrics


def check_names(objective_cfg) -> None:
  """Raises naming the config key if an objective name is unknown (the
  config checks of `ADVANTAGES` and `LOSSES` report the same)."""
  for key, registry in (('advantage', ADVANTAGES), ('loss', LOSSES)):
    name = getattr(objective_cfg, key)
    if name not in registry:
      raise ConfigError(f'objective.{key}: unknown {name!r}; known: '
                        f'{sorted(registry)}')
  if objective_cfg.aggregation not in AGGREGATIONS:
    raise ConfigError(f'objective.aggregation: unknown '
                      f'{objective_cfg.aggregation!r}; known: '
                      f'{list(AGGREGATIONS)}')
