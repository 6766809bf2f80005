"""Train PPLLaVA: SFT on mixed image/video/multi-image batches, and DPO.

Not implemented yet (training (SFT, DPO)): prints its help and exits with 2.
"""

import sys

from ppllava_jax.cli import not_implemented

if __name__ == "__main__":
  sys.exit(not_implemented(__doc__.splitlines()[0], "training (SFT, DPO)"))
