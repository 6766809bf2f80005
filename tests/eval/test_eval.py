"""eval.py end to end on a checkpoint built in code: MVBench items with one missing
video, resumption, pictures, open-ended QA; and the runner's record reading."""

import json
import logging

import numpy as np
import pytest

from ppllava_jax.demo import DemoConfig, build_model, draw_video
from ppllava_jax.data.tokenizer import char_tokenizer
from ppllava_jax.data.video import load_video
from ppllava_jax.eval import app
from ppllava_jax.eval.runner import read_records

SMALL = DemoConfig(frames=8, image_size=112, patch_size=14, vision_width=32, vision_layers=1,
                   llm_width=64, llm_layers=1, text_width=32, text_layers=1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval")
  tokenizer = char_tokenizer()
  checkpoint = build_model(SMALL, len(tokenizer)).save_pretrained(root / "checkpoint")
  tokenizer.save_pretrained(checkpoint)
  (root / "videos").mkdir()
  for name in ("a", "b"):
    draw_video(root / "videos" / f"{name}.mp4", 12, 64)  # decord 0.6 garbles 48x48 H.264
  items = [dict(video=f"{name}.mp4", question=f"Where is the circle {i}?",
                candidates=["left", "right", "up"], answer="right")
           for i, name in enumerate(("a", "missing", "b"))]
  (root / "tasks").mkdir()
  (root / "tasks" / "object_shuffle.json").write_text(json.dumps(items))
  return root, checkpoint


def common(root, checkpoint, out):
  return ["--checkpoint", str(checkpoint), "--scorer-tokenizer", str(checkpoint),
          "--video-root", str(root / "videos"), "--out", str(out), "--frames", "4",
          "--max-new-tokens", "3", "--batch-size", "2"]


def test_mvbench_run_records_failures_scores_resumes_and_draws(setup, capsys, caplog):
  root, checkpoint = setup
  out = root / "mvbench"
  argv = common(root, checkpoint, out) + ["--mvbench", str(root / "tasks"),
                                          "--visualize", str(out / "maps")]
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
  assert {k: r["status"] for k, r in records.items()} == {
      "object_shuffle/0": "ok", "object_shuffle/1": "failed", "object_shuffle/2": "ok"}
  assert sorted(p.name for p in (out / "maps").iterdir()) == ["object_shuffle_0.png",
                                                               "object_shuffle_2.png"]
  lines = (out / "predictions.jsonl").read_text().splitlines()
  caplog.clear()
  with caplog.at_level(logging.INFO, logger="ppllava_jax"):
    assert app.main(argv) == 0  # a rerun answers nothing again; it retries the failure
  assert "2 of 3 jobs already answered, skipped" in caplog.text
  again = (out / "predictions.jsonl").read_text().splitlines()
  assert again[:len(lines)] == lines and len(again) == len(lines) + 1
  assert json.loads(again[-1])["id"] == "object_shuffle/1"


def test_open_ended_qa_writes_jsonl(setup, capsys):
  """Decoded by decord, as the original; average pooling still draws the scorer's map."""
  root, checkpoint = setup
  qa = root / "qa.jsonl"
  qa.write_text(json.dumps(dict(id="q1", video="a.mp4", question="What moves?")) + "\n")
  out = root / "qa"
  argv = common(root, checkpoint, out) + ["--qa", str(qa), "--video-backend", "decord",
                                          "--pooling", "average", "--visualize", str(out / "maps")]
  assert app.main(argv) == 0
  assert [p.name for p in (out / "maps").iterdir()] == ["q1.png"]
  assert "1 answers in" in capsys.readouterr().out
  (record,) = read_records(out / "predictions.jsonl").values()
  assert record["id"] == "q1" and record["status"] == "ok" and isinstance(record["prediction"], str)


def test_torn_last_line_is_skipped_with_a_warning(tmp_path, caplog):
  path = tmp_path / "predictions.jsonl"
  path.write_text('{"id": "a", "status": "ok", "prediction": "x"}\n{"id": "b", "sta')
  with caplog.at_level(logging.WARNING):
    records = read_records(path)
  assert list(records) == ["a"] and "predictions.jsonl:2: skipped an unreadable line" in caplog.text


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
  from ppllava_jax.data.subtitles import lines_at_frames, read_srt
  (tmp_path / "v.srt").write_text(SRT)
  cues = read_srt(tmp_path / "v.srt")
  assert [c.start for c in cues] == [0.0, 0.5, 1.0]  # blocks 3 and 4 share a range
  assert lines_at_frames(cues, [1, 9], 8.0) == ("first line", "same range, later block: kept")
  assert lines_at_frames(cues, [4, 5, 11], 8.0) == ()


def test_videomme_prompt_quotes_the_subtitles_of_the_sampled_frames(setup, tmp_path):
  """The drawn video has 12 frames at 8 fps; 4 frames sampled at the segment middles
  (1, 4, 7, 10) meet cues 1 and 3/4, and the prompt quotes exactly those lines."""
  root, checkpoint = setup
  (tmp_path / "subs").mkdir()
  (tmp_path / "subs" / "a.srt").write_text(SRT)
  item = dict(videoID="a", duration="short", question="What is shown?",
              options=["A. x", "B. y", "C. z", "D. w"], answer="A", question_id="001-1")
  (tmp_path / "vmme.json").write_text(json.dumps([item]))
  out = tmp_path / "out"
  argv = common(root, checkpoint, out) + ["--videomme", str(tmp_path / "vmme.json"),
                                          "--subtitles", "--subtitle-root", str(tmp_path / "subs")]
  assert app.main(argv) == 0
  prompt = read_records(out / "predictions.jsonl")["001-1"]["prompt"]
  assert "This video's subtitles are listed below: first line same range, later block: kept" in prompt
  assert "dropped" not in prompt


def test_questions_on_one_video_decode_it_once(tmp_path, monkeypatch):
  from ppllava_jax.eval import runner
  video = draw_video(tmp_path / "v.mp4", 6, 64)
  calls = []
  monkeypatch.setattr(runner, "load_video",
                      lambda *a, **k: calls.append(a) or load_video(*a, **k))
  jobs = [runner.Job(f"q{i}", "<image> Q?", "Q?", (runner.MediaRef("video", str(video)),), 4)
          for i in range(3)]
  loaded = [item for _, batch in runner._prefetched([jobs[:2], jobs[2:]], "pyav")
            for item in batch]
  assert len(calls) == 1 and [error for _, error in loaded] == [None] * 3
  first = loaded[0][0][1][0]
  assert all(np.array_equal(result[1][0], first) for result, _ in loaded)
