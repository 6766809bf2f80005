"""A workdir belongs to one run: a changed config is refused before anything loads (safe
changes and named ones pass), a damaged latest checkpoint is named by file and the one
before it resumes, another model's checkpoint is a short error, a torn metrics line is
cut; and the data is checked before any weight loads."""

import json
import re
import shutil

import pytest
from support import train_runs

from ppllava_jax import cli
from ppllava_jax.config import apply_overrides, load_config, to_dict
from ppllava_jax.train.run import config as rc
from ppllava_jax.train.run.checkpoint import CheckpointDamaged, Checkpoints
from ppllava_jax.train.run.metrics import read_metrics

STEPS = ("steps=4", "checkpoint_every=2", "eval_every=0", "mcq=None")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, compile_cache):
  """A small tiny run of 4 batches, checkpoints 2 and 4."""
  workdir = tmp_path_factory.mktemp("resume") / "run"
  train_runs.run(train_runs.command(workdir, *STEPS), compile_cache).check_returncode()
  return workdir


def copy(workdir, tmp_path):
  return shutil.copytree(workdir, tmp_path / "run")


@pytest.fixture
def no_model(monkeypatch):
  """Fails the test if the run builds its model (loads weights)."""
  from ppllava_jax.train.run import loop

  def build(*args, **kwargs):
    raise AssertionError("the model was built")

  monkeypatch.setattr(loop, "load", build)


def test_resume_changes_sorts_what_a_run_may_change():
  cfg = load_config(train_runs.CONFIG, rc.RunConfig)
  stored = to_dict(cfg.resolved())
  refused, allowed = rc.resume_changes(
    stored,
    apply_overrides(
      cfg,
      [
        "steps=20",
        "log_every=3",
        "data.num_workers=4",
        "train.remat=nothing_saveable",
        "train.optim.lr=0.5",
        "data.seed=3",
        "model.tiny.llm_layers=2",
      ],
    ),
  )
  assert refused == [
    "data.seed: 0 -> 3",
    "model.tiny.llm_layers: 1 -> 2",
    "train.optim.lr: 0.001 -> 0.5",
  ]
  assert allowed == [
    "data.num_workers: 0 -> 4",
    "log_every: 10 -> 3",
    "steps: 200 -> 20",
    "train.remat: 'none' -> 'nothing_saveable'",
  ]
  refused, _ = rc.resume_changes(
    stored, apply_overrides(cfg, ["train.optim.lr=0.5", "resume=train.optim,model"])
  )
  assert refused == []
  # total_steps follows steps when unset: then a new steps changes the schedule
  unset = apply_overrides(cfg, ["train.optim.total_steps=None"])
  refused, _ = rc.resume_changes(to_dict(unset.resolved()), apply_overrides(unset, ["steps=300"]))
  assert refused == ["train.optim.total_steps: 200 -> 300"]


def test_a_changed_config_is_refused_before_anything_loads(finished, tmp_path, capsys, no_model):
  workdir = copy(finished, tmp_path)
  before = (workdir / "config.json").read_text()
  argv = train_runs.command(workdir, *STEPS, "train.optim.lr=0.5", "data.seed=7")[2:]
  assert cli.run(train_runs.train_main(), argv) == 2
  err = capsys.readouterr()
  assert "holds another run: checkpoint 4's config differs in 2 setting(s)" in err.err
  assert "data.seed: 0 -> 7" in err.err and "train.optim.lr: 0.001 -> 0.5" in err.err
  assert "--set resume=data.seed,train.optim.lr" in err.err
  assert (workdir / "config.json").read_text() == before


def test_a_damaged_checkpoint_is_named_and_the_one_before_resumes(
  finished, tmp_path, compile_cache
):
  workdir = copy(finished, tmp_path)
  data = workdir / "checkpoints" / "4" / "state"
  biggest = max((p for p in data.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  size = biggest.stat().st_size
  with open(biggest, "r+b") as f:
    f.truncate(100)
  with open(workdir / "metrics.jsonl", "a") as f:  # a kill in the middle of a line
    f.write('{"step": 5, "lo')
  done = train_runs.run(train_runs.command(workdir, *STEPS, "steps=6"), compile_cache)
  assert done.returncode == 0, done.stdout + done.stderr
  assert (
    f"warning: checkpoint 4 is damaged ({biggest} has 100 bytes; it had {size} when "
    "checkpoint 4 was saved)"
  ) in done.stdout
  assert "resuming from checkpoint 2" in done.stdout and "step 6: 6 updates" in done.stdout
  assert (workdir / "checkpoints" / "4.damaged").is_dir()
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
    2,
    4,
    6,
  ]
  steps = [r["step"] for r in read_metrics(workdir) if "loss" in r]
  assert steps == sorted(set(steps)) and steps[-1] == 6


def test_garbled_and_missing_checkpoint_files_are_named(finished, tmp_path):
  workdir = copy(finished, tmp_path)
  checkpoints = Checkpoints(workdir)
  try:
    checkpoints.check(4)  # intact
    metadata = workdir / "checkpoints" / "4" / "state" / "_METADATA"
    metadata.write_text(metadata.read_text()[:-5])
    with pytest.raises(CheckpointDamaged, match=f"{metadata} has"):  # the manifest's size
      checkpoints.check(4)
    (workdir / "checkpoints" / "4" / "files.json").unlink()  # a checkpoint of older code
    with pytest.raises(CheckpointDamaged, match=f"{metadata}: not valid JSON"):
      checkpoints.check(4)
    config = workdir / "checkpoints" / "2" / "config" / "metadata"
    config.unlink()
    with pytest.raises(CheckpointDamaged, match=f"{config} is missing"):
      checkpoints.check(2)
  finally:
    checkpoints.close()


def test_another_models_checkpoint_is_a_short_error(finished, tmp_path, compile_cache):
  workdir = copy(finished, tmp_path)
  done = train_runs.run(
    train_runs.command(workdir, *STEPS, "model.tiny.llm_width=32", "resume=model"), compile_cache
  )
  assert done.returncode == 2
  assert "was saved for another model or trainable set" in done.stderr
  assert "params/language_model/model/embed_tokens/weight/value: saved (101, 64)" in done.stderr
  assert len(done.stderr.split("error:", 1)[1]) < 2500 and "Traceback" not in done.stderr
  assert not (workdir / "checkpoints" / "4.damaged").exists()  # not damage: kept as it is


@pytest.mark.parametrize(
  "item, message",
  [
    ("steps=300", "RunConfig.steps=300 is past train.optim.total_steps=200"),
    (
      "data.mixture.corpora.shapes.media_root=/nowhere",
      "corpus 'shapes' ({workdir}/data/train.json): none of the media of its first 16 records "
      "exist, e.g. /nowhere/0000.mp4; is media_root '/nowhere' right?",
    ),
  ],
)
def test_bad_runs_stop_before_any_weight_loads(item, message, tmp_path, capsys, no_model):
  workdir = tmp_path / "w"
  argv = train_runs.command(workdir, item)[2:]
  assert cli.run(train_runs.train_main(), argv) == 2
  out = capsys.readouterr()
  assert message.format(workdir=workdir) in out.err


def test_annotation_errors_stop_before_any_weight_loads(tmp_path, capsys, no_model):
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps([{"video": "0000.mp4", "QA": [{"q": "Which way?", "a": " "}]}]))
  argv = train_runs.command(tmp_path / "w", f"data.mixture.corpora.shapes.annotation={bad}")[2:]
  assert cli.run(train_runs.train_main(), argv) == 2
  out = capsys.readouterr()
  assert f"{bad}: record 0: field 'QA[0].a'" in out.err


def test_a_run_whose_every_sample_is_skipped_fails(tmp_path, compile_cache):
  """Media that exist but cannot be decoded pass the check at the start; every sample is
  skipped, and the run says so instead of reporting 0 updates as a success."""
  (tmp_path / "media").mkdir()
  records = []
  for i in range(3):
    (tmp_path / "media" / f"{i}.mp4").write_bytes(b"not a video")
    records.append({"video": f"{i}.mp4", "QA": [{"q": "Which way?", "a": "Left."}]})
  (tmp_path / "train.json").write_text(json.dumps(records))
  command = train_runs.command(
    tmp_path / "w",
    "steps=2",
    "mcq=None",
    "eval_every=0",
    f"data.mixture.corpora.shapes.annotation={tmp_path / 'train.json'}",
    f"data.mixture.corpora.shapes.media_root={tmp_path / 'media'}",
  )
  for _ in range(2):  # and a rerun of the same command does not call it done
    done = train_runs.run(command, compile_cache)
    assert done.returncode == 2, done.stdout + done.stderr
    assert re.search(
      r"no sample was trained on: all \d+ samples read were skipped "
      r"\(\{'corrupt': \d+\}",
      done.stderr,
    ), done.stderr[-2000:]
