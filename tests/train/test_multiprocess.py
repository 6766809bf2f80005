"""train.py on JAX's multi-controller runtime: 2 processes x 4 CPU devices on localhost (gloo)
against 1 process x 8 devices, on one (data=2, fsdp=4) mesh whose global batch is two data
shards of 4 rows (``data.shards=2``): the same global arrays whatever the process count.

One 2-process run of 5 SFT steps (checkpoints 3 and 5) is the reference. Against it:
a 1-process run of the same 5 steps (losses and parameters within 1e-6); its checkpoint 3
resumed by 2 processes (bit for bit: the same programs on the same devices) and by 1
process (within 1e-6) to step 5. Every metrics record is checked by step in file order,
so a record written twice (by two writers) fails.

The agreements, on 2 processes x 1 device: a batch fetch that ran out or failed on one
process (``global_batch.agreed_next``) ends or fails on both, and a signal handled while
its process waits in the stop gather (``signals.Signals.agreed``) stops both a step later.

The 2-process runs compile for themselves: with JAX's persistent compilation cache, the
second 2-process run on this CPU read back executables whose outputs it then could not
fetch (``device_get`` failed on both processes); the 1-process runs share the cache.
"""

from __future__ import annotations

import json
import shutil
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from support import multiprocess, train_runs

pytestmark = pytest.mark.slow

SETS = (
  "steps=5",
  "log_every=1",
  "checkpoint_every=3",
  "keep=5",
  "eval_every=5",
  "eval_batches=1",
  "eval_data.shards=2",
  "mcq=None",
  "model.tiny.image_size=56",
  "synthetic.videos=8",
  "synthetic.eval_videos=2",
  "data.shards=2",
  "data.batch.batch_size=4",
  "data.batch.video_slots=4",
  "data.batch.seq_buckets=(192,)",
  "data.sample.max_length=192",
  "eval_data.batch.seq_buckets=(192,)",
  "eval_data.sample.max_length=192",
  "train.mesh.data=2",
  "train.mesh.fsdp=4",
)


def command(workdir) -> list[str]:
  return [
    sys.executable,
    str(train_runs.ROOT / "train.py"),
    "--config",
    str(train_runs.CONFIG),
    "--workdir",
    str(workdir),
    *[a for s in SETS for a in ("--set", s)],
  ]


def logged(workdir, key: str = "loss") -> list[tuple[int, float]]:
  """(step, value) of every metrics record with ``key``, in file order (duplicates kept)."""
  records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [(r["step"], r[key]) for r in records if key in r]


def steps(records) -> list[int]:
  return [step for step, _ in records]


def params(workdir, step: int = 5) -> dict[str, np.ndarray]:
  path = workdir / "checkpoints" / str(step) / "state"
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
      dict(ckptr.metadata(path).item_metadata),
    )
    state = ckptr.restore(path, target)
  flat = {}

  def walk(node, path):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(v, f"{path}/{k}")
    else:
      flat[path] = np.asarray(node)

  walk(state["params"], "")
  return flat


def truncated_copy(src, dst, step: int):
  """``src``'s workdir as it stood at checkpoint ``step`` (later checkpoints removed)."""
  shutil.copytree(src, dst)
  for folder in (dst / "checkpoints").iterdir():
    if folder.name.isdigit() and int(folder.name) > step:
      shutil.rmtree(folder)
  return dst


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("two_process")
  done = multiprocess.launch(command(workdir), processes=2, devices=4)
  assert all(r.returncode == 0 for r in done), multiprocess.report(done)
  return workdir, done


def test_only_process_zero_writes_and_both_train(two_process_run):
  workdir, done = two_process_run
  assert steps(logged(workdir)) == [1, 2, 3, 4, 5]  # one record per step: one writer
  for r in done:
    assert "step 5: 5 updates, 0 skipped" in r.stdout, multiprocess.report(done)
  assert steps(logged(workdir, "skipped_samples")) == [1, 2, 3, 4, 5]
  assert (workdir / "loss.png").is_file()
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
    "3",
    "5",
  ]


def test_two_processes_equal_one(two_process_run, tmp_path, compile_cache):
  workdir, _ = two_process_run
  single = tmp_path / "one_process"
  done = multiprocess.run_one(command(single), devices=8, cache=compile_cache)
  assert done.returncode == 0, multiprocess.report(done)
  for key in ("loss", "eval_loss"):  # eval_loss: the held-out batches, sharded the same way
    want, got = logged(workdir, key), logged(single, key)
    assert steps(want) == steps(got) == ([1, 2, 3, 4, 5] if key == "loss" else [5])
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=0, atol=1e-6)
  assert logged(single, "skipped_samples") == logged(workdir, "skipped_samples")
  want, got = params(workdir), params(single)
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6, err_msg=name)


def test_checkpoint_of_two_resumes_in_two_and_in_one(two_process_run, tmp_path, compile_cache):
  workdir, _ = two_process_run
  want = params(workdir)
  two = truncated_copy(workdir, tmp_path / "two", 3)
  done = multiprocess.launch(command(two), processes=2, devices=4)
  assert all(r.returncode == 0 for r in done), multiprocess.report(done)
  assert "resuming from checkpoint 3" in done[0].stdout
  assert "resuming" not in done[1].stdout  # said once
  got = params(two)
  for name in want:  # the same programs on the same devices: exact
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  assert logged(two) == logged(workdir)  # steps 1-3 kept, 4-5 redone: each once

  one = truncated_copy(workdir, tmp_path / "one", 3)
  done = multiprocess.run_one(command(one), devices=8, cache=compile_cache)
  assert done.returncode == 0, multiprocess.report(done)
  assert "resuming from checkpoint 3" in done.stdout
  got = params(one)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6, err_msg=name)


AGREEMENT = """
from jax.experimental import multihost_utils

from ppllava_jax import distributed

distributed.initialize()
import jax

from ppllava_jax.data.engine import DataError
from ppllava_jax.train.run import global_batch

me = jax.process_index()


def fetch(outcome):
  def one():
    if me == 1 and outcome == "end":
      raise StopIteration
    if me == 1 and outcome == "error":
      raise DataError("too many samples skipped")
    return f"batch of {me}"
  return one


for outcome in ("batch", "end", "error"):
  try:
    print(f"= {outcome}: {global_batch.agreed_next(fetch(outcome))}")
  except DataError as err:
    print(f"= {outcome}: DataError: {err}")

from ppllava_jax.signals import Signals
signals, gather = Signals(), multihost_utils.process_allgather


def late(x):  # process 1's SIGTERM handled while it waits in the gather
  out = gather(x)
  if me == 1:
    signals.received = "SIGTERM"
  return out


multihost_utils.process_allgather = late
print(f"= signal in the gather: {signals.agreed()}")
multihost_utils.process_allgather = gather
print(f"= the next step: {signals.agreed()}")
"""


def test_fetch_outcomes_and_late_signals_are_agreed_by_every_process():
  done = multiprocess.launch(
    [sys.executable, "-c", AGREEMENT], processes=2, devices=1, timeout=240
  )  # a process left waiting in a collective: killed
  assert all(r.returncode == 0 for r in done), multiprocess.report(done)
  failed = "process 1 failed to load its data (see its log); every process stops with it"
  for me, own in enumerate((f"DataError: {failed}", "DataError: too many samples skipped")):
    printed = [x[2:] for x in done[me].stdout.splitlines() if x.startswith("= ")]  # not gloo's
    assert printed == [
      f"batch: batch of {me}",
      "end: None",
      f"error: {own}",
      "signal in the gather: None",
      "the next step: SIGTERM",
    ], multiprocess.report(done)
