"""Reading llava-hf and PPLLaVA's own checkpoint folders into a config that describes every
tensor: the original's config.json keys (reference section 2, 9; farewellthree/PPLLaVA),
checked against the tensors; the BT-Adapter's and the scorer's configs, which PPLLaVA's
folders do not write, from the best source there is (``complete_config``); the pooling a
``from_pretrained`` call asks for, completed from the folder's keys (``pooling_for``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ppllava_jax.convert.loader import CheckpointError
from ppllava_jax.models import pretrained
from ppllava_jax.models.btadapter import BTAdapterConfig
from ppllava_jax.models.clip import CLIPConfig, CLIPVisionConfig
from ppllava_jax.models.pooling_modes import MODES
from ppllava_jax.models.ppllava_config import (
  BTADAPTER_KEY,
  ORIGINAL_POOLING_KEYS,
  SCORER_KEY,
  PoolingConfig,
  PPLLaVAConfig,
  config_value,
)
from ppllava_jax.models.scorer import (
  SIGLIP_HEAD_TENSOR,
  ScorerConfig,
  SiglipScorerConfig,
  scorer_config_from_hf,
  stored_scorer_config,
)
from ppllava_jax.models.siglip import SiglipConfig, SiglipVisionConfig

SCORER_TENSOR = "multi_modal_projector.clip_text_model.embeddings.token_embedding.weight"
_VISION_PREFIX = "vision_tower.vision_model."
_BTADAPTER_TENSOR = _VISION_PREFIX + "btadapter_cls_token"
_EXTENDED_TENSOR = "multi_modal_projector.clip_text_model.embeddings.position_embedding_res"
# The original's adapter keys (its own, and the copies it stamps onto the vision config)
# -> the BTAdapterConfig fields they give.
_ADAPTER_KEYS = {
  "btadapter_depth": "depth",
  "vision_config.depth": "depth",
  "max_T": "max_T",
  "vision_config.max_T": "max_T",
}
log = logging.getLogger(__name__)


def pooling_for(pooling: PoolingConfig | str, hf: dict, shapes: dict, where: Path) -> PoolingConfig:
  """``pooling`` completed from config.json: a mode string takes the file's windows, and so
  do the fields a PoolingConfig leaves at their defaults; fields it sets win (video kernel
  and output size count as one: both come from the argument when it sets either)."""
  given = PoolingConfig(pooling) if isinstance(pooling, str) else pooling
  default = PoolingConfig(given.mode)
  changed = {
    f.name: getattr(given, f.name)
    for f in dataclasses.fields(given)
    if getattr(given, f.name) != getattr(default, f.name)
  }
  if changed.keys() & {"video_kernel", "video_output"}:
    changed.update(video_kernel=given.video_kernel, video_output=given.video_output)
  pooling = dataclasses.replace(PoolingConfig.from_hf(hf, given.mode, where), **changed)
  if MODES[pooling.mode].windows is not None:
    read = [k for k in ORIGINAL_POOLING_KEYS if hf.get(k) is not None]
    # PPLLaVA's own folder without its pooling keys is an assumption worth a warning
    level = logging.WARNING if SCORER_TENSOR in shapes and not read else logging.INFO
    log.log(
      level,
      "%s: %s; from config.json: %s, the rest as given or the original's defaults",
      where,
      pooling,
      ", ".join(read) or "none of the original's pooling keys",
    )
  return pooling


def vision_config(hf: dict) -> CLIPVisionConfig | SiglipVisionConfig:
  """The vision tower's config in a config.json dict."""
  return PPLLaVAConfig.from_hf(hf, PoolingConfig("none")).vision


def _check_original_keys(
  hf: dict,
  shapes: dict[str, tuple[int, ...]],
  vision,
  adapter: BTAdapterConfig | None,
  where: str | Path,
) -> None:
  """The original's keys that the checkpoint fixes too must agree with it (``qwen`` selects
  SigLIP and Qwen2; ``frame_shape`` is the patch grid). Only where the thing they describe
  exists: the original writes ``btadapter_depth`` / ``max_T`` and ``extend_clip`` always."""
  siglip = isinstance(vision, SiglipVisionConfig)
  checks = [
    ("qwen", siglip, f"the {'SigLIP' if siglip else 'CLIP'} vision tower"),
    ("frame_shape", (vision.grid, vision.grid), "the vision tower's patch grid"),
    ("btadapter", adapter is not None, "the BT-Adapter tensors"),
  ]
  if adapter is not None:
    checks += [
      (key, getattr(adapter, field), "the BT-Adapter tensors")
      for key, field in _ADAPTER_KEYS.items()
    ]
  if SCORER_TENSOR in shapes:
    scorer_siglip = SIGLIP_HEAD_TENSOR in shapes
    checks += [
      ("qwen", scorer_siglip, f"the {'SigLIP' if scorer_siglip else 'CLIP'} scorer"),
      ("extend_clip", _EXTENDED_TENSOR in shapes, "the scorer's text position tables"),
    ]
  for key, found, what in checks:
    stated = config_value(hf, key, where)
    if stated is not None and stated != found:
      raise CheckpointError(f"{where}: config.json {key}={stated!r}, but {what} gives {found!r}")


def _clip_weight(hf: dict, where: Path) -> tuple[CLIPConfig | SiglipConfig, Path] | None:
  """(config, folder) of the CLIP / SigLIP folder the original's ``clip_weight`` names,
  absolute or relative to the checkpoint folder; None (and a log line) when it names none
  here (its configs usually hold a hub id or a path on the authors' machines)."""
  value = hf.get("clip_weight")
  if not value:
    return None
  folder = Path(where) / value  # an absolute value stays itself
  if not folder.is_dir():
    log.warning("%s: clip_weight %r is not a folder (looked for %s)", where, value, folder)
    return None
  encoder_hf = pretrained.read_config(folder, ("clip", "siglip"))
  return (SiglipConfig if encoder_hf["model_type"] == "siglip" else CLIPConfig).from_hf(
    encoder_hf
  ), folder


def _scorer_config(
  hf: dict,
  shapes: dict[str, tuple[int, ...]],
  vision,
  where: Path,
  clip: CLIPConfig | SiglipConfig | None,
  clip_source: str,
) -> ScorerConfig | SiglipScorerConfig:
  """The scorer tensors' config from the best source (``complete_config``'s order)."""
  if clip is not None:
    scorer = stored_scorer_config(shapes, vision, where, clip, clip_source)
    if SCORER_KEY in hf and scorer_config_from_hf(hf[SCORER_KEY]) != scorer:
      log.warning(
        "%s: %s describes the scorer otherwise than config.json's %s; %s wins",
        where,
        clip_source,
        SCORER_KEY,
        clip_source,
      )
    return scorer
  weight = _clip_weight(hf, where)
  if weight is not None:
    log.info("%s: the scorer's settings from clip_weight %s", where, weight[1])
    return stored_scorer_config(shapes, vision, where, weight[0], f"clip_weight {weight[1]}")
  scorer = stored_scorer_config(shapes, vision, where)
  log.warning(
    "%s: scorer tensors found but config.json does not describe them; inferred %s "
    "(sizes from the tensors, the rest as the released models' encoder: the last "
    "resort; clip= or a clip_weight folder would describe it)",
    where,
    scorer,
  )
  return scorer


def complete_config(
  hf: dict,
  shapes: dict[str, tuple[int, ...]],
  where: str | Path,
  clip: CLIPConfig | SiglipConfig | None = None,
  clip_source: str = "clip=",
) -> dict:
  """``hf`` plus the ``ppllava_btadapter`` / ``ppllava_scorer`` entries a checkpoint's
  tensors call for, once the original's keys agree with the checkpoint (else an error
  naming the folder, the key and both values). ``where`` names the folder.

  The scorer's entry comes from, first to last: ``clip`` (the encoder given as clip=,
  named by ``clip_source``), config.json's own ``ppllava_scorer``, the config of the
  folder the original's ``clip_weight`` names, inference from the tensor shapes (logged
  as the last resort). The adapter's: ``ppllava_btadapter``, else the tensors, which fix
  depth and max_T (the original's ``btadapter_depth`` / ``max_T`` are checked against
  them); said in the log when config.json gives neither.
  """
  hf = dict(hf)
  vision = vision_config(hf)
  adapter = (
    BTAdapterConfig.from_shapes(shapes, _VISION_PREFIX) if _BTADAPTER_TENSOR in shapes else None
  )
  _check_original_keys(hf, shapes, vision, adapter, where)
  if adapter is not None and BTADAPTER_KEY not in hf:
    hf[BTADAPTER_KEY] = dataclasses.asdict(adapter)
    if all(config_value(hf, key, where) is None for key in _ADAPTER_KEYS):
      log.warning(
        "%s: BT-Adapter tensors found but config.json does not describe them; "
        "depth=%d and max_T=%d read off the tensors (the last resort), drop-path "
        "rates %s/%s the original's",
        where,
        adapter.depth,
        adapter.max_T,
        adapter.drop_path_rate,
        adapter.temporal_drop_path_rate,
      )
  if SCORER_TENSOR in shapes and (clip is not None or SCORER_KEY not in hf):
    hf[SCORER_KEY] = _scorer_config(hf, shapes, vision, Path(where), clip, clip_source).to_hf()
  return hf
