"""Convert Hugging Face checkpoints (LLaVA-NeXT, LLaVA-OneVision, PPLLaVA) to and from ppllava-jax.

Not implemented yet (checkpoint conversion): prints its help and exits with 2.
"""

import sys

from ppllava_jax.cli import not_implemented

if __name__ == "__main__":
  sys.exit(not_implemented(__doc__.splitlines()[0], "checkpoint conversion"))
