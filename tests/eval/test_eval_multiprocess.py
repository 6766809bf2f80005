"""eval.py on JAX's multi-controller runtime: 2 processes x 2 CPU devices on localhost (gloo)
against the independent reference, eval.py's main on one process, on a tiny checkpoint and
5 MVBench items (one of a missing video) in batches of 2: three batches, so process 0
answers two and process 1 one, and the failure comes first in its batch's records.

Generation is greedy and each process runs the same padded batches one process would, so
the merged predictions file and the results table equal the single process's. A killed
2-process run's part is merged by the next run (here one process: the split is redone
for whatever process count) and its answers reused; training's ``McqEval`` of parameters
sharded over both processes answers and scores as eval.py does; a partial launch is a
one-line error."""

from __future__ import annotations

import io
import json
import sys

import pytest
from support import multiprocess
from support.eval_folders import eval_folder

from ppllava_jax import cli
from ppllava_jax.eval import app
from ppllava_jax.eval.records import read_records
from ppllava_jax.models.tiny import TinyConfig

SMALL = TinyConfig(
  frames=8,
  image_size=56,
  patch_size=14,
  vision_width=32,
  vision_layers=1,
  llm_width=64,
  llm_layers=1,
  text_width=32,
  text_layers=1,
)
VIDEOS = ("a", "b", "a", "missing", "b")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval_mp")
  items = [
    dict(
      video=f"{name}.mp4",
      question=f"What colour is the circle {i}?",
      candidates=["red", "green", "blue"],
      answer="red",
    )
    for i, name in enumerate(VIDEOS)
  ]
  return root, eval_folder(root, SMALL, {"a": "red", "b": "blue"}, "colour", items)


def argv(root, checkpoint, out, *extra) -> list[str]:
  return [
    "--checkpoint",
    str(checkpoint),
    "--scorer-tokenizer",
    str(checkpoint),
    "--mvbench",
    str(root / "tasks"),
    "--video-root",
    str(root / "videos"),
    "--out",
    str(out),
    "--frames",
    "4",
    "--max-new-tokens",
    "4",
    "--batch-size",
    "2",
    *extra,
  ]


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory):
  """(one process's --out and printout, two processes' --out and results)."""
  root, checkpoint = setup
  one, two = root / "one", root / "two"
  with pytest.MonkeyPatch.context() as patch:  # the reference: eval.py's main, here
    printed = io.StringIO()
    patch.setattr(sys, "stdout", printed)
    assert cli.run(app.main, argv(root, checkpoint, one)) == 0
  cmd = [
    sys.executable,
    str(multiprocess.ROOT / "eval.py"),
    *argv(root, checkpoint, two, "--visualize", str(two / "maps")),
  ]
  done = multiprocess.launch(
    cmd, processes=2, devices=2, cache=tmp_path_factory.mktemp("jax_cache")
  )
  assert all(r.returncode == 0 for r in done), multiprocess.report(done)
  return one, printed.getvalue(), two, done


def test_two_processes_write_the_one_process_predictions_and_results(runs):
  one, printed, two, done = runs
  want = (one / "predictions.jsonl").read_text()
  assert [r["id"] for r in read_records(one / "predictions.jsonl")] == [
    "colour/0",
    "colour/1",
    "colour/3",
    "colour/2",
    "colour/4",
  ]  # batch 2: the failure first
  assert (two / "predictions.jsonl").read_text() == want
  assert json.loads((two / "results.json").read_text()) == json.loads(
    (one / "results.json").read_text()
  )
  assert sorted(p.name for p in two.iterdir()) == ["maps", "predictions.jsonl", "results.json"]
  assert sorted(p.name for p in (two / "maps").iterdir()) == [
    f"colour_{i}.png" for i in (0, 1, 2, 4)
  ]  # drawn by both processes
  table = lambda out: out[out.index("MVBench") : out.index("failed items")]  # not the time
  assert table(done[0].stdout) == table(printed)
  assert [x for x in done[1].stdout.splitlines() if not x.startswith("[Gloo]")] == []


def test_a_killed_runs_part_is_merged_and_its_answers_reused(setup, runs, tmp_path, capsys):
  """As a killed 2-process run leaves it: process 1 had answered batch 2 (colour/3 failed,
  colour/2 answered) into its part, and was writing another record. A rerun, here on one
  process, keeps the part's records first, reuses colour/2 and redoes colour/3."""
  root, checkpoint = setup
  one, *_ = runs
  want = read_records(one / "predictions.jsonl")
  out = tmp_path / "out"
  out.mkdir()
  killed = [r for r in want if r["id"] in ("colour/3", "colour/2")]
  (out / "predictions.jsonl.part-1-of-2").write_text(
    "".join(json.dumps(r) + "\n" for r in killed) + '{"id": "colour/0", "fing'
  )  # torn
  assert app.main(argv(root, checkpoint, out)) == 0
  assert capsys.readouterr().out.startswith("1 answers reused, 1 redone")
  by_id = {r["id"]: r for r in want}
  assert read_records(out / "predictions.jsonl") == killed + [
    by_id[i] for i in ("colour/0", "colour/1", "colour/3", "colour/4")
  ]
  assert sorted(p.name for p in out.iterdir()) == ["predictions.jsonl", "results.json"]


MCQ_EVAL = """import json, sys
from pathlib import Path
from types import SimpleNamespace
import jax, numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ppllava_jax import distributed
distributed.initialize()
from transformers import AutoTokenizer
from ppllava_jax.models.ppllava import PPLLaVA
from ppllava_jax.train.run.evaluation import McqEval
from ppllava_jax.train.run.config import McqEvalConfig
checkpoint, tasks, videos, folder = sys.argv[1:]
model = PPLLaVA.from_pretrained(checkpoint)
graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
mesh = Mesh(np.array(jax.devices()), ("fsdp",))
def shard(x):  # global arrays over every process's devices, as the training state's
  host, n = np.asarray(x), jax.device_count()
  spec = P("fsdp") if host.ndim and host.shape[0] % n == 0 else P()
  return jax.make_array_from_callback(host.shape, NamedSharding(mesh, spec), lambda i: host[i])
tokenizer = AutoTokenizer.from_pretrained(checkpoint)
run = SimpleNamespace(graphdef=graphdef, frozen=jax.tree.map(shard, frozen), model_cfg=model.cfg,
                      tokenizer=tokenizer, scorer_tokenizer=tokenizer,
                      steps=SimpleNamespace(cfg=SimpleNamespace(dtype=None)))
cfg = McqEvalConfig(tasks=tasks, video_root=videos, frames=4, batch_size=2, max_new_tokens=4)
print("record:", json.dumps(McqEval(cfg, Path(folder))(run, jax.tree.map(shard, params), 7)))
"""


def mcq_record(done) -> dict:
  (line,) = [x for x in done.stdout.splitlines() if x.startswith("record: ")]
  return json.loads(line.removeprefix("record: "))


@pytest.mark.slow
def test_mcq_eval_of_sharded_parameters_on_two_processes(setup, runs, tmp_path):
  """``train.run.evaluation.McqEval`` on parameters sharded over 2 processes x 2 devices (each
  takes a local copy; the runner splits and merges) against eval.py on one process: the
  same answers in the same order, the same scores, and one record on both processes."""
  root, checkpoint = setup
  one, *_ = runs
  cmd = [
    sys.executable,
    "-c",
    MCQ_EVAL,
    str(checkpoint),
    str(root / "tasks"),
    str(root / "videos"),
    str(tmp_path / "mcq"),
  ]
  done = multiprocess.launch(cmd, processes=2, devices=2, cache=tmp_path / "cache")
  assert all(r.returncode == 0 for r in done), multiprocess.report(done)
  assert sorted(p.name for p in (tmp_path / "mcq" / "step_7").iterdir()) == ["predictions.jsonl"]
  answers = lambda path: [(r["id"], r["status"], r.get("prediction")) for r in read_records(path)]
  assert answers(tmp_path / "mcq" / "step_7" / "predictions.jsonl") == answers(
    one / "predictions.jsonl"
  )
  record, other = (mcq_record(r) for r in done)
  assert record == other
  results = json.loads((one / "results.json").read_text())
  overall, (task,) = results["overall"], results["groups"]["task"]
  assert (
    record["mcq_accuracy"],
    record["mcq_accuracy/colour"],
    record["mcq_empty"],
    record["mcq_unparseable"],
  ) == (overall["accuracy"], task["accuracy"], overall["empty"], overall["unparseable"])
  assert (record["mcq_items"], record["mcq_failed"]) == (5, 1)


@pytest.mark.parametrize(
  "flags, env",
  [
    (["--num-processes", "2"], {}),
    ([], {"JAX_COORDINATOR_ADDRESS": "localhost:1234", "JAX_NUM_PROCESSES": "2"}),
  ],
)
def test_a_partial_launch_is_a_one_line_error(setup, flags, env, monkeypatch, capsys):
  root, checkpoint = setup
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert cli.run(app.main, argv(root, checkpoint, root / "partial", *flags)) == 2
  err = capsys.readouterr().err
  assert (
    err.startswith(
      "error: a multi-process launch needs the coordinator, the process "
      "count and this process's id; missing: "
    )
    and err.count("\n") == 1
  )
  assert "--process-id / JAX_PROCESS_ID" in err
  assert not (root / "partial").exists()
