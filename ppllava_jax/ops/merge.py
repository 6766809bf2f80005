"""Media embeddings written into the text sequence at placeholder positions, with
static shapes.

Layout. ``input_ids_bl`` already holds one ``placeholder_id`` per media token (the
processor expanded each ``<image>`` to the item's token count, e.g.
``num_image_features``). All media tokens of the batch travel in one flat buffer
``media_emb_ld`` with a mask ``media_mask_l``: read top to bottom, skipping rows whose
mask is False, the real rows are sample 0's first media item's tokens, then its second
item's, ..., then sample 1's, and so on, i.e. the order in which the placeholders
appear when the (B, L) ids are read row-major. Padding rows may sit anywhere (after
each item to bucket item lengths, or at the end) and are never read.

The k-th placeholder of the batch (row-major over (B, L)) receives the k-th real media
token: a cumsum over the flattened ids ranks the placeholders, a binary search in the
cumsum of the mask finds the buffer row of each rank, and one gather fetches it. Shapes
depend only on (B, L, N, D), so it jits once per shape and runs on batch-sharded inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def check_media_counts(input_ids, placeholder_id: int, media_token_count: int | Sequence[int]):
  """Host-side check that placeholders and media tokens pair up one to one.

  ``input_ids`` (B, L); ``media_token_count`` is either the batch total (e.g.
  ``media_mask_l.sum()``) or one count per sample. Raises ``ValueError`` naming the
  placeholder and media token counts (per sample when per-sample counts are given).
  """
  ids_bl = np.asarray(input_ids)
  if ids_bl.ndim != 2:
    raise ValueError(f"check_media_counts: input_ids must be (B, L), got shape {ids_bl.shape}")
  placeholders_b = (ids_bl == placeholder_id).sum(axis=1)
  # np.ndim() == 0 picks the int form (mypy cannot narrow on it)
  if np.ndim(media_token_count) == 0:
    media = int(media_token_count)  # type: ignore[arg-type]
    if placeholders_b.sum() != media:
      raise ValueError(
        f"{int(placeholders_b.sum())} placeholder tokens (id {placeholder_id}) in "
        f"the batch, per sample {placeholders_b.tolist()}, but {media} media "
        f"tokens"
      )
    return
  media_b = [int(c) for c in media_token_count]  # type: ignore[union-attr]
  if len(media_b) != len(placeholders_b):
    raise ValueError(
      f"check_media_counts: {len(media_b)} per-sample media token counts for "
      f"a batch of {len(placeholders_b)}"
    )
  wrong = [
    f"sample {b}: {int(p)} placeholder tokens but {m} media tokens"
    for b, (p, m) in enumerate(zip(placeholders_b, media_b))
    if p != m
  ]
  if wrong:
    raise ValueError(
      f"placeholder (id {placeholder_id}) and media token counts differ: " + "; ".join(wrong)
    )


def merge_media(
  text_emb_bld: jax.Array,
  input_ids_bl: jax.Array,
  media_emb_ld: jax.Array,
  media_mask_l: jax.Array,
  placeholder_id: int | jax.Array,
) -> jax.Array:
  """``text_emb_bld`` with its k-th placeholder replaced by the k-th real media token.

  ``text_emb_bld`` (B, L, D), ``input_ids_bl`` (B, L), ``media_emb_ld`` (N, D),
  ``media_mask_l`` (N,) bool; layout in the module doc. Returns (B, L, D) in
  ``text_emb_bld.dtype``; gradients reach the text embeddings of non-placeholder
  positions and the real media rows, nothing else.

  Counts must match, and under ``jax.jit`` nothing can raise: extra placeholders get a
  clamped (wrong) row, extra media tokens go unused. So callers that jit run
  ``check_media_counts`` on the host first; an eager call with concrete ids and mask
  runs it here.
  """
  if text_emb_bld.ndim != 3 or tuple(input_ids_bl.shape) != tuple(text_emb_bld.shape[:2]):
    raise ValueError(
      f"merge_media: text_emb must be (B, L, D) and input_ids (B, L), got "
      f"{tuple(text_emb_bld.shape)} and {tuple(input_ids_bl.shape)}"
    )
  if (
    media_emb_ld.ndim != 2
    or media_emb_ld.shape[1] != text_emb_bld.shape[2]
    or tuple(media_mask_l.shape) != media_emb_ld.shape[:1]
  ):
    raise ValueError(
      f"merge_media: media_emb must be (N, D={text_emb_bld.shape[2]}) and "
      f"media_mask (N,), got {tuple(media_emb_ld.shape)} and "
      f"{tuple(media_mask_l.shape)}"
    )
  if not any(isinstance(a, jax.core.Tracer) for a in (input_ids_bl, media_mask_l, placeholder_id)):
    check_media_counts(input_ids_bl, int(placeholder_id), int(np.sum(media_mask_l)))
  if media_emb_ld.shape[0] == 0:  # a text-only batch: nothing to gather from
    return text_emb_bld
  b, l, _ = text_emb_bld.shape
  is_media_bl = input_ids_bl == placeholder_id
  rank_bl = jnp.cumsum(is_media_bl.reshape(-1)).reshape(b, l) - 1
  # Row of the k-th real token: the first n where the running count of real rows is k + 1.
  real_so_far_l = jnp.cumsum(media_mask_l.astype(jnp.int32))
  row_bl = jnp.minimum(jnp.searchsorted(real_so_far_l, rank_bl + 1), media_emb_ld.shape[0] - 1)
  media_bld = media_emb_ld.astype(text_emb_bld.dtype)[row_bl]
  return jnp.where(is_media_bl[..., None], media_bld, text_emb_bld)
