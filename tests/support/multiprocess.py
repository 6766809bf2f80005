"""Several processes of one JAX run on localhost: what a pod slice or a Slurm job does, with
CPU devices and gloo collectives (``ppllava_jax.distributed``).

``launch(cmd, processes=2, devices=4)`` starts ``processes`` copies of ``cmd`` with the
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` environment a
launcher exports, each with ``devices`` host devices, and waits for all of them (a
failed one kills the rest, so a test never hangs on a peer waiting in a collective).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def env(devices: int, cache: Path | None = None, **extra) -> dict:
  """This environment for a CPU process of ``devices`` devices, compiling through ``cache``
  (None: no persistent cache), with ``extra`` variables."""
  out = dict(os.environ)
  flags = [
    f
    for f in out.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count")
  ]
  out["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  out["JAX_PLATFORMS"] = "cpu"
  if cache is not None:
    out.update(
      JAX_COMPILATION_CACHE_DIR=str(cache),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
  out.update({k: str(v) for k, v in extra.items()})
  return out


def launch(
  cmd: list[str],
  processes: int = 2,
  devices: int = 4,
  cache: Path | None = None,
  timeout: float = 600,
) -> list[subprocess.CompletedProcess]:
  """Runs ``cmd`` as ``processes`` processes of one run (module doc); their results in
  process order."""
  port = free_port()
  procs, files = [], []
  for i in range(processes):
    e = env(
      devices,
      cache,
      JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
      JAX_NUM_PROCESSES=processes,
      JAX_PROCESS_ID=i,
    )
    # files, not pipes: a pipe nobody reads until the end blocks a talkative child
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    files.append((out, err))
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=out, stderr=err, text=True))
  deadline = time.monotonic() + timeout
  while any(p.poll() is None for p in procs):
    if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
      for p in procs:
        if p.poll() is None:
          p.kill()
      break
    time.sleep(0.2)
  results = []
  for p, (out, err) in zip(procs, files):
    p.wait()
    out.seek(0), err.seek(0)
    results.append(subprocess.CompletedProcess(cmd, p.returncode, out.read(), err.read()))
    out.close(), err.close()
  return results


def run_one(
  cmd: list[str], devices: int, cache: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
  """``cmd`` as a single process with ``devices`` host devices."""
  return subprocess.run(
    cmd,
    cwd=ROOT,
    env=env(devices, cache),
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )


def report(results) -> str:
  """What a failed assertion should show: every process's exit status and output tail."""
  if isinstance(results, subprocess.CompletedProcess):
    results = [results]

  def tail(err: str) -> str:  # from the first traceback: an abort's dump follows it
    start = err.find("Traceback (most recent call last)")
    return err[start : start + 8000] if start >= 0 else err[-6000:]

  return "\n".join(
    f"--- process {i}: rc {r.returncode}\n{r.stdout[-3000:]}\n{tail(r.stderr)}"
    for i, r in enumerate(results)
  )


def kill_group(proc: subprocess.Popen) -> None:
  """SIGKILL to the process group ``proc`` leads (``start_new_session=True``): a launcher
  script and everything it started."""
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  proc.wait()
