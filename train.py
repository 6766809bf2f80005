"""Train PPLLaVA: SFT on mixed image/video/multi-image batches, and DPO.

Training is not implemented yet, so this prints its help and exits with status 2;
it reads nothing and writes nothing.
"""

import argparse
import sys

from ppllava_jax import cli


def build_parser() -> argparse.ArgumentParser:
  description, epilog = __doc__.split("\n\n", 1)
  parser = argparse.ArgumentParser(description=description, epilog=epilog.strip())
  cli.add_debug_flag(parser)
  return parser


def main(argv: list[str] | None = None) -> int:
  return cli.not_implemented(build_parser(), "training (SFT, DPO)", argv)


if __name__ == "__main__":
  sys.exit(cli.run(main))
