import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ppllava_jax.config import load_config
from ppllava_jax.demo import DemoConfig, run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cli, what", [("train.py", "training"), ("eval.py", "evaluation")])
def test_unfinished_clis_say_so_and_exit_2(cli, what):
  done = subprocess.run([sys.executable, str(ROOT / cli)], capture_output=True, text=True,
                        cwd=ROOT, check=False)
  assert done.returncode == 2
  assert done.stdout.startswith("usage:")
  assert f"not implemented yet: {what}" in done.stderr


def test_demo_pools_and_draws(tmp_path):
  cfg = DemoConfig(frames=8, grid=12, embed_dim=32, feature_dim=48)
  stats = run(cfg, tmp_path)
  assert stats["input_tokens"] == 8 * 12 * 12
  assert stats["pooled_shape"] == (4, 4, 4) and stats["pooled_tokens"] == 64
  # The planted target draws most of the relevance though it covers few patches,
  # and relevance-weighted pooling keeps its feature better than plain averaging.
  assert stats["target_relevance_share"] > 0.5 > 5 * stats["target_patch_share"]
  cos = stats["cosine"]
  assert min(cos["weighted_sum"], cos["max"]) > cos["average"] + 0.1
  # The original's softmax of probabilities at temperature 0.01 barely departs from
  # averaging when relevance is spread over many patches (p / 0.01 << 1 here).
  assert abs(cos["softmax"] - cos["average"]) < 0.05
  picture = Image.open(stats["heatmap"])
  assert picture.size[0] == 8 * 96


def test_demo_main_with_the_shipped_config(tmp_path, capsys):
  from ppllava_jax import demo
  demo.main(["--config", str(ROOT / "configs" / "demo.py"), "--out", str(tmp_path)])
  out = capsys.readouterr().out
  assert "visual tokens: 18432 in -> 1024 out (16, 8, 8)" in out
  assert (tmp_path / "relevance.png").is_file()


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
