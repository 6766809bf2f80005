"""train.py as a subprocess on a very small version of configs/sft_tiny.py: one host
device, a persistent compilation cache shared by the runs of one test session (the
runs compile the same step, so only the first pays for it). Its multiple-choice
evaluation asks the task files of ``MCQ_TASKS`` (4 items, one of a missing video) about
the run's held-out synthetic videos, every 3 batches and at the end."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from support import multiprocess

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "sft_tiny.py"
MCQ_TASKS = ROOT / "tests" / "train" / "mcq_tasks"
MCQ = {
  "tasks": str(MCQ_TASKS),
  "video_root": "{workdir}/data/videos",
  "every": 3,
  "frames": 4,
  "batch_size": 2,
  "max_new_tokens": 4,
}
SMALL = (
  "steps=8",
  "log_every=2",
  "checkpoint_every=2",
  "keep=5",
  "eval_every=4",
  "eval_batches=1",
  "model.tiny.image_size=56",
  "synthetic.videos=6",
  "synthetic.eval_videos=2",
  "data.batch.batch_size=2",
  "data.batch.video_slots=2",
  "data.batch.seq_buckets=(192,)",
  "data.sample.max_length=192",
  "eval_data.batch.batch_size=2",
  "eval_data.batch.video_slots=2",
  "eval_data.batch.seq_buckets=(192,)",
  "eval_data.sample.max_length=192",
  f"mcq={MCQ!r}",
)


def train_main():
  """train.py's ``main``, to run in this process (what fails before training starts)."""
  spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main


def env(cache: Path) -> dict:
  """A one-device CPU run's environment, compiling through ``cache``."""
  return multiprocess.env(1, cache)


def command(workdir: Path, *extra: str, config: Path = CONFIG) -> list[str]:
  sets = [a for s in SMALL + extra for a in ("--set", s)]
  return [
    sys.executable,
    str(ROOT / "train.py"),
    "--config",
    str(config),
    "--workdir",
    str(workdir),
    *sets,
  ]


SUMMARY = """import json, sys
from ppllava_jax.config import apply_overrides, load_config
from ppllava_jax.train.run import config as rc
from ppllava_jax.train.run.loop import train
cfg = apply_overrides(load_config(sys.argv[1], rc.RunConfig), sys.argv[3:])
print("summary:", json.dumps(train(cfg, sys.argv[2])))
"""


def summary_command(workdir: Path, *extra: str) -> list[str]:
  """``command``'s run through ``loop.train`` itself: its last line is ``summary: JSON``."""
  return [sys.executable, "-c", SUMMARY, str(CONFIG), str(workdir), *SMALL, *extra]


def summary(done: subprocess.CompletedProcess) -> dict:
  (line,) = [x for x in done.stdout.splitlines() if x.startswith("summary: ")]
  return json.loads(line.removeprefix("summary: "))


def run(cmd, cache: Path, timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run(
    cmd, capture_output=True, text=True, cwd=ROOT, env=env(cache), timeout=timeout, check=False
  )


def start(cmd, cache: Path, log: Path) -> subprocess.Popen:
  f = open(log, "w")
  return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env(cache))


def finished_steps(workdir: Path) -> list[int]:
  folder = workdir / "checkpoints"
  return (
    sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []
  )


def wait_for_checkpoint(proc: subprocess.Popen, workdir: Path, timeout: float = 240) -> None:
  end = time.time() + timeout
  while not finished_steps(workdir):
    if proc.poll() is not None:
      raise AssertionError(f"train.py ended ({proc.returncode}) before its first checkpoint")
    if time.time() > end:
      proc.kill()
      raise AssertionError("no checkpoint in time")
    time.sleep(0.05)


def kill_after_first_checkpoint(
  cmd, cache: Path, workdir: Path, log: Path, delay: float = 0.0
) -> list[int]:
  """Starts ``cmd``, SIGKILLs it ``delay`` seconds after its first checkpoint, and returns
  the checkpoints it left."""
  proc = start(cmd, cache, log)
  wait_for_checkpoint(proc, workdir)
  time.sleep(delay)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, f"train.py ended ({proc.returncode}) before the kill"
  return finished_steps(workdir)


def state_at(workdir: Path, step: int) -> dict[str, np.ndarray]:
  """The saved TrainState of checkpoint ``step``, flat: keystr -> array."""
  import jax
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(Path(workdir).absolute() / "checkpoints" / str(step) / "state")
  return {
    jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }
