"""Open-ended questions: a JSON Lines file of ``{"id", "video", "question"}`` objects,
checked whole before anything runs; errors read ``<path>:<line>: <problem>``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ppllava_jax.files import DataFileError, read_jsonl


@dataclasses.dataclass(frozen=True)
class QAItem:
  id: str  # the row's "id", else its line number
  video: str  # relative to the video root
  question: str


def load_qa(path: str | Path) -> list[QAItem]:
  items: list[QAItem] = []
  lines: dict[str, int] = {}  # id -> the line that gave it first
  for number, row in read_jsonl(path, expect=dict):
    for name in ("video", "question"):
      if not isinstance(row.get(name), str) or not row[name].strip():
        raise DataFileError(
          path, f"field {name!r} must be a non-blank string, got {row.get(name)!r:.60}", number
        )
    item_id = row.get("id", number)
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)):
      raise DataFileError(
        path, f"field 'id' must be a string or an integer, got {item_id!r:.60}", number
      )
    item_id = str(item_id)
    if item_id in lines:
      raise DataFileError(path, f"id {item_id!r} is already used on line {lines[item_id]}", number)
    lines[item_id] = number
    items.append(QAItem(item_id, row["video"], row["question"]))
  return items
