"""The Grain pipeline: bucketing, the checkpointable cursor, workers, skip counting."""

import hashlib
import json

import jax
import numpy as np
import pytest
from transformers import AutoTokenizer

from ppllava_jax.data.annotations import CorpusConfig, MixtureConfig, load_mixture
from ppllava_jax.data.batch import BatchConfig
from ppllava_jax.data.pipeline import DataConfig, DataError, make_train_iterator
from ppllava_jax.data.sft import SampleConfig
from support.train_data import tiny_model_config, write_image, write_json, write_video
from support.tokenizers import clip_tokenizer, llama_sp_tokenizer

MISSING = 6  # records whose image does not exist


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipeline")
  write_video(root / "v.mp4", num_frames=12)
  write_image(root / "a.jpg", (30, 50), 128)
  write_image(root / "b.jpg", (60, 20), 30)
  rng = np.random.default_rng(0)
  videos = [{"video": "v.mp4", "QA": [{"q": "Describe the video.",
                                       "a": " ".join(["Yes"] * int(rng.integers(0, 120)))}]}
            for _ in range(40)]
  llava = []
  for i in range(60):
    answer = {"from": "gpt", "value": " ".join(["no"] * int(rng.integers(0, 150)))}
    if i % 3 == 0:
      llava.append({"image": "a.jpg" if i % 2 else "b.jpg",
                    "conversations": [{"from": "human", "value": "<image>\nWhat?"}, answer]})
    elif i % 3 == 1:
      llava.append({"image": ["b.jpg", "a.jpg"], "conversations": [
          {"from": "human", "value": "<image> and <image>: Compare."}, answer]})
    else:
      llava.append({"conversations": [{"from": "human", "value": "Yes?"}, answer]})
  for i in range(MISSING):
    llava[3 * i * 2]["image"] = f"missing{i}.jpg"
  mixture = MixtureConfig((
      CorpusConfig("videos", str(write_json(root / "videos.json", videos)), str(root), "video",
                   num_frames=4),
      CorpusConfig("llava", str(root / "llava.jsonl"), str(root), format="llava")))
  (root / "llava.jsonl").write_text("\n".join(json.dumps(r) for r in llava))
  tok = AutoTokenizer.from_pretrained(llama_sp_tokenizer(root / "llama"))
  return dict(root=root, mixture=mixture, tok=tok,
              clip=AutoTokenizer.from_pretrained(clip_tokenizer(root / "clip")),
              model=tiny_model_config(tok.convert_tokens_to_ids("<image>")))


def config(setup, **kw):
  base = dict(mixture=setup["mixture"], seed=5, num_epochs=2, num_workers=0,
              batch=BatchConfig(batch_size=4, seq_buckets=(64, 128, 256), video_slots=2,
                                image_slots=2, multi_image_slots=2, num_frames=4, max_pictures=2),
              sample=SampleConfig(max_length=256, max_pictures=2), max_skip_fraction=0.2,
              skip_check_after=10)
  return DataConfig(**{**base, **kw})


def iterator(setup, cfg, **kw):
  return make_train_iterator(cfg, tokenizer=setup["tok"], model=setup["model"],
                             scorer_tokenizer=setup["clip"], **kw)


def fingerprint(it, batch):
  digest = hashlib.sha1()
  for name in ("input_ids", "labels", "row_mask", "scorer_ids", "image_gather", "videos",
               "images", "pictures"):
    digest.update(np.ascontiguousarray(getattr(batch, name)).tobytes())
  return it.last_info.index, it.last_info.records, digest.hexdigest()


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
  it = iterator(setup, cfg, process_index=0, process_count=1)
  step = jax.jit(lambda b: (b.input_ids.sum() + b.videos.sum() + b.images.sum()
                            + b.pictures.sum() + b.image_gather.sum()))
  shapes, lengths, seen = set(), set(), []
  for batch in it:
    shapes.add(batch.shape_key())
    lengths.add(batch.input_ids.shape[1])
    step(batch)
    seen += it.last_info.records
  assert len(seen) == 100 and sorted(seen) == list(range(100))  # each sample once
  assert lengths == {64, 128, 256}  # every bucket used, nothing else
  assert len(shapes) == 3 and step._cache_size() == 3  # one program per bucket
  assert it.stats.skipped == {"missing": MISSING} and it.stats.samples == 100


def test_restoring_the_state_continues_the_exact_stream(setup):
  cfg = config(setup)
  full, _ = stream(setup, cfg, process_index=0, process_count=1)
  assert len({f[0] for f in full}) == len(full)  # two epochs of distinct global batches
  epoch_records = [r for f in full for r in f[1]]
  assert len(epoch_records) == 200 and epoch_records[:100] != epoch_records[100:]
  it = iterator(setup, cfg, process_index=0, process_count=1)
  for _ in range(7):
    next(it)
  state = it.get_state()
  it.close()
  assert state["next_batch"] == 7 and state["stats"]["batches"] == 7
  tail, _ = stream(setup, cfg, state=state, process_index=0, process_count=1)
  assert tail == full[7:]
  # the cursor is global: two processes restored from it share out the same batches
  p0, _ = stream(setup, cfg, state=state, process_index=0, process_count=2)
  p1, _ = stream(setup, cfg, state=state, process_index=1, process_count=2)
  assert len(p0) == len(p1) == -(-len(tail) // 2)
  merged = [f for pair in zip(p0, p1) for f in pair]
  assert [f for f in merged if f[1]] == tail  # past the end: empty batches, no records
  with pytest.raises(DataError, match="saved with seed 5, the config has 6"):
    iterator(setup, config(setup, seed=6), state=state, process_index=0, process_count=1)


def test_grain_workers_give_the_same_stream(setup):
  cfg = config(setup, num_epochs=1)
  serial, _ = stream(setup, cfg, limit=12, process_index=0, process_count=1)
  parallel, _ = stream(setup, config(setup, num_epochs=1, num_workers=2), limit=12,
                       process_index=0, process_count=1)
  assert parallel == serial


def test_skips_are_counted_and_stop_the_run_past_the_limit(setup):
  cfg = config(setup, num_epochs=1, max_skip_fraction=0.01, skip_check_after=10)
  it = iterator(setup, cfg, process_index=0, process_count=1)
  with pytest.raises(DataError, match=r"samples skipped .* more than max_skip_fraction=0.01: "
                                      r"\{'missing': \d+\}; the last: .*missing\d.jpg"):
    for _ in it:
      pass
  it.close()
  assert it.stats.skipped_total >= 1


def test_validation_runs_before_the_pipeline(setup, tmp_path):
  bad = CorpusConfig("bad", str(write_json(tmp_path / "bad.json", [{"video": 3, "QA": []}])))
  with pytest.raises(Exception, match=r"bad.json: record 0: field 'QA'"):
    iterator(setup, config(setup, mixture=MixtureConfig((bad,))), process_index=0,
             process_count=1)
  aset = load_mixture(setup["mixture"])
  assert len(aset) == 100 and aset.num_media.max() == 2
