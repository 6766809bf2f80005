"""from_pretrained / save_pretrained plumbing shared by the model families."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from ppllava_jax.convert.loader import (CheckpointError, Rule, checkpoint_keys, hf_tensors, load_into,
                                        save_tensors)
from ppllava_jax.models.text import extend_text_positions

# Where an extended text tower records its `keep` in config.json (PPLLaVA's own
# configs do not save it: reference section 9), and the tensor that betrays one.
EXTEND_KEEP_KEY = "ppllava_extend_keep"
EXTENDED_TABLE_KEY = "text_model.embeddings.position_embedding_res"


def resolve_checkpoint(path_or_id: str | Path) -> Path:
  """A local folder as is; otherwise a hub id, fetched (json + safetensors only) when online."""
  path = Path(path_or_id)
  if path.is_dir():
    return path
  if path.exists() or str(path_or_id).startswith((".", "/")) or str(path_or_id).count("/") != 1:
    raise CheckpointError(f"checkpoint folder not found: {path}")
  try:
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(str(path_or_id), allow_patterns=["*.json", "*.safetensors"]))
  except Exception as err:  # offline, unknown repo, no permission: say which and why
    raise CheckpointError(f"{path_or_id!r} is not a local folder and could not be fetched from "
                          f"the hub ({type(err).__name__}: {err})") from err


def read_config(path: Path, model_types: Sequence[str]) -> dict[str, Any]:
  """config.json as a dict, after checking its model_type."""
  file = path / "config.json"
  if not file.is_file():
    raise CheckpointError(f"no config.json in {path}")
  config = json.loads(file.read_text())
  found = config.get("model_type")
  if found not in model_types:
    raise CheckpointError(f"{file}: model_type is {found!r}, expected one of {list(model_types)}")
  return config


def from_pretrained(cls: type, parse_config: Callable[[dict], Any], path: str | Path,
                    model_types: Sequence[str], rules: Sequence[Rule], dtype: jnp.dtype | None,
                    extend_text: int | None) -> nnx.Module:
  """Reads a dual-encoder checkpoint folder (or hub id) into ``cls``.

  The model is built abstractly (no random init) and filled from the checkpoint.
  ``extend_text=keep`` extends a plain text tower after loading; a checkpoint that
  already holds the two extended tables must say its keep in config.json.
  """
  path = resolve_checkpoint(path)
  hf = read_config(path, model_types)
  cfg = parse_config(hf)
  if cfg.text.extend_keep is None and EXTENDED_TABLE_KEY in checkpoint_keys(path):
    raise CheckpointError(f"{path} holds extended text positions ({EXTENDED_TABLE_KEY}) but its "
                          f"config.json has no text_config.{EXTEND_KEEP_KEY}; add it (20 for "
                          "PPLLaVA)")
  model = load_into(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))), path, rules, dtype)
  return model if extend_text is None else extend_text_positions(model, keep=extend_text)


def save_pretrained(model: nnx.Module, path: str | Path, rules: Sequence[Rule],
                    hf_config: dict[str, Any]) -> Path:
  path = Path(path)
  save_tensors(hf_tensors(model, rules), path)
  (path / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
  return path
