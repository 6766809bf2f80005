"""What the top-level CLIs share."""

from __future__ import annotations

import argparse
import sys


def not_implemented(description: str, what: str, argv: list[str] | None = None) -> int:
  """Prints the CLI's help and 'not implemented yet: <what>'; returns exit status 2."""
  parser = argparse.ArgumentParser(description=description)
  parser.parse_args(argv)
  parser.print_help()
  print(f"not implemented yet: {what}", file=sys.stderr)
  return 2
