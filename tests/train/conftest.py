import pytest
from support import train_runs


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, compile_cache):
  """One uninterrupted run of the small tiny config (8 batches)."""
  workdir = tmp_path_factory.mktemp("reference")
  done = train_runs.run(train_runs.command(workdir), compile_cache)
  assert done.returncode == 0, done.stdout + done.stderr
  return workdir, done
