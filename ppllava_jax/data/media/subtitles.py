"""VideoMME subtitles: the ``.srt`` lines shown while the sampled frames are.

Reproduces the original's ``load_subtitles`` / ``extract_subtitles`` and the selection
in ``VideoMME_dataset.__getitem__`` (ppllava/test/video_mme/utils.py, lmms-eval's
``videomme_doc_to_text_subtitle`` does the same):

- a cue is ``index / "HH:MM:SS,mmm --> HH:MM:SS,mmm" / text lines``, blocks split on
  blank lines; its text lines are joined with spaces; cues with the same time range
  keep the last one (the original keys a dict by it);
- times become frames as ``int(seconds * fps)``; a cue is picked when a sampled frame
  index ``i`` has ``start <= i < end``;
- the text kept is what stands inside VideoMME's ``<font color="white" size=".72c">``
  tag; a cue without it is dropped, as both originals drop it.

Picked cues come back in file order; the original iterates a Python ``set`` of cue
numbers, which gives that order while the numbers stay below the set's table size.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

from ppllava_jax.data.media.video import MediaError

_FONT = re.compile(r'<font color="white" size=".72c">(.*?)</font>')


@dataclasses.dataclass(frozen=True)
class Cue:
  start: float  # seconds
  end: float
  text: str


def _seconds(stamp: str) -> float:
  hours, minutes, rest = stamp.strip().split(":")
  seconds, millis = rest.split(",")
  return int(hours) * 3600 + int(minutes) * 60 + int(seconds) + int(millis) / 1000


def read_srt(path: str | Path) -> list[Cue]:
  """The cues of an ``.srt`` file, in file order (same time range: the last one)."""
  try:
    content = Path(path).read_text(encoding="utf-8")
  except (OSError, UnicodeDecodeError) as err:
    raise MediaError(path, f"cannot read the subtitles ({err})") from err
  cues: dict[tuple[float, float], str] = {}
  for number, block in enumerate(content.replace("\r\n", "\n").split("\n\n"), 1):
    lines = block.strip("\n").split("\n")
    if len(lines) < 3:
      continue
    try:
      start, end = (_seconds(t) for t in lines[1].split(" --> "))
    except ValueError as err:
      raise MediaError(path, f"subtitle block {number}: bad time line {lines[1]!r}") from err
    cues[(start, end)] = " ".join(lines[2:])
  return [Cue(start, end, text) for (start, end), text in cues.items()]


def lines_at_frames(
  cues: Sequence[Cue], frame_indices: Sequence[int], fps: float
) -> tuple[str, ...]:
  """The text of every cue shown at one of ``frame_indices`` (module doc), in file order."""
  picked = []
  for cue in cues:
    first, stop = int(cue.start * fps), int(cue.end * fps)
    if any(first <= i < stop for i in frame_indices):
      found = _FONT.findall(cue.text)
      if found:
        picked.append(found[0])
  return tuple(picked)
