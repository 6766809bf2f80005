"""A ``data.sft.batches.TrainBatch`` -> the LLM's input embeddings: the media of every slot
encoded and pooled in one fixed-shape program, then written at the placeholders.

The batch's layout (``data.sft.batches`` module doc) fixes every shape, so one compiled step
serves any mix of videos, anyres images and multi-image items:

- videos (V, T, ...): the pooling mode's video path (``PPLLaVA.encode_videos``) with
  ``video_frame_mask``, so frames padding a shorter video stay out of its relevance
  softmax; ``video_token_mask`` keeps each slot's real tokens for ``ops.merge_media``;
- anyres tiles (I, K, ...) and multi-image pictures (M, P, ...): each a one-frame item for
  the vision tower (tiles) or a video of P pictures (a multi-image item, read as the
  original reads it), pooled with the image kernel under one relevance softmax per item
  (``image_tile_mask`` / ``picture_mask``), unpooled in the LLaVA baselines' modes; their
  tokens, with the image newline as the last row, form one table that the host-computed
  ``image_gather`` indices read in placeholder order (the anyres packing as a gather).

A ``data.dpo.pairs.PairBatch`` (DPO) is embedded in two parts: ``pair_media`` runs the scorer,
the vision tower and the pooling once per pair, and ``embed_pairs`` writes each video's
tokens into both of its rows (2i chosen, 2i + 1 rejected). The media depend only on the
frozen parts, so the policy and the reference embed their rows with their own token
tables around the same media tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ppllava_jax import ops
from ppllava_jax.models.ppllava import MODES, PPLLaVA


def _item_tokens(
  model: PPLLaVA,
  frames_btchw: jax.Array,
  text_be: jax.Array | None,
  mask_bt: jax.Array,
  per_frame: bool,
  rngs: nnx.Rngs | None,
) -> jax.Array:
  """(B, T, g', g', D) tokens of B image items of T tiles / pictures each. ``per_frame``:
  the vision tower sees each frame alone (anyres tiles), else each item whole."""
  b, t = frames_btchw.shape[:2]
  if per_frame:
    feats_btggf = model.patch_features(
      frames_btchw.reshape(b * t, 1, *frames_btchw.shape[2:]), rngs
    )
    feats_btggf = feats_btggf.reshape(b, t, *feats_btggf.shape[2:])
  else:
    feats_btggf = model.patch_features(frames_btchw, rngs)
  if MODES[model.cfg.pooling.mode].windows is None:
    return model.multi_modal_projector(feats_btggf)
  return model.pool(feats_btggf, text_be, model.cfg.pooling.image_kernel, mask_bt=mask_bt)


def embed_batch(model: PPLLaVA, batch, rngs: nnx.Rngs | None = None) -> jax.Array:
  """(B, L, D) input embeddings of ``batch`` (a ``TrainBatch``) with its media merged.

  ``rngs``: the vision tower's drop-path keys (``PPLLaVA.patch_features``), drawn only
  when the model is in training mode (``model.train()``); e.g. ``nnx.Rngs(dropout=
  jax.random.fold_in(key, step))`` from the train state's key."""
  cfg = model.cfg
  emb_bld = model.language_model.embed(jnp.maximum(batch.input_ids, 0))  # -1: video ids
  text_be = None
  if cfg.pooling.scored:  # a scored mode's model has its scorer (PPLLaVA.from_pretrained)
    text_be = model.scorer.text_features(batch.scorer_ids, batch.scorer_mask)  # type: ignore[union-attr]
  pick = lambda rows: None if text_be is None else text_be[rows]
  if batch.videos.shape[0]:
    tokens_ild = model.encode_videos(
      batch.videos.astype(emb_bld.dtype), pick(batch.video_row), batch.video_frame_mask, rngs
    )
    emb_bld = ops.merge_media(
      emb_bld,
      batch.input_ids,
      tokens_ild.reshape(-1, emb_bld.shape[-1]),
      batch.video_token_mask.reshape(-1),
      cfg.video_token_index,
    )
  if batch.image_gather.shape[0]:
    parts = []
    if batch.images.shape[0]:
      parts.append(
        _item_tokens(
          model,
          batch.images.astype(emb_bld.dtype),
          pick(batch.image_row),
          batch.image_tile_mask,
          per_frame=True,
          rngs=rngs,
        )
      )
    if batch.pictures.shape[0]:
      parts.append(
        _item_tokens(
          model,
          batch.pictures.astype(emb_bld.dtype),
          pick(batch.multi_image_row),
          batch.picture_mask,
          per_frame=False,
          rngs=rngs,
        )
      )
    d = emb_bld.shape[-1]
    table_ld = jnp.concatenate(
      [p.reshape(-1, d) for p in parts] + [model.image_newline[...].astype(emb_bld.dtype)[None]]
    )
    emb_bld = ops.merge_media(
      emb_bld,
      batch.input_ids,
      table_ld[batch.image_gather],
      batch.image_gather_mask,
      cfg.image_token_index,
    )
  return emb_bld


def pair_media(model: PPLLaVA, batch, dtype=jnp.float32) -> jax.Array:
  """(B, tokens, D) pooled video tokens of a ``PairBatch``'s B videos (pixels in ``dtype``,
  the compute dtype), each scored with its question: once per pair."""
  text_be = None
  if model.cfg.pooling.scored:  # as in embed_batch
    text_be = model.scorer.text_features(batch.scorer_ids, batch.scorer_mask)  # type: ignore[union-attr]
  return model.encode_videos(batch.videos.astype(dtype), text_be, batch.video_frame_mask)


def embed_pairs(model: PPLLaVA, batch, media_bnd: jax.Array) -> jax.Array:
  """(2B, L, D) input embeddings of a ``PairBatch``'s rows: ``model``'s token embeddings,
  with pair i's ``media_bnd[i]`` at the placeholders of rows 2i and 2i + 1."""
  emb_bld = model.language_model.embed(jnp.maximum(batch.input_ids, 0))
  d = emb_bld.shape[-1]
  rows_bnd = jnp.repeat(media_bnd.astype(emb_bld.dtype), 2, axis=0)
  mask_bn = jnp.repeat(batch.video_token_mask, 2, axis=0)
  return ops.merge_media(
    emb_bld,
    batch.input_ids,
    rows_bnd.reshape(-1, d),
    mask_bn.reshape(-1),
    model.cfg.video_token_index,
  )
