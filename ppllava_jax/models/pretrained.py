"""Checkpoint folders: finding them, reading their config.json, writing them."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flax import nnx

from ppllava_jax.convert.loader import (
  CheckpointError,
  Rule,
  hf_tensors,
  read_checkpoint_json,
  save_tensors,
)

# What a transformers folder carries beside its weights and config.json: tokenizers (fast,
# sentencepiece, BPE, WordPiece), chat templates, image / video processors, generation
# defaults. Conversions carry them along, so converted folders still tokenize.
SIDE_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "added_tokens.json",
  "tokenizer.model",
  "spiece.model",
  "vocab.json",
  "merges.txt",
  "vocab.txt",
  "chat_template.jinja",
  "chat_template.json",
  "preprocessor_config.json",
  "video_preprocessor_config.json",
  "processor_config.json",
  "generation_config.json",
)


SCORER_TOKENIZER = "scorer_tokenizer"  # the subfolder that holds the scorer's tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def pick_fields(dc: type, src: Any):
  """Our config dataclass ``dc`` from a parsed transformers config: same-named fields."""
  return dc(
    **{f.name: getattr(src, f.name) for f in dataclasses.fields(dc) if hasattr(src, f.name)}
  )


def resolve_checkpoint(path_or_id: str | Path) -> Path:
  """A local folder as is; otherwise a hub id, fetched when online (json, safetensors and
  the ``SIDE_FILES``; never torch weights)."""
  path = Path(path_or_id)
  if path.is_dir():
    return path
  if path.exists() or str(path_or_id).startswith((".", "/")) or str(path_or_id).count("/") != 1:
    raise CheckpointError(f"checkpoint folder not found: {path}")
  try:
    from huggingface_hub import snapshot_download

    return Path(
      snapshot_download(str(path_or_id), allow_patterns=["*.json", "*.safetensors", *SIDE_FILES])
    )
  except Exception as err:  # offline, unknown repo, no permission: say which and why
    raise CheckpointError(
      f"{path_or_id!r} is not a local folder and could not be fetched from "
      f"the hub ({type(err).__name__}: {err})"
    ) from err


def read_config(path: Path, model_types: Sequence[str]) -> dict[str, Any]:
  """config.json as a dict, after checking its model_type."""
  file = path / "config.json"
  if not file.is_file():
    raise CheckpointError(f"no config.json in {path}")
  config = read_checkpoint_json(file)
  found = config.get("model_type")
  if found not in model_types:
    raise CheckpointError(f"{file}: model_type is {found!r}, expected one of {list(model_types)}")
  return config


def save_pretrained(
  model: nnx.Module,
  path: str | Path,
  rules: Sequence[Rule],
  hf_config: dict[str, Any],
  progress: bool = False,
) -> Path:
  path = Path(path)
  save_tensors(hf_tensors(model, rules), path, progress=progress)
  (path / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
  return path


def copy_side_files(src: Path, dst: Path, scorer: bool = True) -> tuple[str, ...]:
  """Copies the ``SIDE_FILES`` that ``src`` has into ``dst``, and (``scorer``) those of
  its ``scorer_tokenizer/`` into ``dst``'s; returns the names copied (the scorer's with
  their folder). New files get the mode a plain ``open()`` gives (the source's is not
  copied)."""
  names = tuple(name for name in SIDE_FILES if (src / name).is_file())
  for name in names:
    shutil.copyfile(src / name, dst / name)
  if scorer and (src / SCORER_TOKENIZER).is_dir():
    (dst / SCORER_TOKENIZER).mkdir(parents=True, exist_ok=True)
    names += tuple(
      f"{SCORER_TOKENIZER}/{n}"
      for n in copy_side_files(src / SCORER_TOKENIZER, dst / SCORER_TOKENIZER)
    )
  return names


def has_tokenizer(folder: Path) -> bool:
  return any((folder / name).is_file() for name in TOKENIZER_FILES)


def write_generation_config(folder: Path, text) -> None:
  """``generation_config.json`` from the LLM's ids (``text``: a ``DecoderConfig``), when
  the folder has none (a source folder's is copied with its side files)."""
  if (folder / "generation_config.json").is_file():
    return
  eos = list(text.eos_token_id)
  (folder / "generation_config.json").write_text(
    json.dumps(
      dict(
        bos_token_id=text.bos_token_id,
        eos_token_id=eos[0] if len(eos) == 1 else eos,
        pad_token_id=text.pad_token_id,
      ),
      indent=2,
    )
    + "\n"
  )
