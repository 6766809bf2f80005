"""Stopping on SIGINT and SIGTERM where the program chooses, so that no signal is lost.

``with Signals(notice) as signals:`` handles both signals inside the block. The first
one only records its name in ``signals.received`` and prints ``notice`` (``{}``: the
name) on stderr; the program looks between pieces of work it can stop after:
``signals.check()`` raises ``Interrupted`` (``eval.py``: between batches), and
``signals.agreed()`` returns the signal any process received (the training loop: every
process saves the same checkpoint and stops). A second signal raises
``KeyboardInterrupt`` at once, wherever it lands: the way out of a call that takes too
long. Outside the block the handlers that were there before are back.

Why a flag rather than Python's default ``KeyboardInterrupt``: that exception is raised
in whatever code runs when the signal arrives, and code that catches broadly there (a
callback that XLA or a library runs, and that logs and drops what it caught) swallows
it, so the run goes on. The flag stays set whatever catches what, and the next check
stops. SIGTERM, by default, ends the process with nothing saved.

The notice goes straight to stderr's file descriptor: a handler runs between any two
bytecodes of the main thread, possibly in the middle of a write to the same stream
(a progress bar's), which Python's buffered streams refuse to re-enter.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

HANDLED = (signal.SIGTERM, signal.SIGINT)  # in agreed()'s code order (index + 1)


def exit_code(name: str) -> int:
  """What a process stopped by the signal ``name`` exits with: 128 + its number, as a
  shell reports a process the signal ended."""
  return 128 + signal.Signals[name].value


class Interrupted(KeyboardInterrupt):
  """``Signals.check`` found a signal received: a ``KeyboardInterrupt``, so what handles
  Ctrl-C already handles it; ``name`` is the signal's."""

  def __init__(self, name: str):
    super().__init__(name)
    self.name = name


class Signals:
  """SIGINT / SIGTERM -> ``received``, for the ``with`` block (module doc)."""

  def __init__(self, notice: str = "{} received: stopping"):
    self.notice = notice
    self.received: str | None = None
    self._old: dict[signal.Signals, Any] = {}  # the previous handlers

  def __enter__(self) -> Signals:
    for sig in HANDLED:
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: the signals stay as they are
        pass
    return self

  def __exit__(self, *exc) -> None:
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old.clear()

  def _handle(self, signum, frame) -> None:
    if self.received is not None:  # a second one: stop now
      raise KeyboardInterrupt
    self.received = signal.Signals(signum).name
    _say(self.notice.format(self.received))

  def check(self) -> None:
    """Raises ``Interrupted`` once a signal was received."""
    if self.received is not None:
      raise Interrupted(self.received)

  def agreed(self) -> str | None:
    """The signal any process received (one all-gather on several processes), so that
    every process stops at the same point. Only the gathered value counts: a signal
    handled while this process waited in the gather set ``received`` after it sent its
    own, so the others did not see it; this call returns without it, and the next
    gather carries it."""
    import jax

    if jax.process_count() == 1:
      return self.received
    import numpy as np
    from jax.experimental import multihost_utils

    names = [sig.name for sig in HANDLED]
    mine = np.int32(names.index(self.received) + 1 if self.received else 0)
    got = int(np.max(multihost_utils.process_allgather(mine)))
    return names[got - 1] if got else None


def _say(line: str) -> None:
  try:
    os.write(sys.stderr.fileno(), f"\n{line}\n".encode())
  except (AttributeError, OSError, ValueError):  # no file descriptor (a captured stream)
    print(f"\n{line}", file=sys.stderr, flush=True)
