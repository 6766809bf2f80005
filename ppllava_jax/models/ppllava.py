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

The pooling mode (``PoolingConfig.mode``) says what happens between the tower and the
LLM: ``models.pooling_modes.MODES`` is the one table of what each does. PPLLaVA's own Qwen
model packs images the LLaVA-NeXT way (no ``anyres_max`` step), as the original code does.
The configs live in ``models.ppllava_config``, the reading of PPLLaVA's own folders in
``models.released``; this module re-exports the names callers import from it.

``PPLLaVA.embed`` merges the media into the text's embeddings; the forward and
generation run the LLM on what it returns.

Media layout: ``pixel_values_videos`` (V, T, 3, H, W), one video per run of video
placeholders; ``pixel_values`` (N, max_tiles, 3, H, W) with ``image_sizes`` (N, 2)
(height, width) as LLaVA-NeXT processors give, one image per run of image
placeholders. ``PPLLaVAConfig.video_tokens`` / ``image_tokens`` say how long each run
is. Checkpoints without a video token (LLaVA-NeXT, PPLLaVA's own, where the original
marks videos with ``<image>`` too) take videos at placeholder id -1, which only the
processor writes and which never reaches the embedding table. Runs of one kind must be
separated by at least one other token (any prompt template does this); the k-th run
belongs to the k-th item. The scorer's text, one row per sample, arrives as
``clip_input_ids`` / ``clip_attention_mask``.
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
from ppllava_jax.models.btadapter import (
  BTAdapterConfig,
  BTAdapterVisionTransformer,
  CLIPVisionBTAdapter,
)
from ppllava_jax.models.clip import CLIPModel, CLIPVisionTransformer
from ppllava_jax.models.generate import generate
from ppllava_jax.models.layers import Linear, set_attention, set_remat
from ppllava_jax.models.llm import CausalLM, CausalLMOutput, KVCache
from ppllava_jax.models.pooling_modes import MODES, POOLING_MODES
from ppllava_jax.models.ppllava_config import (
  MODEL_TYPES,
  POOLING_MODE_KEY,
  PoolingConfig,
  PPLLaVAConfig,
)
from ppllava_jax.models.released import SCORER_TENSOR, complete_config, pooling_for, vision_config
from ppllava_jax.models.scorer import RelevanceScorer, SiglipRelevanceScorer, build_scorer
from ppllava_jax.models.siglip import SiglipModel, SiglipVisionConfig, SiglipVisionTransformer

__all__ = [
  "MODEL_TYPES",
  "MODES",
  "POOLING_MODES",
  "PPLLaVA",
  "PPLLaVAConfig",
  "PoolingConfig",
  "Projector",
  "complete_config",
]
log = logging.getLogger(__name__)


class Projector(nnx.Module):
  """LLaVA's MLP: linear -> GELU -> linear, vision width to LLM width."""

  def __init__(self, d_vision: int, d_text: int, bias: bool, *, rngs: nnx.Rngs):
    self.linear_1 = Linear(d_vision, d_text, use_bias=bias, axes=(None, "embed"), rngs=rngs)
    self.linear_2 = Linear(d_text, d_text, use_bias=bias, axes=("embed", "embed"), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.linear_2(jax.nn.gelu(self.linear_1(x), approximate=False))


def _media_owners(input_ids_bl: jax.Array, token: int, count: int) -> jax.Array:
  """The batch row of each of the first ``count`` placeholder runs, in row-major order."""
  is_token_bl = input_ids_bl == token
  starts_bl = is_token_bl & ~jnp.pad(is_token_bl, ((0, 0), (1, 0)))[:, :-1]
  flat = jnp.nonzero(starts_bl.reshape(-1), size=count, fill_value=0)[0]
  return flat // input_ids_bl.shape[1]


class PPLLaVA(nnx.Module):
  def __init__(self, cfg: PPLLaVAConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    # a BTAdapterVisionTransformer is a CLIPVisionTransformer
    self.vision_tower: SiglipVisionTransformer | CLIPVisionTransformer
    if isinstance(cfg.vision, SiglipVisionConfig):
      self.vision_tower = SiglipVisionTransformer(cfg.vision, rngs=rngs)
    elif cfg.btadapter is not None:
      self.vision_tower = BTAdapterVisionTransformer(cfg.vision, cfg.btadapter, rngs=rngs)
    else:
      self.vision_tower = CLIPVisionTransformer(cfg.vision, rngs=rngs)
    self.multi_modal_projector: Projector = Projector(
      cfg.vision.hidden_size, cfg.text.hidden_size, cfg.projector_bias, rngs=rngs
    )
    self.language_model = CausalLM(cfg.text, rngs=rngs)
    self.image_newline = nnx.Param(jnp.zeros((cfg.text.hidden_size,)), axes=("embed",))
    # Needed by the "ppllava" / "paper" modes. A submodule even when attached after
    # loading (nnx.data), so it splits, jits, shards and saves with the rest.
    self.scorer = nnx.data(None if cfg.scorer is None else build_scorer(cfg.scorer, rngs=rngs))

  def add_btadapter(self, adapter: BTAdapterConfig, rngs: nnx.Rngs) -> PPLLaVA:
    """A fresh BT-Adapter on the CLIP vision tower, initialised as the original does after
    loading LLaVA's weights (``CLIPVisionBTAdapter.from_clip``): how the Vicuna recipe
    starts from a llava-hf LLaVA-NeXT folder. Returns the model."""
    if self.cfg.btadapter is not None or isinstance(self.cfg.vision, SiglipVisionConfig):
      raise ValueError(
        "add_btadapter needs a plain CLIP vision tower; this model has "
        + ("a BT-Adapter already" if self.cfg.btadapter else "a SigLIP tower")
      )
    self.vision_tower = CLIPVisionBTAdapter.from_clip(
      self.vision_tower,  # type: ignore[arg-type]  # a plain CLIP tower (checked above)
      adapter,
      rngs=rngs,
    ).vision_model
    self.cfg = dataclasses.replace(self.cfg, btadapter=adapter)
    return self

  def set_remat(self, remat: str) -> PPLLaVA:
    """Each LLM decoder layer and each vision-tower layer (CLIP / SigLIP encoder layers,
    BT-Adapter blocks) under ``remat``: "none" or a ``jax.checkpoint_policies`` name
    (``layers.set_remat``). The scorer's text tower is left as it is. Returns the model."""
    set_remat(self.language_model, remat)
    set_remat(self.vision_tower, remat)
    return self

  def set_attention(self, implementation: str) -> PPLLaVA:
    """Every attention of the model (LLM, vision tower, the scorer's text tower) through
    ``implementation``: "xla" (the default), "cudnn", "pallas" or "pallas_interpret"
    (``models.attention``; ``layers.set_attention``). A static attribute, like the remat
    policy: the train step sets ``TrainConfig.attention`` on the model it merges. Returns
    the model."""
    return set_attention(self, implementation)

  # ---- media -> LLM tokens ------------------------------------------------------------

  def patch_features(self, frames_btchw: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    """(B, T, 3, H, W) -> (B, T, g, g, F): the chosen layer's patches, CLS dropped
    (``drop_cls``; SigLIP has none).

    A plain CLIP tower sees every frame alone; the BT-Adapter tower sees each item's
    frames together (images and anyres tiles are one-frame items, as in the original).
    ``rngs``: the BT-Adapter's drop-path keys, used once the model is in training mode
    (``model.train()``); the other towers are deterministic and ignore them.
    """
    b, t = frames_btchw.shape[:2]
    if self.cfg.btadapter is not None:  # the tower is a BTAdapterVisionTransformer
      hidden = self.vision_tower(frames_btchw, rngs)[0][self.cfg.vision_feature_layer]  # type: ignore[call-arg]
    else:
      flat = self.vision_tower(frames_btchw.reshape(b * t, *frames_btchw.shape[2:]))
      hidden = flat[self.cfg.vision_feature_layer].reshape(b, t, *flat[0].shape[1:])
    g = self.cfg.vision.grid
    patches = hidden[:, :, 1:] if self.cfg.drop_cls else hidden
    return patches.reshape(b, t, g, g, hidden.shape[-1])

  def pool(
    self,
    feats_btggf: jax.Array,
    text_be: jax.Array | None,
    kernel,
    stride=None,
    mask_bt: jax.Array | None = None,
  ) -> jax.Array:
    """Patches (B, T, g, g, F) projected and pooled by PPLLaVA's windows into
    (B, T', g', g', D) (stride: the kernel's by default), weighted as the mode says
    (``MODES``). ``mask_bt`` (B, T) marks the real frames (tiles, pictures) of padded
    items: the others get relevance 0 and stay out of the softmax's denominator (a blank
    frame's patches would otherwise take a share, and its L2 normalisation a huge
    gradient)."""
    mode = MODES[self.cfg.pooling.mode]
    x_btggd = self.multi_modal_projector(feats_btggf)
    # scored: embed() checked the scorer and the prompt; pool runs for windowed modes only
    probs = (
      self.scorer(feats_btggf, text_be, mask_bt)  # type: ignore[misc,arg-type]
      if mode.scored
      else jnp.ones(x_btggd.shape[:4], jnp.float32)
    )
    return ops.prompt_guided_pool(
      x_btggd,
      probs,
      kernel,
      stride,
      mode=mode.windows,  # type: ignore[arg-type]
      temperature=self.cfg.pooling.temperature,
    )

  def encode_videos(
    self,
    videos_btchw: jax.Array,
    text_be: jax.Array | None,
    frame_mask_bt: jax.Array | None = None,
    rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    """Videos (B, T, 3, H, W) -> (B, tokens, D), as the pooling mode says (``MODES``);
    ``frame_mask_bt`` marks the real frames of videos padded to T (``pool``); ``rngs`` as
    ``patch_features``."""
    tokens = MODES[self.cfg.pooling.mode].videos(
      self, self.patch_features(videos_btchw, rngs), text_be, frame_mask_bt
    )
    return tokens.reshape(videos_btchw.shape[0], -1, tokens.shape[-1])

  def relevance_maps(
    self,
    videos_btchw: jax.Array,
    clip_input_ids: jax.Array,
    clip_attention_mask: jax.Array | None = None,
  ) -> jax.Array:
    """(B, T, g, g) cosine of each patch with its video's prompt: what Eq. 1 turns into
    probabilities, and what pictures should show (the probabilities are too peaked)."""
    if self.scorer is None:
      raise ValueError(
        "relevance maps need the relevance scorer (a checkpoint with one, or clip= when loading)"
      )
    feats_btggf = self.patch_features(videos_btchw)
    text_be = self.scorer.text_features(clip_input_ids, clip_attention_mask)
    return ops.relevance_logits(self.scorer.patch_embeddings(feats_btggf), text_be)

  def encode_images(
    self, images_itchw: jax.Array, image_sizes, text_ie: jax.Array | None
  ) -> list[jax.Array]:
    """Anyres images (I, tiles, 3, H, W), each with its prompt's ``text_ie`` row -> one
    (tokens of image i, D) array each. Sizes are host values (static)."""
    cfg = self.cfg
    sizes = [tuple(int(x) for x in s) for s in np.asarray(image_sizes)]
    tiles = [
      1 + int(np.prod(ops.anyres_grid_shape(s, cfg.grid_pinpoints, cfg.vision.image_size)))
      for s in sizes
    ]
    feats = [self.patch_features(images_itchw[i, :n, None])[:, 0] for i, n in enumerate(tiles)]
    if MODES[cfg.pooling.mode].windows is None:
      per_image = [self.multi_modal_projector(f) for f in feats]
    else:  # tiles share one relevance softmax: they go on the T axis of one item
      per_image = [
        self.pool(
          f[None], None if text_ie is None else text_ie[i : i + 1], cfg.pooling.image_kernel
        )[0]
        for i, f in enumerate(feats)
      ]
    per_image = [x.reshape(x.shape[0], -1, x.shape[-1]) for x in per_image]
    pool, max_patches = cfg.image_packing()
    return ops.pack_image_features(
      per_image,
      sizes,
      cfg.grid_pinpoints,
      cfg.vision.image_size,
      cfg.vision.patch_size,
      self.image_newline[...],
      pool=pool,
      max_patches=max_patches,
    )

  # ---- forward ------------------------------------------------------------------------

  def embed(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    pixel_values: jax.Array | None = None,
    image_sizes=None,
    pixel_values_videos: jax.Array | None = None,
    clip_input_ids: jax.Array | None = None,
    clip_attention_mask: jax.Array | None = None,
  ) -> tuple[jax.Array, jax.Array]:
    """(inputs_embeds (B, L, D), attention_mask (B, L) bool): the text's embeddings with each
    video's and image's tokens written at their placeholders (module doc), and the mask the
    LLM reads with them (all ones when none is given). What the forward and generation feed
    the LLM; DPO encodes the media once with it and splices in each answer's embeddings."""
    cfg = self.cfg
    emb_bld = self.language_model.embed(jnp.maximum(input_ids, 0))  # -1: video placeholders
    mask_bl = (
      jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
    )
    text_be = None
    if cfg.pooling.scored and (pixel_values is not None or pixel_values_videos is not None):
      if self.scorer is None:
        raise ValueError(
          f"pooling mode {cfg.pooling.mode!r} scores relevance with CLIP: attach "
          "a scorer (PPLLaVA.from_pretrained(path, clip=...))"
        )
      if clip_input_ids is None:
        raise ValueError(
          f"pooling mode {cfg.pooling.mode!r} needs the prompt for the scorer: "
          "pass clip_input_ids (one row per sample)"
        )
      text_be = self.scorer.text_features(clip_input_ids, clip_attention_mask)
    if pixel_values_videos is not None:
      owners = _media_owners(input_ids, cfg.video_token_index, pixel_values_videos.shape[0])
      tokens = self.encode_videos(pixel_values_videos, None if text_be is None else text_be[owners])
      flat = tokens.reshape(-1, tokens.shape[-1])
      emb_bld = ops.merge_media(
        emb_bld, input_ids, flat, jnp.ones(flat.shape[0], bool), cfg.video_token_index
      )
    if pixel_values is not None:
      if image_sizes is None:
        raise ValueError(
          "pixel_values need image_sizes (N, 2) (height, width), as LLaVA-NeXT processors give"
        )
      owners = _media_owners(input_ids, cfg.image_token_index, pixel_values.shape[0])
      packed = self.encode_images(
        pixel_values, image_sizes, None if text_be is None else text_be[owners]
      )
      flat = jnp.concatenate(packed, axis=0)
      emb_bld = ops.merge_media(
        emb_bld, input_ids, flat, jnp.ones(flat.shape[0], bool), cfg.image_token_index
      )
    return emb_bld, mask_bl

  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    position_ids: jax.Array | None = None,
    cache: KVCache | None = None,
    *,
    pixel_values: jax.Array | None = None,
    image_sizes=None,
    pixel_values_videos: jax.Array | None = None,
    clip_input_ids: jax.Array | None = None,
    clip_attention_mask: jax.Array | None = None,
    last_only: bool = False,
  ) -> CausalLMOutput:
    """Logits (B, L, vocab) of the LLM on ``embed``'s embeddings; ``last_only``: the last
    position's (B, 1, vocab), as a prefill needs."""
    emb_bld, mask_bl = self.embed(
      input_ids,
      attention_mask,
      pixel_values=pixel_values,
      image_sizes=image_sizes,
      pixel_values_videos=pixel_values_videos,
      clip_input_ids=clip_input_ids,
      clip_attention_mask=clip_attention_mask,
    )
    return self.language_model(
      inputs_embeds=emb_bld,
      attention_mask=mask_bl,
      position_ids=position_ids,
      cache=cache,
      last_only=last_only,
    )

  def init_cache(self, batch: int, length: int, dtype=None) -> KVCache:
    return self.language_model.init_cache(batch, length, dtype)

  def generate(
    self,
    input_ids,
    attention_mask=None,
    *,
    pixel_values_videos=None,
    pixel_values=None,
    image_sizes=None,
    clip_input_ids=None,
    clip_attention_mask=None,
    **kwargs,
  ):
    """Token ids (B, L + max_new_tokens): ``models.generate.generate`` with media.

    Anyres image sizes fix the token layout, so they are compile-time constants: each
    distinct set of sizes compiles once (videos, of fixed frame count, never do).
    """
    media = {
      k: v
      for k, v in dict(
        pixel_values_videos=pixel_values_videos,
        pixel_values=pixel_values,
        clip_input_ids=clip_input_ids,
        clip_attention_mask=clip_attention_mask,
      ).items()
      if v is not None
    }
    static = {}
    if image_sizes is not None:
      static["image_sizes"] = tuple(tuple(int(x) for x in s) for s in np.asarray(image_sizes))
    return generate(self, input_ids, attention_mask, media=media, static_media=static, **kwargs)

  # ---- checkpoints --------------------------------------------------------------------

  @classmethod
  def from_pretrained(
    cls,
    path: str | Path,
    clip: str | Path | CLIPModel | SiglipModel | None = None,
    pooling: PoolingConfig | str | None = None,
    dtype: jnp.dtype | None = None,
    clip_extend_keep: int | None = 20,
    progress: bool = False,
  ) -> PPLLaVA:
    """A llava-hf LLaVA-NeXT(-Video) or LLaVA-OneVision folder, PPLLaVA's own, or one
    ``save_pretrained`` wrote.

    ``pooling``: a mode (``POOLING_MODES``) or a PoolingConfig; None: the mode the folder
    was saved with (config.json's ``ppllava_pooling_mode``), else ``"ppllava"``. The
    ``"ppllava"`` / ``"paper"`` modes need the relevance scorer: PPLLaVA's folders and ours
    hold it (``multi_modal_projector.clip_*`` tensors). For a plain llava-hf folder give
    ``clip=``: a CLIP (LLaVA-NeXT) or SigLIP (OneVision) folder or model, whose text tower
    is extended (77 -> 248, SigLIP 64 -> 196) with ``clip_extend_keep`` (PPLLaVA's 20; None
    keeps it)
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
    source = (
      f"clip= {clip}" if isinstance(clip, (str, Path)) else f"clip= (a {type(clip).__name__})"
    )
    if clip is not None and not isinstance(clip, (CLIPModel, SiglipModel)):
      encoder = SiglipModel if isinstance(vision_config(hf), SiglipVisionConfig) else CLIPModel
      # it only describes a scorer already inside, whose position tables are the tensors'
      clip = encoder.from_pretrained(
        clip,
        dtype,
        extend_text=None if SCORER_TENSOR in shapes else clip_extend_keep,
        progress=progress,
      )
    hf = complete_config(hf, shapes, path, None if clip is None else clip.cfg, source)
    if pooling is None:
      pooling = hf.get(POOLING_MODE_KEY, PoolingConfig().mode)
    cfg = PPLLaVAConfig.from_hf(hf, pooling_for(pooling, hf, shapes, path))
    if cfg.scorer is None and cfg.pooling.scored and clip is None:
      raise ValueError(
        f"pooling mode {cfg.pooling.mode!r} needs the relevance scorer, and "
        f"{path} has none: give clip= (a CLIP or SigLIP folder or model)"
      )
    model = load_into(
      nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))),
      path,
      LLAVA_NEXT_RULES,
      dtype,
      progress=progress,
    )
    if clip is not None:
      model._take_scorer(clip, path)
    return model

  def _take_scorer(self, clip: CLIPModel | SiglipModel, path: Path) -> None:
    """The ``clip=`` of ``from_pretrained``: the scorer made from it when the folder holds
    none; else only a word on whether the folder's scorer has its token embedding."""
    if self.scorer is not None:
      # The original builds a fresh token table for its extended text tower and nothing
      # copies CLIP's into it (reference section 3): say which one this checkpoint holds.
      ours = self.scorer.text_model.embeddings.token_embedding.weight[...]
      theirs = clip.text_model.embeddings.token_embedding.weight[...]
      same = ours.shape == theirs.shape and bool(jnp.array_equal(ours, theirs))
      log.warning(
        "%s: the scorer's token embedding %s the given encoder's; the checkpoint's scorer is kept",
        path,
        "equals" if same else "differs from",
      )
      return
    if clip.cfg.vision.hidden_size != self.cfg.vision.hidden_size:
      raise ValueError(
        f"the scoring encoder's vision width {clip.cfg.vision.hidden_size} does "
        f"not match the vision tower's {self.cfg.vision.hidden_size}"
      )
    scorer = (
      SiglipRelevanceScorer.from_siglip(clip)
      if isinstance(clip, SiglipModel)
      else RelevanceScorer.from_clip(clip)
    )
    self.cfg = dataclasses.replace(self.cfg, scorer=scorer.cfg)
    self.scorer = nnx.data(scorer)

  def save_pretrained(self, path: str | Path, progress: bool = False) -> Path:
    """The llava-hf layout (hub vision-tower names); a scorer goes in as PPLLaVA's
    ``multi_modal_projector.clip_*`` tensors, its config as ``ppllava_scorer``."""
    return pretrained.save_pretrained(self, path, LLAVA_NEXT_RULES, self.cfg.to_hf(), progress)
