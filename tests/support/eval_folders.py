"""What eval.py reads, built in code: a tiny checkpoint with its tokenizer, videos of a
moving circle and one MVBench task file."""

from __future__ import annotations

import json
from pathlib import Path

from ppllava_jax.data.media.video import write_video
from ppllava_jax.data.text.tokenizer import char_tokenizer
from ppllava_jax.models.tiny import TinyConfig, build_tiny
from ppllava_jax.train.run.synthetic import COLOURS, frames


def eval_folder(
  root: Path, tiny: TinyConfig, videos: dict[str, str], task: str, items: list[dict]
) -> Path:
  """``root``/checkpoint (returned), ``root``/videos/<name>.mp4 (a circle of colour
  ``videos[name]`` moving right, 12 frames of 64 x 64: decord 0.6 garbles 48 x 48 H.264)
  and ``root``/tasks/<task>.json holding ``items``."""
  tokenizer = char_tokenizer()
  checkpoint = build_tiny(tiny, len(tokenizer)).save_pretrained(root / "checkpoint")
  tokenizer.save_pretrained(checkpoint)
  (root / "videos").mkdir()
  for name, colour in videos.items():
    write_video(root / "videos" / f"{name}.mp4", frames(COLOURS[colour], "circle", "right", 12, 64))
  (root / "tasks").mkdir()
  (root / "tasks" / f"{task}.json").write_text(json.dumps(items))
  return checkpoint
