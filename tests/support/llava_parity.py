"""Prompts and comparisons shared by the LLaVA-NeXT-Video and OneVision parity tests."""

import jax.numpy as jnp
import numpy as np
import torch

from support.hf_fixtures import LLAVA_IMAGE_TOKEN, LLAVA_VIDEO_TOKEN

TOL = 1e-4  # f32 logits, max-abs-diff


def video_prompt(frames: int, tokens: int, tile: int, seed=0):
  """(1, L) ids holding ``tokens`` video placeholders between text, and a (1, T, 3, tile, tile)
  video."""
  rng = np.random.default_rng(seed)
  ids = np.concatenate(
    [[1], rng.integers(3, 60, 4), [LLAVA_VIDEO_TOKEN] * tokens, rng.integers(3, 60, 5)]
  )[None]
  video = rng.standard_normal((1, frames, 3, tile, tile)).astype(np.float32)
  return ids.astype(np.int64), video


def image_prompt(tokens: int, tile: int, seed=1):
  """(1, L) ids holding ``tokens`` image placeholders, and (1, 5, 3, tile, tile) tiles
  (the most the fixtures' pinpoints need; transformers gets the first ``tiles``)."""
  ids = np.concatenate([[1, 5, 6], [LLAVA_IMAGE_TOKEN] * tokens, [7, 8]])[None].astype(np.int64)
  pixels = np.random.default_rng(seed).standard_normal((1, 5, 3, tile, tile)).astype(np.float32)
  return ids, pixels


def assert_video_logits_match(hf, ours, ids, video):
  with torch.no_grad():
    want = hf(input_ids=torch.from_numpy(ids), pixel_values_videos=torch.from_numpy(video)).logits
  got = ours(jnp.asarray(ids), pixel_values_videos=jnp.asarray(video)).logits
  assert np.abs(np.asarray(got) - want.numpy()).max() <= TOL


def assert_image_logits_match(hf, ours, ids, pixels, size):
  """All 5 tiles go to both: each model keeps the tiles its image size needs."""
  sizes = np.asarray([size])
  with torch.no_grad():
    want = hf(
      input_ids=torch.from_numpy(ids),
      pixel_values=torch.from_numpy(pixels),
      image_sizes=torch.from_numpy(sizes),
    ).logits
  got = ours(jnp.asarray(ids), pixel_values=jnp.asarray(pixels), image_sizes=sizes).logits
  assert np.abs(np.asarray(got) - want.numpy()).max() <= TOL


def assert_generation_matches(hf, ours, ids, new_tokens=20, **media):
  """Greedy tokens from our cached loop equal transformers' ``generate``."""
  with torch.no_grad():
    want = hf.generate(
      input_ids=torch.from_numpy(ids),
      **{k: torch.from_numpy(np.asarray(v)) for k, v in media.items()},
      max_new_tokens=new_tokens,
      do_sample=False,
      pad_token_id=0,
    ).numpy()
  got = np.asarray(
    ours.generate(
      jnp.asarray(ids), **{k: jnp.asarray(v) for k, v in media.items()}, max_new_tokens=new_tokens
    )
  )
  np.testing.assert_array_equal(got[:, : want.shape[1]], want)
