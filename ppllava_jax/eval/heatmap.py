"""Relevance heat-maps as pictures: one tile per frame, optionally over the frames, and
optionally the colour bar that reads them.

Colours share one scale across all frames of a video, so a bright tile in frame 3
and one in frame 20 mean the same relevance. The scale runs from the video's lowest
value to its highest (not a fixed range: an untrained scorer's cosines span a few
hundredths); the colour bar says which values those are.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# Anchors of a perceptually ordered dark-to-bright map (close to matplotlib's
# "inferno"), interpolated linearly; kept here to avoid a plotting dependency.
_ANCHORS = np.array(
  [
    [0, 0, 4],
    [40, 11, 84],
    [101, 21, 110],
    [159, 42, 99],
    [212, 72, 66],
    [245, 125, 21],
    [250, 193, 39],
    [252, 255, 164],
  ],
  np.float32,
)


def colorize(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
  """Maps values to RGB uint8 (..., 3); values at vmin are dark, at vmax bright."""
  scaled = np.clip((np.asarray(values, np.float32) - vmin) / max(vmax - vmin, 1e-12), 0, 1)
  pos = scaled * (len(_ANCHORS) - 1)
  lo = np.minimum(np.floor(pos).astype(int), len(_ANCHORS) - 2)
  frac = (pos - lo)[..., None]
  return np.round(_ANCHORS[lo] * (1 - frac) + _ANCHORS[lo + 1] * frac).astype(np.uint8)


def colorbar(vmin: float, vmax: float, height: int, label: str, bar: int = 12) -> Image.Image:
  """A vertical colour bar ``bar`` pixels wide and ``height`` tall, ``vmax`` at the top and
  ``vmin`` at the bottom, its ends and middle marked with their values, ``label`` above."""
  draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  ticks = [
    (f"{v:.3g}", y)
    for v, y in ((vmax, 0), ((vmin + vmax) / 2, (height - 1) / 2), (vmin, height - 1))
  ]
  width = bar + 8 + max(draw.textlength(t) for t, _ in ticks)
  width = int(max(width, draw.textlength(label)) + 4)
  picture = Image.new("RGB", (width, height + 14), (255, 255, 255))
  draw = ImageDraw.Draw(picture)
  draw.text((0, 1), label, fill=(0, 0, 0))
  ramp_h = colorize(np.linspace(vmax, vmin, height), vmin, vmax)
  picture.paste(Image.fromarray(np.repeat(ramp_h[:, None], bar, axis=1)), (0, 14))
  for text, y in ticks:
    top = 14 + int(round(y))
    draw.line([(bar, top), (bar + 3, top)], fill=(0, 0, 0))
    draw.text((bar + 6, min(max(top - 5, 14), 14 + height - 11)), text, fill=(0, 0, 0))
  return picture


def relevance_grid(
  probs_thw: np.ndarray,
  frames_thwc: np.ndarray | None = None,
  cols: int = 8,
  cell: int = 96,
  alpha: float = 0.6,
  title: str | None = None,
  colorbar_label: str | None = None,
) -> Image.Image:
  """A (rows x cols) grid of per-frame heat-maps of ``probs_thw`` (T, H, W).

  ``frames_thwc`` (T, h, w, 3) uint8, optional: the video frames to draw under the
  maps with opacity ``alpha``. Each tile is labelled with its frame index.
  ``colorbar_label``, optional: a colour bar of the maps' range (``colorbar``) goes to
  the right of the grid, with this label (what the values are, e.g. "cosine").
  """
  probs_thw = np.asarray(probs_thw, np.float32)
  if probs_thw.ndim != 3:
    raise ValueError(f"relevance_grid: probs must be (T, H, W), got shape {probs_thw.shape}")
  if frames_thwc is not None and (frames_thwc.ndim != 4 or len(frames_thwc) != len(probs_thw)):
    raise ValueError(
      f"relevance_grid: frames must be (T, h, w, 3) with T={len(probs_thw)}, "
      f"got shape {frames_thwc.shape}"
    )
  t = len(probs_thw)
  cols = min(cols, t)
  rows = -(-t // cols)
  header = 24 if title else 0
  vmin, vmax = float(probs_thw.min()), float(probs_thw.max())
  bar = (
    None
    if colorbar_label is None
    else colorbar(vmin, vmax, rows * (cell + 14) - 14, colorbar_label)
  )
  grid_w = cols * cell + (0 if bar is None else 8)
  canvas = Image.new(
    "RGB",
    (grid_w + (0 if bar is None else bar.width), rows * (cell + 14) + header),
    (255, 255, 255),
  )
  draw = ImageDraw.Draw(canvas)
  if title:
    draw.text((4, 6), title, fill=(0, 0, 0))
  if bar is not None:
    canvas.paste(bar, (grid_w, header))
  colours = colorize(probs_thw, vmin, vmax)
  for i in range(t):
    tile = Image.fromarray(colours[i]).resize((cell, cell), Image.Resampling.NEAREST)
    if frames_thwc is not None:
      frame = Image.fromarray(np.asarray(frames_thwc[i], np.uint8)).resize((cell, cell))
      tile = Image.blend(frame.convert("RGB"), tile, alpha)
    x, y = (i % cols) * cell, header + (i // cols) * (cell + 14)
    canvas.paste(tile, (x, y + 14))
    draw.text((x + 2, y + 1), f"t={i}", fill=(0, 0, 0))
  return canvas
