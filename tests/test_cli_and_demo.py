import argparse
import dataclasses
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from ppllava_jax.config import load_config
from ppllava_jax.demo import DemoConfig

ROOT = Path(__file__).resolve().parents[1]


SMALL = dict(frames=8, image_size=112, patch_size=14, vision_width=32, vision_layers=1,
             llm_width=64, llm_layers=1, text_width=32, text_layers=1, max_new_tokens=4,
             video_frames=16, video_size=64)


def test_train_cli_without_arguments_prints_usage_and_exits_2():
  done = subprocess.run([sys.executable, str(ROOT / "train.py")], capture_output=True, text=True,
                        cwd=ROOT, check=False)
  assert done.returncode == 2
  assert done.stderr.startswith("usage:") and "--config" in done.stderr


def test_demo_module_runs_with_a_config_file_and_saves_a_loadable_checkpoint(tmp_path):
  """As the README runs it, ``python -m ppllava_jax.demo --config FILE``, with a config
  file that imports DemoConfig from ppllava_jax.demo, as configs/demo.py does (the class
  the file builds must be the one the demo checks against)."""
  from ppllava_jax.models.ppllava import PPLLaVA
  (tmp_path / "small.py").write_text(
      "from ppllava_jax.demo import DemoConfig\n"
      f"def get_config():\n  return DemoConfig(**{SMALL!r})\n")
  done = subprocess.run([sys.executable, "-m", "ppllava_jax.demo", "--config",
                         str(tmp_path / "small.py"), "--out", str(tmp_path / "out")],
                        capture_output=True, text=True, cwd=ROOT, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  out = done.stdout
  # 8 frames of 8x8 patches; (2,3,3) windows: 4 x 2 x 2 (a spatial remainder of 2 dropped)
  assert "visual tokens: 512 (8, 8, 8) -> 16 (4, 2, 2)" in out
  assert "RANDOM weights" in out and "NOT an answer" in out
  assert "vision tower" in out and "warm" in out
  picture = Image.open(tmp_path / "out" / "relevance.png")
  assert picture.size[0] == 8 * 96
  again = PPLLaVA.from_pretrained(tmp_path / "out" / "checkpoint")
  assert again.cfg.scorer is not None and again.cfg.video_token_index == -1


def _is_sentence(text: str) -> bool:
  text = " ".join(text.split())
  return text[:1].isupper() and text.endswith(".")


@pytest.mark.parametrize("script", ["convert.py", "train.py"])
def test_cli_help_is_whole_sentences_and_says_where_output_goes(script):
  parser = runpy.run_path(str(ROOT / script))["build_parser"]()
  helps = [a.help for a in parser._actions if not isinstance(a, argparse._HelpAction)]
  assert helps and all(_is_sentence(h) for h in helps), helps
  assert _is_sentence(parser.description)
  epilog = parser.epilog.split("\n\n")[-1]  # after convert.py's usage lines
  assert _is_sentence(epilog) and "writes" in epilog, epilog


def test_load_config_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="config file not found"):
    load_config(tmp_path / "missing.py")
  (tmp_path / "empty.py").write_text("x = 1\n")
  with pytest.raises(ValueError, match="defines no get_config"):
    load_config(tmp_path / "empty.py")
  (tmp_path / "wrong.py").write_text("def get_config():\n  return 3\n")
  with pytest.raises(TypeError, match="returned int, expected DemoConfig"):
    load_config(tmp_path / "wrong.py", DemoConfig)
  cfg = load_config(ROOT / "configs" / "demo.py", DemoConfig)
  assert dataclasses.asdict(cfg) == dataclasses.asdict(DemoConfig())
