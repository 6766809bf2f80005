"""Reading JSON and JSONL files with errors that name the file and the line.

``json.loads`` says ``Expecting ',' delimiter: line 1 column 58`` without a path;
here every way a file can be bad (missing, unreadable, not UTF-8, empty, invalid
JSON, the wrong top-level type) is one ``DataFileError``, printed ``path:line: problem``
(``path: problem`` when no line applies). It imports nothing of the package, so every
layer (checkpoints, benchmarks, predictions) can use it.

A JSON Lines file that a process appends to (metrics, predictions) can end in a torn line
when the process is killed mid-write; ``cut_torn_last_line`` cuts it off before the file
is read or appended to again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_JSON_TYPES = {
  dict: "object",
  list: "array",
  str: "string",
  bool: "boolean",
  int: "number",
  float: "number",
  type(None): "null",
}


class DataFileError(ValueError):
  """A file that does not hold what it should: ``path``, ``line`` (1-based or None)
  and ``problem``; prints as ``path:line: problem``."""

  def __init__(self, path: str | Path, problem: str, line: int | None = None):
    self.path, self.problem, self.line = Path(path), problem, line
    super().__init__(f"{path}{'' if line is None else f':{line}'}: {problem}")


def _text(path: Path) -> str:
  try:
    raw = path.read_bytes()
  except OSError as err:
    raise DataFileError(path, f"cannot be read: {err.strerror or err}") from err
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as err:
    raise DataFileError(
      path, f"not UTF-8 text (byte 0x{raw[err.start]:02x})", raw.count(b"\n", 0, err.start) + 1
    ) from err


def _parse(path: Path, text: str, expect: type | None, line: int | None = None) -> Any:
  try:
    value = json.loads(text)
  except json.JSONDecodeError as err:
    where = err.lineno if line is None else line
    raise DataFileError(path, f"invalid JSON: {err.msg} (column {err.colno})", where) from err
  if expect is not None and not isinstance(value, expect):
    found = _JSON_TYPES[type(value)]
    raise DataFileError(
      path,
      f"expected a JSON {_JSON_TYPES[expect]}, found {'an' if found[0] in 'ao' else 'a'} {found}",
      line,
    )
  return value


def read_json(path: str | Path, expect: type | None = None) -> Any:
  """The JSON value in ``path``; with ``expect`` (``dict``, ``list``) its top-level type
  is checked too."""
  path = Path(path)
  text = _text(path)
  if not text.strip():
    raise DataFileError(path, "the file is empty, expected JSON")
  return _parse(path, text, expect)


def read_jsonl(path: str | Path, expect: type | None = None) -> list[tuple[int, Any]]:
  """(line number, value) for every non-blank line of the JSON Lines file ``path``,
  each checked against ``expect`` when given. Reads the whole file before returning,
  so a bad line fails before any is used."""
  path = Path(path)
  return [
    (number, _parse(path, line, expect, number))
    for number, line in enumerate(_text(path).splitlines(), 1)
    if line.strip()
  ]


def cut_torn_last_line(path: str | Path) -> int:
  """Cuts off the bytes after the last newline of the file ``path``, with a warning naming
  the file and the bytes dropped; returns how many (0: none). A writer killed mid-write
  leaves its last line without the newline: appended to, the next line would be glued
  onto it, and read, it fails as invalid JSON."""
  path = Path(path)
  data = path.read_bytes()
  if not data or data.endswith(b"\n"):
    return 0
  keep = data.rfind(b"\n") + 1
  log.warning("%s: cut off a torn last line (%d bytes)", path, len(data) - keep)
  with open(path, "r+b") as file:
    file.truncate(keep)
  return len(data) - keep
