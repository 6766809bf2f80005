"""PPLLaVA: a LLaVA-NeXT model whose visual tokens are pooled under the prompt's guidance.

The composition (reference sections 1-5):

  frames/tiles -> vision tower -> hidden state ``vision_feature_layer`` (-2), CLS dropped
    (LLaVA-OneVision: SigLIP, layer -1, no CLS to drop)
    -> relevance (``RelevanceScorer``: CLIP's post_layernorm + visual_projection of
       those patches against CLIP's text features of the prompt, ``ops.relevance_scores``,
       one softmax over all frames/tiles of an item; ``SiglipRelevanceScorer`` for SigLIP)
    -> MLP projector on every patch (pooling runs in LLM space, after it, as the code does)
    -> ``ops.prompt_guided_pool`` (video (2,3,3); image tiles (1,3,3), then anyres packing)
    -> written into the text embeddings at the placeholder ids (``ops.merge_media``)
    -> the LLM.

Pooling modes (``PoolingConfig.mode``): ``"ppllava"`` (the released code: softmax of
the probabilities at temperature 0.01 per window), ``"paper"`` (Eq. 3, probability-
weighted sum), ``"average"`` (the same windows, plain mean: PLLaVA-style), and the
baselines ``"llava_next_video"`` (2x2 spatial mean *before* the projector, images
unpooled, exactly transformers' LlavaNextVideo), ``"llava_onevision"`` (bilinear 2x
downscale *after* the projector and one newline per video, images with the
``anyres_max`` downscale: exactly transformers' LlavaOnevision) and ``"none"`` (every
token). Only the first two need the scorer. ``MODES`` is the one table of what each
does. PPLLaVA's own Qwen model packs images the LLaVA-NeXT way (no ``anyres_max`` step),
as the original code does.

``PPLLaVA.embed`` merges the media into the text's embeddings; the forward and
generation run the LLM on what it returns.

Media layout: ``pixel_values_videos`` (V, T, 3, H, W), one video per run of video
placeholders; ``pixel_values`` (N, max_tiles, 3, H, W) with ``image_sizes`` (N, 2)
(height, width) as LLaVA-NeXT processors give, one image per run of image
placeholders. ``PPLLaVAConfig.video_tokens`` / ``image_tokens`` say how long each run
is. Checkpoints without a video token (LLaVA-NeXT, PPLLaVA's own, where the original
marks videos with ``<image>`` too) take videos at placeholder id -1, which only the
processor writes and which never reaches the embedding table. Runs of one kind must be separated by at least one other token (any
prompt template does this); the k-th run belongs to the k-th item. The scorer's text,
one row per sample, arrives as ``clip_input_ids`` / ``clip_attention_mask``.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ppllava_jax import ops
from ppllava_jax.convert.llava import LLAVA_NEXT_RULES
from ppllava_jax.convert.loader import CheckpointError, checkpoint_shapes, load_into
from ppllava_jax.models import pretrained
from ppllava_jax.models.btadapter import BTAdapterConfig, BTAdapterVisionTransformer
from ppllava_jax.models.clip import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionTransformer
from ppllava_jax.models.generate import generate
from ppllava_jax.models.layers import Linear
from ppllava_jax.models.llm import CausalLM, CausalLMOutput, DecoderConfig, KVCache
from ppllava_jax.models.scorer import (SIGLIP_HEAD_TENSOR, RelevanceScorer, ScorerConfig,
                                       SiglipRelevanceScorer, SiglipScorerConfig, build_scorer,
                                       scorer_config_from_hf, stored_scorer_config)
from ppllava_jax.models.siglip import (SiglipConfig, SiglipModel, SiglipVisionConfig,
                                       SiglipVisionTransformer)

SCORER_KEY = "ppllava_scorer"
BTADAPTER_KEY = "ppllava_btadapter"
_VISION_PREFIX = "vision_tower.vision_model."
_BTADAPTER_TENSOR = _VISION_PREFIX + "btadapter_cls_token"
_SCORER_TENSOR = "multi_modal_projector.clip_text_model.embeddings.token_embedding.weight"
_EXTENDED_TENSOR = "multi_modal_projector.clip_text_model.embeddings.position_embedding_res"
log = logging.getLogger(__name__)
MODEL_TYPES = ("llava_next", "llava_next_video", "llava_onevision")
_VISION = {"clip_vision_model": CLIPVisionConfig, "siglip_vision_model": SiglipVisionConfig}
_ANYRES_MAX = "anyres_max_"
Size3 = tuple[int, int, int]
# The original's adapter keys (its own, and the copies it stamps onto the vision config)
# -> the BTAdapterConfig fields they give.
_ADAPTER_KEYS = {"btadapter_depth": "depth", "vision_config.depth": "depth", "max_T": "max_T",
                 "vision_config.max_T": "max_T"}

# ---- pooling modes ------------------------------------------------------------------------


def _windowed(model: "PPLLaVA", feats_btggv: jax.Array, text_be: jax.Array | None,
              mask_bt: jax.Array | None) -> jax.Array:
  """PPLLaVA's windows after the projector, with the video geometry of ``PoolingConfig``."""
  _, kernel, stride = model.cfg.pooling.video_geometry(feats_btggv.shape[1], model.cfg.vision.grid)
  return model.pool(feats_btggv, text_be, kernel, stride, mask_bt)


def _windowed_count(cfg: "PPLLaVAConfig", frames: int) -> int:
  return int(np.prod(cfg.pooling.video_geometry(frames, cfg.vision.grid)[0]))


def _spatial_mean(model: "PPLLaVA", feats_btggv: jax.Array, text_be: jax.Array | None,
                  mask_bt: jax.Array | None) -> jax.Array:
  """LLaVA-NeXT-Video: a (1, s, s) mean of the patches, then the projector."""
  s = model.cfg.pooling.llava_next_stride
  ones = jnp.ones(feats_btggv.shape[:4], jnp.float32)
  return model.multi_modal_projector(
      ops.prompt_guided_pool(feats_btggv, ones, (1, s, s), mode="average"))


def _resized(model: "PPLLaVA", feats_btggv: jax.Array, text_be: jax.Array | None,
             mask_bt: jax.Array | None) -> jax.Array:
  """LLaVA-OneVision: each projected frame resized bilinearly to ceil(g / 2) a side, then
  one newline per video."""
  x_btggd = model.multi_modal_projector(feats_btggv)
  v, t, g, _, d = x_btggd.shape
  small = -(-g // 2)  # ceil, as transformers' apply_pooling
  x_btssd = jax.image.resize(x_btggd.astype(jnp.float32), (v, t, small, small, d), "bilinear",
                             antialias=False).astype(x_btggd.dtype)
  newline = jnp.broadcast_to(model.image_newline[...].astype(x_btssd.dtype), (v, 1, d))
  return jnp.concatenate([x_btssd.reshape(v, -1, d), newline], axis=1)


@dataclasses.dataclass(frozen=True)
class _Mode:
  """One pooling mode. ``MODES`` is the one place modes differ, so a new mode is one entry.

  videos: (model, (V, T, g, g, D_vision) patches, (V, E) prompt features or None,
    (V, T) real-frame mask or None) -> (V, ..., D) tokens of each video (frames never mix
    across items outside PPLLaVA's windows, so only those read the mask)
  count: (config, frames) -> how many tokens ``videos`` makes of one video
  windows: the ``ops.prompt_guided_pool`` weights of PPLLaVA's windows, which image tiles
    are pooled with too (None: tiles unpooled)
  scored: the windows weigh patches by the scorer's relevance (Eq. 1)
  anyres_max: images take OneVision's ``anyres_max_N`` downscale
  """
  videos: Callable[["PPLLaVA", jax.Array, jax.Array | None, jax.Array | None], jax.Array]
  count: Callable[["PPLLaVAConfig", int], int]
  windows: str | None = None
  scored: bool = False
  anyres_max: bool = False


MODES: dict[str, _Mode] = {
    "ppllava": _Mode(_windowed, _windowed_count, windows="softmax", scored=True),
    "paper": _Mode(_windowed, _windowed_count, windows="weighted_sum", scored=True),
    "average": _Mode(_windowed, _windowed_count, windows="average"),
    "llava_next_video": _Mode(
        _spatial_mean, lambda cfg, t: t * (cfg.vision.grid // cfg.pooling.llava_next_stride) ** 2),
    "llava_onevision": _Mode(_resized, lambda cfg, t: t * (-(-cfg.vision.grid // 2)) ** 2 + 1,
                             anyres_max=True),
    "none": _Mode(lambda model, feats, text, mask: model.multi_modal_projector(feats),
                  lambda cfg, t: t * cfg.vision.grid ** 2),
}
POOLING_MODES = tuple(MODES)

# The original's pooling keys in config.json -> PoolingConfig fields (reference section 2;
# farewellthree/PPLLaVA llava_interleave.py). image_pooling_stride must equal the kernel.
_ORIGINAL_POOLING = {"pooling_kernel": "video_kernel", "pooling_stride": "video_stride",
                     "pllava_pooling_shape": "video_output", "image_pooling_kernel": "image_kernel",
                     "pooling_temp": "temperature"}
ORIGINAL_POOLING_KEYS = (*_ORIGINAL_POOLING, "image_pooling_stride")


def _literal(hf: dict, key: str, where: str | Path):
  """config.json's ``key`` as the original writes it: JSON, or the Python tuple string of
  its YAML configs ("(2,3,3)"), parsed as a literal, never evaluated; lists become tuples.
  None when absent."""
  value = hf.get(key)
  if isinstance(value, str):
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError) as err:
      raise CheckpointError(f"{where}: config.json {key}={value!r} is not a literal") from err
  return tuple(value) if isinstance(value, list) else value


@dataclasses.dataclass(frozen=True)
class PoolingConfig:
  """``mode`` (one of ``MODES``) and the windows of PPLLaVA's modes.

  Video windows are what ``ops.pool_geometry`` resolves from ``video_kernel`` (and
  ``video_stride``, by default the kernel), or from ``video_output``, the output-size form
  (stride ``I // O``, kernel ``I - (O - 1) * stride``), which replaces the kernel. Image
  tiles are pooled by (1, k, k) windows that tile them, as the anyres packing needs.
  """
  mode: str = "ppllava"
  video_kernel: Size3 | None = (2, 3, 3)
  video_stride: Size3 | None = None
  video_output: Size3 | None = None
  image_kernel: Size3 = (1, 3, 3)
  temperature: float = 0.01
  llava_next_stride: int = 2  # "llava_next_video": the spatial mean's window

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"pooling mode must be one of {POOLING_MODES}, got {self.mode!r}")
    for name in ("video_kernel", "video_stride", "video_output", "image_kernel"):
      value = getattr(self, name)
      if value is not None and (len(value) != 3 or not all(
          isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
        raise ValueError(f"{name} must be 3 positive ints (time, height, width), got {value!r}")
    if (self.video_kernel is None) == (self.video_output is None):
      raise ValueError("give one of video_kernel and video_output (the output-size form), got "
                       f"{self.video_kernel} and {self.video_output}")
    if self.image_kernel[0] != 1 or self.image_kernel[1] != self.image_kernel[2]:
      raise ValueError(f"image tiles are pooled per tile: image_kernel must be (1, k, k), "
                       f"got {self.image_kernel}")

  @property
  def scored(self) -> bool:
    return MODES[self.mode].scored

  def video_geometry(self, frames: int, grid: int) -> tuple[Size3, Size3, Size3]:
    """(output size, kernel, stride) for a video of ``frames`` frames of grid x grid patches."""
    return ops.pool_geometry((frames, grid, grid), self.video_output, self.video_kernel,
                             self.video_stride)

  @classmethod
  def from_hf(cls, hf: dict, mode: str = "ppllava",
              where: str | Path = "config.json") -> "PoolingConfig":
    """``mode``'s windows as a config.json gives them: the original's keys
    (``ORIGINAL_POOLING_KEYS``, JSON lists or its YAML strings) and transformers'
    ``spatial_pool_stride``; absent keys keep the defaults, the original's documented ones
    (reference section 9; for images that is (1, 3, 3), not the original's fallback to the
    video kernel, which would pool tiles across each other)."""
    given = {ours: _literal(hf, key, where) for key, ours in _ORIGINAL_POOLING.items()
             if hf.get(key) is not None}
    if "video_output" in given:
      if "video_kernel" in given:
        raise CheckpointError(f"{where}: config.json gives pllava_pooling_shape "
                              f"{given['video_output']} and pooling_kernel "
                              f"{given['video_kernel']}: the output-size form replaces the "
                              "kernel, give one")
      given["video_kernel"] = None
    image_stride = _literal(hf, "image_pooling_stride", where)
    image_kernel = given.get("image_kernel", cls.image_kernel)
    if image_stride not in (None, image_kernel):
      raise CheckpointError(f"{where}: config.json image_pooling_stride={image_stride} differs "
                            f"from image_pooling_kernel={image_kernel}: anyres images are packed "
                            "from windows that tile each tile, stride = kernel")
    if hf.get("spatial_pool_stride") is not None:
      given["llava_next_stride"] = hf["spatial_pool_stride"]
    try:
      return cls(mode, **given)
    except ValueError as err:
      raise CheckpointError(f"{where}: config.json's pooling keys: {err}") from err

  def to_hf(self) -> dict:
    """The original's keys for these windows (JSON lists), which ``from_hf`` reads back."""
    hf = {key: getattr(self, ours) for key, ours in _ORIGINAL_POOLING.items()}
    hf["image_pooling_stride"] = self.image_kernel
    return {k: list(v) if isinstance(v, tuple) else v for k, v in hf.items() if v is not None}


def _pooling_for(pooling: PoolingConfig | str, hf: dict, shapes: dict, where: Path
                 ) -> PoolingConfig:
  """``pooling`` completed from config.json: a mode string takes the file's windows, and so
  do the fields a PoolingConfig leaves at their defaults; fields it sets win (video kernel
  and output size count as one: both come from the argument when it sets either)."""
  given = PoolingConfig(pooling) if isinstance(pooling, str) else pooling
  default = PoolingConfig(given.mode)
  changed = {f.name: getattr(given, f.name) for f in dataclasses.fields(given)
             if getattr(given, f.name) != getattr(default, f.name)}
  if changed.keys() & {"video_kernel", "video_output"}:
    changed.update(video_kernel=given.video_kernel, video_output=given.video_output)
  pooling = dataclasses.replace(PoolingConfig.from_hf(hf, given.mode, where), **changed)
  if MODES[pooling.mode].windows is not None:
    read = [k for k in ORIGINAL_POOLING_KEYS if hf.get(k) is not None]
    # PPLLaVA's own folder without its pooling keys is an assumption worth a warning
    level = logging.WARNING if _SCORER_TENSOR in shapes and not read else logging.INFO
    log.log(level, "%s: %s; from config.json: %s, the rest as given or the original's defaults",
            where, pooling, ", ".join(read) or "none of the original's pooling keys")
  return pooling


@dataclasses.dataclass(frozen=True)
class PPLLaVAConfig:
  vision: CLIPVisionConfig | SiglipVisionConfig
  text: DecoderConfig
  image_token_index: int
  video_token_index: int
  grid_pinpoints: tuple[tuple[int, int], ...]
  vision_feature_layer: int = -2
  projector_bias: bool = True
  pooling: PoolingConfig = PoolingConfig()
  scorer: ScorerConfig | SiglipScorerConfig | None = None  # config.json: "ppllava_scorer"
  btadapter: BTAdapterConfig | None = None  # the released Vicuna models' vision tower
  model_type: str = "llava_next"  # or "llava_onevision": which config.json to write
  drop_cls: bool = True  # vision_feature_select_strategy "default" (True) / "full"
  max_image_patches: int | None = None  # OneVision's "anyres_max_N" ("llava_onevision" mode)

  @classmethod
  def from_hf(cls, hf: dict, pooling: PoolingConfig) -> "PPLLaVAConfig":
    """From a llava-hf LLaVA-NeXT / LLaVA-NeXT-Video / LLaVA-OneVision config.json dict
    (``complete_config`` adds what PPLLaVA's own folders leave out) and the pooling
    (``PoolingConfig.from_hf`` reads a config.json's)."""
    from transformers import AutoConfig
    full = AutoConfig.for_model(**hf)
    strategy, vision_type = full.vision_feature_select_strategy, full.vision_config.model_type
    if strategy not in ("default", "full") or not isinstance(
        full.vision_feature_layer, int) or full.projector_hidden_act != "gelu":
      raise ValueError("only vision_feature_select_strategy 'default' or 'full', one int "
                       "vision_feature_layer and projector_hidden_act='gelu' are supported; got "
                       f"{strategy!r}, {full.vision_feature_layer!r}, {full.projector_hidden_act!r}")
    btadapter = BTAdapterConfig(**hf[BTADAPTER_KEY]) if BTADAPTER_KEY in hf else None
    if vision_type not in _VISION or (btadapter and vision_type != "clip_vision_model"):
      raise ValueError(f"vision tower {vision_type!r} is not supported: expected one of "
                       f"{list(_VISION)} (the BT-Adapter only on CLIP)")
    aspect = getattr(full, "vision_aspect_ratio", None)
    if aspect is not None and not aspect.startswith(_ANYRES_MAX):
      raise ValueError(f"vision_aspect_ratio {aspect!r} is not supported: expected anyres_max_N")
    return cls(
        vision=pretrained.pick_fields(_VISION[vision_type], full.vision_config),
        text=DecoderConfig.from_hf(full.text_config.to_dict()),
        image_token_index=full.image_token_index,
        video_token_index=getattr(full, "video_token_index", -1),
        grid_pinpoints=tuple(tuple(p) for p in full.image_grid_pinpoints),
        vision_feature_layer=full.vision_feature_layer,
        projector_bias=getattr(full, "multimodal_projector_bias", True),
        pooling=pooling,
        scorer=scorer_config_from_hf(hf[SCORER_KEY]) if SCORER_KEY in hf else None,
        btadapter=btadapter,
        model_type="llava_onevision" if full.model_type == "llava_onevision" else "llava_next",
        drop_cls=strategy == "default",
        max_image_patches=None if aspect is None else int(aspect[len(_ANYRES_MAX):]))

  def video_tokens(self, frames: int) -> int:
    """LLM tokens one video of ``frames`` frames becomes under ``pooling.mode``."""
    return MODES[self.pooling.mode].count(self, frames)

  def image_packing(self) -> tuple[int, int | None]:
    """(pool, max_patches) of the anyres packing under ``pooling.mode``: the image windows'
    side (1: tiles unpooled) and OneVision's N of anyres_max_N (None: no downscale), as
    ``ops.num_image_features`` / ``ops.pack_image_features`` take them."""
    mode = MODES[self.pooling.mode]
    return (1 if mode.windows is None else self.pooling.image_kernel[1],
            self.max_image_patches if mode.anyres_max else None)

  def image_tokens(self, size_hw) -> int:
    """LLM tokens one anyres image of (height, width) ``size_hw`` becomes."""
    pool, max_patches = self.image_packing()
    return ops.num_image_features(size_hw, self.grid_pinpoints, self.vision.image_size,
                                  self.vision.patch_size, pool=pool, max_patches=max_patches)

  def to_hf(self) -> dict:
    """A LLaVA-NeXT-Video config.json (the superset of LLaVA-NeXT's) or a LLaVA-OneVision
    one, plus the pooling windows in the original's keys and our scorer / adapter entries."""
    from transformers import LlavaNextVideoConfig, LlavaOnevisionConfig
    vision_type = next(k for k, v in _VISION.items() if isinstance(self.vision, v))
    common = dict(
        vision_config=dict(dataclasses.asdict(self.vision), model_type=vision_type),
        text_config=self.text.to_hf(),
        image_token_index=self.image_token_index, video_token_index=self.video_token_index,
        image_grid_pinpoints=[list(p) for p in self.grid_pinpoints],
        vision_feature_layer=self.vision_feature_layer,
        vision_feature_select_strategy="default" if self.drop_cls else "full",
        multimodal_projector_bias=self.projector_bias)
    if self.model_type == "llava_onevision":
      hf = LlavaOnevisionConfig(**common,
                                vision_aspect_ratio=f"{_ANYRES_MAX}{self.max_image_patches}"
                                ).to_dict()
    else:
      hf = LlavaNextVideoConfig(**common,
                                spatial_pool_stride=self.pooling.llava_next_stride).to_dict()
    hf.update(self.pooling.to_hf())
    if self.scorer is not None:
      hf[SCORER_KEY] = self.scorer.to_hf()
    if self.btadapter is not None:
      hf[BTADAPTER_KEY] = dataclasses.asdict(self.btadapter)
    return hf


def _stated(hf: dict, key: str, where: str | Path):
  """config.json's ``key`` (``section.name``: in a sub-config), as ``_literal`` reads it."""
  section, _, name = key.rpartition(".")
  return _literal(hf.get(section, {}) if section else hf, name, where)


def _vision_of(hf: dict) -> CLIPVisionConfig | SiglipVisionConfig:
  return PPLLaVAConfig.from_hf(hf, PoolingConfig("none")).vision


def _check_original_keys(hf: dict, shapes: dict[str, tuple[int, ...]], vision,
                         adapter: BTAdapterConfig | None, where: str | Path) -> None:
  """The original's keys that the checkpoint fixes too must agree with it (``qwen`` selects
  SigLIP and Qwen2; ``frame_shape`` is the patch grid). Only where the thing they describe
  exists: the original writes ``btadapter_depth`` / ``max_T`` and ``extend_clip`` always."""
  siglip = isinstance(vision, SiglipVisionConfig)
  checks = [("qwen", siglip, f"the {'SigLIP' if siglip else 'CLIP'} vision tower"),
            ("frame_shape", (vision.grid, vision.grid), "the vision tower's patch grid"),
            ("btadapter", adapter is not None, "the BT-Adapter tensors")]
  if adapter is not None:
    checks += [(key, getattr(adapter, field), "the BT-Adapter tensors")
               for key, field in _ADAPTER_KEYS.items()]
  if _SCORER_TENSOR in shapes:
    scorer_siglip = SIGLIP_HEAD_TENSOR in shapes
    checks += [("qwen", scorer_siglip, f"the {'SigLIP' if scorer_siglip else 'CLIP'} scorer"),
               ("extend_clip", _EXTENDED_TENSOR in shapes, "the scorer's text position tables")]
  for key, found, what in checks:
    stated = _stated(hf, key, where)
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
      encoder_hf), folder


def _scorer_config(hf: dict, shapes: dict[str, tuple[int, ...]], vision, where: Path,
                   clip: CLIPConfig | SiglipConfig | None, clip_source: str
                   ) -> ScorerConfig | SiglipScorerConfig:
  """The scorer tensors' config from the best source (``complete_config``'s order)."""
  if clip is not None:
    scorer = stored_scorer_config(shapes, vision, where, clip, clip_source)
    if SCORER_KEY in hf and scorer_config_from_hf(hf[SCORER_KEY]) != scorer:
      log.warning("%s: %s describes the scorer otherwise than config.json's %s; %s wins",
                  where, clip_source, SCORER_KEY, clip_source)
    return scorer
  weight = _clip_weight(hf, where)
  if weight is not None:
    log.info("%s: the scorer's settings from clip_weight %s", where, weight[1])
    return stored_scorer_config(shapes, vision, where, weight[0], f"clip_weight {weight[1]}")
  scorer = stored_scorer_config(shapes, vision, where)
  log.warning("%s: scorer tensors found but config.json does not describe them; inferred %s "
              "(sizes from the tensors, the rest as the released models' encoder: the last "
              "resort; clip= or a clip_weight folder would describe it)", where, scorer)
  return scorer


def complete_config(hf: dict, shapes: dict[str, tuple[int, ...]], where: str | Path,
                    clip: CLIPConfig | SiglipConfig | None = None,
                    clip_source: str = "clip=") -> dict:
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
  vision = _vision_of(hf)
  adapter = (BTAdapterConfig.from_shapes(shapes, _VISION_PREFIX) if _BTADAPTER_TENSOR in shapes
             else None)
  _check_original_keys(hf, shapes, vision, adapter, where)
  if adapter is not None and BTADAPTER_KEY not in hf:
    hf[BTADAPTER_KEY] = dataclasses.asdict(adapter)
    if all(_stated(hf, key, where) is None for key in _ADAPTER_KEYS):
      log.warning("%s: BT-Adapter tensors found but config.json does not describe them; "
                  "depth=%d and max_T=%d read off the tensors (the last resort), drop-path "
                  "rates %s/%s the original's", where, adapter.depth, adapter.max_T,
                  adapter.drop_path_rate, adapter.temporal_drop_path_rate)
  if _SCORER_TENSOR in shapes and (clip is not None or SCORER_KEY not in hf):
    hf[SCORER_KEY] = _scorer_config(hf, shapes, vision, Path(where), clip, clip_source).to_hf()
  return hf


class Projector(nnx.Module):
  """LLaVA's MLP: linear -> GELU -> linear, vision width to LLM width."""

  def __init__(self, d_vision: int, d_text: int, bias: bool, *, rngs: nnx.Rngs):
    self.linear_1 = Linear(d_vision, d_text, use_bias=bias, axes=(None, "embed"), rngs=rngs)
    self.linear_2 = Linear(d_text, d_text, use_bias=bias, axes=("embed", "embed"), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_2(jax.nn.gelu(self.linear_1(x), approximate=False))


def _media_owners(input_ids_bl: jax.Array, token: int, count: int) -> jax.Array:
  """The batch row of each of the first ``count`` placeholder runs, in row-major order."""
  is_tok = input_ids_bl == token
  starts = is_tok & ~jnp.pad(is_tok, ((0, 0), (1, 0)))[:, :-1]
  flat = jnp.nonzero(starts.reshape(-1), size=count, fill_value=0)[0]
  return flat // input_ids_bl.shape[1]


class PPLLaVA(nnx.Module):

  def __init__(self, cfg: PPLLaVAConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    if isinstance(cfg.vision, SiglipVisionConfig):
      self.vision_tower = SiglipVisionTransformer(cfg.vision, rngs=rngs)
    elif cfg.btadapter is not None:
      self.vision_tower = BTAdapterVisionTransformer(cfg.vision, cfg.btadapter, rngs=rngs)
    else:
      self.vision_tower = CLIPVisionTransformer(cfg.vision, rngs=rngs)
    self.multi_modal_projector = Projector(cfg.vision.hidden_size, cfg.text.hidden_size,
                                           cfg.projector_bias, rngs=rngs)
    self.language_model = CausalLM(cfg.text, rngs=rngs)
    self.image_newline = nnx.Param(jnp.zeros((cfg.text.hidden_size,)), axes=("embed",))
    # Needed by the "ppllava" / "paper" modes. A submodule even when attached after
    # loading (nnx.data), so it splits, jits, shards and saves with the rest.
    self.scorer = nnx.data(None if cfg.scorer is None else build_scorer(cfg.scorer, rngs=rngs))

  # ---- media -> LLM tokens ------------------------------------------------------------

  def patch_features(self, frames_btchw: jax.Array) -> jax.Array:
    """(B, T, 3, H, W) -> (B, T, g, g, D_vision): the chosen layer's patches, CLS dropped
    (``drop_cls``; SigLIP has none).

    A plain CLIP tower sees every frame alone; the BT-Adapter tower sees each item's
    frames together (images and anyres tiles are one-frame items, as in the original).
    """
    b, t = frames_btchw.shape[:2]
    if self.cfg.btadapter is not None:
      hidden = self.vision_tower(frames_btchw)[0][self.cfg.vision_feature_layer]
    else:
      flat = self.vision_tower(frames_btchw.reshape(b * t, *frames_btchw.shape[2:]))
      hidden = flat[self.cfg.vision_feature_layer].reshape(b, t, *flat[0].shape[1:])
    g = self.cfg.vision.grid
    patches = hidden[:, :, 1:] if self.cfg.drop_cls else hidden
    return patches.reshape(b, t, g, g, hidden.shape[-1])

  def pool(self, feats_btggv: jax.Array, text_be: jax.Array | None, kernel, stride=None,
           mask_bt: jax.Array | None = None) -> jax.Array:
    """Projected tokens (B, T', g', g', D) pooled by PPLLaVA's windows (stride: the
    kernel's by default), weighted as the mode says (``MODES``). ``mask_bt`` (B, T) marks
    the real frames (tiles, pictures) of padded items: the others get relevance 0 and stay
    out of the softmax's denominator (a blank frame's patches would otherwise take a share,
    and its L2 normalisation a huge gradient)."""
    mode = MODES[self.cfg.pooling.mode]
    x_btggd = self.multi_modal_projector(feats_btggv)
    probs = (self.scorer(feats_btggv, text_be, mask_bt) if mode.scored
             else jnp.ones(x_btggd.shape[:4], jnp.float32))
    return ops.prompt_guided_pool(x_btggd, probs, kernel, stride, mode=mode.windows,
                                  temperature=self.cfg.pooling.temperature)

  def encode_videos(self, videos_btchw: jax.Array, text_be: jax.Array | None,
                    frame_mask_bt: jax.Array | None = None) -> jax.Array:
    """(V, T, 3, H, W) -> (V, tokens, D), as the pooling mode says (``MODES``);
    ``frame_mask_bt`` marks the real frames of videos padded to T (``pool``)."""
    tokens = MODES[self.cfg.pooling.mode].videos(self, self.patch_features(videos_btchw), text_be,
                                                 frame_mask_bt)
    return tokens.reshape(videos_btchw.shape[0], -1, tokens.shape[-1])

  def relevance_maps(self, videos_btchw: jax.Array, clip_input_ids: jax.Array,
                     clip_attention_mask: jax.Array | None = None) -> jax.Array:
    """(V, T, g, g) cosine of each patch with its video's prompt: what Eq. 1 turns into
    probabilities, and what pictures should show (the probabilities are too peaked)."""
    if self.scorer is None:
      raise ValueError("relevance maps need the relevance scorer (a checkpoint with one, or "
                       "clip= when loading)")
    feats_btggv = self.patch_features(videos_btchw)
    text_be = self.scorer.text_features(clip_input_ids, clip_attention_mask)
    return ops.relevance_logits(self.scorer.patch_embeddings(feats_btggv), text_be)

  def encode_images(self, images_ntchw: jax.Array, image_sizes, text_be: jax.Array | None
                    ) -> list[jax.Array]:
    """Anyres images -> one (tokens_i, D) array each. Sizes are host values (static)."""
    cfg = self.cfg
    sizes = [tuple(int(x) for x in s) for s in np.asarray(image_sizes)]
    tiles = [1 + int(np.prod(ops.anyres_grid_shape(s, cfg.grid_pinpoints, cfg.vision.image_size)))
             for s in sizes]
    feats = [self.patch_features(images_ntchw[i, :n, None])[:, 0] for i, n in enumerate(tiles)]
    if MODES[cfg.pooling.mode].windows is None:
      per_image = [self.multi_modal_projector(f) for f in feats]
    else:  # tiles share one relevance softmax: they go on the T axis of one item
      per_image = [self.pool(f[None], None if text_be is None else text_be[i:i + 1],
                              cfg.pooling.image_kernel)[0] for i, f in enumerate(feats)]
    per_image = [x.reshape(x.shape[0], -1, x.shape[-1]) for x in per_image]
    pool, max_patches = cfg.image_packing()
    return ops.pack_image_features(per_image, sizes, cfg.grid_pinpoints, cfg.vision.image_size,
                                   cfg.vision.patch_size, self.image_newline[...], pool=pool,
                                   max_patches=max_patches)

  # ---- forward ------------------------------------------------------------------------

  def embed(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
            pixel_values: jax.Array | None = None, image_sizes=None,
            pixel_values_videos: jax.Array | None = None,
            clip_input_ids: jax.Array | None = None,
            clip_attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(inputs_embeds (B, L, D), attention_mask (B, L) bool): the text's embeddings with each
    video's and image's tokens written at their placeholders (module doc), and the mask the
    LLM reads with them (all ones when none is given). What the forward and generation feed
    the LLM; DPO encodes the media once with it and splices in each answer's embeddings."""
    cfg = self.cfg
    emb_bld = self.language_model.embed(jnp.maximum(input_ids, 0))  # -1: video placeholders
    mask_bl = (jnp.ones(input_ids.shape, bool) if attention_mask is None
               else attention_mask.astype(bool))
    text_be = None
    if cfg.pooling.scored and (pixel_values is not None or pixel_values_videos is not None):
      if self.scorer is None:
        raise ValueError(f"pooling mode {cfg.pooling.mode!r} scores relevance with CLIP: attach "
                         "a scorer (PPLLaVA.from_pretrained(path, clip=...))")
      if clip_input_ids is None:
        raise ValueError(f"pooling mode {cfg.pooling.mode!r} needs the prompt for the scorer: "
                         "pass clip_input_ids (one row per sample)")
      text_be = self.scorer.text_features(clip_input_ids, clip_attention_mask)
    if pixel_values_videos is not None:
      owners = _media_owners(input_ids, cfg.video_token_index, pixel_values_videos.shape[0])
      tokens = self.encode_videos(pixel_values_videos, None if text_be is None else text_be[owners])
      flat = tokens.reshape(-1, tokens.shape[-1])
      emb_bld = ops.merge_media(emb_bld, input_ids, flat, jnp.ones(flat.shape[0], bool),
                                cfg.video_token_index)
    if pixel_values is not None:
      if image_sizes is None:
        raise ValueError("pixel_values need image_sizes (N, 2) (height, width), as LLaVA-NeXT "
                         "processors give")
      owners = _media_owners(input_ids, cfg.image_token_index, pixel_values.shape[0])
      packed = self.encode_images(pixel_values, image_sizes,
                                  None if text_be is None else text_be[owners])
      flat = jnp.concatenate(packed, axis=0)
      emb_bld = ops.merge_media(emb_bld, input_ids, flat, jnp.ones(flat.shape[0], bool),
                                cfg.image_token_index)
    return emb_bld, mask_bl

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               position_ids: jax.Array | None = None, cache: KVCache | None = None, *,
               pixel_values: jax.Array | None = None, image_sizes=None,
               pixel_values_videos: jax.Array | None = None,
               clip_input_ids: jax.Array | None = None,
               clip_attention_mask: jax.Array | None = None,
               last_only: bool = False) -> CausalLMOutput:
    """Logits (B, L, vocab) of the LLM on ``embed``'s embeddings; ``last_only``: the last
    position's (B, 1, vocab), as a prefill needs."""
    emb_bld, mask_bl = self.embed(input_ids, attention_mask, pixel_values=pixel_values,
                                  image_sizes=image_sizes, pixel_values_videos=pixel_values_videos,
                                  clip_input_ids=clip_input_ids,
                                  clip_attention_mask=clip_attention_mask)
    return self.language_model(inputs_embeds=emb_bld, attention_mask=mask_bl,
                               position_ids=position_ids, cache=cache, last_only=last_only)

  def init_cache(self, batch: int, length: int, dtype=None) -> KVCache:
    return self.language_model.init_cache(batch, length, dtype)

  def generate(self, input_ids, attention_mask=None, *, pixel_values_videos=None,
               pixel_values=None, image_sizes=None, clip_input_ids=None,
               clip_attention_mask=None, **kwargs):
    """Token ids (B, L + max_new_tokens): ``models.generate.generate`` with media.

    Anyres image sizes fix the token layout, so they are compile-time constants: each
    distinct set of sizes compiles once (videos, of fixed frame count, never do).
    """
    media = {k: v for k, v in dict(pixel_values_videos=pixel_values_videos,
                                   pixel_values=pixel_values, clip_input_ids=clip_input_ids,
                                   clip_attention_mask=clip_attention_mask).items()
             if v is not None}
    static = {}
    if image_sizes is not None:
      static["image_sizes"] = tuple(tuple(int(x) for x in s) for s in np.asarray(image_sizes))
    return generate(self, input_ids, attention_mask, media=media, static_media=static, **kwargs)

  # ---- checkpoints --------------------------------------------------------------------

  @classmethod
  def from_pretrained(cls, path: str | Path,
                      clip: str | Path | CLIPModel | SiglipModel | None = None,
                      pooling: PoolingConfig | str = PoolingConfig(),
                      dtype: jnp.dtype | None = None,
                      clip_extend_keep: int | None = 20) -> "PPLLaVA":
    """A llava-hf LLaVA-NeXT(-Video) or LLaVA-OneVision folder, PPLLaVA's own, or one
    ``save_pretrained`` wrote.

    ``pooling``: a mode (``POOLING_MODES``) or a PoolingConfig. The ``"ppllava"`` /
    ``"paper"`` modes need the relevance scorer: PPLLaVA's folders and ours hold it
    (``multi_modal_projector.clip_*`` tensors). For a plain llava-hf folder give ``clip=``:
    a CLIP (LLaVA-NeXT) or SigLIP (OneVision) folder or model, whose text tower is extended
    (77 -> 248, SigLIP 64 -> 196) with ``clip_extend_keep`` (PPLLaVA's 20; None keeps it)
    when loaded from a folder. Given with a folder that holds a scorer, ``clip=`` describes
    it (head counts, activation, epsilon, EOS rule; the sizes must match the tensors'), and
    the log says whether the token embeddings are the given model's.

    What is not in the tensors comes from, first to last:
      1. the arguments: ``clip=``; the pooling mode, and the PoolingConfig fields set away
         from their defaults;
      2. config.json: our ``ppllava_scorer`` / ``ppllava_btadapter``, then the original's
         keys (``pooling_kernel`` / ``pooling_stride`` / ``pllava_pooling_shape``,
         ``image_pooling_kernel`` / ``image_pooling_stride``, ``pooling_temp``;
         ``btadapter_depth``, ``max_T``, ``frame_shape``, ``extend_clip``, ``qwen``, which
         are checked against the checkpoint);
      3. the config of the CLIP / SigLIP folder config.json's ``clip_weight`` names
         (absolute, or relative to ``path``);
      4. inference from the tensor shapes and the released models' conventions, the last
         resort, said in the log; the pooling takes the original's defaults.
    A config.json value that disagrees with the tensors raises a ``CheckpointError`` naming
    the folder, the key and both values.
    """
    path = pretrained.resolve_checkpoint(path)
    hf, shapes = pretrained.read_config(path, MODEL_TYPES), checkpoint_shapes(path)
    source = (f"clip= {clip}" if isinstance(clip, (str, Path))
              else f"clip= (a {type(clip).__name__})")
    if clip is not None and not isinstance(clip, (CLIPModel, SiglipModel)):
      encoder = SiglipModel if isinstance(_vision_of(hf), SiglipVisionConfig) else CLIPModel
      # it only describes a scorer already inside, whose position tables are the tensors'
      clip = encoder.from_pretrained(
          clip, dtype, extend_text=None if _SCORER_TENSOR in shapes else clip_extend_keep)
    hf = complete_config(hf, shapes, path, None if clip is None else clip.cfg, source)
    cfg = PPLLaVAConfig.from_hf(hf, _pooling_for(pooling, hf, shapes, path))
    if cfg.scorer is None and cfg.pooling.scored and clip is None:
      raise ValueError(f"pooling mode {cfg.pooling.mode!r} needs the relevance scorer, and "
                       f"{path} has none: give clip= (a CLIP or SigLIP folder or model)")
    model = load_into(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))), path,
                      LLAVA_NEXT_RULES, dtype)
    if clip is not None and model.scorer is not None:
      # The original builds a fresh token table for its extended text tower and nothing
      # copies CLIP's into it (reference section 3): say which one this checkpoint holds.
      ours = model.scorer.text_model.embeddings.token_embedding.weight[...]
      theirs = clip.text_model.embeddings.token_embedding.weight[...]
      same = ours.shape == theirs.shape and bool(jnp.array_equal(ours, theirs))
      log.warning("%s: the scorer's token embedding %s the given encoder's; the checkpoint's "
                  "scorer is kept", path, "equals" if same else "differs from")
    elif clip is not None:
      if clip.cfg.vision.hidden_size != cfg.vision.hidden_size:
        raise ValueError(f"the scoring encoder's vision width {clip.cfg.vision.hidden_size} does "
                         f"not match the vision tower's {cfg.vision.hidden_size}")
      scorer = (SiglipRelevanceScorer.from_siglip(clip) if isinstance(clip, SiglipModel)
                else RelevanceScorer.from_clip(clip))
      model.cfg = dataclasses.replace(cfg, scorer=scorer.cfg)
      model.scorer = nnx.data(scorer)
    return model

  def save_pretrained(self, path: str | Path) -> Path:
    """The llava-hf layout (hub vision-tower names); a scorer goes in as PPLLaVA's
    ``multi_modal_projector.clip_*`` tensors, its config as ``ppllava_scorer``."""
    return pretrained.save_pretrained(self, path, LLAVA_NEXT_RULES, self.cfg.to_hf())
