"""PPLLaVA's three equations as pure, channel-last JAX functions.

- Eq. 1, relevance: ``relevance_logits``, ``relevance_scores``
- Eq. 2-3, prompt-guided pooling: ``pool_geometry``, ``prompt_guided_pool``,
  ``separate_spatiotemporal_pool``, ``multi_kernel_pool``
- Eq. 4, text position extension: ``extend_positions``, ``interpolate_positions``
- LLaVA-NeXT composition: anyres tiling / packing (``anyres_grid_shape``,
  ``num_image_features``, ``pack_image_features``, ``select_best_resolution``) and the
  static-shape media merge (``merge_media``, ``check_media_counts``)

All are jit-, vmap- and grad-safe and take batch-first arrays, so they shard over
the batch axis without change.
"""

from ppllava_jax.ops.anyres import (
  anyres_grid_shape,
  num_image_features,
  pack_image_features,
  select_best_resolution,
)
from ppllava_jax.ops.geometry import pool_geometry
from ppllava_jax.ops.merge import check_media_counts, merge_media
from ppllava_jax.ops.pooling import (
  POOL_MODES,
  multi_kernel_pool,
  prompt_guided_pool,
  separate_spatiotemporal_pool,
  window_weights,
)
from ppllava_jax.ops.positions import extend_positions, interpolate_positions
from ppllava_jax.ops.relevance import relevance_logits, relevance_scores

__all__ = [
  "POOL_MODES",
  "anyres_grid_shape",
  "check_media_counts",
  "merge_media",
  "num_image_features",
  "pack_image_features",
  "select_best_resolution",
  "extend_positions",
  "interpolate_positions",
  "multi_kernel_pool",
  "pool_geometry",
  "prompt_guided_pool",
  "relevance_logits",
  "relevance_scores",
  "separate_spatiotemporal_pool",
  "window_weights",
]
