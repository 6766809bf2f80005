"""What the CLIP and SigLIP dual encoders share: config translation, the hidden-state
methods, and checkpoint loading / saving."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self

import jax
import jax.numpy as jnp
from flax import nnx

from ppllava_jax.convert.loader import CheckpointError, Rule, checkpoint_keys, load_into
from ppllava_jax.models import pretrained
from ppllava_jax.models.text import extend_text_positions

# Where an extended text tower records its `keep` in config.json (PPLLaVA's own
# configs do not save it: reference section 9), and the tensor that betrays one.
EXTEND_KEEP_KEY = "ppllava_extend_keep"
EXTENDED_TABLE_KEY = "text_model.embeddings.position_embedding_res"


@contextlib.contextmanager
def _quiet_transformers():
  """transformers' SiglipConfig checks its own default sub-config's CLIP-sized BOS / EOS
  against SigLIP's vocabulary and warns, whatever the file says: not the user's problem."""
  from transformers.utils import logging as hf_logging

  level = hf_logging.get_verbosity()
  hf_logging.set_verbosity_error()
  try:
    yield
  finally:
    hf_logging.set_verbosity(level)


def towers_from_hf(hf_config_cls: Any, hf: dict, vision_cls: type, text_cls: type):
  """(full transformers config, vision config, text config) from a config.json dict.

  transformers parses it, so defaults the file omits are filled as transformers would.
  """
  with _quiet_transformers():
    full = hf_config_cls.from_dict(hf)
  text = pretrained.pick_fields(text_cls, full.text_config)
  keep = hf.get("text_config", {}).get(EXTEND_KEEP_KEY)
  return (
    full,
    pretrained.pick_fields(vision_cls, full.vision_config),
    dataclasses.replace(text, extend_keep=keep),
  )


def towers_to_hf(hf_config_cls: type, vision: Any, text: Any, **top: Any) -> dict:
  text_fields = {k: v for k, v in dataclasses.asdict(text).items() if k != "extend_keep"}
  with _quiet_transformers():
    hf = hf_config_cls(
      text_config=text_fields, vision_config=dataclasses.asdict(vision), **top
    ).to_dict()
  if text.extend_keep is not None:
    hf["text_config"][EXTEND_KEEP_KEY] = text.extend_keep
  return hf


class DualEncoder(nnx.Module):
  """Base of CLIPModel and SiglipModel; subclasses set the three class attributes."""

  config_class: ClassVar[type[Any]]  # with from_hf(dict) and to_hf() -> dict
  model_types: ClassVar[tuple[str, ...]]  # accepted config.json model_type values
  rules: ClassVar[tuple[Rule, ...]]  # the key table

  if TYPE_CHECKING:  # what every subclass's __init__ sets (for mypy only)
    cfg: Any
    vision_model: Any
    text_model: Any

    def __init__(self, cfg: Any, *, rngs: nnx.Rngs) -> None: ...

  def vision_hidden_states(self, pixel_values: jax.Array) -> list[jax.Array]:
    """Like HF ``output_hidden_states``: embeddings output, then each layer's (NCHW input)."""
    return self.vision_model(pixel_values)

  def text_hidden_states(
    self, input_ids: jax.Array, attention_mask: jax.Array | None = None
  ) -> list[jax.Array]:
    """Like HF ``output_hidden_states``: embeddings output, then each layer's, (B, L, D)."""
    return self.text_model(input_ids, attention_mask)[0]

  @classmethod
  def from_pretrained(
    cls,
    path: str | Path,
    dtype: jnp.dtype | None = None,
    extend_text: int | None = None,
    progress: bool = False,
  ) -> Self:
    """Reads a transformers checkpoint folder (or a hub id when online).

    The model is built abstractly (no random init) and filled from the checkpoint;
    ``dtype`` casts floating tensors (by default each keeps its stored dtype).
    ``extend_text=keep`` extends a plain text tower after loading to PPLLaVA's
    ``4 * L - 3 * keep`` positions (77 -> 248, 64 -> 196 for keep=20); a checkpoint
    that already holds the two extended tables must name its keep in config.json.
    """
    path = pretrained.resolve_checkpoint(path)
    cfg = cls.config_class.from_hf(pretrained.read_config(path, cls.model_types))
    if cfg.text.extend_keep is None and EXTENDED_TABLE_KEY in checkpoint_keys(path):
      raise CheckpointError(
        f"{path} holds extended text positions ({EXTENDED_TABLE_KEY}) but its "
        f"config.json has no text_config.{EXTEND_KEEP_KEY}; add it (20 for "
        "PPLLaVA)"
      )
    model = load_into(
      nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))), path, cls.rules, dtype, progress=progress
    )
    return model if extend_text is None else extend_text_positions(model, keep=extend_text)

  def save_pretrained(self, path: str | Path) -> Path:
    """Writes model.safetensors and config.json in the transformers layout."""
    return pretrained.save_pretrained(self, path, self.rules, self.cfg.to_hf())
