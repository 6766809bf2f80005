"""What the benchmark scripts share: timing, memory readings, one worker process per contender.

Each script runs every contender in a fresh copy of itself (``run_worker``) so that
its peak memory (``status_kib("VmHWM")``) is its own; the worker prints one JSON line.
Scripts are run as ``python benchmarks/<name>.py``, so this module is importable as
``common``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def status_kib(field: str) -> int:
  """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in KiB."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise RuntimeError(f"{field} not in /proc/self/status")


def available_bytes() -> int:
  with open("/proc/meminfo") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def median_time(fn, reps: int):
  """(median seconds of ``reps`` timed calls after one warm-up call, the warm-up's result)."""
  result = fn()  # warm-up: compilation, allocator, first touch of buffers
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times)), result


def run_worker(script: str, args: list[str]) -> dict:
  """Runs ``script`` with ``args`` in a fresh process and returns its last JSON line, or
  ``{"error": ...}`` saying why it did not finish (a kill is most likely out of memory)."""
  done = subprocess.run(
    [sys.executable, script, *args], capture_output=True, text=True, check=False
  )
  if done.returncode != 0:
    lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
    reason = "killed (out of memory?)" if done.returncode in (-9, 137) else lines[-1]
    return dict(error=f"did not run: {reason}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def _git(*args: str) -> str:
  done = subprocess.run(
    ["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, check=False
  )
  return done.stdout.strip()


def machine() -> str:
  """The CPU model, its core count and the checkout's commit: the line a figure is read with."""
  with open("/proc/cpuinfo") as f:
    cpuinfo = f.read()
  names = [
    line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")
  ]
  extras = [name for name, flag in (("AVX-512", "avx512f"), ("AMX", "amx_tile")) if flag in cpuinfo]
  commit = _git("rev-parse", "--short", "HEAD") or "unknown"
  dirty = " with local changes" if _git("status", "--porcelain", "--untracked-files=no") else ""
  model = (names or ["unknown CPU"])[0] + (f" ({', '.join(extras)})" if extras else "")
  return f"{model}, {os.cpu_count()} cores; commit {commit}{dirty}"
