"""Prompt-to-patch relevance (paper Eq. 1).

``s_(t,h,w) = softmax over all (t, h, w) of one sample of exp(logit_scale) * cos(c, v_(t,h,w))``
with ``v`` the visually projected patch embeddings and ``c`` the projected prompt
embedding. For an anyres image the tiles are put on the T axis, so the softmax
runs over all tiles jointly, as in the original code.

Everything is computed and returned in (at least) float32 whatever the input dtype: the
softmax spans ~18k positions (32 frames x 576 patches) and bf16 probabilities of
that size (~5e-5) lose the differences the pooling temperature amplifies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ppllava_jax.ops.dtypes import compute_dtype


def _check_inputs(patch_emb, text_emb, fn: str) -> None:
  if patch_emb.ndim != 5:
    raise ValueError(f"{fn}: patch_emb must be (B, T, H, W, E), got shape {tuple(patch_emb.shape)}")
  if text_emb.ndim != 2 or text_emb.shape != (patch_emb.shape[0], patch_emb.shape[-1]):
    raise ValueError(
      f"{fn}: text_emb must be (B, E) = {(patch_emb.shape[0], patch_emb.shape[-1])} "
      f"to match patch_emb {tuple(patch_emb.shape)}, got shape {tuple(text_emb.shape)}"
    )


def _l2_normalize(x: jax.Array) -> jax.Array:
  # Like torch's `x / x.norm(dim=-1, keepdim=True)` but finite (zero) for zero vectors.
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def relevance_logits(patch_emb: jax.Array, text_emb: jax.Array) -> jax.Array:
  """Cosine similarity of each patch to the prompt: (B,T,H,W,E), (B,E) -> (B,T,H,W)."""
  _check_inputs(patch_emb, text_emb, "relevance_logits")
  dtype = compute_dtype(patch_emb.dtype, text_emb.dtype)
  v_bthwe = _l2_normalize(patch_emb.astype(dtype))
  c_be = _l2_normalize(text_emb.astype(dtype))
  return jnp.einsum("bthwe,be->bthw", v_bthwe, c_be, precision=jax.lax.Precision.HIGHEST)


def relevance_scores(
  patch_emb: jax.Array,
  text_emb: jax.Array,
  logit_scale: jax.Array | float,
  mask: jax.Array | None = None,
) -> jax.Array:
  """Relevance probabilities (B, T, H, W), at least float32, summing to 1 per sample.

  ``logit_scale`` is CLIP's log temperature (``exp`` is applied here; ~4.6052 -> 100).
  ``mask`` (B, T, H, W) bool, optional, marks real positions: padded frames of a
  batch with mixed frame counts get probability 0 and stay out of the denominator.
  """
  cos_bthw = relevance_logits(patch_emb, text_emb)
  logits_bthw = cos_bthw * jnp.exp(jnp.asarray(logit_scale, cos_bthw.dtype))
  b = logits_bthw.shape[0]
  if mask is not None:
    if mask.shape != logits_bthw.shape:
      raise ValueError(
        f"relevance_scores: mask must be (B, T, H, W) = {logits_bthw.shape}, "
        f"got shape {tuple(mask.shape)}"
      )
    mask = mask.reshape(b, -1)
  probs = jax.nn.softmax(logits_bthw.reshape(b, -1), axis=-1, where=mask)  # flat (t, h, w)
  if mask is not None:
    probs = jnp.where(mask, probs, 0.0)
  return probs.reshape(logits_bthw.shape)
