"""Contrastive image-text losses and their retrieval metric, as pure functions.

Both losses score every image of a batch against every text (``pair_logits``: the
cosine of the L2-normalised embeddings, times ``exp(logit_scale)``, plus SigLIP's
``logit_bias``); row i's image and text are a pair, every other row is a negative:
- ``clip_loss``, CLIP's softmax InfoNCE: the mean over rows of the cross-entropy of each
  image over the texts and of each text over the images, halved (transformers'
  ``image_text_contrastive_loss``);
- ``siglip_loss``, SigLIP's sigmoid loss: ``-log sigmoid(z_ij * logit_ij)`` with
  ``z = +1`` on the pairs and ``-1`` elsewhere, summed over the texts of each image and
  averaged over the images (big_vision's and transformers' form).
``mask_n`` marks the real rows of a padded batch: a padded row is neither a pair nor a
negative, so a batch padded to a fixed shape scores as its real rows alone. Under jit on
a batch sharded over the data axes the (N, N) logits are global: every shard's rows are
the negatives of every other shard's, as in a global-batch contrastive run.

Shape letters: ``n`` pairs (image and text rows), ``e`` the shared embedding width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _unit(x_ne: jax.Array) -> jax.Array:
  x_ne = x_ne.astype(jnp.float32)
  return x_ne / jnp.linalg.norm(x_ne, axis=-1, keepdims=True)


def pair_logits(
  image_ne: jax.Array,
  text_ne: jax.Array,
  logit_scale: jax.Array,
  logit_bias: jax.Array | float = 0.0,
) -> jax.Array:
  """(N images, N texts) float32: ``exp(logit_scale) * cos(image_i, text_j) + logit_bias``."""
  cos_nn = _unit(image_ne) @ _unit(text_ne).T
  return jnp.exp(jnp.asarray(logit_scale, jnp.float32)) * cos_nn + logit_bias


def _mask(mask_n: jax.Array | None, n: int) -> jax.Array:
  return jnp.ones(n, bool) if mask_n is None else jnp.asarray(mask_n, bool)


def clip_loss(
  image_ne: jax.Array,
  text_ne: jax.Array,
  logit_scale: jax.Array,
  mask_n: jax.Array | None = None,
) -> jax.Array:
  """CLIP's symmetric InfoNCE over the real rows (module doc); a float32 scalar."""
  m_n = _mask(mask_n, image_ne.shape[0])
  pairs_nn = m_n[:, None] & m_n[None, :]
  logits_nn = jnp.where(pairs_nn, pair_logits(image_ne, text_ne, logit_scale), -jnp.inf)
  diag_n = jnp.where(m_n, jnp.diagonal(logits_nn), 0.0)  # a padded row's own is -inf
  # a padded row's and column's entries are zeros here, never -inf: no inf, no nan gradient
  image_to_text_n = jax.nn.logsumexp(jnp.where(m_n[:, None], logits_nn, 0.0), axis=1) - diag_n
  text_to_image_n = jax.nn.logsumexp(jnp.where(m_n[None, :], logits_nn, 0.0), axis=0) - diag_n
  per_row_n = jnp.where(m_n, (image_to_text_n + text_to_image_n) / 2, 0.0)
  return per_row_n.sum() / jnp.maximum(m_n.sum(), 1)


def siglip_loss(
  image_ne: jax.Array,
  text_ne: jax.Array,
  logit_scale: jax.Array,
  logit_bias: jax.Array,
  mask_n: jax.Array | None = None,
) -> jax.Array:
  """SigLIP's pairwise sigmoid loss over the real rows (module doc); a float32 scalar."""
  n = image_ne.shape[0]
  m_n = _mask(mask_n, n)
  pairs_nn = m_n[:, None] & m_n[None, :]
  z_nn = 2 * jnp.eye(n, dtype=jnp.float32) - 1
  loglik_nn = jax.nn.log_sigmoid(z_nn * pair_logits(image_ne, text_ne, logit_scale, logit_bias))
  return -jnp.where(pairs_nn, loglik_nn, 0.0).sum() / jnp.maximum(m_n.sum(), 1)


def retrieval_at_1(
  image_ne: jax.Array, text_ne: jax.Array, mask_n: jax.Array | None = None
) -> dict[str, jax.Array]:
  """R@1 over the real rows: the share of texts whose nearest image (among the real ones)
  is their own (``text_to_image``), and of images whose nearest text is (``image_to_text``)."""
  m_n = _mask(mask_n, image_ne.shape[0])
  cos_nn = jnp.where(m_n[:, None] & m_n[None, :], _unit(image_ne) @ _unit(text_ne).T, -jnp.inf)
  own_n = jnp.arange(image_ne.shape[0])
  count = jnp.maximum(m_n.sum(), 1)
  return {
    "text_to_image": jnp.where(m_n, jnp.argmax(cos_nn, axis=0) == own_n, False).sum() / count,
    "image_to_text": jnp.where(m_n, jnp.argmax(cos_nn, axis=1) == own_n, False).sum() / count,
  }
