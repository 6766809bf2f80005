"""read_json / read_jsonl: every way a data file can be bad is one DataFileError that
names the file and, where there is one, the line."""

import pytest

from ppllava_jax.files import DataFileError, read_json, read_jsonl


def test_read_json(tmp_path):
  (tmp_path / "ok.json").write_text('{"a": [1, 2]}')
  assert read_json(tmp_path / "ok.json") == {"a": [1, 2]}
  assert read_json(tmp_path / "ok.json", expect=dict) == {"a": [1, 2]}
  cases = {
    "syntax.json": (
      '{\n  "a": 1\n  "b": 2\n}',
      r":3: invalid JSON: Expecting ',' delimiter \(column 3\)",
    ),
    "empty.json": ("", r": the file is empty, expected JSON"),
    "list.json": ("[1]", r": expected a JSON object, found an array"),
  }
  for name, (text, problem) in cases.items():
    (tmp_path / name).write_text(text)
    with pytest.raises(DataFileError, match=f"^{tmp_path / name}{problem}") as err:
      read_json(tmp_path / name, expect=dict)
    assert isinstance(err.value, ValueError) and err.value.path == tmp_path / name
  (tmp_path / "latin1.json").write_bytes(b'{"a":\n "caf\xe9"}')
  with pytest.raises(DataFileError, match=r"latin1.json:2: not UTF-8 text"):
    read_json(tmp_path / "latin1.json")
  with pytest.raises(DataFileError, match=r"missing.json: cannot be read: No such file"):
    read_json(tmp_path / "missing.json")
  with pytest.raises(DataFileError, match=rf"^{tmp_path}: cannot be read: Is a directory"):
    read_json(tmp_path)


def test_read_jsonl(tmp_path):
  path = tmp_path / "qa.jsonl"
  path.write_text('{"id": 1}\n\n  \n{"id": 2}\n')
  assert read_jsonl(path, expect=dict) == [(1, {"id": 1}), (4, {"id": 2})]  # blank lines skipped
  path.write_text('{"id": 1}\n{"id": 2}\n{"id": 3, }\n')
  with pytest.raises(DataFileError, match=r"qa.jsonl:3: invalid JSON: .* \(column 11\)") as err:
    read_jsonl(path)
  assert err.value.line == 3
  path.write_text('{"id": 1}\n[2]\n')
  with pytest.raises(DataFileError, match=r"qa.jsonl:2: expected a JSON object, found an array"):
    read_jsonl(path, expect=dict)
  path.write_text("")
  assert read_jsonl(path) == []
