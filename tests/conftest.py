"""Shared test set-up: 8 host devices for the sharding tests (before jax loads)."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import numpy as np
import pytest


@pytest.fixture
def rng():
  return np.random.default_rng(0)


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
  """One persistent compilation cache for the subprocess runs of a test session (they
  compile the same steps: only the first pays)."""
  return tmp_path_factory.mktemp("jax_cache")
