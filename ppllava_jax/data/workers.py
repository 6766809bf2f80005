"""The life of Grain's worker processes (``mp_prefetch``), which build batches for
``data.engine.DataIterator``.

The parent decides when they stop (``DataIterator.close``, in the trainer's ``finally``),
so each worker first (``worker_start``) ignores SIGINT and SIGTERM, which a terminal's
Ctrl-C or Slurm sends to every process of the group: no worker tracebacks, no batch cut
off half sent, no worker gone while the parent still reads. A worker also ends as soon
as its parent does, SIGKILL included (``end_with``), so no worker outlives a killed run;
with them gone, multiprocessing's resource tracker frees what they held in shared memory
and ends too. Only a signal that comes while a worker is still starting (importing,
before ``worker_start`` runs) can print its traceback. The shared memory a batch arrives
in is unlinked on arrival (``unlink_received``), and ``finish_unlinks`` waits for
grain's own unlinks, so a stopped run leaves none for the tracker to warn about.

Grain's workers are spawned processes: absl flags are marked parsed first
(``mark_flags_parsed``; grain reads them), and a script that starts a pipeline needs an
``if __name__ == "__main__"`` guard.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time

import jax
from grain.multiprocessing import SharedMemoryArray


def worker_start(parent: int, index: int, count: int) -> None:
  """grain's ``worker_init_fn``, run first in each worker process of ``parent`` (module
  doc): stop signals are the parent's to act on, and the worker ends with the parent."""
  del index, count
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, signal.SIG_IGN)
  end_with(parent)


def end_with(parent: int) -> None:
  """Ends this process as soon as its parent process ``parent`` ends, by a watching thread.

  Not ``prctl(PR_SET_PDEATHSIG)``: its "parent" is the thread that started the process,
  here one of grain's threads, which can end while the parent process lives on."""
  try:
    pidfd = os.pidfd_open(parent)  # readable once the process has ended (Linux >= 5.3)
  except (AttributeError, OSError):  # no pidfds, or the parent is gone already: poll
    pidfd = None
  if os.getppid() != parent:  # it ended before we watched (this process was re-parented)
    os._exit(1)
  threading.Thread(
    target=_exit_after, args=(parent, pidfd), daemon=True, name="ppllava-parent-watch"
  ).start()


def _exit_after(parent: int, pidfd: int | None) -> None:
  if pidfd is not None:
    poll = select.poll()
    poll.register(pidfd, select.POLLIN)
    poll.poll()
  else:
    while os.getppid() == parent:
      time.sleep(0.5)
  os._exit(1)  # no clean-up: the parent is gone, nobody reads what this process holds


def unlink_received(tree) -> None:
  """Removes the names of the shared memory blocks that ``tree`` arrived in from the
  workers, now rather than when its arrays are freed: the arrays stay mapped, and a run
  that stops leaves no name behind whatever still holds a batch (grain unlinks on a
  background thread, which an exit can cut short: the resource tracker's "leaked
  shared_memory" warnings)."""
  for leaf in jax.tree_util.tree_leaves(tree):
    if isinstance(leaf, SharedMemoryArray) and leaf._unlink_on_del:
      leaf.shm.unlink()
      leaf._unlink_on_del = False  # what grain's deleter reads: close only


def finish_unlinks() -> None:
  """Waits for the unlinks grain queued on its deleter thread so far (the batches in its
  buffers, dropped by ``close``), for the reason ``unlink_received`` gives."""
  pool = SharedMemoryArray._del_thread_pool  # grain 0.2: one thread, in order
  if pool is not None:
    try:
      pool.apply(lambda: None)  # runs after every unlink queued before it
    except ValueError:  # the pool was stopped (interpreter exit): nothing to wait for
      pass


def mark_flags_parsed() -> None:
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
