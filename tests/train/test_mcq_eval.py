"""Multiple-choice accuracy during training (``RunConfig.mcq``,
``train.run.evaluation.McqEval``), on the
small tiny run of ``support.train_runs`` (4 items in 2 tasks, one of a missing video,
evaluated every 3 of 8 batches and at the end): its records, an accuracy recounted from
the predictions files, fresh answers at every evaluation and after a resume, a bad
section stopping the run before it trains, and the tiny config's own section."""

import json
import shutil

import pytest
from support import train_runs

from ppllava_jax import cli
from ppllava_jax.config import apply_overrides, load_config
from ppllava_jax.data.text.templates import VICUNA
from ppllava_jax.eval import mcq, runner
from ppllava_jax.eval.fingerprint import job_fingerprint
from ppllava_jax.eval.jobs import mcq_jobs
from ppllava_jax.eval.records import read_records
from ppllava_jax.train.run import config as rc
from ppllava_jax.train.run.evaluation import McqEval
from ppllava_jax.train.run.loop import prepare_data
from ppllava_jax.train.run.metrics import read_metrics

ITEMS = mcq.load_mvbench(train_runs.MCQ_TASKS)
IDS = {"colour/0", "colour/1", "shape/0", "shape/1"}  # shape/1: no such video


def mcq_records(workdir):
  return [r for r in read_metrics(workdir) if "mcq_accuracy" in r]


def predictions(workdir, step):
  return read_records(workdir / "mcq" / f"step_{step}" / "predictions.jsonl")


def test_evaluations_come_every_n_batches_and_at_the_end_with_their_counts(reference_run):
  workdir, done = reference_run
  records = mcq_records(workdir)
  assert [r["step"] for r in records] == [3, 6, 8]  # every=3 of steps=8, and the last
  for r in records:
    assert (r["mcq_items"], r["mcq_failed"]) == (4, 1) and r["mcq_time"] > 0
    assert {"mcq_accuracy/colour", "mcq_accuracy/shape", "mcq_empty", "mcq_unparseable"} <= set(r)
    assert f"mcq at step {r['step']}: accuracy" in done.stdout
  # merged models of later steps reuse the first evaluation's programs
  assert len({r["mcq_compilations"] for r in records}) == 1
  assert sorted(p.name for p in (workdir / "mcq").iterdir()) == ["step_3", "step_6", "step_8"]


def test_the_accuracy_is_a_recount_of_the_predictions_file_against_the_answers(reference_run):
  workdir, _ = reference_run
  by_id = {
    f"{item.task}/{i}": item
    for task in ("colour", "shape")
    for i, item in enumerate(x for x in ITEMS if x.task == task)
  }
  for record in mcq_records(workdir):
    saved = {r["id"]: r for r in predictions(workdir, record["step"])}
    assert saved.keys() == IDS and saved["shape/1"]["status"] == "failed"
    answered = [i for i in sorted(saved) if saved[i]["status"] == "ok"]
    for task in (None, "colour", "shape"):
      ids = [i for i in answered if task is None or i.startswith(task)]
      report = mcq.score(
        [by_id[i] for i in ids], [saved[i]["prediction"] for i in ids], mcq.OriginalProtocol()
      )
      key = "mcq_accuracy" + ("" if task is None else f"/{task}")
      assert record[key] == pytest.approx(report.overall.accuracy), (record["step"], key)
      if task is None:
        assert (record["mcq_empty"], record["mcq_unparseable"]) == (
          report.overall.empty,
          report.overall.unparseable,
        )


def test_every_evaluation_answers_every_item_afresh(reference_run):
  workdir, _ = reference_run
  steps = [r["step"] for r in mcq_records(workdir)]
  files = [predictions(workdir, step) for step in steps]
  assert all(sorted(r["id"] for r in records) == sorted(IDS) for records in files)  # once each
  fingerprints = [{r["fingerprint"] for r in records} for records in files]
  assert all(not a & b for i, a in enumerate(fingerprints) for b in fingerprints[i + 1 :])


def planted(workdir, step):
  """Answers that the loop's runner would reuse at ``step`` if its file held them: the
  fingerprints it gives its jobs (checked against the reference's own), a fake reply."""
  section = train_runs.MCQ
  jobs = mcq_jobs(
    ITEMS, mcq.OriginalProtocol(), VICUNA, workdir / "data" / "videos", section["frames"]
  )
  settings = runner.GenerationSettings(
    max_new_tokens=section["max_new_tokens"], model_key=f"training step {step}"
  ).settings
  return {
    j.id: dict(
      id=j.id,
      fingerprint=job_fingerprint(j, settings),
      status="ok",
      prediction="(B) planted",
      prompt=j.text,
      frame_indices=[],
    )
    for j in jobs
  }


def test_a_resumed_run_reuses_no_answer_saved_at_the_step_it_redoes(
  reference_run, compile_cache, tmp_path
):
  reference, _ = reference_run
  want = {r["id"]: r for r in predictions(reference, 8)}
  assert {i: r["fingerprint"] for i, r in planted(reference, 8).items()} == {
    i: r["fingerprint"] for i, r in want.items()
  }  # the plant would match
  workdir = tmp_path / "resumed"
  shutil.copytree(reference, workdir)
  shutil.rmtree(workdir / "checkpoints" / "8")  # resume from 6, redo 7 and 8
  out = workdir / "mcq" / "step_8" / "predictions.jsonl"
  out.write_text("".join(json.dumps(r) + "\n" for r in planted(workdir, 8).values()))
  done = train_runs.run(train_runs.summary_command(workdir), compile_cache)
  assert done.returncode == 0, done.stdout + done.stderr
  assert "resuming from checkpoint 6" in done.stdout
  got = {r["id"]: r for r in predictions(workdir, 8)}
  assert "planted" not in out.read_text() and got.keys() == IDS
  # the same parameters (a bit-exact resume), so the same answers and accuracy
  assert {i: r.get("prediction") for i, r in got.items()} == {
    i: r.get("prediction") for i, r in want.items()
  }
  (last,) = [r for r in mcq_records(workdir) if r["step"] == 8]
  assert last["mcq_accuracy"] == mcq_records(reference)[-1]["mcq_accuracy"]
  assert train_runs.summary(done)["mcq_accuracy"] == last["mcq_accuracy"]


@pytest.mark.parametrize(
  "section, message",
  [
    (dict(tasks="{workdir}/no_tasks"), "mcq.tasks {workdir}/no_tasks: no such file or folder"),
    (dict(video_root="{workdir}/no_videos"), "mcq.video_root {workdir}/no_videos: not a folder"),
    (
      dict(tasks="{workdir}/bad.json"),
      "{workdir}/bad.json: item 0: field 'answer' 'x' is not one of the candidates",
    ),
  ],
)
def test_a_bad_mcq_section_stops_the_run_before_it_trains(section, message, tmp_path, capsys):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "bad.json").write_text(
    json.dumps([dict(video="v.mp4", question="Q?", candidates=["a", "b"], answer="x")])
  )
  argv = [
    "--config",
    str(train_runs.CONFIG),
    "--workdir",
    str(workdir),
    "--set",
    f"mcq={dict(train_runs.MCQ, **section)!r}",
    "--set",
    "synthetic.videos=1",
    "--set",
    "synthetic.eval_videos=1",
  ]
  assert cli.run(train_runs.train_main(), argv) == 2
  assert f"error: {message.replace('{workdir}', str(workdir))}" in capsys.readouterr().err
  assert not (workdir / "checkpoints").exists() and not (workdir / "config.json").exists()


def test_the_tiny_configs_section_reads_the_task_files_of_its_synthetic_set(tmp_path):
  cfg = apply_overrides(
    load_config(train_runs.CONFIG, rc.RunConfig), ["synthetic.videos=1", "synthetic.eval_videos=2"]
  )
  cfg = prepare_data(cfg, tmp_path)
  evaluation = McqEval(cfg.mcq, tmp_path / "mcq")
  assert sorted({item.task for item in evaluation.items}) == ["colour", "direction", "shape"]
  assert len(evaluation.items) == 3 * 2
  assert all((tmp_path / "data" / "videos" / item.video).is_file() for item in evaluation.items)
