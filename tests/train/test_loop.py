"""train.py end to end on a very small tiny config: what a run writes (TensorBoard's own
reader reads back every scalar of metrics.jsonl), a run killed with SIGKILL at a random
point and restarted with the same command ends bit-identical to an uninterrupted one, and
a streak of non-finite updates stops the run with its message."""

import json
import math
import random

import numpy as np
from support import train_runs
from tensorboard.backend.event_processing import event_accumulator, event_file_loader

from ppllava_jax.train.run.metrics import read_frames, read_metrics

FIELDS = {
  "step",
  "loss",
  "lr",
  "grad_norm",
  "tokens_per_s",
  "samples_per_s",
  "step_time",
  "compilations",
  "skipped_samples",
  "skipped_updates",
  "updates",
  "mfu",
  "peak_flops",
}


def test_a_run_writes_checkpoints_metrics_events_and_a_loss_curve(reference_run):
  workdir, done = reference_run
  assert "step 8: 8 updates, 0 skipped" in done.stdout
  records = [r for r in read_metrics(workdir) if "loss" in r]
  evals = [r for r in read_metrics(workdir) if "eval_loss" in r]
  assert [r["step"] for r in records] == [2, 4, 6, 8]
  assert [r["step"] for r in evals] == [4, 8] and evals[-1]["eval_tokens"] > 0
  assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
  assert FIELDS <= set(records[0])
  assert all(np.isfinite(r["loss"]) and r["compilations"] == 1 for r in records)
  assert records[-1]["mfu"] > 0 and records[-1]["peak_flops"] == 100e9
  assert train_runs.finished_steps(workdir) == [2, 4, 6, 8]
  (events,) = (workdir / "tensorboard").iterdir()
  frames = read_frames(events)  # every CRC checked
  assert len(frames) == 1 + len(read_metrics(workdir)) and b"brain.Event:2" in frames[0]
  assert b"loss" in frames[1] and b"grad_norm" in frames[1]
  assert (workdir / "loss.png").stat().st_size > 0
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["steps"] == 8 and saved["data"]["batch"]["seq_buckets"] == [192]
  # one record per (video, question), 3 questions a video
  assert len(json.loads((workdir / "data" / "train.json").read_text())) == 3 * 6
  assert len(json.loads((workdir / "data" / "eval.json").read_text())) == 3 * 2


def test_tensorboard_reads_back_every_scalar_of_metrics_jsonl(reference_run):
  workdir, _ = reference_run
  records = read_metrics(workdir)
  (events,) = (workdir / "tensorboard").iterdir()
  loaded = list(event_file_loader.EventFileLoader(str(events)).Load())  # stops at a bad CRC
  assert len(loaded) == 1 + len(records) and loaded[0].file_version == "brain.Event:2"
  want: dict[str, list] = {}
  for r in records:  # what the writer keeps: numbers, finite, as float32
    for tag, value in r.items():
      if tag != "step" and isinstance(value, (int, float)) and math.isfinite(value):
        want.setdefault(tag, []).append((r["step"], float(np.float32(value))))
  tensorboard = event_accumulator.EventAccumulator(
    str(workdir / "tensorboard"), size_guidance={event_accumulator.SCALARS: 0}
  )
  tensorboard.Reload()
  assert sorted(tensorboard.Tags()["scalars"]) == sorted(want)
  assert {
    "loss",
    "grad_norm",
    "eval_loss",
    "mcq_accuracy",
    "mcq_accuracy/colour",
    "mcq_accuracy/shape",
    "mcq_items",
    "mcq_failed",
    "mcq_time",
  } <= set(want)
  for tag, points in want.items():
    assert [(e.step, e.value) for e in tensorboard.Scalars(tag)] == points, tag


def test_sigkill_at_a_random_point_then_the_same_command_equals_an_uninterrupted_run(
  reference_run, compile_cache, tmp_path
):
  reference, _ = reference_run
  workdir = tmp_path / "killed"
  cmd = train_runs.command(workdir)
  killed_at = train_runs.kill_after_first_checkpoint(
    cmd, compile_cache, workdir, tmp_path / "first.log", delay=random.uniform(0.0, 0.8)
  )
  done = train_runs.run(cmd, compile_cache)
  assert done.returncode == 0, done.stdout + done.stderr
  assert killed_at[-1] < 8 and f"resuming from checkpoint {killed_at[-1]}" in done.stdout
  want, got = train_runs.state_at(reference, 8), train_runs.state_at(workdir, 8)
  assert want.keys() == got.keys()
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  # the lines of redone steps dropped; the same losses and accuracies, evaluations included
  keys = lambda w: [
    (r["step"], r.get("loss"), r.get("eval_loss"), r.get("mcq_accuracy")) for r in read_metrics(w)
  ]
  assert keys(workdir) == keys(reference)


NAN_CONFIG = """
import numpy as np
from ppllava_jax.data import engine
from configs_sft_tiny import get_config as base

_next = engine.DataIterator.__next__


def _nan_videos(self):
  batch = _next(self)
  return batch.replace(videos=np.full_like(batch.videos, np.nan))


engine.DataIterator.__next__ = _nan_videos  # every batch's pixels are NaN


def get_config():
  return base()
"""


def test_a_streak_of_non_finite_updates_stops_the_run_with_its_message(compile_cache, tmp_path):
  (tmp_path / "configs_sft_tiny.py").write_text(train_runs.CONFIG.read_text())
  (tmp_path / "nan.py").write_text(
    f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\n" + NAN_CONFIG
  )
  done = train_runs.run(
    train_runs.command(tmp_path / "run", "max_nan_in_a_row=3", config=tmp_path / "nan.py"),
    compile_cache,
  )
  assert done.returncode == 2, done.stdout + done.stderr
  assert "error: 3 updates in a row were skipped" in done.stderr
  assert "max_nan_in_a_row=3" in done.stderr
