"""A PPLLaVA of the real geometry at tiny widths, built in code from random weights.

``TinyConfig`` is what the demo, ``configs/sft_tiny.py`` and the tests' end-to-end runs
build: CLIP-style patches (336-pixel frames of 14-pixel patches: 24 x 24 per frame by
default), the (2, 3, 3) prompt-guided pooling kernel, a CLIP text scorer extended from 77
to 248 positions, and a LLaMA decoder, each a layer or two of a few dozen channels. The
vocabulary is the caller's (the char tokenizer's: ``data.text.tokenizer.char_tokenizer``), whose
``<image>`` id 4 is the media placeholder and whose bos / eos / pad are 1 / 2 / 0.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from ppllava_jax.models.clip import CLIPTextConfig, CLIPVisionConfig
from ppllava_jax.models.llm import DecoderConfig
from ppllava_jax.models.ppllava import PPLLaVA
from ppllava_jax.models.ppllava_config import PoolingConfig, PPLLaVAConfig
from ppllava_jax.models.scorer import ScorerConfig


@dataclasses.dataclass(frozen=True)
class TinyConfig:
  """frames: the frames a video is sampled to; image_size / patch_size: the vision
  tower's input (image_size // patch_size patches a side); widths and layer counts per
  tower; kernel: the video pooling kernel (t, h, w); seed: the initialisation's."""

  frames: int = 32
  image_size: int = 336
  patch_size: int = 14
  vision_width: int = 64
  vision_layers: int = 2
  llm_width: int = 128
  llm_layers: int = 2
  text_width: int = 64
  text_layers: int = 2
  kernel: tuple[int, int, int] = (2, 3, 3)
  seed: int = 0

  def model_config(self, vocab: int) -> PPLLaVAConfig:
    tiles = self.image_size
    return PPLLaVAConfig(
      vision=CLIPVisionConfig(
        hidden_size=self.vision_width,
        intermediate_size=4 * self.vision_width,
        num_hidden_layers=self.vision_layers,
        num_attention_heads=2,
        image_size=self.image_size,
        patch_size=self.patch_size,
      ),
      text=DecoderConfig(
        vocab_size=vocab,
        hidden_size=self.llm_width,
        intermediate_size=3 * self.llm_width,
        num_hidden_layers=self.llm_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=self.llm_width // 4,
        max_position_embeddings=4096,
        eos_token_id=(2,),
        pad_token_id=0,
      ),
      image_token_index=4,
      video_token_index=-1,  # the char tokenizer's <image>; no video id
      grid_pinpoints=((tiles, 2 * tiles), (2 * tiles, tiles), (2 * tiles, 2 * tiles)),
      pooling=PoolingConfig("ppllava", video_kernel=self.kernel),
      scorer=ScorerConfig(
        text=CLIPTextConfig(
          vocab_size=vocab,
          hidden_size=self.text_width,
          intermediate_size=2 * self.text_width,
          num_hidden_layers=self.text_layers,
          num_attention_heads=2,
          max_position_embeddings=4 * 77 - 3 * 20,
          extend_keep=20,
          eos_token_id=2,
          bos_token_id=1,
          pad_token_id=0,
        ),
        vision_width=self.vision_width,
        projection_dim=32,
      ),
    )


def build_tiny(cfg: TinyConfig, vocab: int) -> PPLLaVA:
  """``cfg``'s model with ``vocab`` token ids, randomly initialised from ``cfg.seed``."""
  return PPLLaVA(cfg.model_config(vocab), rngs=nnx.Rngs(cfg.seed))
