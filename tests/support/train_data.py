"""Small media, annotation files and a tiny model config for the training-data tests
(their tokenizers: ``support.tokenizers``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from ppllava_jax.data.media.video import write_video as encode
from ppllava_jax.models.clip import CLIPTextConfig, CLIPVisionConfig
from ppllava_jax.models.llm import DecoderConfig
from ppllava_jax.models.ppllava import PoolingConfig, PPLLaVAConfig
from ppllava_jax.models.scorer import ScorerConfig

TILE = 24  # the tower's square: 6 x 6 patches of 4, pooled (1, 3, 3) to 2 x 2 per tile
PINPOINTS = ((TILE, 2 * TILE), (2 * TILE, TILE), (2 * TILE, 2 * TILE))


def tiny_model_config(
  image_token: int, video_token: int = -1, scorer_context: int = 40, mode: str = "ppllava"
) -> PPLLaVAConfig:
  """6 x 6 patches, (2, 3, 3) video / (1, 3, 3) image pooling: a 4-frame video is
  2 x 2 x 2 = 8 tokens, a multi-image picture 4, an anyres image 4 + h*w + h."""
  return PPLLaVAConfig(
    vision=CLIPVisionConfig(
      hidden_size=16,
      intermediate_size=32,
      num_hidden_layers=1,
      num_attention_heads=2,
      image_size=TILE,
      patch_size=4,
    ),
    text=DecoderConfig(
      vocab_size=1000,
      hidden_size=16,
      intermediate_size=32,
      num_hidden_layers=1,
      num_attention_heads=2,
      num_key_value_heads=1,
      head_dim=8,
      max_position_embeddings=512,
      eos_token_id=(2,),
      pad_token_id=0,
    ),
    image_token_index=image_token,
    video_token_index=video_token,
    grid_pinpoints=PINPOINTS,
    pooling=PoolingConfig(mode),
    scorer=ScorerConfig(
      text=CLIPTextConfig(
        vocab_size=600,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=scorer_context,
        eos_token_id=1,
        bos_token_id=0,
        pad_token_id=1,
      ),
      vision_width=16,
      projection_dim=8,
    ),
  )


def write_video(path: Path, num_frames: int = 12, size=(20, 28), step: int = 20) -> Path:
  """Frame i is flat grey ``step * i`` (lossless H.264), so a frame tells its index."""
  return encode(
    path,
    (np.full((*size, 3), min(255, step * i), np.uint8) for i in range(num_frames)),
    rate=10,
    pix_fmt="yuv444p",
    qp="0",
  )


def write_image(path: Path, size=(30, 50), value: int = 128) -> Path:
  Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)
  return path


def write_numbered_frames(folder: Path, count: int, size=(16, 16), step: int = 10) -> Path:
  """``000001.jpg`` ... (1-based, as the original's frame folders): file n is grey
  ``step * (n - 1)``."""
  folder.mkdir(parents=True, exist_ok=True)
  for n in range(1, count + 1):
    Image.fromarray(np.full((*size, 3), step * (n - 1), np.uint8)).save(
      folder / f"{n:06d}.jpg", quality=100
    )
  return folder


def write_json(path: Path, records) -> Path:
  path.write_text(json.dumps(records))
  return path
