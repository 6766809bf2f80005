"""Flax NNX networks. Each takes arrays (never paths) in ``__call__``; checkpoints are
read and written by ``from_pretrained`` / ``save_pretrained``.

The names below resolve lazily (``from ppllava_jax.models import CLIPModel`` imports
``models.clip`` alone), so importing one family does not build the others."""

import importlib

_HOMES = {
  "PPLLaVA": "ppllava",
  "PPLLaVAConfig": "ppllava_config",
  "BTAdapterConfig": "btadapter",
  "CLIPVisionBTAdapter": "btadapter",
  "CLIPConfig": "clip",
  "CLIPModel": "clip",
  "CLIPTextConfig": "clip",
  "CLIPVisionConfig": "clip",
  "LlamaForCausalLM": "llm",
  "Qwen2ForCausalLM": "llm",
  "SiglipConfig": "siglip",
  "SiglipModel": "siglip",
  "SiglipTextConfig": "siglip",
  "SiglipVisionConfig": "siglip",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
  if name not in _HOMES:
    raise AttributeError(f"module 'ppllava_jax.models' has no attribute {name!r}")
  return getattr(importlib.import_module(f"ppllava_jax.models.{_HOMES[name]}"), name)


def __dir__() -> list[str]:
  return __all__
