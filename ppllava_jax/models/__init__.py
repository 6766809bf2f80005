"""Flax NNX networks. Each takes arrays (never paths) in ``__call__``; checkpoints are
read and written by ``from_pretrained`` / ``save_pretrained``."""

from ppllava_jax.models.btadapter import BTAdapterConfig, CLIPVisionBTAdapter
from ppllava_jax.models.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
from ppllava_jax.models.llm import LlamaForCausalLM, Qwen2ForCausalLM
from ppllava_jax.models.siglip import (SiglipConfig, SiglipModel, SiglipTextConfig,
                                       SiglipVisionConfig)

__all__ = [
    "BTAdapterConfig", "CLIPVisionBTAdapter",
    "CLIPConfig", "LlamaForCausalLM", "Qwen2ForCausalLM", "CLIPModel", "CLIPTextConfig", "CLIPVisionConfig",
    "SiglipConfig", "SiglipModel", "SiglipTextConfig", "SiglipVisionConfig",
]
