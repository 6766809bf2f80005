"""JAX's multi-controller runtime: the processes of one run, started by ``initialize``.

``train.py`` and ``eval.py`` call ``initialize(args)`` once logging is configured (its
"process i of n" line shows) and before anything touches a device. It calls
``jax.distributed.initialize`` (``init_kwargs`` says with what) when the run is several
processes, known from, in order:

1. the flags ``--coordinator HOST:PORT --num-processes N --process-id I`` (``add_flags``);
2. the environment ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``
   (what a launcher script exports; JAX itself reads only the first);
3. ``--cluster-detection METHOD`` / ``JAX_CLUSTER_DETECTION``: JAX finds the processes by
   ``METHOD`` (its ``cluster_detection_method``, one of ``CLUSTER_METHODS``), or with
   ``auto`` by each method it knows; ``deactivate``: never detect;
4. the clusters JAX detects that the environment shows (``detected_cluster``, the checks of
   JAX's ``is_env_present``): an srun step of several Slurm tasks, mpirun's Open MPI ranks,
   a GKE TPU slice of several hosts.

Otherwise the run is one process and nothing is initialised. Why 3: the hosts of a Cloud
TPU VM slice (``gcloud compute tpus tpu-vm ssh --worker=all``) show nothing in their
environment; JAX asks the metadata server, not worth a query on every run, so
``scripts/tpu_pod.sh`` opts in with ``--cluster-detection auto``. A Slurm batch step (python
run by the ``sbatch`` script itself, not by ``srun``) has ``SLURM_NTASKS`` but not the
``SLURM_STEP_NODELIST`` JAX needs: it runs as one process, with a warning; a METHOD whose
variables are missing is an error naming them.

Devices per process: an explicit launch (1, 2) sees all of its host's devices
(``JAX_LOCAL_DEVICE_IDS`` / ``CUDA_VISIBLE_DEVICES`` restrict them): start one process per
host. JAX's detection runs only when asked for then (3), since in an srun step it would pin
each process to the GPU of its ``SLURM_LOCALID``. A detected Slurm step or Open MPI job is
one process per GPU (``local_device_ids=[local rank]``): start one task per GPU, each seeing
all of its node's (``scripts/slurm_gpu.sbatch``). TPU processes see all their host's chips.

CPU collectives (several processes on one machine, as the tests run:
``XLA_FLAGS=--xla_force_host_platform_device_count``) go over gloo; that setting only
concerns the CPU backend, so it is set whatever the accelerator.

Only the primary process (index 0) writes what a run shares: metrics, pictures, result
files (``is_primary``); every process takes part in the collectives and in Orbax saves.

Signals: a first SIGTERM / Ctrl-C that any process receives is agreed on at the next step,
and all save and stop (``train.run.loop``); a second one stops only the process that receives
it, at once. The others then fail in their next collective, or the coordination service,
missing that process's heartbeat, tears them down. So send signals to every process, as
Slurm (``scancel``, ``--signal``) and TPU preemption do; ``scripts/localhost.sh`` passes
its own on to each, and stops the others when one fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

log = logging.getLogger(__name__)

ENV = {
  "coordinator": "JAX_COORDINATOR_ADDRESS",
  "num_processes": "JAX_NUM_PROCESSES",
  "process_id": "JAX_PROCESS_ID",
}
CLUSTER_ENV = "JAX_CLUSTER_DETECTION"
# JAX 0.10's cluster_detection_method names (jax._src.clusters), and auto: try them all.
# (Kubernetes has no name there: auto finds it.)
CLUSTER_METHODS = ("auto", "deactivate", "slurm", "ompi", "mpi4py", "gketpu", "gcetpu")
_SLURM_STEP = (
  "SLURM_JOB_ID",
  "SLURM_STEP_NODELIST",
  "SLURM_NTASKS",
  "SLURM_PROCID",
  "SLURM_LOCALID",
)  # SlurmCluster.is_env_present


def _source(name: str) -> str:
  return f"--{name.replace('_', '-')} / {ENV[name]}"


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process was launched: explicit values (all three, or none)."""

  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def __post_init__(self):
    given = [v is not None for v in dataclasses.astuple(self)]
    if not any(given):
      return
    if not all(given):
      missing = [_source(name) for name, v in dataclasses.asdict(self).items() if v is None]
      raise ValueError(
        f"a multi-process launch needs the coordinator, the process count and "
        f"this process's id; missing: {', '.join(missing)}"
      )
    host, _, port = self.coordinator.rpartition(":")
    if not host or not port.isdigit():
      raise ValueError(
        f"{_source('coordinator')} is {self.coordinator!r}: expected HOST:PORT, "
        f"process 0's address and a free port (e.g. node0:12355)"
      )
    if self.num_processes < 1:
      raise ValueError(
        f"{_source('num_processes')} is {self.num_processes}: expected the "
        f"number of processes in the run, at least 1"
      )
    if not 0 <= self.process_id < self.num_processes:
      raise ValueError(
        f"{_source('process_id')} is {self.process_id}: expected this "
        f"process's index, 0 to {self.num_processes - 1} "
        f"({_source('num_processes')} is {self.num_processes})"
      )


def add_flags(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group("multi-process (module ppllava_jax.distributed)")
  group.add_argument(
    "--coordinator",
    metavar="HOST:PORT",
    help=f"Process 0's address (default: ${ENV['coordinator']}).",
  )
  group.add_argument(
    "--num-processes",
    type=int,
    metavar="N",
    help=f"Processes in the run (default: ${ENV['num_processes']}).",
  )
  group.add_argument(
    "--process-id",
    type=int,
    metavar="I",
    help=f"This process's index (default: ${ENV['process_id']}).",
  )
  group.add_argument(
    "--cluster-detection",
    choices=CLUSTER_METHODS,
    metavar="METHOD",
    help=f"Let JAX find the processes by METHOD ({', '.join(CLUSTER_METHODS)}): "
    f"auto for a Cloud TPU VM slice, deactivate for one process in a Slurm "
    f"step (default: ${CLUSTER_ENV}, else Slurm steps, Open MPI and GKE TPU "
    f"slices are detected).",
  )


def _int(name: str, value: str | int) -> int:
  try:
    return int(value)
  except ValueError:
    what = "number of processes" if name == "num_processes" else "index of this process"
    raise ValueError(f"{_source(name)} is {value!r}: expected an integer, the {what}") from None


def launch_of(args: argparse.Namespace | None = None, environ=os.environ) -> Launch:
  """The explicit launch of the flags in ``args``, else of the environment."""
  values = {}
  for name, var in ENV.items():
    value = getattr(args, name, None) if args is not None else None
    if value is None and environ.get(var):
      value = environ[var]
    if value is not None and name != "coordinator":
      value = _int(name, value)
    values[name] = value
  return Launch(**values)


def cluster_detection_of(args: argparse.Namespace | None = None, environ=os.environ) -> str | None:
  """The ``--cluster-detection`` flag, else ``JAX_CLUSTER_DETECTION`` (checked), else None."""
  method = getattr(args, "cluster_detection", None) if args is not None else None
  if method is None and environ.get(CLUSTER_ENV):
    method = environ[CLUSTER_ENV].strip().lower()
    if method not in CLUSTER_METHODS:
      raise ValueError(
        f"{CLUSTER_ENV} is {environ[CLUSTER_ENV]!r}: expected one of {', '.join(CLUSTER_METHODS)}"
      )
  return method


def _count(environ, var: str) -> int:
  """An integer variable a cluster sets (1 when absent or not an integer: no cluster)."""
  try:
    return int(environ.get(var, "1"))
  except ValueError:
    return 1


def detected_cluster(environ=os.environ) -> str | None:
  """The cluster of several processes that JAX would detect from ``environ`` alone, as
  its ``cluster_detection_method`` name, in JAX's order; None when there is none. Same
  checks as JAX's ``is_env_present`` (Cloud TPU VM slices need the metadata server: not
  here), plus a process count over 1 (one Slurm task or MPI rank is a one-process run)."""
  if "OMPI_MCA_orte_hnp_uri" in environ and _count(environ, "OMPI_COMM_WORLD_SIZE") > 1:
    return "ompi"
  tasks = _count(environ, "SLURM_NTASKS")
  if tasks > 1 and all(var in environ for var in _SLURM_STEP):
    return "slurm"
  if tasks > 1 and "SLURM_JOB_ID" in environ and "SLURM_STEP_NODELIST" not in environ:
    log.warning(
      "a Slurm job of %d tasks, but this is not an srun step of them (no "
      "SLURM_STEP_NODELIST): running as one process; start the tasks with srun "
      "(scripts/slurm_gpu.sbatch)",
      tasks,
    )
  hosts = environ.get("TPU_PROCESS_ADDRESSES", environ.get("TPU_WORKER_HOSTNAMES", ""))
  if len([h for h in hosts.split(",") if h]) > 1:
    return "gketpu"
  return None


def _missing(method: str, environ) -> list[str]:
  """The variables JAX's ``method`` would read that ``environ`` lacks (JAX 0.10 goes on
  without them, to a KeyError)."""
  if method == "gketpu":
    hosts = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")
    return [] if any(var in environ for var in hosts) else [" or ".join(hosts)]
  needs = {"slurm": _SLURM_STEP, "ompi": ("OMPI_MCA_orte_hnp_uri",)}.get(method, ())
  return [var for var in needs if var not in environ]


def init_kwargs(args: argparse.Namespace | None = None, environ=os.environ) -> dict | None:
  """The keyword arguments of ``jax.distributed.initialize`` for this launch (module doc),
  or None for a one-process run."""
  launch = launch_of(args, environ)
  method = cluster_detection_of(args, environ)
  if method is not None and (missing := _missing(method, environ)):
    hint = " (an srun step sets them)" if method == "slurm" else ""
    raise ValueError(
      f"--cluster-detection / {CLUSTER_ENV} is {method}, but the environment "
      f"lacks {', '.join(missing)}{hint}"
    )
  if launch.num_processes is not None:
    # Explicit: JAX's detection would only add local_device_ids (one GPU per process in a
    # Slurm step), so it runs only when asked for.
    return dict(
      coordinator_address=launch.coordinator,
      num_processes=launch.num_processes,
      process_id=launch.process_id,
      cluster_detection_method="deactivate"
      if method is None
      else None
      if method == "auto"
      else method,
    )
  if method is None:
    method = detected_cluster(environ)
  if method is None or method == "deactivate":
    return None
  return dict(cluster_detection_method=None if method == "auto" else method)


def initialize(args: argparse.Namespace | None = None, environ=os.environ) -> bool:
  """Starts the multi-controller runtime when this is a multi-process run (module doc);
  returns whether it did. Call before anything touches a device."""
  kwargs = init_kwargs(args, environ)
  if kwargs is None:
    return False
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, KeyError) as err:  # JAX's, for a cluster it found nothing of
    if "coordinator_address" in kwargs:
      raise
    method = kwargs["cluster_detection_method"] or "auto"
    raise ValueError(
      f"cluster detection {method} (--cluster-detection / {CLUSTER_ENV}, or "
      f"found in the environment) did not give JAX a cluster to join: {err!r}; "
      f"pass --coordinator / --num-processes / --process-id instead"
    ) from err
  log.info(
    "process %d of %d: %d local devices of %d",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return True


def is_primary() -> bool:
  import jax

  return jax.process_index() == 0


def say(text: str) -> None:
  """A message of the run, printed once (by process 0: every process runs the same code)
  and past any progress bar."""
  if is_primary():
    from tqdm import tqdm

    tqdm.write(text)
    sys.stdout.flush()


def barrier(name: str) -> None:
  """Every process waits here for the others (a no-op on one process)."""
  import jax

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
