"""predictions.jsonl: torn lines, appending, what a fingerprint covers."""

import json
import logging
import os

from ppllava_jax.eval import fingerprint, records
from ppllava_jax.eval.jobs import Job, MediaRef, Subtitled


def test_torn_last_line_is_skipped_with_a_warning(tmp_path, caplog):
  path = tmp_path / "predictions.jsonl"
  path.write_text('{"id": "a", "status": "ok", "prediction": "x"}\n{"id": "b", "sta')
  with caplog.at_level(logging.WARNING):
    read = records.read_records(path)
  assert [r["id"] for r in read] == ["a"]
  assert "predictions.jsonl:2: skipped an unreadable line" in caplog.text


def test_appending_cuts_a_torn_last_line_first(tmp_path, caplog):
  path = tmp_path / "predictions.jsonl"
  path.write_text('{"id": "a", "status": "ok"}\n{"id": "b", "sta')
  with caplog.at_level(logging.WARNING), records.open_for_append(path) as out:
    records.append(out, {"id": "c", "status": "ok"})
  assert path.read_text() == '{"id": "a", "status": "ok"}\n{"id": "c", "status": "ok"}\n'
  assert "cut off a torn last line (16 bytes)" in caplog.text


def test_count_answers_counts_each_id_and_fingerprint_once(tmp_path):
  path = tmp_path / "predictions.jsonl"
  rows = [
    dict(id="a", fingerprint="1", status="ok"),
    dict(id="a", fingerprint="1", status="ok"),
    dict(id="a", fingerprint="2", status="ok"),
    dict(id="b", fingerprint="1", status="failed"),
  ]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert records.count_answers(path) == 2


def test_the_fingerprint_follows_prompt_media_files_and_settings(tmp_path):
  video = tmp_path / "v.mp4"
  video.write_bytes(b"x" * 10)
  job = Job("a", "<image> Q?", "Q?", (MediaRef("video", str(video), 1.0, 2.0),), 8)
  settings = dict(model="m", max_new_tokens=16)
  base = fingerprint.job_fingerprint(job, settings)
  assert fingerprint.job_fingerprint(Job(**{**job.__dict__, "title": "t"}), settings) == base
  changed = [
    Job(**{**job.__dict__, "text": "<image> R?"}),
    Job(**{**job.__dict__, "scorer_text": "R?"}),
    Job(**{**job.__dict__, "frames": 16}),
    Job(**{**job.__dict__, "media": (MediaRef("video", str(video), 1.0, 3.0),)}),
    Job(**{**job.__dict__, "subtitled": Subtitled(str(tmp_path / "v.srt"), None)}),
  ]
  assert all(fingerprint.job_fingerprint(j, settings) != base for j in changed)
  assert fingerprint.job_fingerprint(job, dict(settings, max_new_tokens=200)) != base
  os.utime(video, ns=(0, 0))  # the same path, another file
  assert fingerprint.job_fingerprint(job, settings) != base


def test_model_key_follows_the_checkpoint_files(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  key = lambda **kw: fingerprint.model_key(
    **{
      **dict(
        checkpoint=str(tmp_path),
        clip=None,
        tokenizer=str(tmp_path),
        scorer_tokenizer=None,
        pooling="ppllava",
        dtype=None,
      ),
      **kw,
    }
  )
  base = key()
  assert key(pooling="average") != base and key(dtype="bfloat16") != base
  (tmp_path / "model.safetensors").write_bytes(b"weights")
  assert key() != base
