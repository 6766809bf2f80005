"""The DPO input pipeline (``data.dpo.pairs``): pair collation, the epoch plan, the iterator.

Expectations are written from the documented layout: row ``2i`` is pair ``i``'s chosen
completion, row ``2i + 1`` its rejected one, each the shared prompt (labels IGNORE) then
the completion, right-padded to the bucket; the media once per pair. Token lists come
from the char tokenizer's layout (ids 0-4 ``<pad> <s> </s> <unk> <image>``, then
printable ASCII from id 5, the newline 100) and ``plain_v1``'s text, ``USER: <image>\\n{q}
ASSISTANT: {a}</s>``. The tiny model: 24-pixel frames of 6 x 6 patches pooled (2, 3, 3),
so a 4-frame video is 8 placeholders (id -1) and a 2-frame one 4.

The pipeline tests run on a synthetic preference set (``train.run.synthetic``) of 5 frame
folders of 12 frames each (more than the 4 sampled, so sampling can differ per epoch).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
from support.train_data import tiny_model_config, write_numbered_frames

from ppllava_jax.data.batching import IGNORE
from ppllava_jax.data.dpo.pairs import (
  MissingReference,
  PairBatch,
  PreferenceDataConfig,
  collate_pairs,
  make_builder,
  make_preference_iterator,
  pair_epoch,
)
from ppllava_jax.data.dpo.rows import (
  PreferenceBuilder,
  PreferenceConfig,
  PreferenceRow,
  PreferenceSample,
  read_preference_rows,
)
from ppllava_jax.data.text.tokenizer import char_tokenizer
from ppllava_jax.train.run.config import SyntheticConfig
from ppllava_jax.train.run.synthetic import PREFERENCE_QUESTION, generate_preference

V = -1  # the tiny model's video placeholder id
BOS, EOS = 1, 2
MODEL = tiny_model_config(image_token=4)  # the char tokenizer's <image>; scorer context 40
SYNTHETIC = SyntheticConfig(kind="preference", videos=5, frames=12, size=32, seed=0)
SAMPLE = PreferenceConfig(template="plain_v1", num_frames=4, max_length=256)
FIELDS = tuple(f.name for f in dataclasses.fields(PairBatch))


def char_ids(text: str) -> list[int]:
  """The char tokenizer's ids of ``text``, from its documented layout."""
  return [100 if c == "\n" else 5 + ord(c) - 32 for c in text]


def prompt_ids(question: str, frames: int = 4) -> list[int]:
  """``<s>USER: <image>\\n{question} ASSISTANT: `` with the video's placeholders."""
  return [BOS] + char_ids("USER: ") + [V] * (2 * frames) + char_ids(f"\n{question} ASSISTANT: ")


def arrays(batch: PairBatch) -> dict[str, np.ndarray]:
  return {name: np.asarray(getattr(batch, name)) for name in FIELDS}


# ---- collate_pairs ----------------------------------------------------------------------


def pair_config(**kw) -> PreferenceDataConfig:
  base = dict(
    rows="unused.jsonl",
    batch_size=4,
    seq_buckets=(16, 32),
    sample=PreferenceConfig(template="plain_v1", num_frames=4, max_length=32),
  )
  return PreferenceDataConfig(**{**base, **kw})


def hand_sample(
  prompt, chosen, rejected, frames, fill, scorer=None, source="s"
) -> PreferenceSample:
  video = np.stack([np.full((3, 24, 24), fill + t, np.float32) for t in range(frames)])
  scorer_ids = scorer_mask = None
  if scorer is not None:
    scorer_ids = np.asarray(scorer + [0] * (6 - len(scorer)), np.int32)
    scorer_mask = np.asarray([1] * len(scorer) + [0] * (6 - len(scorer)), np.int32)
  return PreferenceSample(
    np.asarray(prompt, np.int32),
    np.asarray(chosen, np.int32),
    np.asarray(rejected, np.int32),
    video,
    tuple(range(frames)),
    prompt.count(V),
    scorer_ids,
    scorer_mask,
    source=source,
  )


# pair 0: 11 prompt tokens (a 4-frame video), a 3-token chosen and a 2-token rejected row
S0 = dict(prompt=[BOS, *[V] * 8, 50, 51], chosen=[60, 61, EOS], rejected=[70, EOS])
# pair 1: 6 prompt tokens (a 2-frame video: 4 placeholders), 5 and 8 completion tokens
S1 = dict(
  prompt=[BOS, *[V] * 4, 52],
  chosen=[62, 63, 64, 65, EOS],
  rejected=[71, 72, 73, 74, 75, 76, 77, EOS],
)
# pair 2: 20 tokens in its longer row, past the first bucket (16)
S2 = dict(prompt=[BOS, *[V] * 8, 53, 54, 55], chosen=[80, EOS], rejected=[81] * 7 + [EOS])


def padded(values, length, fill):
  return values + [fill] * (length - len(values))


def expected_row(prompt, completion, length, pad=0):
  """(input_ids, labels, attention_mask, position_ids) of one right-padded row."""
  n = len(prompt) + len(completion)
  return (
    padded(prompt + completion, length, pad),
    padded([IGNORE] * len(prompt) + completion, length, IGNORE),
    padded([1] * n, length, 0),
    padded(list(range(n)), length, 0),
  )


def empty_row(length, pad=0):
  return [pad] * length, [IGNORE] * length, [0] * length, [0] * length


def check_rows(batch, want_rows):
  names = ("input_ids", "labels", "attention_mask", "position_ids")
  for r, want in enumerate(want_rows):
    for name, values in zip(names, want):
      assert np.asarray(getattr(batch, name))[r].tolist() == values, (name, r)


def test_collate_interleaves_chosen_and_rejected_rows_per_pair():
  s0 = hand_sample(**S0, frames=4, fill=1.0, scorer=[BOS, 40, 41, EOS])
  s1 = hand_sample(**S1, frames=2, fill=5.0, scorer=[BOS, 42, EOS])
  cfg = pair_config()
  batch = collate_pairs([s0, None, s1], MODEL, cfg, pad_id=0, scorer_length=6, scorer_pad_id=9)
  # the longer rows are 11 + 3 = 14 and 6 + 8 = 14 tokens: the 16 bucket
  assert batch.input_ids.shape == (8, 16) and batch.input_ids.dtype == np.int32
  check_rows(
    batch,
    [
      expected_row(S0["prompt"], S0["chosen"], 16),
      expected_row(S0["prompt"], S0["rejected"], 16),
      empty_row(16),
      empty_row(16),  # pair 1: None
      expected_row(S1["prompt"], S1["chosen"], 16),
      expected_row(S1["prompt"], S1["rejected"], 16),
      empty_row(16),
      empty_row(16),
    ],
  )  # pair 3: past the samples
  assert batch.pair_mask.tolist() == [True, False, True, False]
  assert batch.sample_mask.tolist() == [True, False, True, False]
  # the media once per pair; pair 2's 2-frame video fills a prefix of the 4 frames
  assert batch.videos.shape == (4, 4, 3, 24, 24) and batch.videos.dtype == np.float32
  for t in range(4):
    assert np.all(batch.videos[0, t] == 1.0 + t)
  assert np.all(batch.videos[2, 0] == 5.0) and np.all(batch.videos[2, 1] == 6.0)
  assert not batch.videos[2, 2:].any() and not batch.videos[1].any() and not batch.videos[3].any()
  assert batch.video_frame_mask.tolist() == [
    [True] * 4,
    [False] * 4,
    [True, True, False, False],
    [False] * 4,
  ]
  assert batch.video_token_mask.tolist() == [
    [True] * 8,
    [False] * 8,
    [True] * 4 + [False] * 4,
    [False] * 8,
  ]
  assert batch.scorer_ids.tolist() == [
    [BOS, 40, 41, EOS, 0, 0],
    [9] * 6,
    [BOS, 42, EOS, 0, 0, 0],
    [9] * 6,
  ]
  assert batch.scorer_mask.tolist() == [[1, 1, 1, 1, 0, 0], [0] * 6, [1, 1, 1, 0, 0, 0], [0] * 6]
  # no reference given: zeros
  assert batch.ref_logps.dtype == np.float32 and batch.ref_logps.tolist() == [0.0] * 8


def test_collate_buckets_the_longest_row_and_interleaves_reference_logps():
  samples = [
    hand_sample(**S0, frames=4, fill=1.0),
    hand_sample(**S1, frames=2, fill=5.0),
    hand_sample(**S2, frames=4, fill=9.0),
  ]
  refs = [(-1.5, -2.5), (-3.0, -4.0), (-5.25, -6.75)]
  cfg = pair_config(pixel_dtype="bfloat16")
  batch = collate_pairs(samples, MODEL, cfg, ref_logps=refs, pad_id=3)
  assert batch.input_ids.shape == (8, 32)  # pair 2's longer row: 12 + 8 = 20 > 16
  check_rows(
    batch,
    [
      expected_row(S0["prompt"], S0["chosen"], 32, pad=3),
      expected_row(S0["prompt"], S0["rejected"], 32, pad=3),
      expected_row(S1["prompt"], S1["chosen"], 32, pad=3),
      expected_row(S1["prompt"], S1["rejected"], 32, pad=3),
      expected_row(S2["prompt"], S2["chosen"], 32, pad=3),
      expected_row(S2["prompt"], S2["rejected"], 32, pad=3),
      empty_row(32, pad=3),
      empty_row(32, pad=3),
    ],
  )
  assert batch.pair_mask.tolist() == [True, True, True, False]
  assert batch.ref_logps.tolist() == [-1.5, -2.5, -3.0, -4.0, -5.25, -6.75, 0.0, 0.0]
  assert str(batch.videos.dtype) == "bfloat16"
  assert batch.scorer_ids.shape == batch.scorer_mask.shape == (4, 0)  # no scorer
  # one sample alone: the smallest bucket
  assert collate_pairs(samples[:1], MODEL, cfg).input_ids.shape == (8, 16)
  # no sample at all: an all-empty batch of the smallest bucket
  empty = collate_pairs([None, None], MODEL, cfg)
  assert empty.input_ids.shape == (8, 16) and not empty.pair_mask.any()
  assert not empty.attention_mask.any() and (empty.labels == IGNORE).all()


def test_collate_rejects_too_many_pairs_or_frames():
  cfg = pair_config(batch_size=2)
  s = hand_sample(**S0, frames=4, fill=1.0)
  with pytest.raises(ValueError, match="collate_pairs: 3 pairs for batch_size 2"):
    collate_pairs([s, s, s], MODEL, cfg)
  long = hand_sample(**S0, frames=6, fill=1.0, source="rows.jsonl:7 (id 'x')")
  with pytest.raises(
    ValueError,
    match=re.escape(
      "collate_pairs: rows.jsonl:7 (id 'x'): 6 frames, the batch holds "
      "PreferenceConfig.num_frames=4"
    ),
  ):
    collate_pairs([s, long], MODEL, cfg)


# ---- pair_epoch and the plan ------------------------------------------------------------


def test_pair_epoch_covers_every_row_once_in_batches():
  order, ends = pair_epoch(10, 4, seed=1, epoch=0)
  assert sorted(order.tolist()) == list(range(10))
  assert ends == [4, 8, 10]  # two full batches of 4 pairs, then a short one of 2
  batches = [order[a:b].tolist() for a, b in zip([0] + ends[:-1], ends)]
  assert [len(b) for b in batches] == [4, 4, 2]
  assert sorted(sum(batches, [])) == list(range(10))
  again, _ = pair_epoch(10, 4, seed=1, epoch=0)
  assert again.tolist() == order.tolist()  # a function of (seed, epoch)
  others = [pair_epoch(10, 4, seed=1, epoch=1)[0], pair_epoch(10, 4, seed=2, epoch=0)[0]]
  for other in others:
    assert sorted(other.tolist()) == list(range(10)) and other.tolist() != order.tolist()
  epochs = {tuple(pair_epoch(10, 4, seed=1, epoch=e)[0].tolist()) for e in range(5)}
  assert len(epochs) == 5


def test_pair_epoch_file_order_and_batch_ends():
  order, ends = pair_epoch(7, 3, seed=1, epoch=4, shuffle=False)
  assert order.tolist() == list(range(7)) and ends == [3, 6, 7]
  assert pair_epoch(8, 4, seed=0, epoch=0)[1] == [4, 8]  # no empty last batch
  assert pair_epoch(3, 4, seed=0, epoch=0)[1] == [3]  # fewer rows than one batch


def test_the_plan_of_make_builder_runs_the_epochs_in_turn():
  rows = [
    PreferenceRow(
      id=i,
      question="Q?",
      video=f"v{i}.mp4",
      chosen="A.",
      rejected="B.",
      file="rows.jsonl",
      line=i + 1,
    )
    for i in range(5)
  ]
  cfg = PreferenceDataConfig(
    rows="rows.jsonl", sample=SAMPLE, batch_size=2, seq_buckets=(128, 256), num_epochs=2
  )
  plan = make_builder(
    cfg,
    rows,
    tokenizer=char_tokenizer(),
    model=MODEL,
    scorer_tokenizer=char_tokenizer(),
    shuffle=False,
  ).plan
  assert plan.total() == 6  # 3 batches (2, 2, 1 pairs) per epoch
  members = [plan.members(g) for g in range(7)]
  assert [(e, r.tolist(), p.tolist()) for e, r, p in members[:6]] == [
    (0, [0, 1], [0, 1]),
    (0, [2, 3], [2, 3]),
    (0, [4], [4]),
    (1, [0, 1], [0, 1]),
    (1, [2, 3], [2, 3]),
    (1, [4], [4]),
  ]
  assert members[6][0] == -1 and len(members[6][1]) == 0  # past the end: an empty batch


# ---- the iterator over a synthetic set --------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  folder = tmp_path_factory.mktemp("preference")
  path = generate_preference(SYNTHETIC, folder)
  rows = [json.loads(line) for line in path.read_text().splitlines()]
  assert len(rows) == SYNTHETIC.videos
  return folder, path, rows


def data_config(rows, media_root, **kw) -> PreferenceDataConfig:
  base = dict(
    rows=str(rows),
    media_root=str(media_root),
    sample=SAMPLE,
    batch_size=2,
    seq_buckets=(128, 256),
    seed=3,
    num_epochs=1,
    num_workers=0,
  )
  return PreferenceDataConfig(**{**base, **kw})


def iterator(cfg, **kw):
  tok = char_tokenizer()
  return make_preference_iterator(
    cfg, tokenizer=tok, model=MODEL, scorer_tokenizer=tok, block=0, blocks=1, **kw
  )


def run(it, limit=None):
  """[(arrays, records, epoch)] of the batches ``it`` yields (at most ``limit``)."""
  out = []
  for batch in it:
    out.append((arrays(batch), it.infos[0].records, it.infos[0].epoch))
    if limit is not None and len(out) == limit:
      break
  return out


def check_pair(batch, i, row):
  """Pair ``i`` of ``batch`` holds JSONL ``row``: the shared prompt, then each completion."""
  prompt = prompt_ids(PREFERENCE_QUESTION)
  for j, side in enumerate(("chosen", "rejected")):
    completion = char_ids(row[side]) + [EOS]
    ids, labels, mask, positions = expected_row(prompt, completion, batch["input_ids"].shape[1])
    assert batch["input_ids"][2 * i + j].tolist() == ids, (row["id"], side)
    assert batch["labels"][2 * i + j].tolist() == labels, (row["id"], side)
    assert batch["attention_mask"][2 * i + j].tolist() == mask
    assert batch["position_ids"][2 * i + j].tolist() == positions
  assert batch["pair_mask"][i]
  assert batch["video_frame_mask"][i].all() and batch["video_token_mask"][i].all()
  assert batch["videos"][i].any()
  # the scorer text is the question alone: <s> and its first 39 characters (context 40)
  assert batch["scorer_ids"][i].tolist() == [BOS] + char_ids(PREFERENCE_QUESTION)[:39]
  assert batch["scorer_mask"][i].all()


def check_empty_pair(batch, i):
  assert not batch["pair_mask"][i]
  for r in (2 * i, 2 * i + 1):
    assert not batch["input_ids"][r].any() and not batch["attention_mask"][r].any()
    assert (batch["labels"][r] == IGNORE).all() and not batch["position_ids"][r].any()
  assert not batch["videos"][i].any() and not batch["video_frame_mask"][i].any()
  assert not batch["video_token_mask"][i].any() and not batch["scorer_mask"][i].any()
  assert batch["ref_logps"][2 * i : 2 * i + 2].tolist() == [0.0, 0.0]


def test_an_epoch_has_every_row_once_in_configured_shapes(synthetic):
  folder, path, rows = synthetic
  it = iterator(data_config(path, folder))
  assert it.stats.skipped == {} and it.stats.samples == 0
  batches = run(it)
  assert len(batches) == 3  # 5 rows in pairs of 2: 2, 2, 1
  # 1 + 6 + 8 + 1 + 49 + 12 = 77 prompt tokens and at most 28 completion tokens: bucket 128
  assert len(PREFERENCE_QUESTION) == 49 and len(prompt_ids(PREFERENCE_QUESTION)) == 77
  want = {
    "input_ids": (4, 128),
    "attention_mask": (4, 128),
    "position_ids": (4, 128),
    "labels": (4, 128),
    "pair_mask": (2,),
    "scorer_ids": (2, 40),
    "scorer_mask": (2, 40),
    "videos": (2, 4, 3, 24, 24),
    "video_frame_mask": (2, 4),
    "video_token_mask": (2, 8),
    "ref_logps": (4,),
  }
  for batch, records, epoch in batches:
    assert {k: v.shape for k, v in batch.items()} == want
    assert epoch == 0
    for i, r in enumerate(records):
      check_pair(batch, i, rows[r])
    for i in range(len(records), 2):
      check_empty_pair(batch, i)
    assert not batch["ref_logps"].any()  # a live reference: zeros
  assert [len(records) for _, records, _ in batches] == [2, 2, 1]
  seen = [r for _, records, _ in batches for r in records]
  assert sorted(seen) == list(range(5))
  assert it.stats.samples == 5 and it.stats.batches == 3 and it.stats.skipped == {}
  assert it.stats.scorer_truncated == 5  # <s> and 49 characters cut to 40
  assert next(it, None) is None


@pytest.mark.parametrize("cut", [2, 4])  # within epoch 0, within epoch 1
def test_a_resumed_stream_is_the_uninterrupted_one(synthetic, cut):
  folder, path, _ = synthetic
  cfg = data_config(path, folder, num_epochs=2)
  full_it = iterator(cfg)
  full = run(full_it)
  assert len(full) == 6 and [e for _, _, e in full] == [0, 0, 0, 1, 1, 1]
  for epoch in (0, 1):
    assert sorted(r for _, rs, e in full if e == epoch for r in rs) == list(range(5))
  first = iterator(cfg)
  run(first, limit=cut)
  state = first.get_state()
  first.close()
  assert state["next_batch"] == cut and state["stats"]["batches"] == cut
  json.dumps(state)  # JSON-able, for a checkpoint
  resumed_it = iterator(cfg, state=state)
  resumed = run(resumed_it)
  assert len(resumed) == len(full) - cut
  for (want, want_records, want_epoch), (got, records, epoch) in zip(full[cut:], resumed):
    assert (records, epoch) == (want_records, want_epoch)
    for name in FIELDS:
      assert np.array_equal(got[name], want[name]), name
  assert resumed_it.stats.as_dict() == full_it.stats.as_dict()


# ---- skips ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flawed(synthetic, tmp_path_factory):
  """A JSONL of the synthetic rows with flawed ones between: two left out when read,
  two (garbage JPEGs, a corrupt mp4) that fail when built."""
  folder, _, rows = synthetic
  root = tmp_path_factory.mktemp("flawed")
  for i in range(3):
    shutil.copytree(folder / "frames" / f"{i:04d}", root / "frames" / f"{i:04d}")
  garbage = write_numbered_frames(root / "garbage", 12)
  for jpg in garbage.iterdir():
    jpg.write_bytes(b"these are not JPEG bytes")
  (root / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 but nothing after it")
  good = rows[:3]
  lines = [
    good[0],  # 1: usable row 0
    good[1],  # 2: usable row 1
    {**good[0], "id": "same", "rejected": good[0]["chosen"] + " "},  # 3: same completions
    {**good[0], "id": "gone", "video": "frames/9999"},  # 4: missing video
    {**good[0], "id": "garbage", "video": "garbage"},  # 5: usable row 2, corrupt frames
    good[2],  # 6: usable row 3
    {**good[1], "id": "bad_mp4", "video": "bad.mp4"},
  ]  # 7: usable row 4, corrupt file
  path = root / "rows.jsonl"
  path.write_text("".join(json.dumps(x) + "\n" for x in lines))
  return root, path, lines


def test_rows_that_cannot_teach_are_skipped_and_bad_media_leave_empty_pairs(flawed):
  root, path, lines = flawed
  usable = [lines[i] for i in (0, 1, 4, 5, 6)]  # file lines 1, 2, 5, 6, 7
  it = iterator(data_config(path, root, batch_size=5, max_skip_fraction=0.9))
  # the rows left out when reading count from the start
  assert it.stats.skipped == {"same_completions": 1, "missing": 1}
  assert it.stats.samples == 2
  batches = run(it)
  assert len(batches) == 1  # all 5 usable rows in one batch of 5 pairs
  batch, records, _ = batches[0]
  assert sorted(records) == list(range(5))
  bad = {2: f"{path}:5 (id 'garbage')", 4: f"{path}:7 (id 'bad_mp4')"}
  for i, r in enumerate(records):
    if r in bad:
      check_empty_pair(batch, i)
    else:
      check_pair(batch, i, usable[r])
  assert batch["pair_mask"].sum() == 3
  skipped = it.infos[0].skipped
  assert sorted(reason for reason, _ in skipped) == ["corrupt", "corrupt"]
  for source in bad.values():
    assert sum(source in detail for _, detail in skipped) == 1, (source, skipped)
  assert it.stats.skipped == {"same_completions": 1, "missing": 1, "corrupt": 2}
  assert it.stats.samples == 7 and it.stats.batches == 1


def pcg(seed: int, epoch: int, index: int) -> np.random.Generator:
  """Another implementation's generator: PCG64 keyed by (seed, epoch, index)."""
  return np.random.Generator(np.random.PCG64([seed, epoch, index]))


def test_an_rng_factory_draws_each_pairs_frames(synthetic):
  """``rng_factory(seed, epoch, position)`` (pinned: ``(seed, 0, row)``) makes the pair's
  generator: 12 frames in 4 segments, linspace(0, 12, 5) = 0 3 6 9 12, one draw from each
  range(lo, hi - 1)."""
  folder, path, _ = synthetic
  cfg = data_config(path, folder)
  rows = read_preference_rows(path, str(folder)).rows
  tok = char_tokenizer()
  for pinned, key in ((False, (3, 1, 2)), (True, (3, 0, 4))):
    builder = make_builder(
      cfg,
      rows,
      tokenizer=tok,
      model=MODEL,
      scorer_tokenizer=tok,
      pin_frames=pinned,
      rng_factory=pcg,
    )
    want = pcg(*key).integers([0, 3, 6, 9], [2, 5, 8, 11]).tolist()
    assert builder.build(4, epoch=1, position=2).frame_indices == tuple(want)


# ---- pinned frames ----------------------------------------------------------------------


def videos_by_epoch(it) -> dict[tuple[int, int], np.ndarray]:
  """(epoch, row) -> the pixels that row's pair got."""
  out = {}
  for batch, records, epoch in run(it):
    for i, r in enumerate(records):
      out[epoch, r] = batch["videos"][i]
  return out


def test_pinned_frames_are_the_same_in_every_epoch(synthetic):
  folder, path, _ = synthetic
  cfg = data_config(path, folder, num_epochs=2)
  pinned = videos_by_epoch(iterator(cfg, pin_frames=True))
  assert len(pinned) == 10
  for r in range(5):
    assert np.array_equal(pinned[0, r], pinned[1, r]), r
  # the documented pinned seed: (seed, 0, row) for every epoch
  rows = read_preference_rows(path, str(folder)).rows
  tok = char_tokenizer()
  build = PreferenceBuilder(tok, MODEL, tok, SAMPLE)
  for r in range(5):
    np.testing.assert_array_equal(pinned[0, r], build(rows[r], seed=3, epoch=0, index=r).video)
  free = videos_by_epoch(iterator(cfg, pin_frames=False))
  assert len(free) == 10
  assert any(not np.array_equal(free[0, r], free[1, r]) for r in range(5))


# ---- the reference table ----------------------------------------------------------------


def test_reference_log_probs_sit_at_each_pairs_rows(synthetic):
  folder, path, rows = synthetic
  table = {row["id"]: (-1.0 - r, -10.0 - r) for r, row in enumerate(rows)}
  it = iterator(data_config(path, folder), reference=table)
  batches = run(it)
  assert len(batches) == 3
  for batch, records, _ in batches:
    want = [0.0] * 4
    for i, r in enumerate(records):
      want[2 * i : 2 * i + 2] = [-1.0 - r, -10.0 - r]
    assert batch["ref_logps"].dtype == np.float32
    assert batch["ref_logps"].tolist() == want


def test_a_row_missing_from_the_reference_table_is_an_error(synthetic):
  folder, path, rows = synthetic
  table = {row["id"]: (-1.0, -2.0) for row in rows if row["id"] != "synthetic_0003"}
  it = iterator(data_config(path, folder), reference=table)
  with pytest.raises(
    MissingReference,
    match=re.escape(f"{path}:4 (id 'synthetic_0003'): no cached reference log-probs"),
  ):
    run(it)
  it.close()


# ---- config validation ------------------------------------------------------------------


@pytest.mark.parametrize(
  "fields, message",
  [
    (dict(rows=""), "PreferenceDataConfig.rows: give the preference JSONL file"),
    (
      dict(sample=PreferenceConfig(max_length=300)),
      "PreferenceConfig.max_length 300 exceeds the largest bucket 256",
    ),
    (
      dict(pixel_dtype="float16"),
      "PreferenceDataConfig.pixel_dtype must be one of ('float32', 'bfloat16')",
    ),
    (dict(batch_size=0), "batch_size and seq_buckets must be positive"),
    (dict(seq_buckets=(256, 128)), "seq_buckets must be increasing"),
    (dict(num_epochs=0), "num_epochs must be >= 1 or None, got 0"),
  ],
)
def test_config_validation(fields, message):
  base = dict(rows="rows.jsonl", sample=PreferenceConfig(max_length=256), seq_buckets=(128, 256))
  with pytest.raises(ValueError, match=re.escape(message)):
    PreferenceDataConfig(**{**base, **fields})


def test_config_defaults_and_buckets():
  cfg = PreferenceDataConfig(rows="rows.jsonl")  # max_length 4096, buckets up to 4096
  assert (cfg.batch_size, cfg.seq_buckets, cfg.num_epochs) == (2, (1024, 2048, 4096), 1)
  assert [cfg.bucket(n) for n in (1, 1024, 1025, 4096)] == [1024, 1024, 2048, 4096]
