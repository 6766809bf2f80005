"""JAX's multi-controller runtime: one process per host, started by ``initialize``.

``train.py`` and ``eval.py`` call ``initialize(args)`` before touching a device. It calls
``jax.distributed.initialize`` when the run is several processes, known from, in order:

1. the flags ``--coordinator HOST:PORT --num-processes N --process-id I`` (``add_flags``);
2. the environment ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``
   (what a launcher script exports, one process per host);
3. a cluster JAX detects by itself: a Slurm job step of several tasks (``SLURM_NTASKS``
   > 1: the coordinator is the first node, the ids are the task ranks) or a TPU pod slice
   (``TPU_WORKER_HOSTNAMES`` naming several hosts); ``jax.distributed.initialize()`` is
   then called without arguments and reads them itself.

Otherwise the run is one process and nothing is initialised. CPU collectives (several
processes on one machine, as the tests run: ``XLA_FLAGS=--xla_force_host_platform_device_count``)
go over gloo; that setting only concerns the CPU backend, so it is set whatever the
accelerator.

Only the primary process (index 0) writes what a run shares: metrics, pictures, result
files (``is_primary``); every process takes part in the collectives and in Orbax saves.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os

log = logging.getLogger(__name__)

ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process was launched: explicit values (all three, or none)."""
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def __post_init__(self):
    given = [v is not None for v in dataclasses.astuple(self)]
    if any(given) and not all(given):
      missing = [f"--{name.replace('_', '-')} / {ENV[name]}"
                 for name, v in dataclasses.asdict(self).items() if v is None]
      raise ValueError(f"a multi-process launch needs the coordinator, the process count and "
                       f"this process's id; missing: {', '.join(missing)}")
    if self.num_processes is not None and not 0 <= self.process_id < self.num_processes:
      raise ValueError(f"--process-id {self.process_id} is not in [0, {self.num_processes})")


def add_flags(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group("multi-process (one process per host; module "
                                    "ppllava_jax.distributed)")
  group.add_argument("--coordinator", metavar="HOST:PORT",
                     help=f"Process 0's address (default: ${ENV['coordinator']}).")
  group.add_argument("--num-processes", type=int, metavar="N",
                     help=f"Processes in the run (default: ${ENV['num_processes']}).")
  group.add_argument("--process-id", type=int, metavar="I",
                     help=f"This process's index (default: ${ENV['process_id']}).")


def launch_of(args: argparse.Namespace | None = None, environ=os.environ) -> Launch:
  """The explicit launch of the flags in ``args``, else of the environment."""
  values = {}
  for name, var in ENV.items():
    value = getattr(args, name, None) if args is not None else None
    if value is None and environ.get(var):
      value = environ[var]
    values[name] = None if value is None else (value if name == "coordinator" else int(value))
  return Launch(**values)


def _cluster_detected(environ=os.environ) -> bool:
  """A Slurm step of several tasks or a multi-host TPU slice, which JAX configures itself."""
  if int(environ.get("SLURM_NTASKS", "1") or 1) > 1:
    return True
  return len([h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def initialize(args: argparse.Namespace | None = None, environ=os.environ) -> bool:
  """Starts the multi-controller runtime when this is a multi-process run (module doc);
  returns whether it did. Call before anything touches a device."""
  import jax
  launch = launch_of(args, environ)
  if launch.num_processes is None and not _cluster_detected(environ):
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if launch.num_processes is None:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=launch.coordinator,
                               num_processes=launch.num_processes,
                               process_id=launch.process_id)
  log.info("process %d of %d: %d local devices of %d", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def is_primary() -> bool:
  import jax
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits here for the others (a no-op on one process)."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
