"""Checkpoint conversion between Hugging Face safetensors folders and Orbax, for every
model family ppllava-jax loads, and what ``convert.py`` prints about them.

An Orbax checkpoint here is a folder with the model state (``state/``, written by
``ocp.StandardCheckpointer``), the source ``config.json`` and the source's tokenizer and
processor files (``pretrained.SIDE_FILES``), so it can be rebuilt and written back to a
complete transformers folder without the original one. Memory: loading streams
tensor by tensor into an abstractly built model, and writing safetensors streams one
shard at a time, so a 7B model is never held twice.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from ppllava_jax.convert.clip import CLIP_RULES
from ppllava_jax.convert.llava import LLAVA_NEXT_RULES
from ppllava_jax.convert.llm import LLM_RULES
from ppllava_jax.convert.loader import (
  CheckpointError,
  Rule,
  checkpoint_shapes,
  hf_tensors,
  load_into,
  save_tensors,
)
from ppllava_jax.convert.siglip import SIGLIP_RULES
from ppllava_jax.models import pretrained
from ppllava_jax.models.clip import CLIPConfig, CLIPModel
from ppllava_jax.models.llm import DecoderConfig, LlamaForCausalLM, Qwen2ForCausalLM
from ppllava_jax.models.ppllava import PPLLaVA
from ppllava_jax.models.ppllava_config import MODEL_TYPES, PoolingConfig, PPLLaVAConfig
from ppllava_jax.models.released import complete_config
from ppllava_jax.models.siglip import SiglipConfig, SiglipModel

CONFIG_FILE = "config.json"
STATE_DIR = "state"


@dataclasses.dataclass(frozen=True)
class Family:
  build: Callable[[dict], nnx.Module]  # config.json dict -> a model (call under eval_shape)
  rules: tuple[Rule, ...]
  # (config.json dict, tensor shapes, folder) -> the config that describes every tensor
  complete: Callable[[dict, dict, Path], dict] = lambda hf, shapes, where: hf


def _llava(hf: dict) -> PPLLaVA:  # weights do not depend on the pooling mode
  return PPLLaVA(PPLLaVAConfig.from_hf(hf, PoolingConfig("none")), rngs=nnx.Rngs(0))


_LLAVA = Family(_llava, LLAVA_NEXT_RULES, complete_config)


FAMILIES: dict[str, Family] = {
  "clip": Family(lambda hf: CLIPModel(CLIPConfig.from_hf(hf), rngs=nnx.Rngs(0)), CLIP_RULES),
  "siglip": Family(
    lambda hf: SiglipModel(SiglipConfig.from_hf(hf), rngs=nnx.Rngs(0)), SIGLIP_RULES
  ),
  "llama": Family(
    lambda hf: LlamaForCausalLM(DecoderConfig.from_hf(hf), rngs=nnx.Rngs(0)), LLM_RULES
  ),
  "qwen2": Family(
    lambda hf: Qwen2ForCausalLM(DecoderConfig.from_hf(hf), rngs=nnx.Rngs(0)), LLM_RULES
  ),
  **{model_type: _LLAVA for model_type in MODEL_TYPES},
}


def _family(path: Path) -> tuple[dict, Family]:
  hf = pretrained.read_config(path, list(FAMILIES))
  return hf, FAMILIES[hf["model_type"]]


def load_hf(path: str | Path, progress: bool = False) -> tuple[nnx.Module, dict]:
  """(model, config.json dict) from any supported transformers folder. For PPLLaVA's
  own folders the dict gains the scorer / BT-Adapter entries their config.json lacks,
  so what is saved from it rebuilds the same model."""
  path = pretrained.resolve_checkpoint(path)
  hf, family = _family(path)
  hf = family.complete(hf, checkpoint_shapes(path), path)
  model = load_into(nnx.eval_shape(lambda: family.build(hf)), path, family.rules, progress=progress)
  return model, hf


def save_hf(
  model: nnx.Module,
  hf: dict,
  path: str | Path,
  max_shard_bytes: int = 5 * 2**30,
  progress: bool = False,
) -> list[Path]:
  """Streams ``model`` to a transformers folder (sharded above ``max_shard_bytes``)."""
  family = FAMILIES[hf["model_type"]]
  path = Path(path)
  files = save_tensors(hf_tensors(model, family.rules), path, max_shard_bytes, progress)
  (path / CONFIG_FILE).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
  return files


def save_orbax(model: nnx.Module, hf: dict, path: str | Path) -> Path:
  path = Path(path).absolute()
  path.mkdir(parents=True, exist_ok=True)
  (path / CONFIG_FILE).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path / STATE_DIR, nnx.state(model).to_pure_dict(), force=True)
  checkpointer.wait_until_finished()
  return path


def load_orbax(path: str | Path) -> tuple[nnx.Module, dict]:
  """(model, config.json dict) from a folder ``save_orbax`` wrote."""
  path = Path(path).absolute()
  if not (path / STATE_DIR).is_dir():
    raise CheckpointError(f"{path} is not an Orbax checkpoint of ppllava-jax (no {STATE_DIR}/)")
  hf, family = _family(path)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: family.build(hf)))
  restored = ocp.StandardCheckpointer().restore(path / STATE_DIR, abstract.to_pure_dict())
  nnx.replace_by_pure_dict(abstract, restored)
  return nnx.merge(graphdef, abstract), hf


@dataclasses.dataclass(frozen=True)
class Conversion:
  model: nnx.Module
  hf: dict  # the config.json written
  side_files: tuple[str, ...]  # the tokenizer / processor files carried along


def to_orbax(src: str | Path, dst: str | Path, progress: bool = False) -> Conversion:
  """The transformers folder (or hub id) ``src`` as the Orbax folder ``dst``."""
  src = pretrained.resolve_checkpoint(src)
  model, hf = load_hf(src, progress)
  dst = save_orbax(model, hf, dst)
  return Conversion(model, hf, pretrained.copy_side_files(src, dst))


def to_hf(
  src: str | Path, dst: str | Path, max_shard_bytes: int = 5 * 2**30, progress: bool = False
) -> Conversion:
  """The Orbax folder ``src`` (from ``to_orbax``) as the transformers folder ``dst``."""
  model, hf = load_orbax(src)
  save_hf(model, hf, dst, max_shard_bytes, progress)
  return Conversion(model, hf, pretrained.copy_side_files(Path(src), Path(dst)))


def parameter_counts(model: nnx.Module) -> dict[str, int]:
  """Parameters per top-level component (e.g. vision_tower, language_model)."""
  counts: dict[str, int] = defaultdict(int)
  for path, var in nnx.to_flat_state(nnx.state(model)):
    counts[str(path[0])] += int(np.prod(var[...].shape))
  return dict(counts)
