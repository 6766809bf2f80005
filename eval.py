"""Evaluate PPLLaVA: one video, MVBench / VideoMME multiple choice, open-ended QA.

A thin CLI over ``ppllava_jax.eval.app`` (``python eval.py --help``).
"""

import sys

from ppllava_jax.eval.app import main

if __name__ == "__main__":
  sys.exit(main())
