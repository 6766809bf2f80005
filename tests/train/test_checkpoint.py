"""Checkpoints: SIGTERM saves at the next batch and exits 143 with its message (resuming is
test_loop's SIGKILL test); a finished run's rerun trains nothing; init_from starts a new run
from another run's parameters."""

import signal

from support import train_runs

from ppllava_jax.train.run.metrics import read_metrics


def test_sigterm_saves_at_the_next_batch_then_exits_143(compile_cache, tmp_path):
  workdir = tmp_path / "term"
  cmd = train_runs.command(workdir, "checkpoint_every=3")
  proc = train_runs.start(cmd, compile_cache, tmp_path / "first.log")
  train_runs.wait_for_checkpoint(proc, workdir)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) in (143, 0)  # 0: it had finished before the signal came
  printed = (tmp_path / "first.log").read_text()
  steps = train_runs.finished_steps(workdir)
  assert "Traceback" not in printed
  if proc.returncode == 143:
    assert "SIGTERM received: saving a checkpoint" in printed
    assert f"stopped by SIGTERM after step {steps[-1]}: checkpoint {steps[-1]} saved" in printed
    assert steps[-1] < 8


def test_rerunning_a_finished_run_trains_nothing(reference_run, compile_cache):
  workdir, _ = reference_run
  before = read_metrics(workdir)
  done = train_runs.run(train_runs.command(workdir), compile_cache)
  assert done.returncode == 0, done.stderr
  assert "resuming from checkpoint 8" in done.stdout and "step 8: 8 updates" in done.stdout
  assert read_metrics(workdir) == before


def test_init_from_starts_a_new_run_from_another_runs_parameters(
  reference_run, compile_cache, tmp_path
):
  reference, _ = reference_run
  first = [r for r in read_metrics(reference) if "loss" in r][0]["loss"]
  done = train_runs.run(
    train_runs.command(tmp_path / "next", "steps=2", f"init_from={reference}", "eval_every=0"),
    compile_cache,
  )
  assert done.returncode == 0, done.stdout + done.stderr
  assert f"starting from the parameters of {reference}" in done.stdout
  assert [r for r in read_metrics(tmp_path / "next") if "loss" in r][0]["loss"] < 0.8 * first
