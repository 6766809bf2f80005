"""anyres geometry and packing against transformers' own functions and processor."""

import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.image_processing_utils import select_best_resolution as hf_select
from transformers.models.llava_next import modeling_llava_next as hf

from ppllava_jax.ops import anyres

# (tile_size, patch_size, pinpoints): llava-v1.6's CLIP-336 set, and a 1x1..3x3 set on
# SigLIP's 384-px tile, where 384 / 14 leaves a remainder (27 patches per side).
PINPOINT_SETS = {
  "llava_v1.6": (336, 14, [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]),
  "3x3_384": (384, 14, [[384 * r, 384 * c] for r in (1, 2, 3) for c in (1, 2, 3)]),
}
# portrait, landscape, square, smaller than a tile, very wide, odd sizes, and one whose
# unpadded width computes to 14.999...: transformers rounds it to 15 before truncating.
SIZES = [(500, 300), (480, 640), (700, 700), (200, 150), (90, 1000), (1234, 567), (328, 205)]
# More sizes where plain truncation (older transformers) would cut one row or column
# pair more than the 7-decimal rounding does (the first for llava_v1.6, the second 3x3_384).
ROUNDING_SIZES = [(47, 1128), (820, 738)]


def random_sizes(n, seed=0):
  rng = np.random.default_rng(seed)
  return [tuple(s) for s in rng.integers(1, 2000, size=(n, 2)).tolist()]


@pytest.mark.parametrize("name", PINPOINT_SETS)
def test_geometry_matches_transformers(name):
  tile, _, pinpoints = PINPOINT_SETS[name]
  for size in SIZES + random_sizes(400):
    assert anyres.select_best_resolution(size, pinpoints) == hf_select(size, pinpoints)
    rows, cols = anyres.anyres_grid_shape(size, pinpoints, tile)
    assert (rows, cols) == hf.get_anyres_image_grid_shape(size, pinpoints, tile)
    assert 1 + rows * cols == hf.image_size_to_num_patches(size, pinpoints, tile)


def test_select_best_resolution_ties_go_to_the_first_listed():
  # A small image fits every pinpoint whole (effective area capped at its own), so the
  # least wasted wins; 336x672 and 672x336 tie and the first listed is taken, whatever
  # the image's orientation.
  for pinpoints in ([[336, 672], [672, 336]], [[672, 336], [336, 672]]):
    for size in [(200, 150), (150, 200)]:
      assert anyres.select_best_resolution(size, pinpoints) == tuple(pinpoints[0])
      assert hf_select(size, pinpoints) == tuple(pinpoints[0])


def tiny_processor(tile, patch, pinpoints):
  """A real LlavaNextProcessor with a 3-word tokenizer: nothing is downloaded."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor, PreTrainedTokenizerFast

  words = Tokenizer(models.WordLevel({"<unk>": 0, "<image>": 1, "hi": 2}, unk_token="<unk>"))
  words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>")
  tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
  images = LlavaNextImageProcessorPil(
    size={"shortest_edge": tile},
    crop_size={"height": tile, "width": tile},
    image_grid_pinpoints=pinpoints,
  )
  # llava-hf's settings: the tower has CLS (+1), the "default" strategy drops it (-1).
  return LlavaNextProcessor(
    image_processor=images,
    tokenizer=tokenizer,
    patch_size=patch,
    vision_feature_select_strategy="default",
    num_additional_image_tokens=1,
  )


@pytest.mark.parametrize("name", PINPOINT_SETS)
def test_num_image_features_is_the_processors_count(name):
  tile, patch, pinpoints = PINPOINT_SETS[name]
  processor = tiny_processor(tile, patch, pinpoints)
  rng = np.random.default_rng(0)
  for size in SIZES:
    image = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
    out = processor(images=[image], text=["hi <image> hi"], return_tensors="np")
    rows, cols = anyres.anyres_grid_shape(size, pinpoints, tile)
    assert out["pixel_values"].shape[1] == 1 + rows * cols, size
    assert (out["input_ids"] == 1).sum() == anyres.num_image_features(
      size, pinpoints, tile, patch
    ), size
  # Many more sizes through the processor's count alone (no pixels), for the rounding.
  sizes = random_sizes(400, seed=1) + ROUNDING_SIZES
  want = processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
  assert [anyres.num_image_features(s, pinpoints, tile, patch) for s in sizes] == want


def hf_pack(features, size, pinpoints, tile, side, newline):
  """LlavaNextModel.pack_image_features on a config whose tiles are side x side."""
  # transformers reads the per-tile grid as vision image_size // patch_size; a patch of
  # tile // side makes that the (pooled) side, which is how the original PPLLaVA code
  # reuses this packing after pooling every tile.
  config = hf.LlavaNextConfig(
    vision_config={
      "model_type": "clip_vision_model",
      "image_size": tile,
      "patch_size": tile // side,
    },
    image_grid_pinpoints=pinpoints,
  )
  packed, lengths = hf.LlavaNextModel.pack_image_features(
    types.SimpleNamespace(config=config),
    [torch.from_numpy(features)],
    torch.tensor([size]),
    "default",
    torch.from_numpy(newline),
  )
  assert lengths.tolist() == [packed[0].shape[0]]
  return packed[0].numpy()


@pytest.mark.parametrize("pool", [1, 3])
@pytest.mark.parametrize("name", PINPOINT_SETS)
def test_pack_matches_transformers(name, pool):
  tile, patch, pinpoints = PINPOINT_SETS[name]
  side = (tile // patch) // pool
  rng = np.random.default_rng(pool)
  newline = rng.standard_normal(3).astype(np.float32)
  features, sizes = [], SIZES
  for size in sizes:
    rows, cols = anyres.anyres_grid_shape(size, pinpoints, tile)
    features.append(rng.standard_normal((1 + rows * cols, side * side, 3)).astype(np.float32))
  got = anyres.pack_image_features(
    [jnp.asarray(f) for f in features],
    sizes,
    pinpoints,
    tile,
    patch,
    jnp.asarray(newline),
    pool=pool,
  )
  for f, size, packed in zip(features, sizes, got):
    want = hf_pack(f, size, pinpoints, tile, side, newline)
    np.testing.assert_array_equal(np.asarray(packed), want, err_msg=str(size))
    assert packed.shape[0] == anyres.num_image_features(size, pinpoints, tile, patch, pool)


def test_pack_layout_base_then_rows_with_newlines():
  # 672x672 on a 2x2 grid of 2x2 tiles: nothing to unpad, so the layout is explicit.
  tile, pinpoints, side = 336, [[672, 672]], 2
  features = np.arange(5 * side * side, dtype=np.float32).reshape(5, side * side, 1)
  newline = np.array([-1.0], np.float32)
  got = anyres.pack_image_features(
    [features], [(672, 672)], pinpoints, tile, tile // side, newline
  )[0][:, 0]
  grid = features[1:, :, 0].reshape(2, 2, side, side)  # (tile row, tile col, y, x)
  rows = [np.append(grid[r // side, :, r % side, :].reshape(-1), -1.0) for r in range(2 * side)]
  np.testing.assert_array_equal(np.asarray(got), np.concatenate([features[0, :, 0], *rows]))


def test_pack_keeps_the_feature_dtype():
  features = jnp.ones((3, 576, 4), jnp.bfloat16)
  (got,) = anyres.pack_image_features(
    [features], [(500, 300)], PINPOINT_SETS["llava_v1.6"][2], 336, 14, jnp.zeros(4, jnp.float32)
  )
  assert got.dtype == jnp.bfloat16 and got.shape == (1576, 4)


@pytest.mark.parametrize(
  "call, words",
  [
    (
      lambda: anyres.pack_image_features(
        [np.zeros((4, 576, 2))], [(500, 300)], PINPOINT_SETS["llava_v1.6"][2], 336, 14, np.zeros(2)
      ),
      ["image 0", "(500, 300)", "1 + 2x1 tiles", "(3, 576, 2)", "(4, 576, 2)"],
    ),
    (
      lambda: anyres.pack_image_features(
        [np.zeros((3, 576, 2))],
        [(500, 300)],
        PINPOINT_SETS["llava_v1.6"][2],
        336,
        14,
        np.zeros(2),
        pool=3,
      ),
      ["8x8 features", "(3, 64, 2)", "(3, 576, 2)"],
    ),
    (
      lambda: anyres.pack_image_features(
        [np.zeros((3, 576, 2))],
        [(500, 300), (9, 9)],
        PINPOINT_SETS["llava_v1.6"][2],
        336,
        14,
        np.zeros(2),
      ),
      ["1 feature arrays but 2 image sizes"],
    ),
    (
      lambda: anyres.pack_image_features(
        [np.zeros((3, 576, 2))],
        [(500, 300)],
        PINPOINT_SETS["llava_v1.6"][2],
        336,
        14,
        np.zeros((1, 2)),
      ),
      ["image_newline must be (D,)", "(1, 2)"],
    ),
    (
      lambda: anyres.anyres_grid_shape((500, 300), [[336, 672], [400, 336]], 336),
      ["multiples of tile_size 336", "(400, 336)"],
    ),
    (lambda: anyres.select_best_resolution((0, 300), [[336, 672]]), ["positive", "(0, 300)"]),
    (lambda: anyres.select_best_resolution((500, 300), []), ["empty"]),
    (
      lambda: anyres.num_image_features((500, 300), [[336, 672]], 336, 14, pool=25),
      ["kernel larger than input", "25 > 24"],
    ),
  ],
)
def test_errors_name_the_problem(call, words):
  with pytest.raises(ValueError) as err:
    call()
  for word in words:
    assert word in str(err.value), (word, str(err.value))
