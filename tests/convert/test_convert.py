"""convert.py: transformers folder -> Orbax -> transformers folder, losslessly, with the
tokenizer and processor files."""

import os
import stat
import subprocess
import sys
from pathlib import Path

from support.hf_fixtures import (
  assert_same_state,
  assert_same_tensors,
  make_llava_next_video,
  make_llm,
)
from support.tokenizers import llama_sp_tokenizer

from ppllava_jax import checkpoints
from ppllava_jax.models.pretrained import SIDE_FILES

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args) -> str:
  done = subprocess.run(
    [sys.executable, str(ROOT / "convert.py"), *map(str, args)],
    capture_output=True,
    text=True,
    cwd=ROOT,
    check=False,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def _umask() -> int:
  umask = os.umask(0o077)
  os.umask(umask)
  return umask


def test_llava_next_video_round_trip_through_orbax_with_shards(tmp_path):
  """Weights, config, tokenizer and processor files go to Orbax and back; every written
  file has the mode the umask gives (safetensors alone writes 0o600)."""
  from transformers import AutoTokenizer, LlavaNextVideoForConditionalGeneration

  hf, src = make_llava_next_video(tmp_path / "src")
  llama_sp_tokenizer(src)  # no tokenizer.json: the sentencepiece file must travel
  (src / "preprocessor_config.json").write_text(
    '{"image_processor_type": "LlavaNextImageProcessor"}'
  )
  side = sorted(["tokenizer.model", "tokenizer_config.json", "preprocessor_config.json"])
  out = run_cli("to-orbax", src, tmp_path / "orbax")
  assert "llava_next_video:" in out and "language_model" in out and "vision_tower" in out
  assert (
    f"tokenizer / processor files copied: {', '.join(sorted(side, key=SIDE_FILES.index))}" in out
  )
  counts = checkpoints.parameter_counts(checkpoints.load_hf(src)[0])
  assert f"{sum(counts.values()):,} parameters" in out
  assert sum(counts.values()) == sum(p.numel() for p in hf.parameters())
  run_cli("to-hf", tmp_path / "orbax", tmp_path / "back", "--max-shard-gb", 2e-5)  # ~21 KB shards
  assert len(list((tmp_path / "back").glob("model-*-of-*.safetensors"))) > 1
  assert_same_state(checkpoints.load_hf(src)[0], checkpoints.load_hf(tmp_path / "back")[0])
  back = LlavaNextVideoForConditionalGeneration.from_pretrained(tmp_path / "back").state_dict()
  assert_same_tensors(hf.state_dict(), back)
  for name in side:
    assert (tmp_path / "back" / name).read_bytes() == (src / name).read_bytes(), name
  text = "the red circle falls"
  assert (
    AutoTokenizer.from_pretrained(tmp_path / "back")(text)["input_ids"]
    == AutoTokenizer.from_pretrained(src)(text)["input_ids"]
  )
  modes = {
    str(f.relative_to(tmp_path)): oct(stat.S_IMODE(f.stat().st_mode))
    for folder in ("orbax", "back")
    for f in (tmp_path / folder).rglob("*")
    if f.is_file()
  }
  assert set(modes.values()) == {oct(0o666 & ~_umask())}, modes


def test_tied_qwen2_round_trip(tmp_path):
  _, src = make_llm("qwen2", tmp_path / "src")
  model, hf = checkpoints.load_hf(src)
  checkpoints.save_orbax(model, hf, tmp_path / "orbax")
  again, hf_again = checkpoints.load_orbax(tmp_path / "orbax")
  assert hf_again == hf
  assert_same_state(model, again)
  checkpoints.save_hf(again, hf, tmp_path / "back")
  assert (tmp_path / "back" / "model.safetensors").is_file()
  assert_same_state(model, checkpoints.load_hf(tmp_path / "back")[0])


def test_not_an_orbax_checkpoint(tmp_path):
  import pytest

  from ppllava_jax.convert.loader import CheckpointError

  with pytest.raises(CheckpointError, match="not an Orbax checkpoint"):
    checkpoints.load_orbax(tmp_path)


def test_released_style_onevision_folder_round_trip(tmp_path, caplog):
  """A PPLLaVA Qwen folder whose config.json omits the scorer (as the released ones do)
  converts to Orbax and back; the written config.json then describes the scorer."""
  import json

  from support.hf_fixtures import make_llava_onevision, make_scorer_siglip

  from ppllava_jax.models.ppllava import PPLLaVA

  _, src = make_llava_onevision(tmp_path / "onevision")
  _, sig = make_scorer_siglip(tmp_path / "siglip", google_like=True)
  PPLLaVA.from_pretrained(src, clip=sig).save_pretrained(tmp_path / "released")
  config = json.loads((tmp_path / "released" / "config.json").read_text())
  del config["ppllava_scorer"]
  (tmp_path / "released" / "config.json").write_text(json.dumps(config))
  with caplog.at_level("WARNING"):
    model, hf = checkpoints.load_hf(tmp_path / "released")
  assert "scorer tensors found" in caplog.text and hf["ppllava_scorer"]["kind"] == "siglip"
  checkpoints.save_orbax(model, hf, tmp_path / "orbax")
  again, hf_again = checkpoints.load_orbax(tmp_path / "orbax")
  assert_same_state(model, again)
  checkpoints.save_hf(again, hf_again, tmp_path / "back")
  written = json.loads((tmp_path / "back" / "config.json").read_text())
  assert written["ppllava_scorer"] == hf["ppllava_scorer"]
  assert_same_state(model, PPLLaVA.from_pretrained(tmp_path / "back"))
