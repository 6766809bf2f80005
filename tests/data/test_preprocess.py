"""Pixel preprocessing against transformers' PIL image processors, and by hand.

The references are transformers 5.23's ``*ImageProcessorPil`` classes (its "slow" PIL
path) on the same inputs. Both sides resize with PIL and round in the same order, so the
bound MAX_DIFF is a float32 rounding allowance that the outputs do not use: they agree
exactly.
"""

import numpy as np
import pytest
from PIL import Image
from transformers import (
  CLIPImageProcessorPil,
  LlavaNextImageProcessorPil,
  LlavaOnevisionImageProcessorPil,
  SiglipImageProcessorPil,
)
from transformers.image_utils import (
  IMAGENET_STANDARD_MEAN,
  IMAGENET_STANDARD_STD,
  OPENAI_CLIP_MEAN,
  OPENAI_CLIP_STD,
)

from ppllava_jax.data.media.preprocess import (
  CLIP_MEAN,
  CLIP_STD,
  LLAVA_NEXT_PINPOINTS,
  ONEVISION_PINPOINTS,
  SIGLIP_MEAN,
  SIGLIP_STD,
  clip_image_pixels,
  llava_next_image_pixels,
  normalize,
  siglip_image_pixels,
  to_rgb,
  video_pixels,
)

MAX_DIFF = 1e-6
# odd sizes; portrait and landscape; smaller than a tile; very wide; square; tall
SIZES = [(333, 517), (517, 333), (40, 50), (90, 1000), (700, 700), (1234, 567)]


def photo(height, width, seed=0):
  """uint8 (H, W, 3): colour gradients, a disc and a bar, sensor-like noise."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
  image = np.stack([255 * x, 255 * y, 128 + 100 * np.sin(6 * (x + y))], axis=-1)
  image[(x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.05] = (240, 30, 60)
  image[(np.abs(y - 0.75) < 0.05) & (x < 0.7)] = (20, 20, 200)
  return np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)


def hf_pixels(processor, image):
  """One image through a transformers processor: its pixel_values[0]."""
  return processor(image, return_tensors="np")["pixel_values"][0]


@pytest.fixture(scope="module")
def llava_next():
  return LlavaNextImageProcessorPil(
    size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
  )


def assert_close(ours, ref):
  assert ours.dtype == np.float32 and ours.shape == ref.shape
  assert np.abs(ours - ref).max() <= MAX_DIFF


def test_constants_are_transformers():
  assert list(CLIP_MEAN) == list(OPENAI_CLIP_MEAN) and list(CLIP_STD) == list(OPENAI_CLIP_STD)
  assert list(SIGLIP_MEAN) == list(IMAGENET_STANDARD_MEAN)
  assert list(SIGLIP_STD) == list(IMAGENET_STANDARD_STD)
  assert [list(p) for p in LLAVA_NEXT_PINPOINTS] == LlavaNextImageProcessorPil.image_grid_pinpoints
  assert [
    list(p) for p in ONEVISION_PINPOINTS
  ] == LlavaOnevisionImageProcessorPil.image_grid_pinpoints


def test_normalize_is_the_equation():
  pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
  out = normalize(pixels, CLIP_MEAN, CLIP_STD)
  expected = (pixels / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)  # float64
  assert out.dtype == np.float32 and out.shape == (2, 3, 5, 7)
  assert np.abs(out - np.moveaxis(expected, -1, 1)).max() <= 1e-6


def test_video_pixels_squash_vs_transformers():
  # LlavaNextVidProcessor: straight to 336 x 336; CLIP's processor with a square size and
  # no crop is that operation
  ref = CLIPImageProcessorPil(size={"height": 336, "width": 336}, do_center_crop=False)
  for frames_thwc in [
    np.stack([photo(48, 64, seed) for seed in range(3)]),  # upscaled
    np.stack([photo(333, 517, seed) for seed in range(2)]),  # downscaled
    np.stack([photo(336, 336, seed) for seed in range(2)]),
  ]:  # a store's
    ours = video_pixels(frames_thwc)
    assert_close(ours, np.stack([hf_pixels(ref, f) for f in frames_thwc]))


def test_video_pixels_letterbox_vs_onevision():
  # LlavaOnevisionVidProcessor pins the best resolution to 384 x 384: one letterboxed tile.
  # OneVision's processor given that single pinpoint makes it as tile 1 (tile 0: squashed).
  ref = LlavaOnevisionImageProcessorPil(
    image_grid_pinpoints=[[384, 384]], image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD
  )
  frames = [photo(333, 517, 0), photo(517, 333, 1), photo(48, 64, 2), photo(384, 384, 3)]
  boxed = video_pixels(frames, 384, SIGLIP_MEAN, SIGLIP_STD, letterbox=True)
  squashed = video_pixels(frames, 384, SIGLIP_MEAN, SIGLIP_STD)
  for i, frame in enumerate(frames):
    base_and_tile = hf_pixels(ref, frame)
    assert_close(boxed[i], base_and_tile[1])
    assert_close(squashed[i], base_and_tile[0])


@pytest.mark.parametrize("size_hw", [(333, 517), (517, 333), (200, 150), (336, 336), (335, 1001)])
def test_clip_image_pixels_vs_transformers(size_hw):
  ref = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
  image = photo(*size_hw)
  assert_close(clip_image_pixels(image), hf_pixels(ref, image))


@pytest.mark.parametrize("size_hw", [(333, 517), (517, 333), (40, 50)])
def test_siglip_image_pixels_vs_transformers(size_hw):
  ref = SiglipImageProcessorPil(size={"height": 384, "width": 384})  # mean = std = 0.5
  image = photo(*size_hw)
  assert_close(siglip_image_pixels(image), hf_pixels(ref, image))


@pytest.mark.parametrize("size_hw", SIZES)
def test_llava_next_vs_transformers(llava_next, size_hw):
  image = photo(*size_hw)
  out = llava_next(image, return_tensors="np")
  ours, image_size = llava_next_image_pixels(image)
  assert image_size == tuple(out["image_sizes"][0]) == size_hw
  assert_close(ours, out["pixel_values"][0])  # same tile count, same pixels


# 333 x 517 fits (384, 768) whole: 1 x 2; 500 x 1300 needs (768, 1536): 2 x 4
@pytest.mark.parametrize("size_hw, tiles", [((333, 517), 1 + 2), ((500, 1300), 1 + 8)])
def test_onevision_vs_transformers(size_hw, tiles):
  ref = LlavaOnevisionImageProcessorPil(image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)
  image = photo(*size_hw)
  ours, image_size = llava_next_image_pixels(
    image, ONEVISION_PINPOINTS, 384, SIGLIP_MEAN, SIGLIP_STD
  )
  assert image_size == size_hw and len(ours) == tiles
  assert_close(ours, hf_pixels(ref, image))


def test_input_modes_vs_transformers(llava_next):
  rgb_hwc = photo(333, 517)
  grey_hw = rgb_hwc.mean(-1).astype(np.uint8)
  alpha_hw = np.linspace(0, 255, 517).astype(np.uint8)[None].repeat(333, 0)
  rgba = Image.fromarray(np.dstack([rgb_hwc, alpha_hw]))
  grey = Image.fromarray(grey_hw)
  palette = Image.fromarray(rgb_hwc).quantize(64)
  opaque_rgba = np.dstack([rgb_hwc, np.full_like(grey_hw, 255)])
  # (ours, transformers'): the same image; transformers takes no (H, W) array
  for image, ref_image in [
    (rgb_hwc, rgb_hwc),
    (Image.fromarray(rgb_hwc), rgb_hwc),
    (grey_hw, grey),
    (grey_hw[..., None], grey_hw[..., None]),
    (grey, grey),
    (palette, palette),
    (opaque_rgba, opaque_rgba),
  ]:
    assert_close(llava_next_image_pixels(image)[0], hf_pixels(llava_next, ref_image))
  # transparency: alpha dropped, as the original's Image.open(...).convert("RGB");
  # transformers 5.23 itself composites onto white, which differs here
  ours = llava_next_image_pixels(rgba)[0]
  assert_close(ours, hf_pixels(llava_next, rgba.convert("RGB")))
  assert np.abs(ours - hf_pixels(llava_next, rgba)).max() > 0.5


def test_anyres_layout_by_hand():
  # white 100 x 300 on llava-v1.6 pinpoints: every pinpoint holds it whole, so the least
  # wasteful, (336, 672), wins: 1 x 2 tiles. Fitted: width 672, height
  # ceil(100 * (672 / 300)) = 225, not 224: in binary 672 / 300 is a hair above 2.24.
  # Centred: 55 rows of black padding above, rows 55 .. 279 white, 56 black below.
  pixels, _ = llava_next_image_pixels(np.full((100, 300, 3), 255, np.uint8))
  white = ((1 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).astype(np.float32)
  black = (-np.array(CLIP_MEAN) / np.array(CLIP_STD)).astype(np.float32)
  expected_nchw = np.empty((3, 3, 336, 336), np.float32)
  expected_nchw[:] = black[:, None, None]
  expected_nchw[0] = white[:, None, None]  # the base tile: the whole image, squashed
  expected_nchw[1:, :, 55:280] = white[:, None, None]
  np.testing.assert_allclose(pixels, expected_nchw, atol=1e-6)


def test_bad_inputs():
  with pytest.raises(TypeError):
    to_rgb(np.zeros((4, 4, 3), np.float32))
  with pytest.raises(TypeError):
    to_rgb([[0, 1], [2, 3]])
  with pytest.raises(ValueError):
    to_rgb(np.zeros((4, 4, 2), np.uint8))
  with pytest.raises(ValueError):
    clip_image_pixels(photo(40, 50), size=224, crop=336)
  with pytest.raises(ValueError, match="multiples"):
    llava_next_image_pixels(photo(40, 50), [[336, 500]])
