"""Damaged checkpoint folders, and the CLIs' error path: one message naming the file, what
is wrong and the checkpoint folder; ``error: ...`` and exit status 2, tracebacks with
--debug."""

import json
import re
import runpy
import shutil
import sys
from pathlib import Path

import pytest
from support.hf_fixtures import make_clip, rewrite_checkpoint

from ppllava_jax import cli
from ppllava_jax.convert.loader import CheckpointError
from ppllava_jax.files import DataFileError
from ppllava_jax.models.clip import CLIPModel

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  return make_clip("b", tmp_path_factory.mktemp("clip") / "clip")[1]


def damaged(src: Path, dst: Path, name: str, content: bytes | str) -> Path:
  """A copy of the checkpoint ``src`` whose file ``name`` holds ``content``."""
  shutil.copytree(src, dst)
  (dst / name).write_bytes(content if isinstance(content, bytes) else content.encode())
  return dst


def fails(path: Path) -> str:
  with pytest.raises(CheckpointError) as err:
    CLIPModel.from_pretrained(path)
  return str(err.value)


@pytest.mark.parametrize("how", ["empty", "truncated", "corrupt"])
def test_damaged_safetensors_is_named_with_its_folder(clip, tmp_path, how):
  data = (clip / "model.safetensors").read_bytes()
  content = {"empty": b"", "truncated": data[: len(data) // 2], "corrupt": b"\x07" * 16 + data[16:]}
  bad = damaged(clip, tmp_path / "bad", "model.safetensors", content[how])
  msg = fails(bad)
  assert msg.startswith(
    f"{bad / 'model.safetensors'}: not a readable safetensors file "
    f"({len(content[how]):,} bytes; safetensors: "
  )
  assert msg.endswith(f"it may be truncated or corrupt, so checkpoint {bad} cannot be loaded")


def test_invalid_config_json_is_named_with_line_and_folder(clip, tmp_path):
  bad = damaged(clip, tmp_path / "bad", "config.json", '{"model_type": "clip"\n "x": 1}')
  assert fails(bad) == (
    f"{bad / 'config.json'}:2: invalid JSON: Expecting ',' delimiter "
    f"(column 2); checkpoint {bad} cannot be loaded"
  )
  (bad / "config.json").write_text("")
  assert fails(bad).startswith(f"{bad / 'config.json'}: the file is empty")
  (bad / "config.json").write_text("[]")
  assert fails(bad).startswith(f"{bad / 'config.json'}: expected a JSON object, found an array")


def test_bad_index_is_named(clip, tmp_path):
  index = "model.safetensors.index.json"
  bad = damaged(clip, tmp_path / "bad", index, '{"weight_map": {"a": "model.safetensors",}}')
  assert fails(bad).startswith(f"{bad / index}:1: invalid JSON: Expecting property name")
  (bad / index).write_text(json.dumps({"metadata": {}}))
  assert fails(bad) == (
    f'{bad / index}: no "weight_map" object of tensor names to shard '
    f"files; checkpoint {bad} cannot be loaded"
  )
  (bad / index).write_text(json.dumps({"weight_map": {"a": 3}}))
  assert 'no "weight_map" object of tensor names to shard files' in fails(bad)


def test_missing_tensor_is_named_as_the_checkpoint_spells_it(clip, tmp_path):
  key = "vision_model.encoder.layers.0.mlp.fc1.weight"
  bad = rewrite_checkpoint(clip, tmp_path / "bad", lambda t: t.pop(key))
  msg = fails(bad)
  assert re.search(r"missing .*: 1\n", msg)
  assert f"    {key} (-> vision_model.encoder.layers.0.mlp.fc1.kernel)\n" in msg + "\n"


def test_run_turns_user_errors_into_one_message_and_status_2(capsys):
  def raising(error):
    def main(argv):
      raise error

    return main

  for error in (
    CheckpointError("folder x does not fit"),
    DataFileError("x.json", "bad", 3),
    json.JSONDecodeError("Expecting value", "", 0),
    FileNotFoundError("no file y"),
  ):
    assert cli.run(raising(error), []) == 2
    assert capsys.readouterr().err == f"error: {error}\n"
  with pytest.raises(DataFileError):
    cli.run(raising(DataFileError("x.json", "bad")), ["--debug"])
  with pytest.raises(RuntimeError):  # a bug, not the user's: its traceback shows
    cli.run(raising(RuntimeError("bug")), [])
  assert cli.run(lambda argv: 0, []) == 0 and cli.run(lambda argv: None, []) == 0


def run_script(monkeypatch, script: str, *args) -> int:
  """Runs ``python <script> args`` in this process (its ``__main__`` block included)."""
  monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
  with pytest.raises(SystemExit) as done:
    runpy.run_path(str(ROOT / script), run_name="__main__")
  return done.value.code


def test_convert_prints_the_error_and_exits_2_or_shows_the_traceback_with_debug(
  clip, tmp_path, monkeypatch, capsys
):
  bad = damaged(clip, tmp_path / "bad", "model.safetensors", b"")
  assert run_script(monkeypatch, "convert.py", "to-orbax", bad, tmp_path / "out") == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {bad / 'model.safetensors'}: not a readable safetensors file")
  assert err.count("\n") == 1 and "Traceback" not in err
  with pytest.raises(CheckpointError, match="not a readable safetensors file"):
    run_script(monkeypatch, "convert.py", "to-orbax", bad, tmp_path / "out", "--debug")


def test_eval_cli_prints_the_error_and_exits_2(tmp_path, monkeypatch, capsys):
  """Which check eval.py makes first is its own; what it raises reaches the user as one line."""
  code = run_script(
    monkeypatch,
    "eval.py",
    "--checkpoint",
    tmp_path / "nowhere",
    "--scorer-tokenizer",
    tmp_path / "nowhere",
    "--video",
    tmp_path / "v.mp4",
    "--question",
    "Why?",
  )
  err = capsys.readouterr().err
  assert code == 2 and err.startswith("error: ") and str(tmp_path) in err, err
  assert err.count("\n") == 1 and "Traceback" not in err
