"""DPO losses and their metrics, as pure functions of per-row completion log-probs.

Inputs are what ``losses.sequence_logprobs`` returns for each side: the summed
log-probability of a row's supervised tokens (its completion and end marker) and their
count, (B,) float32 each; the logits behind them are never materialised for the whole
sequence. The reference's sums come from the same rows (so the counts are shared).

With ``d = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)``,
``beta`` and label smoothing ``eps``, the per-pair losses are trl's ``DPOTrainer``
formulas (trl 1.16.0 ``_compute_loss``, and the trl-0.8-era ``dpo_loss`` that the
original's LLaVA-Hound trainer copies, ``ppllava/train/dpo_trainer.py``):

- ``sigmoid``: ``-(1 - eps) log σ(beta d) - eps log σ(-beta d)`` (conservative DPO).
  trl 0.8 to 0.2x write it so; trl 1.16 kept ``eps`` only for ``robust`` and writes
  ``-log σ(beta d)``, the same at ``eps = 0`` (the original's setting).
- ``hinge``: ``relu(1 - beta d)`` (both versions).
- ``ipo``: ``(d_mean - 1 / (2 beta))^2`` with ``d_mean`` the log-ratios divided by
  each side's token count (at least 1): trl 1.16's length normalisation. trl 0.8 got
  the same number by averaging the log-probs themselves, but then also reported its
  rewards and logps as means; here they are always sums, as trl 1.16.
- ``robust``: ``(-(1 - eps) log σ(beta d) + eps log σ(-beta d)) / (1 - 2 eps)``.

The loss is the mean over pairs plus ``gamma`` times the SFT cross-entropy of the
chosen completions (LLaVA-Hound: ``dpo_alpha * dpo + gamma * sft``, with ``dpo_alpha``
1): their summed negative log-probs over their token count, the token mean the
original's ``CrossEntropyLoss`` takes over the chosen rows. ``gamma = 0`` is the
original's DPO config.

Metrics, named as trl and the original log them (batch means; rewards
``beta * (policy - reference)`` of each side, with no gradient): ``rewards/chosen``,
``rewards/rejected``, ``rewards/accuracies`` (chosen reward strictly above the
rejected), ``rewards/margins``, ``logps/chosen``, ``logps/rejected``,
``ref_logps/chosen``, ``ref_logps/rejected`` (sums), ``losses/dpo``, ``losses/sft``,
``losses/total``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
  """The original's DPO settings by default (sigmoid, beta 0.1, no smoothing, no SFT term,
  a live reference in float32).

  precompute_reference: one pass before training computes the reference's log-probs of
    every row and caches them on disk (``train.run.reference``); no reference weights stay in
    memory, and each row's frames are pinned (``data.dpo.pairs``). Otherwise the reference
    is a frozen copy of the trainable part (the LLM), run in every step beside the policy.
  reference_dtype: the live copy's storage, "float32" or "bfloat16" (half the memory; it
    then computes in the step's compute dtype from bfloat16-rounded weights).
  """

  loss_type: str = "sigmoid"
  beta: float = 0.1  # the KL weight; for IPO its tau
  label_smoothing: float = 0.0  # sigmoid: in [0, 0.5]; robust: the flip rate, in [0, 0.5)
  gamma: float = 0.0  # weight of the SFT term on the chosen completions
  precompute_reference: bool = False
  reference_dtype: str = "float32"

  def __post_init__(self):
    if self.loss_type not in LOSS_TYPES:
      raise ValueError(f"DPOConfig.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
    if not self.beta > 0 or not self.gamma >= 0:
      raise ValueError(f"DPOConfig: beta must be > 0 and gamma >= 0, got {self.beta}, {self.gamma}")
    if self.reference_dtype not in ("float32", "bfloat16"):
      raise ValueError(
        f"DPOConfig.reference_dtype must be 'float32' or 'bfloat16', got {self.reference_dtype!r}"
      )
    eps = self.label_smoothing
    ok = {"sigmoid": 0 <= eps <= 0.5, "robust": 0 <= eps < 0.5}.get(self.loss_type, eps == 0)
    if not ok:  # hinge and ipo have no smoothing: a value there would be silently ignored
      allowed = {"sigmoid": "[0, 0.5]", "robust": "[0, 0.5)"}.get(self.loss_type, "{0}")
      raise ValueError(
        f"DPOConfig.label_smoothing for {self.loss_type!r} must be in {allowed}, got {eps}"
      )


def dpo_loss(
  policy_chosen_b: jax.Array,
  policy_rejected_b: jax.Array,
  ref_chosen_b: jax.Array,
  ref_rejected_b: jax.Array,
  *,
  loss_type: str,
  beta: float,
  label_smoothing: float = 0.0,
  chosen_count_b: jax.Array | None = None,
  rejected_count_b: jax.Array | None = None,
) -> jax.Array:
  """Per-pair DPO losses (B,) from summed completion log-probs (module doc); ``ipo``
  also needs each side's token counts."""
  chosen_ratio_b = policy_chosen_b - ref_chosen_b
  rejected_ratio_b = policy_rejected_b - ref_rejected_b
  if loss_type == "ipo":
    if chosen_count_b is None or rejected_count_b is None:
      raise ValueError("dpo_loss: the ipo loss needs chosen_count_b and rejected_count_b")
    d_b = chosen_ratio_b / jnp.maximum(chosen_count_b, 1.0) - rejected_ratio_b / jnp.maximum(
      rejected_count_b, 1.0
    )
    return (d_b - 1 / (2 * beta)) ** 2
  z_b = beta * (chosen_ratio_b - rejected_ratio_b)
  eps = label_smoothing
  if loss_type == "sigmoid":
    return -(1 - eps) * jax.nn.log_sigmoid(z_b) - eps * jax.nn.log_sigmoid(-z_b)
  if loss_type == "hinge":
    return jax.nn.relu(1 - z_b)
  if loss_type == "robust":
    return (-(1 - eps) * jax.nn.log_sigmoid(z_b) + eps * jax.nn.log_sigmoid(-z_b)) / (1 - 2 * eps)
  raise ValueError(f"dpo_loss: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def preference_loss(
  policy_chosen_b: jax.Array,
  policy_rejected_b: jax.Array,
  ref_chosen_b: jax.Array,
  ref_rejected_b: jax.Array,
  chosen_count_b: jax.Array,
  rejected_count_b: jax.Array,
  config: DPOConfig,
  mask_b: jax.Array | None = None,
  pairs: jax.Array | None = None,
  chosen_tokens: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(the loss to minimise, metrics): the mean DPO loss over the pairs of ``mask_b`` (all
  by default) plus ``gamma`` times the chosen completions' token-mean cross-entropy
  (module doc). Reference inputs get no gradient.

  ``pairs`` / ``chosen_tokens``: the denominators of those means (default: this batch's);
  given the counts of a whole accumulated step, the loss and metrics of each micro-batch
  are its shares of the step's, and the shares add up."""
  w_b = jnp.ones_like(policy_chosen_b) if mask_b is None else mask_b.astype(jnp.float32)
  pairs = jnp.maximum(w_b.sum() if pairs is None else pairs, 1.0)
  if chosen_tokens is None:
    chosen_tokens = (chosen_count_b * w_b).sum()
  mean = lambda x_b: jnp.where(w_b > 0, x_b, 0.0).sum() / pairs  # padded pairs hold zeros
  ref_chosen_b, ref_rejected_b = jax.lax.stop_gradient((ref_chosen_b, ref_rejected_b))
  dpo = mean(
    dpo_loss(
      policy_chosen_b,
      policy_rejected_b,
      ref_chosen_b,
      ref_rejected_b,
      loss_type=config.loss_type,
      beta=config.beta,
      label_smoothing=config.label_smoothing,
      chosen_count_b=chosen_count_b,
      rejected_count_b=rejected_count_b,
    )
  )
  sft = -jnp.where(w_b > 0, policy_chosen_b, 0.0).sum() / jnp.maximum(chosen_tokens, 1.0)
  total = dpo + config.gamma * sft
  chosen_b, rejected_b, policy_chosen_b, policy_rejected_b = jax.lax.stop_gradient(
    (
      config.beta * (policy_chosen_b - ref_chosen_b),
      config.beta * (policy_rejected_b - ref_rejected_b),
      policy_chosen_b,
      policy_rejected_b,
    )
  )
  metrics = {
    "rewards/chosen": mean(chosen_b),
    "rewards/rejected": mean(rejected_b),
    "rewards/accuracies": mean((chosen_b > rejected_b).astype(jnp.float32)),
    "rewards/margins": mean(chosen_b - rejected_b),
    "logps/chosen": mean(policy_chosen_b),
    "logps/rejected": mean(policy_rejected_b),
    "ref_logps/chosen": mean(ref_chosen_b),
    "ref_logps/rejected": mean(ref_rejected_b),
    "losses/dpo": jax.lax.stop_gradient(dpo),
    "losses/sft": jax.lax.stop_gradient(sft),
    "losses/total": jax.lax.stop_gradient(total),
  }
  return total, metrics
