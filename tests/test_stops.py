"""Processes end cleanly. train.py with Grain data workers, stopped by Ctrl-C (SIGINT to
its whole process group, as a terminal sends it), saves a checkpoint, exits 130, prints
no worker traceback and no leaked-shared-memory warning, and leaves no process behind;
SIGKILLed, its workers and multiprocessing's resource tracker end within seconds.
eval.py stops at the next batch on SIGINT (130) or SIGTERM (143) whenever the signal
lands, keeping every finished answer, even when the code it lands in swallows the
``KeyboardInterrupt``.

Every process a test starts runs in a session of its own, and whatever of that process
group is left is killed when the test ends, pass or fail."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import multiprocess, train_runs
from support.eval_folders import eval_folder

from ppllava_jax.eval import app, runner
from ppllava_jax.eval.records import count_answers
from ppllava_jax.models.tiny import TinyConfig

ROOT = train_runs.ROOT
TINY = TinyConfig(
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
ITEMS = 300  # batches of one item, ~10 ms each on a CPU: seconds of answers to signal into


# --- processes, from /proc ---


def _stat(pid: int) -> list[str] | None:
  """The fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, ...); None
  once the process is gone."""
  try:
    text = Path(f"/proc/{pid}/stat").read_text()
  except OSError:
    return None
  return text.rsplit(")", 1)[1].split()


def group(pgid: int) -> list[int]:
  """The live processes of process group ``pgid``. A zombie counts as gone: it holds no
  memory, and init (or the container's stand-in for it) reaps it when it likes."""
  pids = []
  for entry in Path("/proc").iterdir():
    fields = _stat(int(entry.name)) if entry.name.isdigit() else None
    if fields is not None and fields[0] != "Z" and int(fields[2]) == pgid:
      pids.append(int(entry.name))
  return pids


def command_line(pid: int) -> str:
  try:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
  except OSError:
    return ""


def data_workers(pgid: int) -> list[int]:
  return [p for p in group(pgid) if "spawn_main" in command_line(p)]


def left_after(pgid: int, timeout: float) -> list[str]:
  """Polls until process group ``pgid`` is empty; the command lines of what is left."""
  end = time.monotonic() + timeout
  while (left := group(pgid)) and time.monotonic() < end:
    time.sleep(0.05)
  return [command_line(p) for p in left]


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
  """``cmd`` in a session of its own: its process group is the one a terminal's Ctrl-C
  would reach."""
  with open(log, "w") as out:
    return subprocess.Popen(
      cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


@contextlib.contextmanager
def reaped(proc: subprocess.Popen):
  """Kills what is left of ``proc``'s process group on the way out, workers included."""
  try:
    yield proc
  finally:
    for pid in group(proc.pid):
      with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    proc.wait()


# --- train.py with data workers ---


def start_training(workdir: Path, cache: Path, log: Path) -> subprocess.Popen:
  cmd = train_runs.command(workdir, "data.num_workers=2", "steps=40")  # it never ends first
  return start(cmd, train_runs.env(cache), log)


def running_workers(proc: subprocess.Popen, workdir: Path) -> list[int]:
  train_runs.wait_for_checkpoint(proc, workdir)
  workers = data_workers(proc.pid)
  assert len(workers) == 2, [command_line(p) for p in group(proc.pid)]
  return workers


def test_ctrl_c_with_data_workers_saves_exits_130_and_leaves_no_process(compile_cache, tmp_path):
  """Seen failing before: a KeyboardInterrupt traceback from every worker, and "leaked
  shared_memory objects" warnings from the resource tracker."""
  workdir, log = tmp_path / "run", tmp_path / "run.log"
  with reaped(start_training(workdir, compile_cache, log)) as proc:
    running_workers(proc, workdir)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
    assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    assert left_after(proc.pid, timeout=15) == []
  printed = log.read_text()  # the tracker, gone now, would have warned into it
  assert "Traceback" not in printed and "leaked" not in printed, printed[-3000:]
  assert printed.count("SIGINT received: saving a checkpoint at the next step, then stopping") == 1
  step = int(re.search(r"stopped by SIGINT after step (\d+): checkpoint \1 saved", printed)[1])
  assert step in train_runs.finished_steps(workdir)


def test_sigkill_of_train_py_ends_its_data_workers_within_seconds(compile_cache, tmp_path):
  """Seen failing before: the workers (and the resource tracker) lived on, re-parented
  to init."""
  workdir, log = tmp_path / "run", tmp_path / "run.log"
  with reaped(start_training(workdir, compile_cache, log)) as proc:
    running_workers(proc, workdir)
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert left_after(proc.pid, timeout=10) == []


# --- eval.py ---


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  """A tiny checkpoint and an MVBench task of ``ITEMS`` questions on two videos."""
  root = tmp_path_factory.mktemp("stops_eval")
  items = [
    dict(
      video=f"{'ab'[i % 2]}.mp4",
      question=f"Where is the circle {i}?",
      candidates=["left", "right", "up"],
      answer="right",
    )
    for i in range(ITEMS)
  ]
  return root, eval_folder(root, TINY, {"a": "red", "b": "blue"}, "object_shuffle", items)


def eval_args(root: Path, checkpoint: Path, out: Path) -> list[str]:
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
    "8",
    "--batch-size",
    "1",
  ]


def wait_for_an_answer(proc: subprocess.Popen, predictions: Path, timeout: float = 120) -> None:
  end = time.monotonic() + timeout
  while not (predictions.exists() and b"\n" in predictions.read_bytes()):
    assert proc.poll() is None, f"eval.py ended ({proc.returncode}) before its first answer"
    assert time.monotonic() < end, "no answer in time"
    time.sleep(0.01)


@pytest.mark.parametrize("name, delay", [("SIGINT", 0.0), ("SIGINT", 0.2), ("SIGTERM", 0.1)])
def test_eval_py_stops_at_the_next_batch_on_a_signal_and_keeps_its_answers(
  bench, compile_cache, tmp_path, name, delay
):
  """The signal lands at another moment each time (a swallowed one would let the run
  finish). Seen failing before: SIGTERM killed eval.py without its line (exit -15)."""
  root, checkpoint = bench
  predictions, log = tmp_path / "out" / "predictions.jsonl", tmp_path / "eval.log"
  cmd = [sys.executable, str(ROOT / "eval.py"), *eval_args(root, checkpoint, predictions.parent)]
  with reaped(start(cmd, multiprocess.env(1, compile_cache), log)) as proc:
    wait_for_an_answer(proc, predictions)
    time.sleep(delay)
    proc.send_signal(getattr(signal, name))
    assert proc.wait(timeout=60) == 128 + getattr(signal, name), log.read_text()[-3000:]
  printed = log.read_text()
  assert "Traceback" not in printed, printed[-3000:]
  assert f"{name} received: stopping after the batch in progress" in printed
  kept = re.findall(r"^interrupted: (\d+) answers kept in (.+)$", printed, re.MULTILINE)
  assert kept == [(str(count_answers(predictions)), str(predictions))]
  assert 1 <= int(kept[0][0]) < ITEMS


def test_a_keyboard_interrupt_that_the_code_swallows_still_stops_the_eval(
  bench, tmp_path, monkeypatch, capsys
):
  """Seen failing before: the KeyboardInterrupt was raised inside code that caught and
  dropped it (as callbacks that XLA or a library runs do), and the run went on to the end."""
  calls = []

  def generate(model, processor, encoded, cfg):
    calls.append(len(encoded))
    if len(calls) == 1:
      try:
        signal.raise_signal(signal.SIGINT)  # Ctrl-C, landing in code that swallows it
      except KeyboardInterrupt:
        pass
    return ["reply"] * len(encoded)

  monkeypatch.setattr(runner, "_generate", generate)
  root, checkpoint = bench
  out, before = tmp_path / "out", signal.getsignal(signal.SIGINT)
  assert app.main(eval_args(root, checkpoint, out) + ["--limit", "4"]) == 130
  assert calls == [1]  # the batch in progress is answered, and nothing after it
  err = capsys.readouterr().err.splitlines()
  assert "SIGINT received: stopping after the batch in progress (again: at once)" in err
  assert err[-1] == f"interrupted: 1 answers kept in {out / 'predictions.jsonl'}"
  assert signal.getsignal(signal.SIGINT) is before  # the handlers are put back
