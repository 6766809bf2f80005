"""The prompt each (benchmark, protocol) cell gives an item: the user turn's text, the
answer prefix and the relevance scorer's text.

Scorer text: the question and its options, as the original passes it
(``processor(prompt, question, video)``): no system sentence, instruction, subtitles or
prefix. lmms-eval has no such input; there it is the same block in lmms-eval's own
option format.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from ppllava_jax.eval.mcq.items import LETTERS, Item, MVBenchItem, VideoMMEItem
from ppllava_jax.eval.mcq.protocols import EvalProtocol, LmmsEvalProtocol, OriginalProtocol

MVBENCH_SYSTEM = (
  "Carefully watch the video and pay attention to the cause and sequence of events, the "
  "detail and movement of objects, and the action and pose of persons. Based on your "
  "observations, select the best option that accurately addresses the question.\n"
)
VIDEOMME_INSTRUCTION = (
  "Select the best answer to the following multiple-choice question based on the video "
  "and the subtitles. Respond with only the letter (A, B, C, or D) of the correct option."
)


class McqPrompt(NamedTuple):
  """What the runner needs for one item; a tuple, so it unpacks."""

  question: str  # the user turn's text, before the chat template wraps it
  answer_prefix: str  # prefilled after the assistant tag
  scorer_text: str  # the relevance scorer's text input


def numpy_array_text(strings: Sequence[str], line_width: int = 75) -> str:
  """``str(numpy.array(strings))`` for a 1-D string array (<= 1000 items, default print
  options), as the original prints VideoMME options.

  NumPy writes each element's ``repr`` separated by spaces inside brackets and wraps
  before an element that would pass ``line_width - 1`` columns (one kept for ``]``),
  unless the line holds no element yet; continuation lines are indented by one space.
  """
  lines, line = [], " "
  for index, word in enumerate(repr(s) for s in strings):
    if index:
      line += " "
    if len(line) + len(word) > line_width - 1 and len(line) > 1:
      lines.append(line.rstrip())
      line = " "
    line += word
  lines.append(line)
  return "[" + "\n".join(lines)[1:] + "]"


def _lettered(candidates: Sequence[str]) -> str:
  return "".join(f"({LETTERS[i]}) {c}\n" for i, c in enumerate(candidates))


def original_mvbench(item: MVBenchItem, protocol: OriginalProtocol) -> McqPrompt:
  """``test/mvbench/utils.py`` ``qa_template`` and ``mv_bench_infer_mp.py``:
  ``Question: {q}\\nOptions:\\n(A) ...`` (right-stripped), then ``\\nOnly give the best
  option.``; the answer is prefilled ``Best option:(``. The released script passes
  ``--system_llm``, a ``store_false`` flag, so the system sentence is *off* by default
  here too (``mvbench_system``); when on it is prepended to the question text, not put
  in a system slot."""
  block = f"Question: {item.question}\nOptions:\n{_lettered(item.candidates)}".rstrip()
  system = MVBENCH_SYSTEM if protocol.mvbench_system else ""
  return McqPrompt(f"{system}{block}\nOnly give the best option.", "Best option:(", block)


def lmms_mvbench(item: MVBenchItem, protocol: LmmsEvalProtocol) -> McqPrompt:
  """``tasks/mvbench/utils.py`` (since af395ae1, unchanged at 75571cfe):
  ``Question:{q}\\nOption:\\n(A) ...\\nOnly give the best option.\\n``, no prefix."""
  block = f"Question:{item.question}\nOption:\n{_lettered(item.candidates)}"
  return McqPrompt(block + "Only give the best option.\n", "", block.rstrip())


def original_videomme(item: VideoMMEItem, protocol: OriginalProtocol) -> McqPrompt:
  """``test/video_mme/utils.py`` and ``videomme_infer.py``: ``{system}\\n{question}\\n
  {options}``, the options printed as the text of the NumPy array pandas gives
  (``numpy_array_text``); subtitles (lines joined by spaces) put before as ``This
  video's subtitles are listed below: {subs} \\n`` when non-empty; answer prefix ``The
  best answer is:``."""
  block = f"{item.question}\n{numpy_array_text(item.options)}"
  subtitles = " ".join(item.subtitles or ()) if protocol.subtitles else ""
  head = f"This video's subtitles are listed below: {subtitles} \n" if subtitles else ""
  return McqPrompt(f"{head}{VIDEOMME_INSTRUCTION}\n{block}", "The best answer is:", block)


def lmms_videomme(item: VideoMMEItem, protocol: LmmsEvalProtocol) -> McqPrompt:
  """``tasks/videomme/utils.py`` and its yaml: ``{instruction}\\n{question}\\n{options
  one per line}\\n{post_prompt}`` (post prompt of the ``default`` model kwargs unless
  given), or with subtitles ``This video's subtitles are listed below: \\n{lines joined
  by newlines, or "No subtitles available"}\\n...\\nThe best answer is:``."""
  block = item.question + "\n" + "\n".join(item.options)
  if not protocol.subtitles:
    return McqPrompt(f"{VIDEOMME_INSTRUCTION}\n{block}\n{protocol.videomme_post_prompt}", "", block)
  subtitles = "No subtitles available" if item.subtitles is None else "\n".join(item.subtitles)
  return McqPrompt(
    f"This video's subtitles are listed below: \n{subtitles}\n"
    f"{VIDEOMME_INSTRUCTION}\n{block}\nThe best answer is:",
    "",
    block,
  )


# each function takes the (item, protocol) types of its key: Any, as no one type says so
PROMPTS: dict[tuple[type, type], Callable[[Any, Any], McqPrompt]] = {
  (MVBenchItem, OriginalProtocol): original_mvbench,
  (MVBenchItem, LmmsEvalProtocol): lmms_mvbench,
  (VideoMMEItem, OriginalProtocol): original_videomme,
  (VideoMMEItem, LmmsEvalProtocol): lmms_videomme,
}


def build_prompt(item: Item, protocol: EvalProtocol) -> McqPrompt:
  """The question text, answer prefix and scorer text ``protocol`` gives ``item``."""
  return PROMPTS[type(item), type(protocol)](item, protocol)
