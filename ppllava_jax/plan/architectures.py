"""The released models' architectures, for planning a run whose checkpoint folder is not on
this machine (no weights needed: only the shapes).

``RELEASES["vicuna7b"]``: PPLLaVA's Vicuna-7B models (farewellthree/ppllava_weight
``ppllava_vicuna7b_*``), i.e. llava-hf/llava-v1.6-vicuna-7b-hf (LLaMA-7B, vocab 32064,
``<image>`` 32000, LLaVA-1.6's five pinpoints) with openai/clip-vit-large-patch14-336 as the
vision tower (BT-Adapter depth 4, max_T 64) and as the scorer (its text tower extended
77 -> 248, keep 20, legacy EOS pooling), pooled (2, 3, 3): the sizes of those folders'
config.json files (``models.released`` reads the same from a real folder).
"""

from __future__ import annotations

from ppllava_jax.models.btadapter import BTAdapterConfig
from ppllava_jax.models.clip import CLIPTextConfig, CLIPVisionConfig
from ppllava_jax.models.llm import DecoderConfig
from ppllava_jax.models.ppllava_config import PoolingConfig, PPLLaVAConfig
from ppllava_jax.models.scorer import ScorerConfig

_CLIP_L336 = CLIPVisionConfig(
  hidden_size=1024,
  intermediate_size=4096,
  num_hidden_layers=24,
  num_attention_heads=16,
  image_size=336,
  patch_size=14,
)

RELEASES: dict[str, PPLLaVAConfig] = {
  "vicuna7b": PPLLaVAConfig(
    vision=_CLIP_L336,
    text=DecoderConfig(
      vocab_size=32064,
      hidden_size=4096,
      intermediate_size=11008,
      num_hidden_layers=32,
      num_attention_heads=32,
      num_key_value_heads=32,
      head_dim=128,
      max_position_embeddings=4096,
      rms_norm_eps=1e-5,
      bos_token_id=1,
      eos_token_id=(2,),
      pad_token_id=0,
    ),
    image_token_index=32000,
    video_token_index=-1,
    grid_pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)),
    pooling=PoolingConfig("ppllava", video_kernel=(2, 3, 3)),
    scorer=ScorerConfig(
      text=CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=4 * 77 - 3 * 20,
        extend_keep=20,
        eos_token_id=2,
      ),
      vision_width=1024,
      projection_dim=768,
    ),
    btadapter=BTAdapterConfig(depth=4, max_T=64),
  ),
}
# A checkpoint name naming a release (the Vicuna recipe's start, PPLLaVA's folders, our
# exports of them) -> its architecture.
NAME_HINTS = (("vicuna-7b", "vicuna7b"), ("vicuna7b", "vicuna7b"))


def release_for(checkpoint: str) -> str | None:
  """The release a checkpoint name points to (``NAME_HINTS``), None when none does."""
  low = checkpoint.lower()
  return next((arch for hint, arch in NAME_HINTS if hint in low), None)
