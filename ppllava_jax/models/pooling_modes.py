"""The pooling modes (``PoolingConfig.mode``): ``MODES`` is the one place they differ, so
a new mode is one entry.

``"ppllava"`` (the released code: softmax of the probabilities at temperature 0.01 per
window), ``"paper"`` (Eq. 3, probability-weighted sum), ``"average"`` (the same windows,
plain mean: PLLaVA-style), and the baselines ``"llava_next_video"`` (2x2 spatial mean
*before* the projector, images unpooled, exactly transformers' LlavaNextVideo),
``"llava_onevision"`` (bilinear 2x downscale *after* the projector and one newline per
video, images with the ``anyres_max`` downscale: exactly transformers' LlavaOnevision)
and ``"none"`` (every token). Only the first two need the scorer.

Each entry's network function takes the model as an argument, so this module imports
neither the network nor its config (both import it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from ppllava_jax import ops

if TYPE_CHECKING:
  from ppllava_jax.models.ppllava import PPLLaVA
  from ppllava_jax.models.ppllava_config import PPLLaVAConfig


def _windowed(
  model: PPLLaVA, feats_btggf: jax.Array, text_be: jax.Array | None, mask_bt: jax.Array | None
) -> jax.Array:
  """PPLLaVA's windows after the projector, with the video geometry of ``PoolingConfig``."""
  _, kernel, stride = model.cfg.pooling.video_geometry(feats_btggf.shape[1], model.cfg.vision.grid)
  return model.pool(feats_btggf, text_be, kernel, stride, mask_bt)


def _windowed_count(cfg: PPLLaVAConfig, frames: int) -> int:
  return int(np.prod(cfg.pooling.video_geometry(frames, cfg.vision.grid)[0]))


def _spatial_mean(
  model: PPLLaVA, feats_btggf: jax.Array, text_be: jax.Array | None, mask_bt: jax.Array | None
) -> jax.Array:
  """LLaVA-NeXT-Video: a (1, s, s) mean of the patches, then the projector."""
  s = model.cfg.pooling.llava_next_stride
  ones = jnp.ones(feats_btggf.shape[:4], jnp.float32)
  return model.multi_modal_projector(
    ops.prompt_guided_pool(feats_btggf, ones, (1, s, s), mode="average")
  )


def _resized(
  model: PPLLaVA, feats_btggf: jax.Array, text_be: jax.Array | None, mask_bt: jax.Array | None
) -> jax.Array:
  """LLaVA-OneVision: each projected frame resized bilinearly to ceil(g / 2) a side, then
  one newline per video."""
  x_btggd = model.multi_modal_projector(feats_btggf)
  b, t, g, _, d = x_btggd.shape
  half = -(-g // 2)  # ceil, as transformers' apply_pooling
  halved_btggd = jax.image.resize(
    x_btggd.astype(jnp.float32), (b, t, half, half, d), "bilinear", antialias=False
  ).astype(x_btggd.dtype)
  newline = jnp.broadcast_to(model.image_newline[...].astype(halved_btggd.dtype), (b, 1, d))
  return jnp.concatenate([halved_btggd.reshape(b, -1, d), newline], axis=1)


@dataclasses.dataclass(frozen=True)
class _Mode:
  """One pooling mode.

  videos: (model, (B, T, g, g, F) patches of B videos, (B, E) prompt features or None,
    (B, T) real-frame mask or None) -> (B, ..., D) tokens of each video (frames never mix
    across items outside PPLLaVA's windows, so only those read the mask)
  count: (config, frames) -> how many tokens ``videos`` makes of one video
  windows: the ``ops.prompt_guided_pool`` weights of PPLLaVA's windows, which image tiles
    are pooled with too (None: tiles unpooled)
  scored: the windows weigh patches by the scorer's relevance (Eq. 1)
  anyres_max: images take OneVision's ``anyres_max_N`` downscale
  """

  videos: Callable[[PPLLaVA, jax.Array, jax.Array | None, jax.Array | None], jax.Array]
  count: Callable[[PPLLaVAConfig, int], int]
  windows: str | None = None
  scored: bool = False
  anyres_max: bool = False


MODES: dict[str, _Mode] = {
  "ppllava": _Mode(_windowed, _windowed_count, windows="softmax", scored=True),
  "paper": _Mode(_windowed, _windowed_count, windows="weighted_sum", scored=True),
  "average": _Mode(_windowed, _windowed_count, windows="average"),
  "llava_next_video": _Mode(
    _spatial_mean, lambda cfg, t: t * (cfg.vision.grid // cfg.pooling.llava_next_stride) ** 2
  ),
  "llava_onevision": _Mode(
    _resized, lambda cfg, t: t * (-(-cfg.vision.grid // 2)) ** 2 + 1, anyres_max=True
  ),
  "none": _Mode(
    lambda model, feats, text, mask: model.multi_modal_projector(feats),
    lambda cfg, t: t * cfg.vision.grid**2,
  ),
}
POOLING_MODES = tuple(MODES)
