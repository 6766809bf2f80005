"""The Qwen recipe as the cluster scripts run it: ``configs/sft_qwen7b.py`` through
``scripts/localhost.sh`` on 2 processes (what a pod or a Slurm job does, on CPU devices),
with only hub ids, data paths and batch sizes swapped by ``--set`` for tiny llava-hf
LLaVA-OneVision + SigLIP folders (``support.journeys``). The single-process path of the
recipes is ``test_vicuna.py``'s."""

import os
import subprocess
import sys

import pytest
from support import journeys, multiprocess, train_runs

from ppllava_jax.train.run.metrics import read_metrics

pytestmark = pytest.mark.slow
ROOT = train_runs.ROOT


def ok(done: subprocess.CompletedProcess) -> str:
  assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-6000:]
  return done.stdout + done.stderr


def test_qwen_recipe_on_two_processes_through_localhost_sh(tmp_path):
  """scripts/localhost.sh starts the processes of one run, as a pod or a Slurm job would."""
  start, data = journeys.qwen_start(tmp_path / "qwen"), journeys.sft_data(tmp_path / "data")
  workdir = tmp_path / "run"
  cmd = [
    "bash",
    str(ROOT / "scripts" / "localhost.sh"),
    "train.py",
    "--config",
    str(ROOT / "configs" / "sft_qwen7b.py"),
    "--workdir",
    str(workdir),
    *[a for s in journeys.recipe_overrides("sft_qwen7b", start, data) for a in ("--set", s)],
  ]
  env = dict(
    os.environ,
    PROCESSES="2",
    DEVICES="1",
    PORT=str(multiprocess.free_port()),
    PYTHON=sys.executable,
  )
  proc = subprocess.Popen(
    cmd,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    cwd=ROOT,
    env=env,
    start_new_session=True,
  )
  try:
    stdout, stderr = proc.communicate(timeout=600)
  finally:  # the script and both trainers, whatever happened
    multiprocess.kill_group(proc)
  out = ok(subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr))
  assert "process 0 of 2" in out and "process 1 of 2" in out, out[-3000:]
  assert out.count("step 2: 2 updates, 0 skipped") == 2  # every process ends the same run
  assert sorted(r["step"] for r in read_metrics(workdir) if "loss" in r) == [1, 2]
