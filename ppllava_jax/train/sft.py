"""SFT's objective: the next-token cross-entropy over the step's supervised tokens.

``TokenMean`` is an ``Objective`` of the core step (``train.core.step``): it merges the
trainable and frozen states into the model once, embeds the batch
(``train.core.inputs.embed_batch``), runs the LLM to its final hidden states and takes
``train.core.losses.cross_entropy`` (sum, count) on them, never the full logits. Under
accumulation each micro-batch's share is its sum over the step's supervised tokens
(``accum_reduction="tokens"``: the global token mean), or its mean over k
(``"micro_mean"``: the mean of the micro-batch means, transformers 4.45's and so the
original's). ``TokenMean.sums`` is also the held-out loss (``Steps.eval``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ppllava_jax.data.sft.batches import TrainBatch
from ppllava_jax.models.ppllava import PPLLaVA
from ppllava_jax.train.core import losses
from ppllava_jax.train.core.config import TrainConfig
from ppllava_jax.train.core.inputs import embed_batch
from ppllava_jax.train.core.losses import supervised_targets
from ppllava_jax.train.core.step import merged


def loss_sums(
  model: PPLLaVA, batch: TrainBatch, chunk: int = losses.CHUNK, rngs: nnx.Rngs | None = None
) -> tuple[jax.Array, jax.Array]:
  """(summed cross-entropy of the supervised tokens, their count) of one micro-batch."""
  emb_bld = embed_batch(model, batch, rngs)
  lm = model.language_model
  # in the step the batch's fields are jax.Arrays (np.ndarrays on the host)
  hidden_bld, _ = lm.hidden_states(
    inputs_embeds=emb_bld,
    attention_mask=batch.attention_mask,  # type: ignore[arg-type]
    position_ids=batch.position_ids,  # type: ignore[arg-type]
  )
  return losses.cross_entropy(hidden_bld, lm.head_dv, batch.labels, chunk)  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class TokenMean:
  """SFT: the next-token cross-entropy over the step's supervised tokens (module doc:
  ``accum_reduction``); ``constants`` is the frozen state."""

  graphdef: nnx.GraphDef
  cfg: TrainConfig
  count: str = "tokens"

  def sums(self, params, frozen, batch, key=None):
    """(loss sum, token count); ``key``: training mode with drop-path keys from it, None:
    deterministic."""
    model = merged(self.graphdef, self.cfg, params, frozen)
    if key is None:
      model.eval()
      return loss_sums(model, batch, self.cfg.loss_chunk)
    model.train()
    return loss_sums(model, batch, self.cfg.loss_chunk, nnx.Rngs(dropout=key))

  def totals(self, batch):
    return {"tokens": supervised_targets(batch.labels).sum().astype(jnp.float32)}

  def share(self, params, frozen, batch, key, totals):
    s, c = self.sums(params, frozen, batch, key)
    if self.cfg.optim.accum_reduction == "micro_mean":
      return s / jnp.maximum(c, 1.0) / self.cfg.optim.grad_accum, {}
    return s / jnp.maximum(totals["tokens"], 1.0), {}
