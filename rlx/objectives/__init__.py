"""Objectives: advantages, policy losses, KL and aggregation, by name.

Entry points:
  compute_advantages(name, rewards, mask, **kwargs) -> [B, Gmax]
  policy_loss(name, logp, old_logp, advantages, loss_mask, **kwargs)
      -> (scalar loss, metrics dict)
Unknown names fail with the list of known ones.
"""

from rlx.config import ConfigError
from rlx.objectives.advantages import ADVANTAGES
from rlx.objectives.losses import aggregate
from rlx.objectives.losses import AGGREGATIONS
from rlx.objectives.losses import kl_penalty
from rlx.objectives.losses import LOSSES
from rlx.objectives.losses import masked_max
from rlx.objectives.losses import masked_mean
from rlx.objectives.losses import token_entropy


def _lookup(registry: dict, kind: str, name: str):
  if name not in registry:
    raise ValueError(f'unknown {kind} {name!r}; known: {sorted(registry)}')
  return registry[name]


def compute_advantages(name: str, rewards, mask, **kwargs):
  """Advantages `[B, Gmax]` from rewards `[B, Gmax]` and a validity mask."""
  return _lookup(ADVANTAGES, 'advantage', name)(rewards, mask, **kwargs)


def policy_loss(name: str, logp, old_logp, advantages, loss_mask, *,
                aggregation: str = 'token-mean', total_tokens=None,
                total_seqs=None, norm_len: int = 1, **kwargs):
  """Aggregated policy loss and its metrics (masked means over tokens).

  Args:
    name: a key of `LOSSES`.
    logp, old_logp: [B, G, T] log-probs of the sampled tokens under the
      current and the old policy.
    advantages: [B, G] or [B, G, T].
    loss_mask: [B, G, T] bool.
    aggregation, total_tokens, total_seqs, norm_len: see `aggregate`.
    **kwargs: the loss's hyper-parameters.

  Returns:
    (loss scalar, {'clip_frac/low', 'clip_frac/high', 'ratio/mean',
    'ratio/max', 'approx_kl_old'}).
  """
  fn = _lookup(LOSSES, 'policy loss', name)
  per_token, diag = fn(logp, old_logp, advantages, **kwargs)
  loss = aggregate(per_token, loss_mask, aggregation,
                   total_tokens=total_tokens, total_seqs=total_seqs,
                   norm_len=norm_len)
  ratio = diag['ratio']
  metrics = {
      'clip_frac/low': masked_mean(diag['clipped_low'], loss_mask),
      'clip_frac/high': masked_mean(diag['clipped_high'], loss_mask),
      'ratio/mean': masked_mean(ratio, loss_mask),
      'ratio/max': masked_max(ratio, loss_mask),
      # k3 estimate of KL(old || current) on the sampled tokens.
      'approx_kl_old': masked_mean(kl_penalty(old_logp, logp, 'k3'),
                                   loss_mask),
  }
  return loss, metrics


def check_names(objective_cfg) -> None:
  """Raises naming the config key if an objective name is unknown."""
  for key, registry in (('advantage', ADVANTAGES), ('loss', LOSSES)):
    name = getattr(objective_cfg, key)
    if name not in registry:
      raise ConfigError(f'objective.{key}: unknown {name!r}; known: '
                        f'{sorted(registry)}')
  if objective_cfg.aggregation not in AGGREGATIONS:
    raise ConfigError(f'objective.aggregation: unknown '
                      f'{objective_cfg.aggregation!r}; known: '
                      f'{list(AGGREGATIONS)}')
