"""ppllava_jax.distributed's decisions over fake environments: what jax.distributed.initialize
would be called with (never called here), which clusters are detected as JAX would, and
the errors a bad launch value gives."""

import argparse
import logging
import re

import pytest

from ppllava_jax import distributed

SRUN_STEP = {
  "SLURM_JOB_ID": "4242",
  "SLURM_STEP_NODELIST": "gpu[001-004]",
  "SLURM_NTASKS": "32",
  "SLURM_PROCID": "9",
  "SLURM_LOCALID": "1",
}
EXPLICIT = {
  "JAX_COORDINATOR_ADDRESS": "node0:12355",
  "JAX_NUM_PROCESSES": "4",
  "JAX_PROCESS_ID": "2",
}


def parse(*argv):
  parser = argparse.ArgumentParser()
  distributed.add_flags(parser)
  return parser.parse_args(argv)


def test_launch_from_flags_then_environment():
  assert distributed.launch_of(None, {}) == distributed.Launch()
  assert distributed.launch_of(None, EXPLICIT) == distributed.Launch("node0:12355", 4, 2)
  args = parse("--coordinator", "head:1", "--num-processes", "2", "--process-id", "1")
  assert distributed.launch_of(args, EXPLICIT) == distributed.Launch("head:1", 2, 1)
  assert distributed.launch_of(parse("--process-id", "3"), EXPLICIT).process_id == 3


@pytest.mark.parametrize(
  "environ, message",
  [
    (
      {**EXPLICIT, "JAX_NUM_PROCESSES": "four"},
      "--num-processes / JAX_NUM_PROCESSES is 'four': expected an integer, the number of processes",
    ),
    (
      {**EXPLICIT, "JAX_PROCESS_ID": "2.0"},
      "--process-id / JAX_PROCESS_ID is '2.0': expected an integer, the index of this process",
    ),
    (
      {**EXPLICIT, "JAX_NUM_PROCESSES": "0", "JAX_PROCESS_ID": "0"},
      "--num-processes / JAX_NUM_PROCESSES is 0: expected the number of processes in the "
      "run, at least 1",
    ),
    (
      {**EXPLICIT, "JAX_PROCESS_ID": "4"},
      "--process-id / JAX_PROCESS_ID is 4: expected this process's index, 0 to 3 "
      "(--num-processes / JAX_NUM_PROCESSES is 4)",
    ),
    ({**EXPLICIT, "JAX_PROCESS_ID": "-1"}, "JAX_PROCESS_ID is -1: expected this process's index"),
    (
      {**EXPLICIT, "JAX_COORDINATOR_ADDRESS": "node0"},
      "--coordinator / JAX_COORDINATOR_ADDRESS is 'node0': expected HOST:PORT",
    ),
    (
      {"JAX_NUM_PROCESSES": "2"},
      "missing: --coordinator / JAX_COORDINATOR_ADDRESS, --process-id / JAX_PROCESS_ID",
    ),
  ],
)
def test_bad_launch_values_name_the_variable_value_and_expectation(environ, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    distributed.launch_of(None, environ)


def test_num_processes_flag_zero():
  args = parse("--coordinator", "h:1", "--num-processes", "0", "--process-id", "0")
  with pytest.raises(
    ValueError,
    match=re.escape("--num-processes / JAX_NUM_PROCESSES is 0: expected the number of processes"),
  ):
    distributed.launch_of(args, {})


def test_detected_cluster_mirrors_jax_checks(caplog):
  assert distributed.detected_cluster({}) is None
  assert distributed.detected_cluster(SRUN_STEP) == "slurm"
  assert distributed.detected_cluster({**SRUN_STEP, "SLURM_NTASKS": "1"}) is None  # one task
  for missing in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_LOCALID"):
    partial = {k: v for k, v in SRUN_STEP.items() if k != missing}
    assert distributed.detected_cluster(partial) is None
  assert not caplog.records
  ompi = {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.1:34911", "OMPI_COMM_WORLD_SIZE": "4"}
  assert distributed.detected_cluster(ompi) == "ompi"
  assert distributed.detected_cluster({**ompi, "OMPI_COMM_WORLD_SIZE": "1"}) is None
  assert distributed.detected_cluster({"TPU_WORKER_HOSTNAMES": "w-0,w-1"}) == "gketpu"
  assert distributed.detected_cluster({"TPU_WORKER_HOSTNAMES": "w-0"}) is None
  # TPU_PROCESS_ADDRESSES first, as in GkeTpuCluster
  assert (
    distributed.detected_cluster(
      {"TPU_PROCESS_ADDRESSES": "w-0:8476", "TPU_WORKER_HOSTNAMES": "w-0,w-1"}
    )
    is None
  )


def test_slurm_batch_step_without_srun_is_one_process_with_a_warning(caplog):
  batch = {k: v for k, v in SRUN_STEP.items() if k != "SLURM_STEP_NODELIST"}
  with caplog.at_level(logging.WARNING, logger="ppllava_jax.distributed"):
    assert distributed.init_kwargs(None, batch) is None
  assert "a Slurm job of 32 tasks, but this is not an srun step" in caplog.text


def test_init_kwargs():
  init = distributed.init_kwargs
  assert init(None, {}) is None
  assert init(None, SRUN_STEP) == {"cluster_detection_method": "slurm"}
  # explicit: JAX's detection off, so an srun step's process sees all its host's GPUs
  explicit = {"coordinator_address": "node0:12355", "num_processes": 4, "process_id": 2}
  assert init(None, {**SRUN_STEP, **EXPLICIT}) == {
    **explicit,
    "cluster_detection_method": "deactivate",
  }
  assert init(parse("--cluster-detection", "slurm"), {**SRUN_STEP, **EXPLICIT}) == {
    **explicit,
    "cluster_detection_method": "slurm",
  }
  assert init(parse("--cluster-detection", "auto"), EXPLICIT) == {
    **explicit,
    "cluster_detection_method": None,
  }
  # opting in: a Cloud TPU VM slice shows nothing in its environment
  assert init(parse("--cluster-detection", "auto"), {}) == {"cluster_detection_method": None}
  assert init(None, {"JAX_CLUSTER_DETECTION": "gcetpu"}) == {"cluster_detection_method": "gcetpu"}
  assert init(None, {"JAX_CLUSTER_DETECTION": " Auto "}) == {"cluster_detection_method": None}
  # the flag before the variable; deactivate: one process even in an srun step
  assert (
    init(parse("--cluster-detection", "deactivate"), {**SRUN_STEP, "JAX_CLUSTER_DETECTION": "auto"})
    is None
  )
  assert init(None, {**SRUN_STEP, "JAX_CLUSTER_DETECTION": "deactivate"}) is None


def test_bad_cluster_detection():
  with pytest.raises(
    ValueError,
    match=re.escape("JAX_CLUSTER_DETECTION is 'slurmm': expected one of auto, deactivate, slurm"),
  ):
    distributed.init_kwargs(None, {"JAX_CLUSTER_DETECTION": "slurmm"})
  with pytest.raises(SystemExit):
    parse("--cluster-detection", "slurmm")
  # a method JAX reads from the environment, asked for where it is not (JAX: a KeyError)
  batch = {k: v for k, v in SRUN_STEP.items() if k != "SLURM_STEP_NODELIST"}
  with pytest.raises(
    ValueError,
    match=re.escape(
      "--cluster-detection / JAX_CLUSTER_DETECTION is slurm, but the environment lacks "
      "SLURM_STEP_NODELIST (an srun step sets them)"
    ),
  ):
    distributed.init_kwargs(parse("--cluster-detection", "slurm"), batch)
  with pytest.raises(
    ValueError,
    match="is gketpu, but the environment lacks TPU_PROCESS_ADDRESSES or TPU_WORKER_HOSTNAMES",
  ):
    distributed.init_kwargs(None, {"JAX_CLUSTER_DETECTION": "gketpu"})
  assert distributed.init_kwargs(
    None, {"JAX_CLUSTER_DETECTION": "gketpu", "TPU_WORKER_HOSTNAMES": "w-0"}
  ) == {"cluster_detection_method": "gketpu"}


def test_cluster_methods_are_jax_s():
  from jax._src import clusters

  names = {env.name for env in clusters.ClusterEnv._cluster_types}
  assert set(distributed.CLUSTER_METHODS) - {"auto", "deactivate"} <= names
