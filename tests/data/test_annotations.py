"""Annotation formats, validation errors (file, record, field) and the data mixture."""

import collections
import json
import pickle

import numpy as np
import pytest

from ppllava_jax.data.sft.annotations import (
  AnnotationError,
  CorpusConfig,
  MixtureConfig,
  epoch_order,
  load_mixture,
  parse_record,
)
from ppllava_jax.data.text.templates import Turn
from ppllava_jax.files import DataFileError

QA = [{"q": "What is it?", "a": "A dog."}]


def corpus(tmp_path, records, name="c", suffix=".json", **kw):
  path = tmp_path / f"{name}{suffix}"
  if suffix == ".jsonl":
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
  else:
    path.write_text(json.dumps(records))
  return CorpusConfig(name, str(path), **kw)


def load(tmp_path, records, **kw):
  return load_mixture(MixtureConfig((corpus(tmp_path, records, **kw),)))


@pytest.mark.parametrize(
  "bad, fmt, kind, where",
  [
    (1, "qa", "auto", "record 2: must be an object"),
    ({"QA": QA}, "qa", "auto", "record 2: field 'video': missing"),
    ({"video": "v.mp4", "QA": "q"}, "qa", "auto", "field 'QA': must be a non-empty list"),
    ({"video": "v.mp4", "QA": []}, "qa", "auto", "field 'QA': must be a non-empty list"),
    ({"video": "v.mp4", "QA": [{"q": "x"}]}, "qa", "auto", "field 'QA[0].a': missing"),
    (
      {"video": "v.mp4", "QA": [{"q": 3, "a": "b"}]},
      "qa",
      "auto",
      "field 'QA[0].q': must be a string, got int",
    ),
    ({"video": "v.mp4", "QA": [{"q": "x", "a": "b", "i": 1}]}, "qa", "auto", "field 'QA[0].i'"),
    ({"video": "v.mp4", "QA": QA, "total_frames": 0}, "qa", "auto", "field 'total_frames'"),
    ({"video": "", "QA": QA}, "qa", "auto", "field 'video': is empty"),
    ({"video": "v.mp4", "image": "a.jpg", "QA": QA}, "qa", "auto", "one media key"),
    ({"multi-image": "a.jpg", "QA": QA}, "qa", "auto", "field 'multi-image': a multi-image"),
    ({"multi-image": [], "QA": QA}, "qa", "auto", "field 'multi-image': is an empty list"),
    ({"multi-image": ["a.jpg", 3], "QA": QA}, "qa", "auto", "field 'multi-image[1]'"),
    (
      {"multi-image": ["a.jpg", "b.jpg"], "QA": [{"q": "<image> x", "a": "y"}]},
      "qa",
      "auto",
      "field 'QA': the conversation has 1 <image> placeholders for 2 multi-image item(s)",
    ),
    (
      {"video": "v.mp4", "QA": [{"q": "x", "a": "y"}, {"q": "<image>z", "a": "w"}]},
      "qa",
      "auto",
      "2 <image> placeholders for 1 video item(s)",
    ),
    (
      {"video": "v.mp4", "QA": [{"q": "x", "a": "see <image>"}]},
      "qa",
      "auto",
      "field 'QA[0]': an answer holds '<image>'",
    ),
    # an empty answer: the original trains that turn on its end marker alone
    (
      {"video": "v.mp4", "QA": [{"q": "x", "a": ""}]},
      "qa",
      "auto",
      "record 2: field 'QA[0].a': is empty",
    ),
    (
      {"video": "v.mp4", "QA": [{"q": "x", "a": "y"}, {"q": "z", "a": " \n\t"}]},
      "qa",
      "auto",
      "record 2: field 'QA[1].a': is blank (whitespace only)",
    ),
    ({"image": "a.jpg", "QA": QA}, "qa", "video", "field 'video': missing (corpus 'c' holds video"),
    (
      {"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
      "llava",
      "auto",
      "field 'conversations[0].from': expected 'human', got 'gpt'",
    ),
    (
      {"conversations": [{"from": "human", "value": "x"}]},
      "llava",
      "auto",
      "field 'conversations': needs human/gpt pairs, got 1",
    ),
    (
      {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": None}]},
      "llava",
      "auto",
      "field 'conversations[1]'",
    ),
    (
      {
        "image": "a.jpg",
        "conversations": [
          {"from": "human", "value": "x"},
          {"from": "gpt", "value": "y"},
        ],
      },
      "llava",
      "video",
      "field 'video': missing",
    ),
    (
      {"conversations": [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}]},
      "llava",
      "auto",
      "1 <image> placeholders for 0 text item(s)",
    ),
    (
      {
        "conversations": [
          {"from": "system", "value": ""},
          {"from": "human", "value": "x"},
          {"from": "gpt", "value": ""},
        ]
      },
      "llava",
      "auto",
      "record 2: field 'conversations[2].value': is empty",
    ),
    (
      {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "  "}]},
      "llava",
      "auto",
      "record 2: field 'conversations[1].value': is blank (whitespace only)",
    ),
  ],
)
def test_a_malformed_record_names_file_record_and_field(tmp_path, bad, fmt, kind, where):
  good = (
    {"video": "v.mp4", "QA": QA}
    if fmt == "qa"
    else {
      "video": "v.mp4",
      "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}],
    }
  )
  c = corpus(tmp_path, [good, good, bad, good], format=fmt, kind=kind)
  with pytest.raises(AnnotationError) as err:
    load_mixture(MixtureConfig((c,)))
  message = str(err.value)
  assert message.startswith(c.annotation + ": "), message
  assert where in message, message
  assert pickle.loads(pickle.dumps(err.value)).args == err.value.args  # crosses processes


def test_file_level_errors_name_the_file_and_line(tmp_path):
  def load_file(name):
    return load_mixture(MixtureConfig((CorpusConfig("a", str(tmp_path / name)),)))

  (tmp_path / "obj.json").write_text('{"video": "v.mp4"}')
  with pytest.raises(DataFileError, match=r"obj\.json: expected a JSON array, found an object"):
    load_file("obj.json")
  (tmp_path / "bad.jsonl").write_text(json.dumps({"video": "v", "QA": QA}) + "\n\n{oops\n")
  with pytest.raises(DataFileError, match=r"bad\.jsonl:3: invalid JSON"):
    load_file("bad.jsonl")
  with pytest.raises(DataFileError, match=r"none\.json: cannot be read: No such file"):
    load_file("none.json")
  (tmp_path / "empty.jsonl").write_text("\n")
  with pytest.raises(AnnotationError, match=r"empty\.jsonl: holds no records"):
    load_file("empty.jsonl")


def test_both_formats_normalise_to_records(tmp_path):
  qa = parse_record(
    {
      "multi-image": ["x/a.jpg", "/abs/b.jpg"],
      "total_frames": 5,
      "QA": [
        {"i": "Be brief.", "q": "<image><image>Compare.", "a": "Same."},
        {"i": "ignored", "q": "Why?", "a": "Light."},
      ],
    },
    CorpusConfig("m", "f", media_root="/root"),
  )
  assert qa.kind == "multi-image" and qa.media == ("/root/x/a.jpg", "/abs/b.jpg")
  assert qa.system == "Be brief." and qa.total_frames is None  # frames only for videos
  assert qa.turns == (Turn("<image><image>Compare.", "Same."), Turn("Why?", "Light."))
  llava = CorpusConfig("l", "f", format="llava", media_root="r")
  conv = [
    {"from": "system", "value": "Sys."},
    {"from": "human", "value": "<image>\nQ1"},
    {"from": "gpt", "value": "A1"},
    {"from": "human", "value": "Q2"},
    {"from": "gpt", "value": "A2"},
  ]
  r = parse_record({"id": 1, "image": "p.jpg", "conversations": conv}, llava)
  assert (r.kind, r.media, r.system) == ("image", ("r/p.jpg",), "Sys.")
  assert r.turns == (Turn("<image>\nQ1", "A1"), Turn("Q2", "A2"))
  two = [{"from": "human", "value": "<image><image>Q"}, {"from": "gpt", "value": "A"}]
  assert parse_record({"image": ["a", "b"], "conversations": two}, llava).kind == "multi-image"
  one = [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]
  assert parse_record({"image": ["a"], "conversations": one}, llava).kind == "image"
  assert parse_record({"video": "v", "conversations": one}, llava).kind == "video"
  assert parse_record({"conversations": one}, llava).kind == "text"
  frames = parse_record({"video": ["f/2.jpg", "f/1.jpg"], "QA": QA}, CorpusConfig("v", "f"))
  assert frames.kind == "video" and frames.frame_list


def test_annotation_set_round_trips_and_pickles(tmp_path):
  records = [{"video": f"v{i}.mp4", "QA": QA, "total_frames": i + 1} for i in range(3)]
  records.append({"multi-image": ["a", "b", "c"], "QA": [{"q": "<image>" * 3, "a": "é"}]})
  aset = load(tmp_path, records, media_root="/m")
  again = pickle.loads(pickle.dumps(aset))
  assert len(again) == 4 and again.kinds.tolist() == [2, 2, 2, 3]
  assert again.num_media.tolist() == [1, 1, 1, 3]
  assert again[1].media == ("/m/v1.mp4",) and again[1].total_frames == 2
  assert again[3].turns[0].answer == "é" and again[3].source == 3
  assert again.describe(3) == f"corpus 'c' ({tmp_path / 'c.json'}) record 3"


def test_mixture_concatenates_with_repeats_and_reshuffles_each_epoch(tmp_path):
  a = corpus(tmp_path, [{"video": f"a{i}", "QA": QA} for i in range(3)], "a")
  b = corpus(tmp_path, [{"image": f"b{i}", "QA": QA} for i in range(2)], "b", repeat=2)
  mix = MixtureConfig((a, b))
  aset = load_mixture(mix)
  orders = [epoch_order(aset, mix, seed=1, epoch=e) for e in range(4)]
  for order in orders:
    assert sorted(collections.Counter(order.tolist()).items()) == [
      (0, 1),
      (1, 1),
      (2, 1),
      (3, 2),
      (4, 2),
    ]
  assert len({tuple(o) for o in orders}) > 1
  np.testing.assert_array_equal(epoch_order(aset, mix, seed=1, epoch=2), orders[2])


def test_weighted_mixture_draws_without_replacement_and_cycles(tmp_path):
  a = corpus(tmp_path, [{"video": f"a{i}", "QA": QA} for i in range(2)], "a", weight=3.0)
  b = corpus(tmp_path, [{"image": f"b{i}", "QA": QA} for i in range(3)], "b", weight=1.0)
  mix = MixtureConfig((a, b), epoch_size=8)
  aset = load_mixture(mix)
  order = epoch_order(aset, mix, seed=0, epoch=0)
  counts = collections.Counter(order.tolist())
  assert counts[0] == counts[1] == 3  # corpus a: 6 draws, each of its 2 records 3 times
  assert sum(counts[i] for i in (2, 3, 4)) == 2 and max(counts[i] for i in (2, 3, 4)) == 1
  with pytest.raises(ValueError, match="every corpus or to none"):
    MixtureConfig((a, CorpusConfig("c", "x")))
