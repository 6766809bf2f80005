"""train.py as a subprocess on a very small version of configs/sft_tiny.py: one host
device, a persistent compilation cache shared by the runs of one test session (the
runs compile the same step, so only the first pays for it)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "sft_tiny.py"
SMALL = ("steps=8", "log_every=2", "checkpoint_every=2", "keep=5", "eval_every=4",
         "eval_batches=1", "model.tiny.image_size=56", "synthetic.videos=6",
         "synthetic.eval_videos=2", "data.batch.batch_size=2", "data.batch.video_slots=2",
         "data.batch.seq_buckets=(192,)", "data.sample.max_length=192",
         "eval_data.batch.batch_size=2", "eval_data.batch.video_slots=2",
         "eval_data.batch.seq_buckets=(192,)", "eval_data.sample.max_length=192")


def env(cache: Path) -> dict:
  out = dict(os.environ)
  flags = out.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
  out["XLA_FLAGS"] = flags.strip()
  out.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", JAX_PLATFORMS="cpu")
  return out


def command(workdir: Path, *extra: str, config: Path = CONFIG) -> list[str]:
  sets = [a for s in SMALL + extra for a in ("--set", s)]
  return [sys.executable, str(ROOT / "train.py"), "--config", str(config), "--workdir",
          str(workdir), *sets]


def run(cmd, cache: Path, timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env(cache),
                        timeout=timeout, check=False)


def start(cmd, cache: Path, log: Path) -> subprocess.Popen:
  f = open(log, "w")
  return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env(cache))


def finished_steps(workdir: Path) -> list[int]:
  folder = workdir / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def wait_for_checkpoint(proc: subprocess.Popen, workdir: Path, timeout: float = 240) -> None:
  end = time.time() + timeout
  while not finished_steps(workdir):
    if proc.poll() is not None:
      raise AssertionError(f"train.py ended ({proc.returncode}) before its first checkpoint")
    if time.time() > end:
      proc.kill()
      raise AssertionError("no checkpoint in time")
    time.sleep(0.05)


def state_at(workdir: Path, step: int) -> dict[str, np.ndarray]:
  """The saved TrainState of checkpoint ``step``, flat: keystr -> array."""
  import jax
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.restore(Path(workdir).absolute() / "checkpoints" / str(step) / "state")
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
