"""The Grain pipeline: bucketing, the checkpointable cursor, workers, skip counting."""

import hashlib
import json

import jax
import numpy as np
import pytest
from support.tokenizers import clip_tokenizer, llama_sp_tokenizer
from support.train_data import tiny_model_config, write_image, write_json, write_video
from transformers import AutoTokenizer

from ppllava_jax.data.batching import pad_batch
from ppllava_jax.data.engine import DataError
from ppllava_jax.data.sft.annotations import CorpusConfig, MixtureConfig, load_mixture
from ppllava_jax.data.sft.batches import BatchConfig, Geometry
from ppllava_jax.data.sft.pipeline import DataConfig, make_train_iterator
from ppllava_jax.data.sft.samples import SampleConfig

MISSING = 6  # records whose image does not exist


def words(rng, most: int) -> int:
  """An answer's word count: one at least (an empty answer is an annotation error)."""
  return max(1, int(rng.integers(0, most)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipeline")
  write_video(root / "v.mp4", num_frames=12)
  write_image(root / "a.jpg", (30, 50), 128)
  write_image(root / "b.jpg", (60, 20), 30)
  rng = np.random.default_rng(0)
  videos = [
    {
      "video": "v.mp4",
      "QA": [{"q": "Describe the video.", "a": " ".join(["Yes"] * words(rng, 120))}],
    }
    for _ in range(40)
  ]
  llava = []
  for i in range(60):
    answer = {"from": "gpt", "value": " ".join(["no"] * words(rng, 150))}
    if i % 3 == 0:
      llava.append(
        {
          "image": "a.jpg" if i % 2 else "b.jpg",
          "conversations": [{"from": "human", "value": "<image>\nWhat?"}, answer],
        }
      )
    elif i % 3 == 1:
      llava.append(
        {
          "image": ["b.jpg", "a.jpg"],
          "conversations": [{"from": "human", "value": "<image> and <image>: Compare."}, answer],
        }
      )
    else:
      llava.append({"conversations": [{"from": "human", "value": "Yes?"}, answer]})
  for i in range(MISSING):
    llava[3 * i * 2]["image"] = f"missing{i}.jpg"
  mixture = MixtureConfig(
    (
      CorpusConfig(
        "videos", str(write_json(root / "videos.json", videos)), str(root), "video", num_frames=4
      ),
      CorpusConfig("llava", str(root / "llava.jsonl"), str(root), format="llava"),
    )
  )
  (root / "llava.jsonl").write_text("\n".join(json.dumps(r) for r in llava))
  tok = AutoTokenizer.from_pretrained(llama_sp_tokenizer(root / "llama"))
  return dict(
    root=root,
    mixture=mixture,
    tok=tok,
    clip=AutoTokenizer.from_pretrained(clip_tokenizer(root / "clip")),
    model=tiny_model_config(tok.convert_tokens_to_ids("<image>")),
  )


def config(setup, **kw):
  base = dict(
    mixture=setup["mixture"],
    seed=5,
    num_epochs=2,
    num_workers=0,
    batch=BatchConfig(
      batch_size=4,
      seq_buckets=(64, 128, 256),
      video_slots=2,
      image_slots=2,
      multi_image_slots=2,
      num_frames=4,
      max_pictures=2,
    ),
    sample=SampleConfig(max_length=256, max_pictures=2),
    max_skip_fraction=0.2,
    skip_check_after=10,
  )
  return DataConfig(**{**base, **kw})


def iterator(setup, cfg, **kw):
  return make_train_iterator(
    cfg, tokenizer=setup["tok"], model=setup["model"], scorer_tokenizer=setup["clip"], **kw
  )


def fingerprint(it, batch):
  digest = hashlib.sha1()
  for name in (
    "input_ids",
    "labels",
    "row_mask",
    "scorer_ids",
    "image_gather",
    "videos",
    "images",
    "pictures",
  ):
    digest.update(np.ascontiguousarray(getattr(batch, name)).tobytes())
  return it.infos[0].index, it.infos[0].records, digest.hexdigest()


def stream(setup, cfg, limit=None, **kw):
  it = iterator(setup, cfg, **kw)
  out = []
  for batch in it:
    out.append(fingerprint(it, batch))
    if limit and len(out) == limit:
      break
  it.close()
  return out, it


def test_bucketed_batches_compile_few_programs_and_cover_the_epoch(setup):
  cfg = config(setup, num_epochs=1)
  it = iterator(setup, cfg, block=0, blocks=1)
  step = jax.jit(
    lambda b: (
      b.input_ids.sum() + b.videos.sum() + b.images.sum() + b.pictures.sum() + b.image_gather.sum()
    )
  )
  shapes, lengths, seen = set(), set(), []
  for batch in it:
    shapes.add(batch.shape_key())
    lengths.add(batch.input_ids.shape[1])
    step(batch)
    seen += it.infos[0].records
  assert len(seen) == 100 and sorted(seen) == list(range(100))  # each sample once
  assert lengths == {64, 128, 256}  # every bucket used, nothing else
  assert len(shapes) == 3 and step._cache_size() == 3  # one program per bucket
  assert it.stats.skipped == {"missing": MISSING} and it.stats.samples == 100


def test_restoring_the_state_continues_the_exact_stream(setup):
  cfg = config(setup)
  full, _ = stream(setup, cfg, block=0, blocks=1)
  assert len({f[0] for f in full}) == len(full)  # two epochs of distinct global batches
  epoch_records = [r for f in full for r in f[1]]
  assert len(epoch_records) == 200 and epoch_records[:100] != epoch_records[100:]
  it = iterator(setup, cfg, block=0, blocks=1)
  for _ in range(7):
    next(it)
  state = it.get_state()
  it.close()
  assert state["next_batch"] == 7 and state["stats"]["batches"] == 7
  tail, _ = stream(setup, cfg, state=state, block=0, blocks=1)
  assert tail == full[7:]
  # the cursor is global: two processes restored from it share out the same batches
  p0, _ = stream(setup, cfg, state=state, block=0, blocks=2)
  p1, _ = stream(setup, cfg, state=state, block=1, blocks=2)
  assert len(p0) == len(p1) == -(-len(tail) // 2)
  merged = [f for pair in zip(p0, p1) for f in pair]
  # past the end: empty batches, no records; the halves' contents (row references moved to
  # their global rows) are test_a_steps_shards_are_one_global_batch_whatever_the_blocks's
  assert [f[:2] for f in merged if f[1]] == [f[:2] for f in tail]
  with pytest.raises(DataError, match="saved with seed 5, the config has 6"):
    iterator(setup, config(setup, seed=6), state=state, block=0, blocks=1)


def test_grain_workers_give_the_same_stream(setup):
  cfg = config(setup, num_epochs=1)
  serial, _ = stream(setup, cfg, limit=12, block=0, blocks=1)
  parallel, _ = stream(
    setup, config(setup, num_epochs=1, num_workers=2), limit=12, block=0, blocks=1
  )
  assert parallel == serial


def test_skips_are_counted_and_stop_the_run_past_the_limit(setup):
  cfg = config(setup, num_epochs=1, max_skip_fraction=0.01, skip_check_after=10)
  it = iterator(setup, cfg, block=0, blocks=1)
  with pytest.raises(
    DataError,
    match=r"samples skipped .* more than max_skip_fraction=0.01: "
    r"\{'missing': \d+\}; the last: .*missing\d.jpg",
  ):
    for _ in it:
      pass
  it.close()
  assert it.stats.skipped_total >= 1


def test_validation_runs_before_the_pipeline(setup, tmp_path):
  bad = CorpusConfig("bad", str(write_json(tmp_path / "bad.json", [{"video": 3, "QA": []}])))
  with pytest.raises(Exception, match=r"bad.json: record 0: field 'QA'"):
    iterator(setup, config(setup, mixture=MixtureConfig((bad,))), block=0, blocks=1)
  aset = load_mixture(setup["mixture"])
  assert len(aset) == 100 and aset.num_media.max() == 2


def test_a_steps_shards_are_one_global_batch_whatever_the_blocks(setup):
  """``shards=2``: one block (one process) yields the two planned batches of a step as one
  global batch; two blocks yield its halves; each half is the planned batch itself with its
  row references moved to its rows and its gather indices into the global image table
  (images of both shards, pictures of both, the newline: data.sft.batches's layout)."""
  cfg = config(setup, num_epochs=1, shards=2)
  plain = iterator(setup, config(setup, num_epochs=1), block=0, blocks=1)
  whole = iterator(setup, cfg, block=0, blocks=1)
  halves = [iterator(setup, cfg, block=b, blocks=2) for b in range(2)]
  geo = Geometry.of(setup["model"], cfg.batch)
  rng = np.random.default_rng(0)
  for step in range(6):
    parts = [next(plain), next(plain)]
    got = next(whole)
    assert [i.index for i in whole.infos] == [2 * step, 2 * step + 1]
    length = got.input_ids.shape[1]
    for b, (half, part) in enumerate(zip([next(h) for h in halves], parts)):
      rows = slice(4 * b, 4 * b + 4)
      part = pad_batch(part, length, setup["tok"].pad_token_id)
      half = pad_batch(half, length, setup["tok"].pad_token_id)
      for name in ("input_ids", "labels", "attention_mask", "row_mask", "scorer_ids"):
        np.testing.assert_array_equal(getattr(got, name)[rows], getattr(part, name))
        np.testing.assert_array_equal(getattr(half, name), getattr(part, name))
      for name in ("video_row", "image_row", "multi_image_row"):
        slots = getattr(part, name).shape[0]
        np.testing.assert_array_equal(
          getattr(got, name)[b * slots : (b + 1) * slots], getattr(part, name) + 4 * b
        )
    # the image-token table: each shard's own table, read through its own gather, equals
    # the global table read through the global gather
    tables = []
    for part in parts:
      i, k = part.images.shape[:2]
      m, p = part.pictures.shape[:2]
      tables.append(
        (
          rng.normal(size=(i * k * geo.picture_tokens, 3)),
          rng.normal(size=(m * p * geo.picture_tokens, 3)),
        )
      )
    newline = rng.normal(size=(1, 3))
    table = np.concatenate([t[0] for t in tables] + [t[1] for t in tables] + [newline])
    want = np.concatenate(
      [
        np.concatenate([img, pic, newline])[part.image_gather][part.image_gather_mask]
        for (img, pic), part in zip(tables, parts)
      ]
    )
    np.testing.assert_array_equal(table[got.image_gather][got.image_gather_mask], want)
  for it in (plain, whole, *halves):
    it.close()


def test_shards_must_split_over_the_blocks(setup):
  with pytest.raises(ValueError, match="3 shards per step do not split over 2 data blocks"):
    iterator(setup, config(setup, shards=3), block=0, blocks=2)
  with pytest.raises(ValueError, match="shards must be >= 1"):
    config(setup, shards=0)
