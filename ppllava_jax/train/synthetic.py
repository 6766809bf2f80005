"""A synthetic video-QA set whose answers can be read from the pixels.

Each video is one coloured shape (red / green / blue circle or square) moving left,
right, up or down across a grey field (H.264, PyAV); its record, in the original's
``qa`` format, asks three questions: the colour, the shape, the direction. The set is a
function of ``SyntheticConfig`` alone, written once into ``folder`` (``train.json``,
``eval.json`` with ``eval_videos`` other videos, and ``videos/``); an existing complete set
is reused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ppllava_jax.data.video import write_video
from ppllava_jax.train.run_config import SyntheticConfig

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}
SHAPES = ("circle", "square")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def frames(colour, shape: str, direction: str, count: int, size: int):
  """The ``count`` (size, size, 3) frames of one shape crossing the middle of the field."""
  yy, xx = np.mgrid[:size, :size]
  dx, dy = DIRECTIONS[direction]
  r = size // 8
  for i in range(count):
    t = 0.2 + 0.6 * i / max(1, count - 1)
    cx = int(size * (t if dx > 0 else 1 - t if dx < 0 else 0.5))
    cy = int(size * (t if dy > 0 else 1 - t if dy < 0 else 0.5))
    frame_hwc = np.full((size, size, 3), 96, np.uint8)
    if shape == "circle":
      frame_hwc[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = colour
    else:
      frame_hwc[max(0, cy - r):cy + r, max(0, cx - r):cx + r] = colour
    yield frame_hwc


def generate(cfg: SyntheticConfig, folder: str | Path) -> Path:
  """Writes (or reuses) the set in ``folder``; returns the training annotation file."""
  folder = Path(folder)
  if cfg.eval_videos:
    _write(folder, "eval", cfg.eval_videos, cfg.seed + 1, cfg)
  return _write(folder, "train", cfg.videos, cfg.seed, cfg)


def _write(folder: Path, split: str, count: int, seed: int, cfg: SyntheticConfig) -> Path:
  annotation = folder / f"{split}.json"
  if annotation.is_file():
    return annotation
  (folder / "videos").mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  records = []
  for i in range(count):
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    name = f"{i:04d}.mp4" if split == "train" else f"{split}_{i:04d}.mp4"
    write_video(folder / "videos" / name,
                frames(COLOURS[colour], shape, direction, cfg.frames, cfg.size))
    records.append({"video": name, "QA": [
        {"q": "What colour is the shape?", "a": colour},
        {"q": "Is it a circle or a square?", "a": shape},
        {"q": "Which way does it move?", "a": direction}]})
  tmp = annotation.with_suffix(".tmp")
  tmp.write_text(json.dumps(records, indent=1))
  tmp.rename(annotation)  # last: a killed generation is redone
  return annotation
