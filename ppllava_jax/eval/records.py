"""``predictions.jsonl``: one JSON record per finished job, appended as answers come.

``{"id", "fingerprint", "status": "ok", "prediction", "prompt", "frame_indices"}`` or
``{"id", "fingerprint", "status": "failed", "error"}``. Records are only ever appended:
answers made under other settings stay in the file, and a rerun with those settings
reuses them again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TextIO

from ppllava_jax.files import cut_torn_last_line

log = logging.getLogger(__name__)


def read_records(path: str | Path) -> list[dict]:
  """Every readable record, in file order; unreadable lines are skipped with a warning."""
  path = Path(path)
  records = []
  if path.exists():
    for number, line in enumerate(path.read_text().splitlines(), 1):
      if line.strip():
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError as err:  # a run killed mid-write leaves a torn line
          log.warning("%s:%d: skipped an unreadable line (%s)", path, number, err)
  return records


def count_answers(path: str | Path) -> int:
  """Distinct answers (id and fingerprint) the file holds."""
  return len(
    {(r.get("id"), r.get("fingerprint")) for r in read_records(path) if r.get("status") == "ok"}
  )


def open_for_append(path: str | Path) -> TextIO:
  """``path`` opened to append records, after cutting off a torn last line (a run killed
  mid-write): appended to it, the next record would be glued onto it and lost."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if path.exists():
    cut_torn_last_line(path)
  return open(path, "a")


def append(out: TextIO, record: dict) -> None:
  out.write(json.dumps(record) + "\n")
  out.flush()  # a killed run keeps every finished answer
