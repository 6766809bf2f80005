"""Pixels for the vision towers: video frames, CLIP and SigLIP images, LLaVA-NeXT anyres tiles.

Every function returns float32, channel-first, normalised pixels, and reproduces the
PIL path of transformers' image processors (``*ImageProcessorPil`` in 5.23, the "slow"
processors the original ran), for which the tests find no difference at all.

Decisions:

- Resizing is PIL's on uint8 RGB, bicubic by default (the ``resample: 3`` of the
  CLIP-336 and llava-v1.6 preprocessor configs); transformers converts to PIL as well.
- Rescale and normalise follow transformers' order of operations (``x * (1/255)`` in
  float64, cast to float32, then ``(x - mean) / std`` in float32), so outputs are
  bit-identical to its processors rather than merely close.
- Video frames (the original's ``LlavaNextVidProcessor``, Vicuna models) are resized
  straight to size x size, aspect ignored. For the Qwen models the original's
  ``LlavaOnevisionVidProcessor`` instead fits each frame into one 384 tile, aspect kept,
  and pads it black and centred: ``letterbox=True``.
- RGB conversion is PIL's ``convert("RGB")``, which drops an alpha channel: the original
  opened every image with ``Image.open(path).convert("RGB")`` before its processor.
  transformers 5.23 would composite transparency onto white instead.
- One anyres implementation serves LLaVA-NeXT (336 tiles, ``LLAVA_NEXT_PINPOINTS``,
  CLIP mean/std) and LLaVA-OneVision (384 tiles, ``ONEVISION_PINPOINTS``, SigLIP
  mean/std): for a single image their processors differ only in those parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ppllava_jax.ops.anyres import anyres_grid_shape

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
BICUBIC = Image.Resampling.BICUBIC
# (height, width); llava-v1.6's set, and LLaVA-OneVision's 1x1 .. 6x6 tiles of 384
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
ONEVISION_PINPOINTS = tuple((384 * r, 384 * c) for r in range(1, 7) for c in range(1, 7))

ImageLike = Image.Image | np.ndarray
Stats = Sequence[float]


def to_rgb(image: ImageLike) -> Image.Image:
  """A PIL RGB image from a PIL image of any mode or a uint8 (H, W), (H, W, 1|3|4) array."""
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8:
      raise TypeError(f"image arrays must be uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
      raise ValueError(f"image arrays must be (H, W) or (H, W, 1|3|4), got {image.shape}")
    image = Image.fromarray(image)
  elif not isinstance(image, Image.Image):
    raise TypeError(f"expected a PIL image or a uint8 array, got {type(image).__name__}")
  return image if image.mode == "RGB" else image.convert("RGB")


def normalize(pixels_hwc: np.ndarray, mean: Stats, std: Stats) -> np.ndarray:
  """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) = (x / 255 - mean) / std."""
  # transformers' rounding steps, for bit-identical outputs
  scaled = (pixels_hwc.astype(np.float64) * (1 / 255)).astype(np.float32)
  out = (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return np.ascontiguousarray(np.moveaxis(out, -1, -3))


def _fit_size(size_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int]:
  """The size within ``target_hw`` keeping the aspect: transformers' ``get_patch_output_size``
  (the limiting side exact, the other ceil'd; the scale is divided first, as there, so
  ties land the same way)."""
  (h, w), (th, tw) = size_hw, target_hw
  if tw / w < th / h:
    return min(math.ceil(h * (tw / w)), th), tw
  return th, min(math.ceil(w * (th / h)), tw)


def _letterbox(image: Image.Image, target_hw: tuple[int, int], resample: int) -> np.ndarray:
  """``image`` fitted into ``target_hw`` and padded with black, centred (an odd
  remainder goes below and right), as uint8 (H, W, 3)."""
  h, w = _fit_size((image.height, image.width), target_hw)
  canvas_hwc = np.zeros((*target_hw, 3), np.uint8)
  top, left = (target_hw[0] - h) // 2, (target_hw[1] - w) // 2
  canvas_hwc[top : top + h, left : left + w] = np.asarray(image.resize((w, h), resample))
  return canvas_hwc


def _square(image: Image.Image, size: int, letterbox: bool, resample: int) -> np.ndarray:
  if letterbox:
    return _letterbox(image, (size, size), resample)
  return np.asarray(image.resize((size, size), resample))


def video_pixels(
  frames_thwc: np.ndarray | Sequence[ImageLike],
  size: int = 336,
  mean: Stats = CLIP_MEAN,
  std: Stats = CLIP_STD,
  *,
  letterbox: bool = False,
  resample: int = BICUBIC,
) -> np.ndarray:
  """Video frames -> float32 (T, 3, size, size).

  Each frame is resized straight to size x size (the original's ``LlavaNextVidProcessor``)
  or, with ``letterbox``, fitted and padded black (its ``LlavaOnevisionVidProcessor``:
  use size 384 and SigLIP mean/std there).
  """
  return normalize(
    np.stack([_fitted(f, size, letterbox, resample) for f in frames_thwc]), mean, std
  )


def _fitted(frame: ImageLike, size: int, letterbox: bool, resample: int) -> np.ndarray:
  """A frame at size x size. One already so as RGB uint8 (a media store's) is returned as
  it is: resizing or fitting an image to its own size is the identity (PIL copies it), and
  the round trip through PIL was most of a stored sample's preprocessing."""
  if isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.shape == (size, size, 3):
    return frame
  return _square(to_rgb(frame), size, letterbox, resample)


def siglip_image_pixels(
  image: ImageLike,
  size: int = 384,
  mean: Stats = SIGLIP_MEAN,
  std: Stats = SIGLIP_STD,
  resample: int = BICUBIC,
) -> np.ndarray:
  """SigLIP's ``SiglipImageProcessor``: resized straight to size x size -> (3, size, size)."""
  return normalize(_square(to_rgb(image), size, False, resample), mean, std)


def clip_image_pixels(
  image: ImageLike,
  size: int = 336,
  crop: int = 336,
  mean: Stats = CLIP_MEAN,
  std: Stats = CLIP_STD,
  resample: int = BICUBIC,
) -> np.ndarray:
  """CLIP's ``CLIPImageProcessor``: shortest side to ``size``, centre crop -> (3, crop, crop).

  The long side becomes ``int(size * long / short)`` (truncated), and the crop starts at
  ``(side - crop) // 2``, as in transformers.
  """
  if crop > size:
    raise ValueError(f"clip_image_pixels: crop ({crop}) must not exceed size ({size})")
  rgb = to_rgb(image)
  h, w = rgb.height, rgb.width
  new_h, new_w = (int(size * h / w), size) if w <= h else (size, int(size * w / h))
  resized_hwc = np.asarray(rgb.resize((new_w, new_h), resample))
  top, left = (new_h - crop) // 2, (new_w - crop) // 2
  return normalize(resized_hwc[top : top + crop, left : left + crop], mean, std)


def llava_next_image_pixels(
  image: ImageLike,
  grid_pinpoints: Sequence[Sequence[int]] = LLAVA_NEXT_PINPOINTS,
  tile: int = 336,
  mean: Stats = CLIP_MEAN,
  std: Stats = CLIP_STD,
  resample: int = BICUBIC,
) -> tuple[np.ndarray, tuple[int, int]]:
  """LLaVA-NeXT anyres: (float32 (1 + R*C, 3, tile, tile), the image's (height, width)).

  Tile 0 is the whole image resized straight to tile x tile. The others: the image fitted,
  aspect kept, into the best (height, width) pinpoint of ``grid_pinpoints``
  (``ops.anyres``'s choice, (R*tile, C*tile)), padded black and centred, then cut into
  R x C tiles, row-major. As ``LlavaNextImageProcessor``; LLaVA-OneVision's
  ``LlavaOnevisionImageProcessor`` is the same with ``ONEVISION_PINPOINTS``, ``tile=384``
  and SigLIP mean/std. Their ``do_pad`` (zero tiles appended so that a batch of images
  has equal tile counts) is left to the caller: each image keeps its own count here.
  """
  rgb = to_rgb(image)
  size_hw = (rgb.height, rgb.width)
  rows, cols = anyres_grid_shape(size_hw, grid_pinpoints, tile)
  canvas_hwc = _letterbox(rgb, (rows * tile, cols * tile), resample)
  tiles_ihwc = (
    canvas_hwc.reshape(rows, tile, cols, tile, 3)
    .transpose(0, 2, 1, 3, 4)
    .reshape(rows * cols, tile, tile, 3)
  )
  base_hwc = np.asarray(rgb.resize((tile, tile), resample))
  return normalize(np.concatenate([base_hwc[None], tiles_ihwc]), mean, std), size_hw
