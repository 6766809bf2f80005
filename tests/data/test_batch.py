"""Fixed-shape batches: the plan, the layout, and anyres packing as host gather indices."""

import jax.numpy as jnp
import numpy as np
import pytest
from support.train_data import tiny_model_config

from ppllava_jax import ops
from ppllava_jax.data.batching import IGNORE, pad_batch
from ppllava_jax.data.sft.annotations import KIND_CODES
from ppllava_jax.data.sft.batches import (
  BatchConfig,
  Geometry,
  anyres_gather_indices,
  collate,
  plan_batches,
)
from ppllava_jax.data.sft.samples import Sample

IMG = 7  # the tiny config's image placeholder id here
SIZES = [(30, 50), (50, 30), (24, 24), (100, 20), (17, 93), (48, 48), (61, 47)]


@pytest.mark.parametrize("mode, side", [("ppllava", 2), ("none", 6)])
def test_anyres_gather_indices_equal_pack_image_features(mode, side):
  model = tiny_model_config(IMG, mode=mode)
  rng = np.random.default_rng(0)
  d = 5
  newline = rng.normal(size=d).astype(np.float32)
  pool = 1 if mode == "none" else 3
  for size in SIZES:
    rows, cols = ops.anyres_grid_shape(size, model.grid_pinpoints, 24)
    feats = rng.normal(size=(1 + rows * cols, side * side, d)).astype(np.float32)
    want = ops.pack_image_features(
      [jnp.asarray(feats)], [size], model.grid_pinpoints, 24, 4, jnp.asarray(newline), pool=pool
    )[0]
    base = 3 * side * side  # the image's tiles start some rows into a table
    table = np.concatenate(
      [rng.normal(size=(base, d)), feats.reshape(-1, d), rng.normal(size=(2, d)), newline[None]]
    ).astype(np.float32)
    index = anyres_gather_indices(size, model, base=base, newline=len(table) - 1)
    assert len(index) == model.image_tokens(size), size
    np.testing.assert_array_equal(table[index], np.asarray(want), err_msg=str(size))


def test_plan_closes_a_batch_when_rows_or_slots_run_out():
  v, i, t, m = (KIND_CODES[k] for k in ("video", "image", "text", "multi-image"))
  cfg = BatchConfig(batch_size=4, video_slots=2, image_slots=1, multi_image_slots=1)
  kinds = np.array([v, i, v, v, t, m, i, i, t, t, t, t, m])
  # [v i v] (a third video), [v t m i] (rows), [i t t t] (rows), [t m]
  assert plan_batches(kinds, cfg) == [3, 7, 11, 13]
  with pytest.raises(ValueError, match="multi-image samples but the batch layout gives them"):
    plan_batches(kinds, BatchConfig(batch_size=4, multi_image_slots=0))


def _sample(kind, n_text, rng, model, size=None, pictures=0, frames=4):
  media = (
    {
      "video": model.video_tokens(frames) if kind == "video" else 0,
      "image": model.image_tokens(size) if kind == "image" else 0,
      "multi-image": 4 * pictures,
    }[kind]
    if kind != "text"
    else 0
  )
  placeholder = -1 if kind == "video" else IMG
  ids = np.concatenate([[1], np.full(media, placeholder), rng.integers(10, 90, n_text)])
  labels = np.where(np.arange(len(ids)) > len(ids) - 3, ids, IGNORE)
  s = Sample(
    ids.astype(np.int32),
    labels.astype(np.int32),
    np.ones(len(ids), np.int32),
    np.arange(40, dtype=np.int32),
    np.ones(40, np.int32),
    kind,
    source=kind,
  )
  if kind == "video":
    s.video = rng.normal(size=(frames, 3, 24, 24)).astype(np.float32)
  elif kind == "image":
    tiles = 1 + int(np.prod(ops.anyres_grid_shape(size, model.grid_pinpoints, 24)))
    s.image, s.image_size = rng.normal(size=(tiles, 3, 24, 24)).astype(np.float32), size
  elif kind == "multi-image":
    s.pictures = rng.normal(size=(pictures, 3, 24, 24)).astype(np.float32)
  return s


def test_collate_layout_and_the_image_token_table():
  model = tiny_model_config(IMG)
  cfg = BatchConfig(
    batch_size=6,
    seq_buckets=(32, 64, 128),
    video_slots=2,
    image_slots=3,
    multi_image_slots=2,
    num_frames=6,
    max_pictures=3,
  )
  rng = np.random.default_rng(1)
  samples = [
    _sample("image", 5, rng, model, size=(30, 50)),
    _sample("video", 9, rng, model, frames=4),
    None,  # a skipped sample: an empty row
    _sample("multi-image", 3, rng, model, pictures=2),
    _sample("text", 40, rng, model),
    _sample("image", 2, rng, model, size=(100, 20)),
  ]
  b = collate(samples, model, cfg, pad_id=0, scorer_length=40)
  longest = max(s.length for s in samples if s is not None)
  assert longest > 32 and b.input_ids.shape == (6, 64)  # rounded up to a bucket
  assert b.row_mask.tolist() == [True, True, False, True, True, True]
  for row, s in enumerate(samples):
    n = 0 if s is None else s.length
    assert b.attention_mask[row].tolist() == [1] * n + [0] * (64 - n)
    assert b.position_ids[row].tolist() == list(range(n)) + [0] * (64 - n)
    if s is not None:
      assert b.input_ids[row, :n].tolist() == s.input_ids.tolist()
      assert b.labels[row].tolist() == s.labels.tolist() + [IGNORE] * (64 - n)
  assert (b.loss_mask == (b.labels != IGNORE)).all()
  # videos: one slot used, 4 of 6 frames, the pooled tokens of 4 frames a prefix
  assert b.videos.shape == (2, 6, 3, 24, 24) and b.video_mask.tolist() == [True, False]
  assert b.video_row[0] == 1 and b.video_frame_mask[0].tolist() == [True] * 4 + [False] * 2
  assert b.video_token_mask.shape == (2, model.video_tokens(6))
  assert b.video_token_mask.sum() == model.video_tokens(4) == (b.input_ids == -1).sum()
  np.testing.assert_array_equal(b.videos[0, :4], samples[1].video)
  assert b.image_mask.tolist() == [True, True, False] and b.image_row[:2].tolist() == [0, 5]
  assert b.image_tile_mask.sum(1).tolist() == [5, 3, 0]
  assert b.picture_item_mask.tolist() == [True, False] and b.picture_mask[0].tolist() == [
    True,
    True,
    False,
  ]
  # the image-token table built from per-tile features gives every <image> placeholder
  geo = Geometry.of(model, cfg)
  d = 4
  tile_feats = rng.normal(size=(3, geo.max_tiles, 4, d)).astype(np.float32)
  pic_feats = rng.normal(size=(2, 3, 4, d)).astype(np.float32)
  newline = rng.normal(size=d).astype(np.float32)
  table = np.concatenate([tile_feats.reshape(-1, d), pic_feats.reshape(-1, d), newline[None]])
  assert len(table) == geo.table_rows(cfg)
  packed = ops.pack_image_features(
    [jnp.asarray(tile_feats[0, :5]), jnp.asarray(tile_feats[1, :3])],
    [(30, 50), (100, 20)],
    model.grid_pinpoints,
    24,
    4,
    jnp.asarray(newline),
    pool=3,
  )
  want = np.concatenate([packed[0], pic_feats[0, :2].reshape(-1, d), packed[1]])  # row order
  got = table[b.image_gather][b.image_gather_mask]
  np.testing.assert_array_equal(got, want)
  ops.check_media_counts(b.input_ids, IMG, int(b.image_gather_mask.sum()))
  emb = jnp.zeros((6, 64, d))
  merged = ops.merge_media(
    emb,
    jnp.asarray(b.input_ids),
    jnp.asarray(table[b.image_gather]),
    jnp.asarray(b.image_gather_mask),
    IMG,
  )
  np.testing.assert_array_equal(np.asarray(merged)[b.input_ids == IMG], want)
  assert b.scorer_ids.shape == (6, 40) and b.scorer_mask[2].sum() == 0
  padded = pad_batch(b, 128)
  assert padded.input_ids.shape == (6, 128) and (padded.labels[:, 64:] == IGNORE).all()
  assert padded.shape_key() != b.shape_key() and padded.videos is b.videos


def test_collate_refuses_what_the_layout_cannot_hold():
  model = tiny_model_config(IMG)
  rng = np.random.default_rng(2)
  cfg = BatchConfig(batch_size=3, seq_buckets=(64,), video_slots=1, num_frames=4)
  two = [_sample("video", 3, rng, model), _sample("video", 3, rng, model)]
  with pytest.raises(ValueError, match="more videos than the layout's 1 slots"):
    collate(two, model, cfg)
  with pytest.raises(ValueError, match="exceeds the largest bucket 64"):
    collate([_sample("text", 80, rng, model)], model, cfg)
