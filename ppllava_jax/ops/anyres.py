"""LLaVA-NeXT "anyres" tiling: the grid an image is cut into, how many LLM tokens
it becomes, and how its tile features are packed into one sequence.

Matches transformers 5.23 (``select_best_resolution``, and in ``llava_next``:
``get_anyres_image_grid_shape``, ``unpad_image``, ``LlavaNextModel.pack_image_features``,
``LlavaNextProcessor._get_number_of_features``). Every size here is (height, width),
grid pinpoints included.

An image of size (H, W) becomes ``1 + R*C`` square tiles of ``tile_size`` pixels:
tile 0, the "base", is the whole image squashed into one tile; tiles 1.. are the image
resized to fit the best pinpoint ``(R*tile_size, C*tile_size)``, padded to it (centred)
and cut row-major. The vision tower turns each tile into an S x S feature grid with
``S = tile_size // patch_size`` (24 for CLIP ViT-L/14 at 336 px). The LLM then sees

- the base tile: S*S tokens row-major, no newline;
- the other tiles assembled into one (R*S, C*S) grid, the rows or columns that fall in
  the padding cut off (below), then read row by row, each row followed by one
  ``image_newline`` token,

so one image costs ``S*S + h*w + h`` tokens, (h, w) being the unpadded grid.

Unpadding works on the feature grid, not on pixels: if the image is relatively wider
than the grid, ``kept = int(round(H * (grid_w / W), 7))`` rows survive the computation
(rounded to 7 decimals, then truncated: 14.999999999999998 counts as 15, 14.9 as 14) and
``(grid_h - kept) // 2`` rows are cut at *each* end, so an odd difference keeps
``kept + 1`` rows; otherwise the same with columns.

PPLLaVA pools every tile (1, pool, pool) before packing (``pool=3``: 24x24 -> 8x8), so
there ``S = (tile_size // patch_size) // pool`` (a remainder is dropped, as in
``pool_geometry``) and the base tile, the grid and the unpadding are all on pooled
features: the rows to cut are computed on the pooled (R*S, C*S) grid by the rule above,
as the original code does by calling transformers' ``unpad_image`` after its projector.
That is not "pool the unpadded full grid": a pooled row straddling padding and image is
kept or cut whole. E.g. a 500x300 image on pinpoint 672x336 (R, C = 2, 1): unpooled,
rows 4..43 of 48 stay (1576 tokens, the processor's count); pooled by 3, rows 1..14 of
16 stay (64 + 14*8 + 14 = 190 tokens), which cover full rows 3..44, one padding row each
side.

LLaVA-OneVision (``vision_aspect_ratio="anyres_max_N"``, ``max_patches=N`` here) adds
one step after unpadding, as its ``pack_image_features`` does: when the unpadded (h, w)
grid holds more than about N tiles' worth of features, i.e.
``ratio = sqrt(h*w / (N*S*S)) > 1.1``, the grid is resized bilinearly (half-pixel
centres, no antialiasing: torch's ``interpolate(mode="bilinear")``) to
``(int(h // ratio), int(w // ratio))`` before the newlines are added.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from ppllava_jax.ops.geometry import pool_geometry

Size2 = tuple[int, int]


def _as_size2(value, name: str) -> Size2:
  try:
    height, width = (operator.index(v) for v in value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be 2 ints (height, width), got {value!r}") from None
  if height < 1 or width < 1:
    raise ValueError(f"{name} must be positive (height, width), got {(height, width)}")
  return height, width


def select_best_resolution(
  original_size: Sequence[int], possible_resolutions: Sequence[Sequence[int]]
) -> Size2:
  """The (height, width) pinpoint that keeps most of the image, then wastes least.

  Per candidate, the image is scaled to fit it with its aspect kept (sides truncated
  to ints); ``effective`` is that pixel count, capped at the original's (upscaling adds
  nothing), ``wasted`` the rest of the candidate's area. The largest effective wins,
  then the smallest wasted, then the first listed.
  """
  height, width = _as_size2(original_size, "select_best_resolution: original_size")
  candidates = [
    _as_size2(r, "select_best_resolution: a possible resolution") for r in possible_resolutions
  ]
  if not candidates:
    raise ValueError("select_best_resolution: possible_resolutions is empty")

  def fit(candidate: Size2) -> tuple[int, int]:
    ch, cw = candidate
    scale = min(cw / width, ch / height)
    effective = min(int(width * scale) * int(height * scale), width * height)
    return effective, -(ch * cw - effective)

  return max(candidates, key=fit)  # max returns the first of equal keys


def anyres_grid_shape(
  original_size: Sequence[int], grid_pinpoints: Sequence[Sequence[int]], tile_size: int
) -> Size2:
  """(rows, cols) of tiles an image of ``original_size`` is cut into, base tile excluded.

  transformers calls ``tile_size`` "patch_size" here (it passes the vision tower's
  image size). Every pinpoint must be a multiple of ``tile_size``; transformers does
  not check, and its tile count (ceil) and grid shape (floor) disagree otherwise.
  """
  if tile_size < 1:
    raise ValueError(f"anyres_grid_shape: tile_size must be >= 1, got {tile_size}")
  pinpoints = [_as_size2(p, "anyres_grid_shape: a grid pinpoint") for p in grid_pinpoints]
  off = [p for p in pinpoints if p[0] % tile_size or p[1] % tile_size]
  if off:
    raise ValueError(
      f"anyres_grid_shape: grid pinpoints must be multiples of tile_size {tile_size}, got {off}"
    )
  best_h, best_w = select_best_resolution(original_size, pinpoints)
  return best_h // tile_size, best_w // tile_size


def _unpad_margins(original_size: Size2, grid_size: Size2) -> Size2:
  """Rows and columns cut from *each* end of the assembled feature grid."""
  height, width = original_size
  grid_h, grid_w = grid_size
  # Float division and round-then-truncate as transformers does, so that sizes on a
  # boundary land on the same side.
  if width / height > grid_w / grid_h:  # relatively wider: padded above and below
    kept = int(round(height * (grid_w / width), 7))
    return (grid_h - kept) // 2, 0
  kept = int(round(width * (grid_h / height), 7))
  return 0, (grid_w - kept) // 2


def _downscaled(grid: Size2, side: int, max_patches: int | None) -> Size2:
  """The unpadded grid after OneVision's ``anyres_max`` resize (module doc)."""
  h, w = grid
  if max_patches is None:
    return grid
  ratio = math.sqrt(h * w / (max_patches * side * side))
  return (int(h // ratio), int(w // ratio)) if ratio > 1.1 else grid


def _packed_geometry(
  original_size, grid_pinpoints, tile_size: int, patch_size: int, pool: int
) -> tuple[Size2, int, Size2]:
  """((rows, cols) of tiles, features per tile side, (rows, cols) cut from each end)."""
  original_size = _as_size2(original_size, "image size")
  rows, cols = anyres_grid_shape(original_size, grid_pinpoints, tile_size)
  if patch_size < 1 or tile_size < patch_size:
    raise ValueError(f"patch_size must be in [1, tile_size={tile_size}], got {patch_size}")
  unpooled = tile_size // patch_size
  (_, side, _), _, _ = pool_geometry((1, unpooled, unpooled), kernel=(1, pool, pool))
  return (rows, cols), side, _unpad_margins(original_size, (rows * side, cols * side))


def num_image_features(
  original_size: Sequence[int],
  grid_pinpoints: Sequence[Sequence[int]],
  tile_size: int,
  patch_size: int,
  pool: int = 1,
  max_patches: int | None = None,
) -> int:
  """LLM tokens one image of ``original_size`` becomes: ``S*S + h*w + h`` (module doc).

  Features exclude CLS (``vision_feature_select_strategy="default"``, as in LLaVA-NeXT
  and PPLLaVA); with ``pool=1`` this is the number of ``<image>`` tokens
  ``LlavaNextProcessor`` inserts. ``pool`` > 1 counts PPLLaVA's (1, pool, pool)
  pooling of every tile, base included, with unpadding on the pooled grid.
  ``max_patches``: LLaVA-OneVision's ``anyres_max_N`` downscale (module doc).
  """
  (rows, cols), side, (cut_h, cut_w) = _packed_geometry(
    original_size, grid_pinpoints, tile_size, patch_size, pool
  )
  kept_h, kept_w = _downscaled(
    (rows * side - 2 * cut_h, cols * side - 2 * cut_w), side, max_patches
  )
  return side * side + kept_h * kept_w + kept_h


def pack_image_features(
  features_per_image: Sequence[jax.Array],
  image_sizes: Sequence[Sequence[int]],
  grid_pinpoints: Sequence[Sequence[int]],
  tile_size: int,
  patch_size: int,
  image_newline: jax.Array,
  pool: int = 1,
  max_patches: int | None = None,
) -> list[jax.Array]:
  """Packs each image's tile features into its LLM token sequence (module doc).

  ``features_per_image[i]`` is (1 + R*C, S*S, D): the base tile, then the grid tiles
  row-major, each tile's S x S features row-major (after projection and, for
  ``pool`` > 1, pooling). ``image_sizes[i]`` is the original (height, width);
  ``max_patches`` applies LLaVA-OneVision's ``anyres_max_N`` downscale;
  ``image_newline`` is (D,) and is cast to the features' dtype.

  Returns one (num_image_features(...), D) array per image. Lengths depend on the
  host-side image sizes, so call this outside ``jax.jit``, per batch of images; under
  jit it would compile once per distinct geometry.
  """
  if len(features_per_image) != len(image_sizes):
    raise ValueError(
      f"pack_image_features: {len(features_per_image)} feature arrays but "
      f"{len(image_sizes)} image sizes"
    )
  if image_newline.ndim != 1:
    raise ValueError(
      f"pack_image_features: image_newline must be (D,), got shape {tuple(image_newline.shape)}"
    )
  d = image_newline.shape[0]
  packed = []
  for i, (tiles_ipd, size) in enumerate(zip(features_per_image, image_sizes)):
    (rows, cols), side, (cut_h, cut_w) = _packed_geometry(
      size, grid_pinpoints, tile_size, patch_size, pool
    )
    expected = (1 + rows * cols, side * side, d)
    if tuple(tiles_ipd.shape) != expected:
      raise ValueError(
        f"pack_image_features: image {i} of size {tuple(size)} needs "
        f"(1 + {rows}x{cols} tiles, {side}x{side} features, D={d}) = "
        f"{expected}, got shape {tuple(tiles_ipd.shape)}"
      )
    tiles_ipd = jnp.asarray(tiles_ipd)
    grid_h, grid_w = rows * side, cols * side
    grid_hwd = (
      tiles_ipd[1:]
      .reshape(rows, cols, side, side, d)
      .transpose(0, 2, 1, 3, 4)
      .reshape(grid_h, grid_w, d)
    )
    grid_hwd = grid_hwd[cut_h : grid_h - cut_h, cut_w : grid_w - cut_w]
    small = _downscaled(grid_hwd.shape[:2], side, max_patches)  # type: ignore[arg-type]  # (H, W)
    if small != grid_hwd.shape[:2]:
      grid_hwd = jax.image.resize(
        grid_hwd.astype(jnp.float32), (*small, d), "bilinear", antialias=False
      ).astype(tiles_ipd.dtype)
    newline_h1d = jnp.broadcast_to(image_newline.astype(tiles_ipd.dtype), (grid_hwd.shape[0], 1, d))
    rows_ld = jnp.concatenate([grid_hwd, newline_h1d], axis=1).reshape(-1, d)
    packed.append(jnp.concatenate([tiles_ipd[0], rows_ld], axis=0))
  return packed
