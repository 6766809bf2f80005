import numpy as np
import pytest

from ppllava_jax.eval.heatmap import colorize, relevance_grid


def test_colorize_is_monotone_in_brightness():
  rgb = colorize(np.linspace(0, 1, 50), 0.0, 1.0).astype(float)
  luminance = rgb @ np.array([0.299, 0.587, 0.114])
  assert (np.diff(luminance) >= -1e-9).all()
  assert tuple(colorize(np.array([0.0, 1.0]), 0, 1)[0]) == (0, 0, 4)
  assert tuple(colorize(np.array([0.0, 1.0]), 0, 1)[1]) == (252, 255, 164)


def test_grid_puts_the_hottest_patch_where_it_is():
  probs = np.zeros((5, 4, 4), np.float32)
  probs[3, 2, 1] = 1.0  # frame 3, row 2, column 1
  img = np.asarray(relevance_grid(probs, cols=3, cell=40))
  assert img.shape == (2 * (40 + 14), 3 * 40, 3)
  # Frame 3 is row 1, column 0 of the grid; patch (2, 1) covers a 10x10 block there.
  tile_top = 1 * (40 + 14) + 14
  block = img[tile_top + 20 : tile_top + 30, 10:20]
  assert (block == (252, 255, 164)).all()
  others = img[tile_top : tile_top + 40, 0:40].reshape(-1, 3)
  assert (others == (252, 255, 164)).all(axis=1).sum() == 100  # only that block is bright


def test_grid_blends_frames_and_checks_shapes():
  probs = np.random.default_rng(0).random((2, 3, 3))
  frames = np.full((2, 30, 30, 3), 255, np.uint8)
  img = relevance_grid(probs, frames, cell=30, alpha=0.5, title="t")
  assert img.size == (60, 24 + 30 + 14)
  with pytest.raises(ValueError, match=r"frames must be \(T, h, w, 3\) with T=2"):
    relevance_grid(probs, frames[:1])
  with pytest.raises(ValueError, match=r"probs must be \(T, H, W\)"):
    relevance_grid(probs[0])
