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
token). Only the first two need the scorer. PPLLaVA's own Qwen model packs images the
LLaVA-NeXT way (no ``anyres_max`` step), as the original code does.

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

import dataclasses
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ppllava_jax import ops
from ppllava_jax.convert.llava import LLAVA_NEXT_RULES
from ppllava_jax.convert.loader import checkpoint_shapes, load_into
from ppllava_jax.models import pretrained
from ppllava_jax.models.btadapter import BTAdapterConfig, BTAdapterVisionTransformer
from ppllava_jax.models.clip import CLIPModel, CLIPVisionConfig, CLIPVisionTransformer
from ppllava_jax.models.generate import generate
from ppllava_jax.models.layers import Linear
from ppllava_jax.models.llm import CausalLM, CausalLMOutput, DecoderConfig, KVCache
from ppllava_jax.models.scorer import (RelevanceScorer, ScorerConfig, SiglipRelevanceScorer,
                                       SiglipScorerConfig, build_scorer, infer_scorer_config,
                                       scorer_config_from_hf)
from ppllava_jax.models.siglip import SiglipModel, SiglipVisionConfig, SiglipVisionTransformer

SCORER_KEY = "ppllava_scorer"
BTADAPTER_KEY = "ppllava_btadapter"
_BTADAPTER_TENSOR = "vision_tower.vision_model.btadapter_cls_token"
_SCORER_TENSOR = "multi_modal_projector.clip_text_model.embeddings.token_embedding.weight"
log = logging.getLogger(__name__)
MODEL_TYPES = ("llava_next", "llava_next_video", "llava_onevision")
POOLING_MODES = ("ppllava", "paper", "average", "llava_next_video", "llava_onevision", "none")
_UNPOOLED_IMAGES = ("llava_next_video", "llava_onevision", "none")  # LLaVA never pools images
_VISION = {"clip_vision_model": CLIPVisionConfig, "siglip_vision_model": SiglipVisionConfig}
_ANYRES_MAX = "anyres_max_"
_SCORED = {"ppllava": "softmax", "paper": "weighted_sum"}


@dataclasses.dataclass(frozen=True)
class PoolingConfig:
  mode: str = "ppllava"
  video_kernel: tuple[int, int, int] = (2, 3, 3)
  image_kernel: tuple[int, int, int] = (1, 3, 3)
  temperature: float = 0.01
  llava_next_stride: int = 2  # "llava_next_video": the spatial mean's window

  def __post_init__(self):
    if self.mode not in POOLING_MODES:
      raise ValueError(f"pooling mode must be one of {POOLING_MODES}, got {self.mode!r}")
    if self.image_kernel[0] != 1:
      raise ValueError(f"image tiles are pooled per tile: image_kernel must be (1, k, k), "
                       f"got {self.image_kernel}")

  @property
  def scored(self) -> bool:
    return self.mode in _SCORED


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
    (``complete_config`` adds what PPLLaVA's own folders leave out)."""
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
    stride = getattr(full, "spatial_pool_stride", pooling.llava_next_stride)
    return cls(
        vision=pretrained.pick_fields(_VISION[vision_type], full.vision_config),
        text=DecoderConfig.from_hf(full.text_config.to_dict()),
        image_token_index=full.image_token_index,
        video_token_index=getattr(full, "video_token_index", -1),
        grid_pinpoints=tuple(tuple(p) for p in full.image_grid_pinpoints),
        vision_feature_layer=full.vision_feature_layer,
        projector_bias=getattr(full, "multimodal_projector_bias", True),
        pooling=dataclasses.replace(pooling, llava_next_stride=stride),
        scorer=scorer_config_from_hf(hf[SCORER_KEY]) if SCORER_KEY in hf else None,
        btadapter=btadapter,
        model_type="llava_onevision" if full.model_type == "llava_onevision" else "llava_next",
        drop_cls=strategy == "default",
        max_image_patches=None if aspect is None else int(aspect[len(_ANYRES_MAX):]))

  def video_tokens(self, frames: int) -> int:
    """LLM tokens one video of ``frames`` frames becomes under ``pooling.mode``."""
    g, mode = self.vision.grid, self.pooling.mode
    if mode == "none":
      return frames * g * g
    if mode == "llava_next_video":
      return frames * (g // self.pooling.llava_next_stride) ** 2
    if mode == "llava_onevision":
      return frames * (-(-g // 2)) ** 2 + 1
    out, _, _ = ops.pool_geometry((frames, g, g), kernel=self.pooling.video_kernel)
    return int(np.prod(out))

  def image_tokens(self, size_hw) -> int:
    """LLM tokens one anyres image of (height, width) ``size_hw`` becomes."""
    unpooled = self.pooling.mode in _UNPOOLED_IMAGES
    return ops.num_image_features(
        size_hw, self.grid_pinpoints, self.vision.image_size, self.vision.patch_size,
        pool=1 if unpooled else self.pooling.image_kernel[1],
        max_patches=self.max_image_patches if self.pooling.mode == "llava_onevision" else None)

  def to_hf(self) -> dict:
    """A LLaVA-NeXT-Video config.json (the superset of LLaVA-NeXT's) or a LLaVA-OneVision one."""
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
    if self.scorer is not None:
      hf[SCORER_KEY] = self.scorer.to_hf()
    if self.btadapter is not None:
      hf[BTADAPTER_KEY] = dataclasses.asdict(self.btadapter)
    return hf


def complete_config(hf: dict, shapes: dict[str, tuple[int, ...]], where: str | Path) -> dict:
  """``hf`` plus the ``ppllava_btadapter`` / ``ppllava_scorer`` entries a checkpoint's
  tensors call for when its config.json lacks them, as PPLLaVA's own folders do
  (reference section 9); each one filled in is logged. ``where`` names the folder."""
  hf = dict(hf)
  if _BTADAPTER_TENSOR in shapes and BTADAPTER_KEY not in hf:
    depth = len({k.split(".")[3] for k in shapes if ".btadapter_S_layers." in k})
    btadapter = BTAdapterConfig(depth=depth)
    hf[BTADAPTER_KEY] = dataclasses.asdict(btadapter)
    log.warning("%s: BT-Adapter tensors found but config.json does not describe them; using "
                "depth=%d (counted) and the original's max_T=%d, drop-path rates %s/%s", where,
                depth, btadapter.max_T, btadapter.drop_path_rate,
                btadapter.temporal_drop_path_rate)
  if _SCORER_TENSOR in shapes and SCORER_KEY not in hf:
    vision = PPLLaVAConfig.from_hf(hf, PoolingConfig("none")).vision
    scorer = infer_scorer_config(shapes, vision)
    hf[SCORER_KEY] = scorer.to_hf()
    log.warning("%s: scorer tensors found but config.json does not describe them; inferred "
                "%s (sizes from the tensors, the rest as the released models' encoder)", where,
                scorer)
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

  def _pool(self, feats_btggv: jax.Array, text_be: jax.Array | None, kernel) -> jax.Array:
    """Projected and pooled tokens (B, T', g', g', D) for the PPLLaVA-family modes."""
    pooling = self.cfg.pooling
    x_btggd = self.multi_modal_projector(feats_btggv)
    if pooling.mode == "none":
      return x_btggd
    if pooling.mode == "average":
      probs = jnp.ones(x_btggd.shape[:4], jnp.float32)
      return ops.prompt_guided_pool(x_btggd, probs, kernel, mode="average")
    probs = self.scorer(feats_btggv, text_be)
    return ops.prompt_guided_pool(x_btggd, probs, kernel, mode=_SCORED[pooling.mode],
                                  temperature=pooling.temperature)

  def encode_videos(self, videos_btchw: jax.Array, text_be: jax.Array | None) -> jax.Array:
    """(V, T, 3, H, W) -> (V, tokens, D)."""
    v = videos_btchw.shape[0]
    feats_btggv = self.patch_features(videos_btchw)
    if self.cfg.pooling.mode == "llava_next_video":
      s = self.cfg.pooling.llava_next_stride
      ones = jnp.ones(feats_btggv.shape[:4], jnp.float32)
      pooled = ops.prompt_guided_pool(feats_btggv, ones, (1, s, s), mode="average")
      tokens = self.multi_modal_projector(pooled)
    elif self.cfg.pooling.mode == "llava_onevision":
      x_btggd = self.multi_modal_projector(feats_btggv)
      small = -(-x_btggd.shape[2] // 2)  # ceil, as transformers' apply_pooling
      x_btssd = jax.image.resize(x_btggd.astype(jnp.float32), (*x_btggd.shape[:2], small, small,
                                                               x_btggd.shape[-1]),
                                 "bilinear", antialias=False).astype(x_btggd.dtype)
      newline = jnp.broadcast_to(self.image_newline[...].astype(x_btssd.dtype),
                                 (v, 1, x_btssd.shape[-1]))
      return jnp.concatenate([x_btssd.reshape(v, -1, x_btssd.shape[-1]), newline], axis=1)
    else:
      tokens = self._pool(feats_btggv, text_be, self.cfg.pooling.video_kernel)
    return tokens.reshape(v, -1, tokens.shape[-1])

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
    if cfg.pooling.mode in _UNPOOLED_IMAGES:
      per_image, pool = [self.multi_modal_projector(f) for f in feats], 1
    else:  # tiles share one relevance softmax: they go on the T axis of one item
      pool = cfg.pooling.image_kernel[1]
      per_image = [self._pool(f[None], None if text_be is None else text_be[i:i + 1],
                              cfg.pooling.image_kernel)[0] for i, f in enumerate(feats)]
    per_image = [x.reshape(x.shape[0], -1, x.shape[-1]) for x in per_image]
    max_patches = cfg.max_image_patches if cfg.pooling.mode == "llava_onevision" else None
    return ops.pack_image_features(per_image, sizes, cfg.grid_pinpoints, cfg.vision.image_size,
                                   cfg.vision.patch_size, self.image_newline[...], pool=pool,
                                   max_patches=max_patches)

  # ---- forward ------------------------------------------------------------------------

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               position_ids: jax.Array | None = None, cache: KVCache | None = None, *,
               pixel_values: jax.Array | None = None, image_sizes=None,
               pixel_values_videos: jax.Array | None = None,
               clip_input_ids: jax.Array | None = None,
               clip_attention_mask: jax.Array | None = None,
               last_only: bool = False) -> CausalLMOutput:
    """Logits (B, L, vocab) with media merged at their placeholders (module doc);
    ``last_only``: the last position's (B, 1, vocab), as a prefill needs."""
    cfg = self.cfg
    emb_bld = self.language_model.embed(jnp.maximum(input_ids, 0))  # -1: video placeholders
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
    return self.language_model(inputs_embeds=emb_bld, attention_mask=attention_mask,
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
                      pooling: PoolingConfig = PoolingConfig(), dtype: jnp.dtype | None = None,
                      clip_extend_keep: int | None = 20) -> "PPLLaVA":
    """A llava-hf LLaVA-NeXT(-Video) or LLaVA-OneVision folder, or one ``save_pretrained`` wrote.

    The ``"ppllava"`` / ``"paper"`` modes need the relevance scorer: PPLLaVA's own
    folders and those this package saved hold it (``multi_modal_projector.clip_*``
    tensors; when config.json does not describe it, it is inferred and the log says
    so). For a plain llava-hf folder give ``clip=``: a CLIP (LLaVA-NeXT) or SigLIP
    (OneVision) folder or model, whose text tower is extended (77 -> 248, SigLIP
    64 -> 196) with ``clip_extend_keep`` (PPLLaVA's 20; None keeps it) when loaded from
    a folder. Given with a folder that holds a scorer, ``clip=`` is only compared: the
    log says whether the token embeddings are the given model's.
    """
    path = pretrained.resolve_checkpoint(path)
    hf = pretrained.read_config(path, MODEL_TYPES)
    cfg = PPLLaVAConfig.from_hf(complete_config(hf, checkpoint_shapes(path), path), pooling)
    if cfg.scorer is None and pooling.scored and clip is None:
      raise ValueError(f"pooling mode {pooling.mode!r} needs the relevance scorer, and {path} "
                       "has none: give clip= (a CLIP or SigLIP folder or model)")
    model = load_into(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))), path,
                      LLAVA_NEXT_RULES, dtype)
    if clip is not None and not isinstance(clip, (CLIPModel, SiglipModel)):
      encoder = SiglipModel if isinstance(cfg.vision, SiglipVisionConfig) else CLIPModel
      clip = encoder.from_pretrained(clip, dtype, extend_text=clip_extend_keep)
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
