"""Evaluate PPLLaVA: jitted batch inference, MVBench / VideoMME, open-ended QA.

Not implemented yet (evaluation): prints its help and exits with 2.
"""

import sys

from ppllava_jax.cli import not_implemented

if __name__ == "__main__":
  sys.exit(not_implemented(__doc__.splitlines()[0], "evaluation"))
