"""Multiple-choice video benchmarks (MVBench, VideoMME): items, prompts and scorers.

A protocol is a prompt builder, an answer prefix and a scorer, reproduced exactly,
quirks included, because each changes published numbers. Each (benchmark, protocol)
cell is one function in ``prompts`` and one in ``scoring``, whose docstring cites the
source and names the quirks it reproduces:

- ``OriginalProtocol``: PPLLaVA's scripts (farewellthree/PPLLaVA, commit d5766c8;
  ``test/mvbench/``, ``test/video_mme/``);
- ``LmmsEvalProtocol``: EvolvingLMMs-Lab/lmms-eval (``tasks/mvbench/utils.py``,
  ``tasks/videomme/utils.py`` and their yaml files; commits named per function).

Modules: ``items`` (typed items and their loaders), ``protocols``, ``prompts``,
``readers`` (the answer readers of both sources) and ``scoring``.
"""

from ppllava_jax.eval.mcq.items import (
  DURATIONS,
  LETTERS,
  Item,
  McqDataError,
  MVBenchItem,
  VideoMMEItem,
  load_mvbench,
  load_videomme,
)
from ppllava_jax.eval.mcq.prompts import (
  MVBENCH_SYSTEM,
  VIDEOMME_INSTRUCTION,
  McqPrompt,
  build_prompt,
  numpy_array_text,
)
from ppllava_jax.eval.mcq.protocols import (
  LMMS_VIDEOMME_POST_PROMPT,
  LMMS_VIDEOMME_POST_PROMPT_LLAVA_VID,
  PROTOCOLS,
  EvalProtocol,
  LmmsEvalProtocol,
  OriginalProtocol,
  make_protocol,
)
from ppllava_jax.eval.mcq.readers import (
  check_ans,
  lmms_mcq_extract,
  lmms_mcq_read,
  original_videomme_read,
)
from ppllava_jax.eval.mcq.scoring import Outcome, ScoreReport, Tally, score

__all__ = [
  "DURATIONS",
  "LETTERS",
  "Item",
  "McqDataError",
  "MVBenchItem",
  "VideoMMEItem",
  "load_mvbench",
  "load_videomme",
  "MVBENCH_SYSTEM",
  "VIDEOMME_INSTRUCTION",
  "McqPrompt",
  "build_prompt",
  "numpy_array_text",
  "LMMS_VIDEOMME_POST_PROMPT",
  "LMMS_VIDEOMME_POST_PROMPT_LLAVA_VID",
  "EvalProtocol",
  "LmmsEvalProtocol",
  "OriginalProtocol",
  "PROTOCOLS",
  "make_protocol",
  "check_ans",
  "lmms_mcq_extract",
  "lmms_mcq_read",
  "original_videomme_read",
  "Outcome",
  "ScoreReport",
  "Tally",
  "score",
]
