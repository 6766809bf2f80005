"""What the top-level CLIs share: the error path (user errors as one line, exit codes).

Each CLI's ``__main__`` block is ``sys.exit(cli.run(main))``, and its parser declares
``--debug`` with ``add_debug_flag``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

DEBUG_FLAG = "--debug"

# Errors users cause: bad values and files (CheckpointError, DataFileError and
# json.JSONDecodeError are ValueErrors) and paths (FileNotFoundError, PermissionError).
# Anything else is a bug, and its traceback is what a report needs.
USER_ERRORS = (ValueError, OSError)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(DEBUG_FLAG, action="store_true", help="Show the full traceback on errors.")


def run(
  main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None
) -> int:
  """Runs ``main(argv)`` and returns its exit status (None counts as 0). A user error
  prints as ``error: <message>`` on stderr and returns 2; with ``--debug`` in the
  arguments (``sys.argv[1:]`` when ``argv`` is None) it propagates, traceback and all.
  A Ctrl-C that the program does not handle itself (while weights load, say) prints one
  line and returns 130, as a shell reports it."""
  try:
    return main(argv) or 0
  except KeyboardInterrupt:
    if DEBUG_FLAG in (sys.argv[1:] if argv is None else argv):
      raise
    print("\ninterrupted", file=sys.stderr)
    return 130
  except USER_ERRORS as err:
    if DEBUG_FLAG in (sys.argv[1:] if argv is None else argv):
      raise
    print(f"error: {err}", file=sys.stderr)
    return 2
