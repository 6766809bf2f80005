"""Peak host memory of a run's start, its resume and its export: one state, never two.

Four ``train.py`` processes on one CPU device, side by side in one run, on the tiny SFT
config with a 4 x 1024 LLM (about 50M parameters, all trained: the state is float32
parameters + AdamW's two moments, ~0.6 GB): a fresh start that trains 2 steps and saves;
the same command with ``steps=4``, which resumes from that checkpoint and trains 2 more;
that command again, which restores the last checkpoint and has nothing to train (the
restore's own peak); and ``train.py export``. Each peak is the child's own maximum RSS
(``os.wait4``). The code before e78823a held two states while it restored (the first
state it made and the one it restored into); restoring into the abstract state holds
one. The export restores the parameters alone. Run this file in an older checkout to
compare (it needs only ``train.py`` and the tiny config).

  python benchmarks/resume_memory.py [--llm-width 1024] [--llm-layers 4]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]


def peak_kib(argv: list[str]) -> tuple[int, float]:
  """(the child's maximum RSS in KiB, its seconds); raises when it fails."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  start = time.perf_counter()
  proc = subprocess.Popen(
    argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
  )
  err = proc.stderr.read() if proc.stderr else ""
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(argv[1:3])} exited {proc.returncode}:\n{err[-3000:]}")
  return usage.ru_maxrss, time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--llm-width", type=int, default=1024, help="the tiny LLM's width")
  parser.add_argument("--llm-layers", type=int, default=4, help="the tiny LLM's layers")
  args = parser.parse_args()
  print(common.machine())
  sets = [
    "log_every=1", "checkpoint_every=2", "eval_every=0", "mcq=None", "eval_data=None",
    f"model.tiny.llm_width={args.llm_width}", f"model.tiny.llm_layers={args.llm_layers}",
    "model.tiny.image_size=56", "synthetic.videos=4", "synthetic.eval_videos=0",
    "data.batch.batch_size=2", "data.batch.video_slots=2", "data.batch.seq_buckets=(192,)",
    "data.sample.max_length=192", "data.num_workers=0", "train.optim.total_steps=4",
  ]  # fmt: skip
  with tempfile.TemporaryDirectory() as tmp:
    workdir = Path(tmp) / "run"
    train = [sys.executable, "train.py", "--config", "configs/sft_tiny.py"]
    train += ["--workdir", str(workdir)] + [a for s in sets for a in ("--set", s)]
    runs = {
      "start (2 steps, no checkpoint)": train + ["--set", "steps=2"],
      "resume (from step 2, 2 more)": train + ["--set", "steps=4"],
      "restore only (the run is done)": train + ["--set", "steps=4"],
      "export (the parameters)": [sys.executable, "train.py", "export", "--workdir",
                                  str(workdir), "--out", str(Path(tmp) / "hf")],
    }  # fmt: skip
    peaks = {name: peak_kib(argv) for name, argv in runs.items()}
  start = peaks["start (2 steps, no checkpoint)"][0]
  print(f"tiny SFT run, LLM {args.llm_layers} x {args.llm_width}, one CPU device; peak RSS:")
  for name, (kib, seconds) in peaks.items():
    print(f"  {name:32s} {kib / 1024:8.0f} MiB  {kib / start:5.2f}x the start  ({seconds:.0f} s)")


if __name__ == "__main__":
  main()
