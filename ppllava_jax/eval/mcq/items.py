"""MVBench and VideoMME items: typed, loaded from their files with errors that name
the file, the item and the field (``McqDataError``; a JSON or JSONL file that cannot be
read, is not JSON or not a list: ``files.DataFileError``, naming the file and line)."""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ppllava_jax.files import read_json, read_jsonl

LETTERS = string.ascii_uppercase
DURATIONS = ("short", "medium", "long")


class McqDataError(ValueError):
  """A benchmark file that cannot be read as items; the message names file, item, field."""


@dataclasses.dataclass(frozen=True)
class MVBenchItem:
  task: str
  video: str  # relative to the task's video folder
  question: str
  candidates: tuple[str, ...]
  answer: str  # the text of one candidate
  # Clip bounds in seconds; the original reads them only for its "bound" tasks
  # (action sequence/prediction/localization, object interaction, episodic reasoning).
  start: float | None = None
  end: float | None = None


@dataclasses.dataclass(frozen=True)
class VideoMMEItem:
  video_id: str  # ``videoID``: the video file's stem
  duration: str  # short | medium | long
  question: str
  options: tuple[str, ...]  # "A. ...", as in the dataset
  answer: str  # a letter
  question_id: str | None = None
  task_type: str | None = None
  domain: str | None = None
  sub_category: str | None = None
  # Subtitle lines picked for the sampled frames, in order (each protocol joins them its
  # way); None: the video has no subtitle file.
  subtitles: tuple[str, ...] | None = None


Item = MVBenchItem | VideoMMEItem


def _records(path: Path) -> Iterator[tuple[str, Any]]:
  """(where, record) for a JSON list, JSON Lines or Parquet file; the JSON ones are read
  whole by ``files.read_json`` / ``read_jsonl`` (their errors: ``path:line: problem``)."""
  if path.suffix == ".jsonl":
    return ((f"line {number}", record) for number, record in read_jsonl(path))
  if path.suffix == ".json":
    return ((f"item {i}", record) for i, record in enumerate(read_json(path, expect=list)))
  if path.suffix != ".parquet":
    raise McqDataError(
      f"{path}: unknown format {path.suffix!r}; expected .json, .jsonl or .parquet"
    )
  try:
    import pyarrow.parquet as pq  # installed with tensorflow-datasets; only needed here
  except ImportError:
    raise McqDataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
  try:
    rows = pq.read_table(path).to_pylist()
  except OSError as err:
    raise McqDataError(f"{path}: cannot be read ({err})") from None
  return ((f"item {i}", row) for i, row in enumerate(rows))


class _Fields:
  """Typed access to one record's fields, errors naming the file, item and field."""

  def __init__(self, path: Path, where: str, record: Any):
    if not isinstance(record, Mapping):
      raise McqDataError(f"{path}: {where}: expected an object, got {type(record).__name__}")
    self.path, self.where, self.record = path, where, record

  def error(self, name: str, problem: str) -> McqDataError:
    return McqDataError(f"{self.path}: {self.where}: field {name!r} {problem}")

  def get(self, name: str, kind: type | tuple[type, ...], required: bool = True) -> Any:
    value = self.record.get(name)
    if value is None:
      if required:
        raise self.error(name, "is missing")
      return None
    if not isinstance(value, kind) or isinstance(value, bool):
      names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
      raise self.error(name, f"must be {names}, got {type(value).__name__} {value!r:.60}")
    return value

  def strings(self, name: str, required: bool = True) -> tuple[str, ...] | None:
    value = self.get(name, (list, tuple), required)
    if value is None:
      return None
    if not all(isinstance(v, str) for v in value):
      raise self.error(name, "must be a list of strings")
    return tuple(value)

  def options(self, name: str) -> tuple[str, ...]:
    value = self.strings(name)
    assert value is not None  # required: strings() raised if it is missing
    if not 1 <= len(value) <= len(LETTERS):
      raise self.error(name, f"must hold 1 to {len(LETTERS)} options, got {len(value)}")
    return value


def load_mvbench(path: str | Path, task: str | None = None) -> list[MVBenchItem]:
  """One MVBench task file (a JSON list of ``{video, question, candidates, answer}``),
  or every ``*.json`` of a folder; the task name is the file's stem unless given.

  Items come file by file (files sorted by name), each file's in its order.
  """
  path = Path(path)
  if path.is_dir():
    files = sorted(path.glob("*.json"))
    if not files:
      raise McqDataError(f"{path}: no *.json task files")
    return [item for file in files for item in load_mvbench(file, task)]
  items = []
  for where, record in _records(path):
    fields = _Fields(path, where, record)
    candidates, answer = fields.options("candidates"), fields.get("answer", str)
    if answer not in candidates:
      raise fields.error("answer", f"{answer!r:.60} is not one of the candidates")
    items.append(
      MVBenchItem(
        task=task or path.stem,
        video=fields.get("video", str),
        question=fields.get("question", str),
        candidates=candidates,
        answer=answer,
        start=fields.get("start", (int, float), required=False),
        end=fields.get("end", (int, float), required=False),
      )
    )
  return items


def load_videomme(path: str | Path) -> list[VideoMMEItem]:
  """VideoMME question rows (``videoID, duration, question, options, answer`` and
  optionally ``question_id, task_type, domain, sub_category, subtitles``) from JSON,
  JSON Lines or the official Parquet file (needs pyarrow)."""
  path = Path(path)
  items = []
  for where, record in _records(path):
    fields = _Fields(path, where, record)
    duration, options = fields.get("duration", str), fields.options("options")
    if duration not in DURATIONS:
      raise fields.error("duration", f"must be one of {DURATIONS}, got {duration!r}")
    answer = fields.get("answer", str)
    if answer not in LETTERS[: len(options)]:
      raise fields.error(
        "answer", f"must be a letter A-{LETTERS[len(options) - 1]}, got {answer!r:.60}"
      )
    subtitles = record.get("subtitles")
    items.append(
      VideoMMEItem(
        video_id=fields.get("videoID", str),
        duration=duration,
        question=fields.get("question", str),
        options=options,
        answer=answer,
        question_id=fields.get("question_id", str, required=False),
        task_type=fields.get("task_type", str, required=False),
        domain=fields.get("domain", str, required=False),
        sub_category=fields.get("sub_category", str, required=False),
        subtitles=(subtitles,)
        if isinstance(subtitles, str)
        else fields.strings("subtitles", required=False),
      )
    )
  return items
