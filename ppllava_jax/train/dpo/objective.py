"""DPO as an objective of the one train step (``train.core.step``), on
``data.dpo.pairs.PairBatch``es.

Per step: the policy (the trainable parameters merged with the frozen state) encodes the
B videos once (``train.core.inputs.pair_media``: scorer, vision tower, pooling), embeds the 2B
rows around those tokens and runs the LLM once over chosen + rejected; the summed
completion log-probs come from ``losses.sequence_logprobs``, one logits chunk at a time,
never the (2B, L, vocab) float32 logits. The reference's log-probs are either

- live: ``DPOConstants.reference``, a frozen copy of the trainable part taken when the run
  starts (the LLM: ``check_trainable``), merged with the same frozen state and run on the
  same media tokens, under ``stop_gradient``; or
- cached: ``PairBatch.ref_logps``, computed once before training (``train.run.reference``).

Then ``train.dpo.losses.preference_loss`` with the step's pair and chosen-token counts as
denominators (``PreferenceObjective.totals``), so accumulated micro-batches add up to the
step's mean.

Only the LLM may train: the media tokens are computed once for the policy and the
reference, which is only right when nothing on their path changes (and is the original's
``onlyLLM`` recipe). The step is deterministic: the media are encoded with drop path off,
so both sides see the same tokens. (The original's policy ran the BT-Adapter's drop path
while its reference, in eval mode, did not: their log-ratios were not zero even at the
first step.)
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from ppllava_jax.models.ppllava import PPLLaVA
from ppllava_jax.train.core import losses
from ppllava_jax.train.core.config import TrainConfig
from ppllava_jax.train.core.inputs import embed_pairs, pair_media
from ppllava_jax.train.core.losses import supervised_targets
from ppllava_jax.train.core.partition import Partition
from ppllava_jax.train.core.step import merged
from ppllava_jax.train.dpo.losses import DPOConfig, preference_loss

POLICY_PREFIX = "language_model/"  # what may train under DPO (module doc)


@flax.struct.dataclass
class DPOConstants:
  """What the DPO step reads besides the trainable parameters."""

  frozen: nnx.State
  reference: nnx.State | None  # the reference's trainable part; None: cached in the batch


def check_trainable(part: Partition) -> None:
  """Refuses trainable parameters outside the LLM (module doc)."""
  outside = sorted(p for p in part.trainable if not p.startswith(POLICY_PREFIX))
  if outside:
    raise ValueError(
      f"DPO encodes the media once for the policy and the reference, so only "
      f"{POLICY_PREFIX}* may train, but train.trainable makes {len(outside)} other "
      f"parameter(s) trainable, e.g. {', '.join(outside[:3])}; use train.core.partition.DPO"
    )


def reference_copy(params: nnx.State, dtype, shardings) -> nnx.State:
  """A copy of ``params`` in ``dtype`` with its own buffers (the train state is donated)."""

  def one(x):
    return jnp.copy(x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x)

  return jax.jit(lambda p: jax.tree.map(one, p), out_shardings=shardings)(params)


def pair_logps(
  model: PPLLaVA, batch, media_bnd: jax.Array, chunk: int = losses.CHUNK
) -> tuple[jax.Array, jax.Array]:
  """(summed completion log-probs, supervised token counts), (2B,) each, of a
  ``PairBatch``'s rows under ``model``, around the shared ``media_bnd``."""
  lm = model.language_model
  hidden_bld, _ = lm.hidden_states(
    inputs_embeds=embed_pairs(model, batch, media_bnd),
    attention_mask=batch.attention_mask,
    position_ids=batch.position_ids,
  )
  return losses.sequence_logprobs(hidden_bld, lm.head_dv, batch.labels, chunk)


def reference_logps(graphdef: nnx.GraphDef, cfg: TrainConfig, params, frozen, batch) -> jax.Array:
  """(2B,) log-probs of ``batch``'s rows under the model of ``params`` (the reference at
  the start of a run): what a live reference computes in the step."""
  model = merged(graphdef, cfg, params, frozen)
  model.eval()
  return pair_logps(model, batch, pair_media(model, batch, cfg.dtype), cfg.loss_chunk)[0]


@dataclasses.dataclass(frozen=True)
class PreferenceObjective:
  """The DPO loss of ``config`` (``train.core.step.Objective``); constants: ``DPOConstants``."""

  graphdef: nnx.GraphDef
  cfg: TrainConfig
  config: DPOConfig
  count: str = "pairs"

  def totals(self, batch):
    supervised = supervised_targets(batch.labels)  # (..., 2B, L - 1): rows 2i chosen
    return {
      "pairs": batch.pair_mask.sum().astype(jnp.float32),
      "tokens": supervised.sum().astype(jnp.float32),
      "chosen_tokens": supervised[..., 0::2, :].sum().astype(jnp.float32),
    }

  def share(self, params, constants: DPOConstants, batch, key, totals):
    del key  # deterministic (module doc)
    model = merged(self.graphdef, self.cfg, params, constants.frozen)
    model.eval()
    media_bnd = pair_media(model, batch, self.cfg.dtype)
    logp_r, count_r = pair_logps(model, batch, media_bnd, self.cfg.loss_chunk)
    if constants.reference is None:
      ref_r = batch.ref_logps
    else:
      reference = merged(self.graphdef, self.cfg, constants.reference, constants.frozen)
      reference.eval()
      ref_r = jax.lax.stop_gradient(pair_logps(reference, batch, media_bnd, self.cfg.loss_chunk)[0])
    return preference_loss(
      logp_r[0::2],
      logp_r[1::2],
      ref_r[0::2],
      ref_r[1::2],
      count_r[0::2],
      count_r[1::2],
      self.config,
      batch.pair_mask,
      totals["pairs"],
      totals["chosen_tokens"],
    )
