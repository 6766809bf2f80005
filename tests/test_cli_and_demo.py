import dataclasses
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


def test_train_cli_says_it_is_not_implemented_and_exits_2():
  done = subprocess.run([sys.executable, str(ROOT / "train.py")], capture_output=True, text=True,
                        cwd=ROOT, check=False)
  assert done.returncode == 2
  assert done.stdout.startswith("usage:")
  assert "not implemented yet: training" in done.stderr


def test_demo_runs_the_pipeline_and_saves_a_loadable_checkpoint(tmp_path, capsys):
  from ppllava_jax import demo
  from ppllava_jax.models.ppllava import PPLLaVA
  (tmp_path / "small.py").write_text(
      "from ppllava_jax.demo import DemoConfig\n"
      f"def get_config():\n  return DemoConfig(**{SMALL!r})\n")
  demo.main(["--config", str(tmp_path / "small.py"), "--out", str(tmp_path / "out")])
  out = capsys.readouterr().out
  # 8 frames of 8x8 patches; (2,3,3) windows: 4 x 2 x 2 (a spatial remainder of 2 dropped)
  assert "visual tokens: 512 (8, 8, 8) -> 16 (4, 2, 2)" in out
  assert "RANDOM weights" in out and "NOT an answer" in out
  assert "vision tower" in out and "warm" in out
  picture = Image.open(tmp_path / "out" / "relevance.png")
  assert picture.size[0] == 8 * 96
  again = PPLLaVA.from_pretrained(tmp_path / "out" / "checkpoint")
  assert again.cfg.scorer is not None and again.cfg.video_token_index == -1


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
