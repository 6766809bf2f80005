"""The media store: built from tiny videos, read back against an independent PyAV + PIL
decode, and used by the SampleBuilder in place of decoding.

Videos: textured frames shifted one column a frame, lossless H.264 (so decoding is
exact); ``short.mp4`` has fewer frames than the store keeps (kept whole), ``long.mp4``
more (kept at the segment midpoints), ``frames/`` is a ``{:06d}.jpg`` folder with
``total_frames``. The tower's square is 24 px (``support.train_data``).
"""

import dataclasses
import json
import pickle
from pathlib import Path

import av
import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from support.train_data import TILE, tiny_model_config, write_json, write_numbered_frames

from ppllava_jax.data.media import preprocess
from ppllava_jax.data.media.video import cover_indices, write_video
from ppllava_jax.data.sft.annotations import CorpusConfig
from ppllava_jax.data.sft.samples import SampleBuilder, SampleConfig, SkipSample, build_sample
from ppllava_jax.data.sft.store import (
  MediaStore,
  StoreConfig,
  StoreError,
  build_store,
  main,
  media_key,
  nearest,
)
from ppllava_jax.data.text.tokenizer import char_tokenizer
from ppllava_jax.models.siglip import SiglipVisionConfig

KEEP = 16  # frames the store keeps a video
LENGTHS = {"short.mp4": 12, "long.mp4": 40}


def textured(count: int, size=(20, 28)):
  """Smooth colour gradients with a few edges, shifted a column a frame."""
  y, x = np.mgrid[: size[0], :48]
  base = np.stack([x * 5, y * 11, 128 + 100 * np.sin(x / 3) * (y > size[0] // 2)], -1)
  return [
    np.roll(base, i, axis=1)[:, : size[1]].clip(0, 255).astype(np.uint8) for i in range(count)
  ]


def record(video: str, answer: str = "It moves.", **extra) -> dict:
  return {"video": video, "QA": [{"q": "What moves?", "a": answer}], **extra}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
  root = tmp_path_factory.mktemp("media")
  for name, count in LENGTHS.items():
    write_video(root / name, textured(count), rate=10, pix_fmt="yuv444p", qp="0")
  write_numbered_frames(root / "frames", 10, size=(16, 16))
  records = [
    record("short.mp4"),
    record("long.mp4"),
    record("short.mp4", "Again."),
    record("frames", total_frames=10),
  ]
  write_json(root / "ann.json", records)
  return root


@pytest.fixture(scope="module")
def stores(media, tmp_path_factory):
  """{"uint8": store, "jpeg": store (built by the CLI)}."""
  out = tmp_path_factory.mktemp("stores")
  corpus = CorpusConfig("videos", str(media / "ann.json"), str(media))
  uint8 = build_store(
    [corpus], out / "uint8", StoreConfig(KEEP, TILE, format="uint8"), progress=False
  )
  main(
    [
      "build",
      "--annotations",
      str(media / "ann.json"),
      "--media-root",
      str(media),
      "--out",
      str(out / "jpeg"),
      "--frames",
      str(KEEP),
      "--size",
      str(TILE),
    ]
  )
  return {"uint8": MediaStore(uint8), "jpeg": MediaStore(out / "jpeg")}


def decoded(path: Path) -> np.ndarray:
  """Every frame of a video, by PyAV alone."""
  with av.open(str(path)) as container:
    return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def squared(frames_thwc) -> np.ndarray:
  """The original's resize, straight to the tower's square with PIL's bicubic."""
  return np.stack(
    [np.asarray(Image.fromarray(f).resize((TILE, TILE), Image.BICUBIC)) for f in frames_thwc]
  )


def reference(media: Path, key: str) -> tuple[np.ndarray, list[int]]:
  """(the kept frames at the tower's square, their indices), decoded independently."""
  if key == "frames":
    indices = list(range(10))
    frames = [
      np.asarray(Image.open(media / key / f"{i + 1:06d}.jpg").convert("RGB")) for i in indices
    ]
    return squared(frames), indices
  total = LENGTHS[key]
  step = (total - 1) / KEEP  # segment midpoints of a video longer than the store keeps
  indices = (
    list(range(total)) if total <= KEEP else [int(step / 2 + round(step * i)) for i in range(KEEP)]
  )
  return squared(decoded(media / key)[indices]), indices


def test_kept_frames_cover_short_videos_whole_and_long_ones_at_midpoints():
  assert cover_indices(16, 0, 12) == list(range(12))
  assert cover_indices(4, 0, 40) == [4, 14, 24, 33]  # 39 / 4 = 9.75 apart
  assert cover_indices(3, 5, 8) == [5, 6, 7]
  kept = np.asarray([4, 14, 24, 34])
  assert nearest(kept, [0, 9, 10, 19, 20, 39]).tolist() == [0, 0, 1, 1, 2, 3]  # ties: earlier
  assert nearest(np.asarray([7]), [0, 30]).tolist() == [0, 0]
  assert media_key("/data/v/a.mp4", "/data/v") == "a.mp4"
  assert media_key("/data/v/a.mp4", "/data/v/") == "a.mp4"
  assert media_key("/elsewhere/a.mp4", "/data/v") == "/elsewhere/a.mp4"


def test_uint8_store_holds_exactly_the_decoded_frames(stores, media):
  store = stores["uint8"]
  assert store.keys == ["frames", "long.mp4", "short.mp4"] and len(store) == 3
  for key in store.keys:
    row = store.lookup(key)
    want, indices = reference(media, key)
    assert row.frame_indices.tolist() == indices
    assert row.total_frames == {"frames": 10, **LENGTHS}[key]
    np.testing.assert_array_equal(row.pixels(range(len(indices))), want)
  conversations = json.loads(store.lookup("short.mp4").conversations)
  assert [(c["record"], c["turns"][0][1]) for c in conversations] == [
    (0, "It moves."),
    (2, "Again."),
  ]


def test_jpeg_store_is_within_a_few_grey_levels(stores, media):
  for key in stores["jpeg"].keys:
    row = stores["jpeg"].lookup(key)
    want, _ = reference(media, key)
    error = np.abs(row.pixels(range(len(want))).astype(np.int16) - want)
    assert error.mean() < 1.5 and error.max() <= 24, (key, error.mean(), error.max())


def test_letterboxed_store_gives_the_siglip_pixels(media, tmp_path):
  store = MediaStore(
    build_store(
      [CorpusConfig("v", str(media / "ann.json"), str(media))],
      tmp_path,
      StoreConfig(KEEP, TILE, letterbox=True, format="uint8"),
      progress=False,
    )
  )
  row = store.lookup("long.mp4")
  frames = decoded(media / "long.mp4")[row.frame_indices]
  stats = (preprocess.SIGLIP_MEAN, preprocess.SIGLIP_STD)
  np.testing.assert_array_equal(
    preprocess.video_pixels(row.pixels(range(KEEP)), TILE, *stats, letterbox=True),
    preprocess.video_pixels(frames, TILE, *stats, letterbox=True),
  )


@pytest.fixture(scope="module")
def tok():
  return char_tokenizer()


def sample(tok, media, raw, store=None, num_frames=4, **kw):
  cfg = tiny_model_config(tok.convert_tokens_to_ids("<image>"))
  return build_sample(
    raw,
    tokenizer=tok,
    scorer_tokenizer=tok,
    model=cfg,
    media_root=str(media),
    num_frames=num_frames,
    config=SampleConfig(max_length=512, media_store=store),
    **kw,
  )


@pytest.mark.parametrize("video", ["short.mp4", "frames"])
def test_samples_from_a_uint8_store_equal_decoded_ones(stores, media, tok, video):
  """Kept whole, so the store gives the decode path's sample exactly."""
  raw = record(video, total_frames=10) if video == "frames" else record(video)
  for seed, index in ((0, 0), (7, 3), (11, 5)):
    want = sample(tok, media, raw, seed=seed, index=index)
    got = sample(tok, media, raw, stores["uint8"].path, seed=seed, index=index)
    assert got.frame_indices == want.frame_indices
    for field in ("input_ids", "labels", "scorer_ids", "scorer_mask", "video"):
      np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)


def test_a_long_video_draws_the_nearest_kept_frames(stores, media, tok):
  """Expected frames by hand from the rule. Stored: the midpoint of each of 16 segments of
  frames 0..39, int(seg / 2 + round(seg * i)) with seg = 39 / 16 = 2.4375 -> 1, 3, 6, 8, 11,
  13, 16, 18, 21, 23, 25, 28, 30, 33, 35, 38. Drawn: the decode path's sampler for seed 3,
  epoch 0, index 2, one frame of each of 4 segments [0, 10), [10, 20), [20, 30), [30, 40)
  (its last frame left out): default_rng([3, 0, 2]).integers([0, 10, 20, 30],
  [9, 19, 29, 39]) = 8, 15, 22, 34. Nearest stored: 8 -> 8 (stored), 15 -> 16 (13 is 2
  away), 22 -> 21 and 34 -> 33 (ties: the earlier)."""
  got = sample(tok, media, record("long.mp4"), stores["uint8"].path, seed=3, index=2)
  assert got.frame_indices == (8, 16, 21, 33)
  frames = decoded(media / "long.mp4")[[8, 16, 21, 33]]
  np.testing.assert_array_equal(got.video, preprocess.video_pixels(frames, TILE))


def test_a_video_the_store_lacks_is_a_missing_skip_naming_both(stores, media, tok, tmp_path):
  write_video(tmp_path / "new.mp4", textured(5))
  with pytest.raises(SkipSample) as err:
    sample(tok, tmp_path, record("new.mp4"), stores["uint8"].path)
  assert err.value.reason == "missing"
  assert str(tmp_path / "new.mp4") in err.value.detail
  assert stores["uint8"].path in err.value.detail and "'new.mp4'" in err.value.detail


def test_a_store_for_another_tower_or_fewer_frames_is_refused(stores, media, tok):
  with pytest.raises(
    ValueError,
    match=r"holds 24 px frames \(letterbox False\); the model's "
    r"tower takes 32 px \(letterbox False\)",
  ):
    stores["uint8"].check_geometry(32, False)
  with pytest.raises(
    ValueError,
    match=r"keeps 16 frames a video; training samples 20: the "
    r"store's frames must be >= 20 \(>= 40 recommended\)",
  ):
    sample(tok, media, record("short.mp4"), stores["uint8"].path, num_frames=20)
  stores["uint8"].check_frames(16)  # K = T: enforced K >= T, not the recommended 2T
  siglip_sized = dataclasses.replace(
    tiny_model_config(4),
    vision=SiglipVisionConfig(
      hidden_size=16,
      intermediate_size=32,
      num_hidden_layers=1,
      num_attention_heads=2,
      image_size=TILE,
      patch_size=4,
    ),
  )
  with pytest.raises(
    ValueError,
    match=r"\(letterbox False\); the model's tower takes 24 px "
    r"\(letterbox True\)",
  ):
    SampleBuilder(tok, siglip_sized, tok, SampleConfig(media_store=stores["uint8"].path))


def test_the_builder_refuses_missing_and_unreadable_videos(media, tmp_path):
  ann = write_json(tmp_path / "ann.json", [record("short.mp4"), record("gone.mp4")])
  corpus = CorpusConfig("v", str(ann), str(media))
  with pytest.raises(
    StoreError,
    match=rf"1 of 2 videos do not exist: {media}/gone.mp4 "
    rf"\({ann} record 1\)",
  ):
    build_store([corpus], tmp_path / "a", progress=False)
  (tmp_path / "bad.mp4").write_bytes(b"not a video")
  bad = write_json(tmp_path / "bad.json", [record("bad.mp4")])
  with pytest.raises(
    StoreError,
    match=rf"{tmp_path}/bad.mp4: not a video or corrupt .* "
    rf"\(used by {bad} record 0\)",
  ):
    build_store([CorpusConfig("v", str(bad), str(tmp_path))], tmp_path / "b", progress=False)
  with pytest.raises(StoreError, match="not a media store"):
    MediaStore(tmp_path / "b")
  write_json(tmp_path / "ok.json", [record("short.mp4")])
  ok = [CorpusConfig("v", str(tmp_path / "ok.json"), str(media))]
  build_store(ok, tmp_path / "c", StoreConfig(4, 8), progress=False)
  with pytest.raises(StoreError, match="already holds a media store"):
    build_store(ok, tmp_path / "c", StoreConfig(4, 8), progress=False)


def test_the_store_pickles_and_reads_through_grain_and_tfds(stores):
  store = stores["jpeg"]
  copy = pickle.loads(pickle.dumps(store))
  assert copy._source is None  # opened lazily, in the process that reads
  want = store.lookup("long.mp4")
  np.testing.assert_array_equal(copy.lookup("long.mp4").pixels([0, 5]), want.pixels([0, 5]))
  rows = grain.MapDataset.source(copy).map(lambda row: row.key)
  assert list(rows) == store.keys
  direct = tfds.data_source("media_store", data_dir=store.path, split="train")
  assert [row["key"].decode() for row in direct] == store.keys
