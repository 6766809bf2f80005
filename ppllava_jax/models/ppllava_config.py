"""PPLLaVA's configuration: ``PoolingConfig`` (the pooling mode and PPLLaVA's windows) and
``PPLLaVAConfig`` (the whole model), how many LLM tokens a video or image becomes, and both
as config.json gives them: llava-hf's LLaVA-NeXT(-Video) / LLaVA-OneVision keys, the
original's pooling keys, our ``ppllava_scorer`` / ``ppllava_btadapter`` entries
(``models.released`` adds these to PPLLaVA's own folders, which lack them).
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import Any

from ppllava_jax import ops
from ppllava_jax.convert.loader import CheckpointError
from ppllava_jax.models import pretrained
from ppllava_jax.models.btadapter import BTAdapterConfig
from ppllava_jax.models.clip import CLIPVisionConfig
from ppllava_jax.models.llm import DecoderConfig
from ppllava_jax.models.pooling_modes import MODES, POOLING_MODES
from ppllava_jax.models.scorer import ScorerConfig, SiglipScorerConfig, scorer_config_from_hf
from ppllava_jax.models.siglip import SiglipVisionConfig
from ppllava_jax.ops.geometry import Size3

MODEL_TYPES = ("llava_next", "llava_next_video", "llava_onevision")
SCORER_KEY = "ppllava_scorer"
BTADAPTER_KEY = "ppllava_btadapter"
POOLING_MODE_KEY = "ppllava_pooling_mode"  # the mode the folder was trained / saved with
_VISION = {"clip_vision_model": CLIPVisionConfig, "siglip_vision_model": SiglipVisionConfig}
_ANYRES_MAX = "anyres_max_"

# The original's pooling keys in config.json -> PoolingConfig fields (reference section 2;
# farewellthree/PPLLaVA llava_interleave.py). image_pooling_stride must equal the kernel.
_ORIGINAL_POOLING = {
  "pooling_kernel": "video_kernel",
  "pooling_stride": "video_stride",
  "pllava_pooling_shape": "video_output",
  "image_pooling_kernel": "image_kernel",
  "pooling_temp": "temperature",
}
ORIGINAL_POOLING_KEYS = (*_ORIGINAL_POOLING, "image_pooling_stride")


def config_value(hf: dict, key: str, where: str | Path):
  """config.json's ``key`` (``section.name``: in a sub-config) as the original writes it:
  JSON, or the Python tuple string of its YAML configs ("(2,3,3)"), parsed as a literal,
  never evaluated; lists become tuples. None when absent."""
  section, _, name = key.rpartition(".")
  value = (hf.get(section, {}) if section else hf).get(name)
  if isinstance(value, str):
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError) as err:
      raise CheckpointError(f"{where}: config.json {name}={value!r} is not a literal") from err
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
      if value is not None and (
        len(value) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
      ):
        raise ValueError(f"{name} must be 3 positive ints (time, height, width), got {value!r}")
    if (self.video_kernel is None) == (self.video_output is None):
      raise ValueError(
        "give one of video_kernel and video_output (the output-size form), got "
        f"{self.video_kernel} and {self.video_output}"
      )
    if self.image_kernel[0] != 1 or self.image_kernel[1] != self.image_kernel[2]:
      raise ValueError(
        f"image tiles are pooled per tile: image_kernel must be (1, k, k), got {self.image_kernel}"
      )

  @property
  def scored(self) -> bool:
    return MODES[self.mode].scored

  def video_geometry(self, frames: int, grid: int) -> tuple[Size3, Size3, Size3]:
    """(output size, kernel, stride) for a video of ``frames`` frames of grid x grid patches."""
    return ops.pool_geometry(
      (frames, grid, grid), self.video_output, self.video_kernel, self.video_stride
    )

  @classmethod
  def from_hf(
    cls, hf: dict, mode: str = "ppllava", where: str | Path = "config.json"
  ) -> PoolingConfig:
    """``mode``'s windows as a config.json gives them: the original's keys
    (``ORIGINAL_POOLING_KEYS``, JSON lists or its YAML strings) and transformers'
    ``spatial_pool_stride``; absent keys keep the defaults, the original's documented ones
    (reference section 9; for images that is (1, 3, 3), not the original's fallback to the
    video kernel, which would pool tiles across each other)."""
    given = {
      ours: config_value(hf, key, where)
      for key, ours in _ORIGINAL_POOLING.items()
      if hf.get(key) is not None
    }
    if "video_output" in given:
      if "video_kernel" in given:
        raise CheckpointError(
          f"{where}: config.json gives pllava_pooling_shape "
          f"{given['video_output']} and pooling_kernel "
          f"{given['video_kernel']}: the output-size form replaces the "
          "kernel, give one"
        )
      given["video_kernel"] = None
    image_stride = config_value(hf, "image_pooling_stride", where)
    image_kernel = given.get("image_kernel", cls.image_kernel)
    if image_stride not in (None, image_kernel):
      raise CheckpointError(
        f"{where}: config.json image_pooling_stride={image_stride} differs "
        f"from image_pooling_kernel={image_kernel}: anyres images are packed "
        "from windows that tile each tile, stride = kernel"
      )
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
  def from_hf(cls, hf: dict, pooling: PoolingConfig) -> PPLLaVAConfig:
    """From a llava-hf LLaVA-NeXT / LLaVA-NeXT-Video / LLaVA-OneVision config.json dict
    (``complete_config`` adds what PPLLaVA's own folders leave out) and the pooling
    (``PoolingConfig.from_hf`` reads a config.json's)."""
    from transformers import AutoConfig

    full = AutoConfig.for_model(**hf)
    strategy, vision_type = full.vision_feature_select_strategy, full.vision_config.model_type
    if (
      strategy not in ("default", "full")
      or not isinstance(full.vision_feature_layer, int)
      or full.projector_hidden_act != "gelu"
    ):
      raise ValueError(
        "only vision_feature_select_strategy 'default' or 'full', one int "
        "vision_feature_layer and projector_hidden_act='gelu' are supported; got "
        f"{strategy!r}, {full.vision_feature_layer!r}, {full.projector_hidden_act!r}"
      )
    btadapter = BTAdapterConfig(**hf[BTADAPTER_KEY]) if BTADAPTER_KEY in hf else None
    if vision_type not in _VISION or (btadapter and vision_type != "clip_vision_model"):
      raise ValueError(
        f"vision tower {vision_type!r} is not supported: expected one of "
        f"{list(_VISION)} (the BT-Adapter only on CLIP)"
      )
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
      max_image_patches=None if aspect is None else int(aspect[len(_ANYRES_MAX) :]),
    )

  def video_tokens(self, frames: int) -> int:
    """LLM tokens one video of ``frames`` frames becomes under ``pooling.mode``."""
    return MODES[self.pooling.mode].count(self, frames)

  def image_packing(self) -> tuple[int, int | None]:
    """(pool, max_patches) of the anyres packing under ``pooling.mode``: the image windows'
    side (1: tiles unpooled) and OneVision's N of anyres_max_N (None: no downscale), as
    ``ops.num_image_features`` / ``ops.pack_image_features`` take them."""
    mode = MODES[self.pooling.mode]
    return (
      1 if mode.windows is None else self.pooling.image_kernel[1],
      self.max_image_patches if mode.anyres_max else None,
    )

  def image_tokens(self, size_hw) -> int:
    """LLM tokens one anyres image of (height, width) ``size_hw`` becomes."""
    pool, max_patches = self.image_packing()
    return ops.num_image_features(
      size_hw,
      self.grid_pinpoints,
      self.vision.image_size,
      self.vision.patch_size,
      pool=pool,
      max_patches=max_patches,
    )

  def to_hf(self) -> dict:
    """A LLaVA-NeXT-Video config.json (the superset of LLaVA-NeXT's) or a LLaVA-OneVision
    one, plus the pooling windows in the original's keys and our scorer / adapter entries."""
    from transformers import LlavaNextVideoConfig, LlavaOnevisionConfig

    vision_type = next(k for k, v in _VISION.items() if isinstance(self.vision, v))
    common: dict[str, Any] = dict(
      vision_config=dict(dataclasses.asdict(self.vision), model_type=vision_type),
      text_config=self.text.to_hf(),
      image_token_index=self.image_token_index,
      video_token_index=self.video_token_index,
      image_grid_pinpoints=[list(p) for p in self.grid_pinpoints],
      vision_feature_layer=self.vision_feature_layer,
      vision_feature_select_strategy="default" if self.drop_cls else "full",
      multimodal_projector_bias=self.projector_bias,
    )
    if self.model_type == "llava_onevision":
      hf = LlavaOnevisionConfig(
        **common, vision_aspect_ratio=f"{_ANYRES_MAX}{self.max_image_patches}"
      ).to_dict()
    else:
      hf = LlavaNextVideoConfig(
        **common, spatial_pool_stride=self.pooling.llava_next_stride
      ).to_dict()
    hf.update(self.pooling.to_hf())
    hf[POOLING_MODE_KEY] = self.pooling.mode
    if self.scorer is not None:
      hf[SCORER_KEY] = self.scorer.to_hf()
    if self.btadapter is not None:
      hf[BTADAPTER_KEY] = dataclasses.asdict(self.btadapter)
    return hf
