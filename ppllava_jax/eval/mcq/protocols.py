"""The two scoring protocols: which prompts, prefixes and readers a run uses."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from ppllava_jax.eval.mcq.readers import LMMS_VIDEOMME_EXTRACTORS

LMMS_VIDEOMME_POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
LMMS_VIDEOMME_POST_PROMPT_LLAVA_VID = "The best answer is:"


@dataclasses.dataclass(frozen=True)
class OriginalProtocol:
  """PPLLaVA's scripts (farewellthree/PPLLaVA, commit d5766c8)."""

  mvbench_system: bool = False  # the released script turns it off (prompts.original_mvbench)
  subtitles: bool = False  # VideoMME with subtitles (``--use_subtitles``)

  name: ClassVar[str] = "original"
  max_new_tokens: ClassVar[int] = 200  # greedy, both scripts


@dataclasses.dataclass(frozen=True)
class LmmsEvalProtocol:
  """EvolvingLMMs-Lab/lmms-eval."""

  videomme_extractor: Literal["2024", "2026"] = "2024"
  videomme_post_prompt: str = LMMS_VIDEOMME_POST_PROMPT  # without subtitles only
  subtitles: bool = False  # the ``videomme_w_subtitle`` task

  name: ClassVar[str] = "lmms_eval"
  max_new_tokens: ClassVar[int] = 16  # greedy, both task yamls

  def __post_init__(self):
    if self.videomme_extractor not in LMMS_VIDEOMME_EXTRACTORS:
      raise ValueError(
        f"videomme_extractor must be one of {sorted(LMMS_VIDEOMME_EXTRACTORS)}, "
        f"got {self.videomme_extractor!r}"
      )


PROTOCOLS = (OriginalProtocol.name, LmmsEvalProtocol.name)


def make_protocol(
  name: str, subtitles: bool = False, videomme_extractor: str = "2024"
) -> OriginalProtocol | LmmsEvalProtocol:
  """The scoring protocol called ``name`` (one of ``PROTOCOLS``) with its options."""
  if name == OriginalProtocol.name:
    return OriginalProtocol(subtitles=subtitles)
  if name == LmmsEvalProtocol.name:
    return LmmsEvalProtocol(
      videomme_extractor=videomme_extractor,  # type: ignore[arg-type]  # LmmsEvalProtocol checks it
      subtitles=subtitles,
    )
  raise ValueError(f"unknown protocol {name!r}; expected one of {PROTOCOLS}")


EvalProtocol = OriginalProtocol | LmmsEvalProtocol
