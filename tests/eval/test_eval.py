"""eval.py end to end on a checkpoint built in code: MVBench items with one missing
video, resumption under the same settings only, pictures, open-ended QA, prompts longer
than the context, Ctrl-C; and the checks made before the model loads."""

import json
import logging

import numpy as np
import pytest
from support.eval_folders import eval_folder

from ppllava_jax import cli
from ppllava_jax.data.media.video import load_video, write_video
from ppllava_jax.eval import app, runner
from ppllava_jax.eval.jobs import Job, MediaRef
from ppllava_jax.eval.records import read_records
from ppllava_jax.models.tiny import TinyConfig
from ppllava_jax.train.run.synthetic import COLOURS, frames

SMALL = TinyConfig(
  frames=8,
  image_size=112,
  patch_size=14,
  vision_width=32,
  vision_layers=1,
  llm_width=64,
  llm_layers=1,
  text_width=32,
  text_layers=1,
)


def draw_video(path, count, size):
  """A red circle moving right."""
  return write_video(path, frames(COLOURS["red"], "circle", "right", count, size))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval")
  items = [
    dict(
      video=f"{name}.mp4",
      question=f"Where is the circle {i}?",
      candidates=["left", "right", "up"],
      answer="right",
    )
    for i, name in enumerate(("a", "missing", "b"))
  ]
  return root, eval_folder(root, SMALL, {"a": "red", "b": "red"}, "object_shuffle", items)


def common(root, checkpoint, out):
  return [
    "--checkpoint",
    str(checkpoint),
    "--scorer-tokenizer",
    str(checkpoint),
    "--video-root",
    str(root / "videos"),
    "--out",
    str(out),
    "--frames",
    "4",
    "--max-new-tokens",
    "3",
    "--batch-size",
    "2",
  ]


def test_mvbench_run_records_failures_scores_resumes_and_draws(setup, capsys, caplog):
  root, checkpoint = setup
  out = root / "mvbench"
  argv = common(root, checkpoint, out) + [
    "--mvbench",
    str(root / "tasks"),
    "--visualize",
    str(out / "maps"),
  ]
  with caplog.at_level(logging.INFO, logger="ppllava_jax"):
    assert app.main(argv) == 0
  printed = capsys.readouterr().out
  assert "compiled generation program #" in caplog.text
  assert "failed: object_shuffle/1: MediaError" in printed and "missing.mp4" in printed
  assert "MVBench, protocol original" in printed and "object_shuffle" in printed
  results = json.loads((out / "results.json").read_text())
  assert results["items"] == 3 and list(results["failed"]) == ["object_shuffle/1"]
  assert results["overall"]["total"] == 2  # the failed item is reported, not scored
  records = read_records(out / "predictions.jsonl")
  assert {r["id"]: r["status"] for r in records} == {
    "object_shuffle/0": "ok",
    "object_shuffle/1": "failed",
    "object_shuffle/2": "ok",
  }
  assert sorted(p.name for p in (out / "maps").iterdir()) == [
    "object_shuffle_0.png",
    "object_shuffle_2.png",
  ]
  lines = (out / "predictions.jsonl").read_text().splitlines()
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="ppllava_jax"):
    assert app.main(argv) == 0  # a rerun answers nothing again; it retries the failure
  assert "2 answers reused, 1 redone" in capsys.readouterr().out
  again = (out / "predictions.jsonl").read_text().splitlines()
  assert again[: len(lines)] == lines and len(again) == len(lines) + 1
  assert json.loads(again[-1])["id"] == "object_shuffle/1"


def test_open_ended_qa_writes_jsonl(setup, capsys):
  """Decoded by decord, as the original; average pooling still draws the scorer's map."""
  root, checkpoint = setup
  qa = root / "qa.jsonl"
  qa.write_text(json.dumps(dict(id="q1", video="a.mp4", question="What moves?")) + "\n")
  out = root / "qa"
  argv = common(root, checkpoint, out) + [
    "--qa",
    str(qa),
    "--video-backend",
    "decord",
    "--pooling",
    "average",
    "--visualize",
    str(out / "maps"),
  ]
  assert app.main(argv) == 0
  assert [p.name for p in (out / "maps").iterdir()] == ["q1.png"]
  assert "0 answers reused, 0 redone (failed before, or made under other settings), 1 new" in (
    capsys.readouterr().out
  )
  (record,) = read_records(out / "predictions.jsonl")
  assert record["id"] == "q1" and record["status"] == "ok" and isinstance(record["prediction"], str)


SRT = """1
00:00:00,000 --> 00:00:00,500
<font color="white" size=".72c">first line</font>

2
00:00:00,500 --> 00:00:01,000
no font tag: dropped, as the originals drop it

3
00:00:01,000 --> 00:00:01,400
<font color="white" size=".72c">shown at frame 8</font>

4
00:00:01,000 --> 00:00:01,400
<font color="white" size=".72c">same range, later block: kept</font>
"""


def test_subtitles_at_sampled_frames(tmp_path):
  """8 fps: cue 1 covers frames 0-3, cue 2 frames 4-7, cues 3/4 frames 8-10."""
  from ppllava_jax.data.media.subtitles import lines_at_frames, read_srt

  (tmp_path / "v.srt").write_text(SRT)
  cues = read_srt(tmp_path / "v.srt")
  assert [c.start for c in cues] == [0.0, 0.5, 1.0]  # blocks 3 and 4 share a range
  assert lines_at_frames(cues, [1, 9], 8.0) == ("first line", "same range, later block: kept")
  assert lines_at_frames(cues, [4, 5, 11], 8.0) == ()


def test_videomme_prompt_quotes_the_subtitles_of_the_sampled_frames(setup, tmp_path):
  """The drawn video has 12 frames at 8 fps; 4 frames sampled at the segment middles
  (1, 4, 7, 9) meet cues 1 and 3/4, and the prompt quotes exactly those lines."""
  root, checkpoint = setup
  (tmp_path / "subs").mkdir()
  (tmp_path / "subs" / "a.srt").write_text(SRT)
  item = dict(
    videoID="a",
    duration="short",
    question="What is shown?",
    options=["A. x", "B. y", "C. z", "D. w"],
    answer="A",
    question_id="001-1",
  )
  (tmp_path / "vmme.json").write_text(json.dumps([item]))
  out = tmp_path / "out"
  argv = common(root, checkpoint, out) + [
    "--videomme",
    str(tmp_path / "vmme.json"),
    "--subtitles",
    "--subtitle-root",
    str(tmp_path / "subs"),
  ]
  assert app.main(argv) == 0
  (record,) = read_records(out / "predictions.jsonl")
  assert record["id"] == "001-1" and record["frame_indices"] == [[1, 4, 7, 9]]
  prompt = record["prompt"]
  assert (
    "This video's subtitles are listed below: first line same range, later block: kept" in prompt
  )
  assert "dropped" not in prompt


def test_questions_on_one_video_decode_it_once(tmp_path, monkeypatch):
  video = draw_video(tmp_path / "v.mp4", 6, 64)
  calls = []
  monkeypatch.setattr(runner, "load_video", lambda *a, **k: calls.append(a) or load_video(*a, **k))
  jobs = [Job(f"q{i}", "<image> Q?", "Q?", (MediaRef("video", str(video)),), 4) for i in range(3)]
  loaded = [item for _, batch in runner._prefetched([jobs[:2], jobs[2:]], "pyav") for item in batch]
  assert len(calls) == 1 and [error for _, error in loaded] == [None] * 3
  first = loaded[0][0].videos[0]
  assert all(np.array_equal(result.videos[0], first) for result, _ in loaded)


# --- reruns, ids, limits, interruption (generation replaced: these test the bookkeeping) ---


@pytest.fixture
def replies(monkeypatch):
  """Generation without the model: call k answers every item "reply k", or raises
  ``raises[k]`` when that is set."""
  calls, raises = [], {}

  def generate(model, processor, encoded, cfg):
    calls.append(len(encoded))
    if len(calls) in raises:
      raise raises[len(calls)]
    return [f"reply {len(calls)}"] * len(encoded)

  monkeypatch.setattr(runner, "_generate", generate)
  return calls, raises


def _predictions(out):
  return {r["id"]: r.get("prediction") for r in read_records(out / "predictions.jsonl")}


def test_a_rerun_reuses_answers_only_under_the_same_settings(setup, replies, capsys):
  """Seen failing before: the lmms_eval and average-pooling reruns generated nothing and
  scored run 1's answers."""
  root, checkpoint = setup
  calls, _ = replies
  out = root / "rerun"
  argv = common(root, checkpoint, out) + ["--mvbench", str(root / "tasks"), "--batch-size", "3"]

  def rerun(*extra):
    assert app.main(argv + list(extra)) == 0
    replies = [o["reply"] for o in json.loads((out / "results.json").read_text())["outcomes"]]
    return len(calls), replies, capsys.readouterr().out.splitlines()[0]

  runs = [rerun(), rerun("--protocol", "lmms_eval"), rerun(), rerun("--pooling", "average")]
  # Another prompt or pooling generates again; the first settings' answers stay reusable.
  assert [(n, replies) for n, replies, _ in runs] == [
    (1, ["(reply 1"] * 2),
    (2, ["reply 2"] * 2),
    (2, ["(reply 1"] * 2),
    (3, ["(reply 3"] * 2),
  ]
  assert [summary.split(" (")[0] for _, _, summary in runs] == [
    "0 answers reused, 0 redone",
    "0 answers reused, 3 redone",
    "2 answers reused, 1 redone",
    "0 answers reused, 3 redone",
  ]


def test_one_video_is_keyed_on_the_video_and_the_question(setup, replies, capsys):
  """Seen failing before: the second question printed the first one's answer."""
  root, checkpoint = setup
  out = root / "single"
  ask = lambda q: (
    common(root, checkpoint, out) + ["--video", str(root / "videos" / "a.mp4"), "--question", q]
  )
  assert app.main(ask("What moves?")) == 0
  assert capsys.readouterr().out.splitlines()[-1] == "reply 1"
  assert app.main(ask("What is red?")) == 0
  assert capsys.readouterr().out.splitlines()[-1] == "reply 2"
  assert app.main(ask("What moves?")) == 0
  printed = capsys.readouterr().out.splitlines()
  assert printed[-1] == "reply 1" and printed[0].startswith("1 answers reused, 0 redone")


def test_a_prompt_longer_than_the_context_fails_its_item(setup, replies, capsys):
  """The demo LLM has 4096 positions; a 5000-character question is 5000+ tokens with the
  character tokenizer. Seen failing before: it was generated."""
  root, checkpoint = setup
  qa = root / "long.jsonl"
  qa.write_text(
    json.dumps(dict(id="long", video="a.mp4", question="x" * 5000))
    + "\n"
    + json.dumps(dict(id="short", video="a.mp4", question="What moves?"))
    + "\n"
  )
  out = root / "long"
  assert app.main(common(root, checkpoint, out) + ["--qa", str(qa)]) == 0
  printed = capsys.readouterr().out
  records = {r["id"]: r for r in read_records(out / "predictions.jsonl")}
  assert records["short"]["status"] == "ok" and records["long"]["status"] == "failed"
  error = records["long"]["error"]
  assert error.startswith("ValueError: the prompt has 50") and "needs 50" in error
  assert "the LLM's context is 4096 (max_position_embeddings)" in error
  assert f"failed: long: {error}" in printed


def test_ctrl_c_ends_with_one_line_and_exit_130(setup, replies, capsys):
  """Seen failing before: KeyboardInterrupt propagated (a traceback)."""
  root, checkpoint = setup
  _, raises = replies
  raises[2] = KeyboardInterrupt()  # during item 3: item 1 answered, item 2's video missing
  out = root / "interrupted"
  argv = common(root, checkpoint, out) + ["--mvbench", str(root / "tasks"), "--batch-size", "1"]
  assert app.main(argv) == 130
  assert capsys.readouterr().err.splitlines()[-1] == (
    f"interrupted: 1 answers kept in {out / 'predictions.jsonl'}"
  )
  assert app.main(argv) == 0
  assert "1 answers reused, 1 redone" in capsys.readouterr().out


def test_a_torn_last_line_is_cut_before_appending(setup, replies):
  """Seen failing before: the first new record was glued onto the torn line and lost."""
  root, checkpoint = setup
  out = root / "torn"
  out.mkdir()
  (out / "predictions.jsonl").write_text('{"id": "x", "status": "ok"}\n{"id": "object_shuf')
  assert app.main(common(root, checkpoint, out) + ["--mvbench", str(root / "tasks")]) == 0
  assert list(_predictions(out)) == [
    "x",
    "object_shuffle/1",
    "object_shuffle/0",
    "object_shuffle/2",
  ]


@pytest.fixture
def no_model(monkeypatch):
  def load(args):
    raise AssertionError("the model was loaded")

  monkeypatch.setattr(app, "load", load)


def test_inputs_are_checked_before_the_model_loads(setup, no_model, tmp_path):
  """Seen failing before: the model loaded first, and the QA line was reported as the
  JSON decoder's "line 1"."""
  root, checkpoint = setup
  base = common(root, checkpoint, tmp_path / "out")
  qa = tmp_path / "qa.jsonl"
  qa.write_text(json.dumps(dict(video="a.mp4", question="Q?")) + "\n\n{oops\n")
  with pytest.raises(ValueError, match=r"qa\.jsonl:3: invalid JSON: Expecting property name"):
    app.main(base + ["--qa", str(qa)])
  qa.write_text(json.dumps(dict(video="a.mp4", question=" ")) + "\n")
  with pytest.raises(ValueError, match=r"qa\.jsonl:1: field 'question' must be a non-blank"):
    app.main(base + ["--qa", str(qa)])
  (tmp_path / "task.json").write_text(json.dumps([dict(video="a.mp4", question="Q?")]))
  with pytest.raises(ValueError, match=r"task\.json: item 0: field 'candidates' is missing"):
    app.main(base + ["--mvbench", str(tmp_path / "task.json")])
  with pytest.raises(ValueError, match=r"--video .*nothing\.mp4: no such file or folder"):
    app.main(base + ["--video", str(tmp_path / "nothing.mp4"), "--question", "Q?"])
  with pytest.raises(ValueError, match=r"--video-root .*: not a folder"):
    app.main(base + ["--mvbench", str(root / "tasks"), "--video-root", str(tmp_path / "no")])


def test_eval_py_prints_an_input_error_as_one_line(setup, no_model, tmp_path, capsys):
  root, checkpoint = setup
  argv = common(root, checkpoint, tmp_path / "out") + [
    "--video",
    str(tmp_path / "no.mp4"),
    "--question",
    "Q?",
  ]
  assert cli.run(app.main, argv) == 2
  missing = tmp_path / "no.mp4"
  assert capsys.readouterr().err == f"error: --video {missing}: no such file or folder\n"


@pytest.mark.parametrize(
  "extra, message",
  [
    (["--frames", "0"], "argument --frames: must be 1 or more, got 0"),
    (["--batch-size", "-2"], "argument --batch-size: must be 1 or more, got -2"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be 1 or more, got 0"),
    (["--limit", "-1"], "argument --limit: must be 0 or more, got -1"),
    (["--frames", "4.5"], "argument --frames: expected a whole number, got '4.5'"),
  ],
)
def test_numbers_are_validated(extra, message, capsys):
  """Seen failing before: the out-of-range values were accepted (0 frames or batch size
  silently became the defaults)."""
  with pytest.raises(SystemExit) as exit_:
    app.parse_args(["--checkpoint", "c", "--video", "v.mp4", "--question", "Q?", *extra])
  assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("question", ["", "  \n"])
def test_a_blank_question_is_an_error(question, capsys):
  with pytest.raises(SystemExit):
    app.parse_args(["--checkpoint", "c", "--video", "v.mp4", "--question", question])
  assert "--video needs a --question that is not blank" in capsys.readouterr().err


def test_limit_zero_checks_and_runs_nothing(setup, replies, capsys):
  root, checkpoint = setup
  out = root / "limit0"
  assert (
    app.main(common(root, checkpoint, out) + ["--mvbench", str(root / "tasks"), "--limit", "0"])
    == 0
  )
  assert "0 new" in capsys.readouterr().out and replies[0] == []


def test_help_is_whole_sentences_and_says_where_output_goes(capsys):
  """Seen failing before: helps like "default: --checkpoint", nothing on reruns."""
  for action in app.build_parser()._actions:
    assert action.help[0].isupper() and action.help.endswith("."), action.help
  with pytest.raises(SystemExit):
    app.parse_args(["--help"])
  text = " ".join(capsys.readouterr().out.split())
  assert "Answers are appended to OUT/predictions.jsonl" in text
  assert "A rerun with the same --out reuses a saved answer only when" in text
