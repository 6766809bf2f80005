"""Text-tower pieces shared by CLIP and SigLIP: embeddings with PPLLaVA's optional
extended position tables (reference section 3), their construction from a plain
checkpoint, and truncation that says so."""

from __future__ import annotations

import dataclasses
import warnings
from typing import TYPE_CHECKING, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from ppllava_jax import ops
from ppllava_jax.models.layers import Embedding, Frozen

if TYPE_CHECKING:
  from ppllava_jax.models.dual_encoder import DualEncoder

_EncoderT = TypeVar("_EncoderT", bound="DualEncoder")  # extend_text_positions keeps the type


class TextEmbeddings(nnx.Module):
  """Token + position embeddings; with ``keep`` set, PPLLaVA's two position tables."""

  def __init__(self, vocab: int, dim: int, positions: int, keep: int | None, *, rngs: nnx.Rngs):
    self.keep = keep
    self.token_embedding = Embedding(vocab, dim, axes=("vocab", "embed"), rngs=rngs)
    if keep is None:
      self.position_embedding = Embedding(positions, dim, axes=(None, "embed"), rngs=rngs)
    else:
      table = jax.random.normal(rngs.params(), (positions, dim))
      # read at positions < keep / >= keep; a Frozen table here, an Embedding without keep
      self.position_embedding = Frozen(table * 0.01, axes=(None, "embed"))  # type: ignore[assignment]
      self.position_embedding_res = nnx.Param(table * 0.01, axes=(None, "embed"))

  def __call__(self, ids_bl: jax.Array) -> jax.Array:
    x_bld = self.token_embedding(ids_bl)
    length = ids_bl.shape[1]
    if self.keep is None:
      pos_ld = self.position_embedding.weight[:length]
    else:
      below = (jnp.arange(length) < self.keep)[:, None]
      pos_ld = jnp.where(
        below,
        self.position_embedding[:length],  # type: ignore[index]  # keep set: the Frozen table
        self.position_embedding_res[:length],
      )
    return x_bld + pos_ld.astype(x_bld.dtype)


def prepare_text_inputs(
  ids_bl: jax.Array, mask_bl: jax.Array | None, limit: int, eos_id: int | None
) -> tuple[jax.Array, jax.Array]:
  """Checks (B, L) ids, defaults the mask to all ones, and cuts inputs longer than
  ``limit`` positions with a warning (never silently).

  With ``eos_id``, rows still running at the cut end in EOS, as a tokenizer
  truncating at ``limit`` would give, so EOS pooling still finds one.
  """
  if ids_bl.ndim != 2:
    raise ValueError(f"input_ids must be (B, L), got shape {tuple(ids_bl.shape)}")
  if mask_bl is None:
    mask_bl = jnp.ones(ids_bl.shape, bool)
  elif mask_bl.shape != ids_bl.shape:
    raise ValueError(
      f"attention_mask must match input_ids {tuple(ids_bl.shape)}, got shape {tuple(mask_bl.shape)}"
    )
  if ids_bl.shape[1] <= limit:
    return ids_bl, mask_bl
  warnings.warn(
    f"text input of {ids_bl.shape[1]} tokens is longer than the {limit} positions "
    f"of the text encoder: truncated to {limit} tokens (the rest is ignored"
    + ("; the last kept token becomes EOS)." if eos_id is not None else ")."),
    stacklevel=5,
  )
  ids_bl, mask_bl = ids_bl[:, :limit], mask_bl[:, :limit]
  if eos_id is not None:
    running = mask_bl[:, -1].astype(bool)
    ids_bl = ids_bl.at[:, -1].set(jnp.where(running, eos_id, ids_bl[:, -1]))
  return ids_bl, mask_bl


def extend_text_positions(model: _EncoderT, keep: int = 20, ratio: int = 4) -> _EncoderT:
  """A copy of a CLIP/SigLIP ``model`` whose text tower reads ``ratio*L - (ratio-1)*keep``
  positions: both tables start as ``ops.extend_positions`` of the original one."""
  if model.cfg.text.extend_keep is not None:
    raise ValueError(f"the text tower is already extended (keep={model.cfg.text.extend_keep})")
  table = model.text_model.embeddings.position_embedding.weight[...]
  extended = ops.extend_positions(table, keep=keep, ratio=ratio)
  text_cfg = dataclasses.replace(
    model.cfg.text, extend_keep=keep, max_position_embeddings=extended.shape[0]
  )
  cfg = dataclasses.replace(model.cfg, text=text_cfg)
  graph, state = nnx.split(nnx.eval_shape(lambda: type(model)(cfg, rngs=nnx.Rngs(0))))
  flat = dict(nnx.to_flat_state(state))
  positions = ("text_model", "embeddings", "position_embedding")
  for path, var in nnx.to_flat_state(nnx.state(model)):
    if path[:3] != positions:
      flat[path].set_value(var[...])
  flat[positions].set_value(extended)
  flat[positions[:2] + ("position_embedding_res",)].set_value(extended)
  return nnx.merge(graph, nnx.from_flat_state(flat))
