"""Checkpoint folders: finding them, reading their config.json, writing them."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flax import nnx

from ppllava_jax.convert.loader import CheckpointError, Rule, hf_tensors, save_tensors


def pick_fields(dc: type, src: Any):
  """Our config dataclass ``dc`` from a parsed transformers config: same-named fields."""
  return dc(**{f.name: getattr(src, f.name) for f in dataclasses.fields(dc) if hasattr(src, f.name)})


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


def save_pretrained(model: nnx.Module, path: str | Path, rules: Sequence[Rule],
                    hf_config: dict[str, Any]) -> Path:
  path = Path(path)
  save_tensors(hf_tensors(model, rules), path)
  (path / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
  return path
