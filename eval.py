"""Evaluate PPLLaVA: one video, MVBench / VideoMME multiple choice, open-ended QA.

A thin CLI over ``ppllava_jax.eval.app`` (``python eval.py --help``); errors users
cause print as one ``error: ...`` line with exit status 2 (``--debug``: the traceback).
"""

import sys

from ppllava_jax import cli
from ppllava_jax.eval.app import main

if __name__ == "__main__":
  sys.exit(cli.run(main))
