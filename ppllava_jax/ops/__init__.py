"""PPLLaVA's three equations as pure, channel-last JAX functions.

- Eq. 1, relevance: ``relevance_logits``, ``relevance_scores``
- Eq. 2-3, prompt-guided pooling: ``pool_geometry``, ``prompt_guided_pool``,
  ``separate_spatiotemporal_pool``, ``multi_kernel_pool``
- Eq. 4, text position extension: ``extend_positions``, ``interpolate_positions``

All are jit-, vmap- and grad-safe and take batch-first arrays, so they shard over
the batch axis without change.
"""

from ppllava_jax.ops.geometry import pool_geometry
from ppllava_jax.ops.pooling import (POOL_MODES, multi_kernel_pool, prompt_guided_pool,
                                     separate_spatiotemporal_pool, window_weights)
from ppllava_jax.ops.positions import extend_positions, interpolate_positions
from ppllava_jax.ops.relevance import relevance_logits, relevance_scores

__all__ = [
    "POOL_MODES",
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
