"""PPLLaVA's relevance scorer: the parts of CLIP (or SigLIP) that Eq. 1 needs, and nothing else.

CLIP (the Vicuna models, reference section 1): the original projector keeps CLIP's
text transformer, the vision tower's ``post_layernorm`` (applied to the LLaVA vision
tower's layer -2 patches), both projections and ``logit_scale``; CLIP's own vision
transformer is never run.

SigLIP (the Qwen model, reference 1b): SigLIP's text transformer (its pooled output
already ends in SigLIP's text head), the vision ``post_layernorm``, and the attention-
pooling head used per patch (value projection, then the residual MLP). SigLIP's
``logit_bias`` is kept (the checkpoints hold it) but adds the same constant to every
patch of an item, so it does not change the softmax and Eq. 1 ignores it. SigLIP text is
pooled at the last position, so padding changes it: the original trains on unpadded text
(each row's last real token pooled) and evaluates padded text (a padding position pooled);
``data.sft.samples``'s ``SampleConfig.scorer_padding`` picks the form, the ids carry it
(``siglip.NO_TOKEN`` past an unpadded text's end).

Released checkpoints store both kinds as ``multi_modal_projector.clip_*``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from ppllava_jax import ops
from ppllava_jax.convert.loader import CheckpointError
from ppllava_jax.models.clip import (
  CLIPConfig,
  CLIPModel,
  CLIPTextConfig,
  CLIPTextTransformer,
  CLIPVisionConfig,
)
from ppllava_jax.models.layers import LayerNorm, Linear
from ppllava_jax.models.siglip import (
  SiglipConfig,
  SiglipModel,
  SiglipPoolingHead,
  SiglipTextConfig,
  SiglipTextTransformer,
  SiglipVisionConfig,
)

if TYPE_CHECKING:
  from pathlib import Path

_PREFIX = "multi_modal_projector."
_TEXT = _PREFIX + "clip_text_model."
SIGLIP_HEAD_TENSOR = _PREFIX + "clip_visual_head.probe"  # only a SigLIP scorer has one


@dataclasses.dataclass(frozen=True)
class ScorerConfig:
  text: CLIPTextConfig
  vision_width: int  # the LLaVA vision tower's width, which visual_ln normalises
  projection_dim: int
  layer_norm_eps: float = 1e-5  # CLIP vision's

  @classmethod
  def from_hf(cls, hf: dict) -> ScorerConfig:
    return cls(
      text=CLIPTextConfig(**hf["text_config"]),
      vision_width=hf["vision_width"],
      projection_dim=hf["projection_dim"],
      layer_norm_eps=hf["layer_norm_eps"],
    )

  def to_hf(self) -> dict:
    hf = dataclasses.asdict(self)
    return dict(hf, text_config=hf.pop("text"))

  @classmethod
  def infer(
    cls, shapes: dict[str, tuple[int, ...]], vision: CLIPVisionConfig, where: str | Path
  ) -> ScorerConfig:
    """The last resort, when nothing describes a checkpoint's scorer tensors: sizes from
    their shapes, the rest as OpenAI CLIP, which every released Vicuna model starts from
    (64-wide heads, quick-GELU, legacy EOS pooling: ``eos_token_id=2``, the highest id is
    CLIP's EOS; ``keep=20`` when extended) and the LLaVA tower's LayerNorm epsilon."""
    projection_dim, vision_width = shapes[_PREFIX + "clip_visual_projection.weight"]
    return cls(
      text=_inferred_text(CLIPTextConfig, shapes, 64, "OpenAI CLIP", where, eos_token_id=2),
      vision_width=vision_width,
      projection_dim=projection_dim,
      layer_norm_eps=vision.layer_norm_eps,
    )

  @classmethod
  def from_encoder(
    cls, clip: CLIPConfig, shapes: dict[str, tuple[int, ...]], where: str | Path, source: str
  ) -> ScorerConfig:
    """The scorer ``clip`` (the CLIP it was trained from, named by ``source``) describes:
    its settings, the tensors' sizes, which must agree with it."""
    projection_dim, vision_width = shapes[_PREFIX + "clip_visual_projection.weight"]
    text = _described_text(
      clip.text,
      shapes,
      where,
      source,
      {
        "vision.hidden_size": (clip.vision.hidden_size, vision_width),
        "projection_dim": (clip.projection_dim, projection_dim),
      },
    )
    return cls(text, vision_width, projection_dim, clip.vision.layer_norm_eps)


@dataclasses.dataclass(frozen=True)
class SiglipScorerConfig:
  text: SiglipTextConfig
  vision: SiglipVisionConfig  # the LLaVA vision tower's: visual_ln and the head are its width

  @classmethod
  def from_hf(cls, hf: dict) -> SiglipScorerConfig:
    return cls(
      text=SiglipTextConfig(**hf["text_config"]), vision=SiglipVisionConfig(**hf["vision_config"])
    )

  def to_hf(self) -> dict:
    return dict(
      kind="siglip",
      text_config=dataclasses.asdict(self.text),
      vision_config=dataclasses.asdict(self.vision),
    )

  @classmethod
  def infer(
    cls, shapes: dict[str, tuple[int, ...]], vision: SiglipVisionConfig, where: str | Path
  ) -> SiglipScorerConfig:
    """As ``ScorerConfig.infer``, following google/siglip-so400m-patch14-384 (72-wide
    heads, tanh GELU, eps 1e-6), which the released Qwen model starts from; the head
    takes the LLaVA tower's settings."""
    text = _inferred_text(
      SiglipTextConfig,
      shapes,
      72,
      "siglip-so400m",
      where,
      projection_size=shapes[_TEXT + "head.weight"][0],
    )
    return cls(text=text, vision=vision)

  @classmethod
  def from_encoder(
    cls, siglip: SiglipConfig, shapes: dict[str, tuple[int, ...]], where: str | Path, source: str
  ) -> SiglipScorerConfig:
    """As ``ScorerConfig.from_encoder``, for the SigLIP the scorer was trained from."""
    if not siglip.vision.vision_use_head:
      raise CheckpointError(
        f"{where}: {source} has no vision pooling head "
        "(vision_use_head=False), which the SigLIP scorer is made of"
      )
    text = _described_text(
      siglip.text,
      shapes,
      where,
      source,
      {
        "text.projection_size": (siglip.text.projection_size, shapes[_TEXT + "head.weight"][0]),
        "vision.hidden_size": (siglip.vision.hidden_size, shapes[SIGLIP_HEAD_TENSOR][-1]),
        "vision.intermediate_size": (
          siglip.vision.intermediate_size,
          shapes[_PREFIX + "clip_visual_head.mlp.fc1.weight"][0],
        ),
      },
    )
    return cls(text=text, vision=siglip.vision)


def _stored_text(shapes: dict[str, tuple[int, ...]]) -> tuple[dict, bool]:
  """The sizes a stored text tower's tensors fix, and whether it holds the two extended
  position tables (then ``max_position_embeddings`` is the extended length)."""
  vocab, hidden = shapes[_TEXT + "embeddings.token_embedding.weight"]
  extended = _TEXT + "embeddings.position_embedding_res" in shapes
  positions = shapes[
    _TEXT
    + ("embeddings.position_embedding" if extended else "embeddings.position_embedding.weight")
  ][0]
  layers = len(
    {k[len(_TEXT) :].split(".")[2] for k in shapes if k.startswith(_TEXT + "encoder.layers.")}
  )
  return dict(
    vocab_size=vocab,
    hidden_size=hidden,
    num_hidden_layers=layers,
    intermediate_size=shapes[_TEXT + "encoder.layers.0.mlp.fc1.weight"][0],
    max_position_embeddings=positions,
  ), extended


def _inferred_text(
  text_cls: type,
  shapes: dict[str, tuple[int, ...]],
  head_dim: int,
  model: str,
  where: str | Path,
  **fixed,
):
  """The stored text tower under ``model``'s conventions: ``head_dim``-wide heads, keep 20."""
  sizes, extended = _stored_text(shapes)
  hidden = sizes["hidden_size"]
  if hidden % head_dim:
    raise CheckpointError(
      f"{where}: the scorer's text width {hidden} is not a multiple of the {head_dim}-wide "
      f"heads of {model}, which inference assumes when nothing else describes the scorer: "
      "give clip= (the encoder the scorer was trained from), or name its folder as "
      "clip_weight in config.json"
    )
  return text_cls(
    **sizes, num_attention_heads=hidden // head_dim, extend_keep=20 if extended else None, **fixed
  )


def _described_text(
  text,
  shapes: dict[str, tuple[int, ...]],
  where: str | Path,
  source: str,
  checked: dict[str, tuple[int, int]],
):
  """``text`` (from ``source``) with the stored tower's sizes, once they and ``checked``
  ({field: (source's, stored)}) agree. An extended tower's ``keep`` follows from ``text``'s
  unextended length L and the stored one, ``4 L - 3 keep`` (reference section 3)."""
  sizes, extended = _stored_text(shapes)
  stored = sizes["max_position_embeddings"]
  length = (
    text.max_position_embeddings
    if text.extend_keep is None
    else (text.max_position_embeddings + 3 * text.extend_keep) // 4
  )
  checked = {
    f"text.{k}": (getattr(text, k), v) for k, v in sizes.items() if k != "max_position_embeddings"
  } | checked
  if not extended:  # else keep says whether the lengths fit
    checked["text.max_position_embeddings"] = (length, stored)
  _check_sizes(where, source, checked)
  keep, rest = divmod(4 * length - stored, 3)
  if extended and (rest or not 0 <= keep < length):
    raise CheckpointError(
      f"{where}: the scorer's {stored} extended text positions are no "
      f"extension (4 L - 3 keep) of the {length} of {source}"
    )
  return dataclasses.replace(text, **sizes, extend_keep=keep if extended else None)


def _check_sizes(where: str | Path, source: str, checked: dict[str, tuple[int, int]]) -> None:
  wrong = [
    f"{k}: {ours} there, {stored} in the tensors"
    for k, (ours, stored) in checked.items()
    if ours != stored
  ]
  if wrong:
    raise CheckpointError(
      f"{where}: {source} does not describe the scorer's tensors: " + "; ".join(wrong)
    )


def scorer_config_from_hf(hf: dict) -> ScorerConfig | SiglipScorerConfig:
  """A ``ppllava_scorer`` config.json entry of either kind."""
  return (SiglipScorerConfig if hf.get("kind") == "siglip" else ScorerConfig).from_hf(hf)


def stored_scorer_config(
  shapes: dict[str, tuple[int, ...]],
  vision,
  where: str | Path,
  encoder: CLIPConfig | SiglipConfig | None = None,
  source: str = "",
) -> ScorerConfig | SiglipScorerConfig:
  """The config of a checkpoint's scorer tensors (SigLIP's when they hold the pooling head,
  CLIP's otherwise) that its config.json does not give: described by ``encoder`` (the
  dual encoder's config, from ``source``) when there is one, else inferred."""
  siglip = SIGLIP_HEAD_TENSOR in shapes
  cls = SiglipScorerConfig if siglip else ScorerConfig
  if encoder is None:
    return cls.infer(shapes, vision, where)
  if isinstance(encoder, SiglipConfig) != siglip:
    kinds = ("CLIP", "SigLIP") if siglip else ("SigLIP", "CLIP")
    raise CheckpointError(
      f"{where}: {source} is a {kinds[0]}, but the scorer tensors are {kinds[1]}'s"
    )
  # the encoder is of cls's kind (checked above)
  return cls.from_encoder(encoder, shapes, where, source)  # type: ignore[arg-type]


def build_scorer(
  cfg: ScorerConfig | SiglipScorerConfig, *, rngs: nnx.Rngs
) -> RelevanceScorer | SiglipRelevanceScorer:
  return (SiglipRelevanceScorer if isinstance(cfg, SiglipScorerConfig) else RelevanceScorer)(
    cfg,  # type: ignore[arg-type]  # the config of the class picked by its type
    rngs=rngs,
  )


class _Scorer(nnx.Module):
  """Eq. 1 from ``patch_embeddings`` and ``text_features``, which subclasses define."""

  if TYPE_CHECKING:  # what the subclasses define (for mypy only)
    logit_scale: nnx.Param

    def patch_embeddings(self, feats: jax.Array) -> jax.Array: ...

  def __call__(
    self, feats_btggf: jax.Array, text_be: jax.Array, mask_bt: jax.Array | None = None
  ) -> jax.Array:
    """Eq. 1 over all (t, h, w) of each item: (B, T, g, g) probabilities; frames that
    ``mask_bt`` (B, T) marks False (padding) get 0."""
    mask = (
      None
      if mask_bt is None
      else jnp.broadcast_to(mask_bt[:, :, None, None], feats_btggf.shape[:4])
    )
    return ops.relevance_scores(
      self.patch_embeddings(feats_btggf), text_be, self.logit_scale[...].reshape(()), mask
    )


class RelevanceScorer(_Scorer):
  def __init__(self, cfg: ScorerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.text_model = CLIPTextTransformer(cfg.text, rngs=rngs)
    self.visual_ln = LayerNorm(cfg.vision_width, cfg.layer_norm_eps)
    self.visual_projection = Linear(
      cfg.vision_width, cfg.projection_dim, use_bias=False, axes=("embed", "joint"), rngs=rngs
    )
    self.text_projection = Linear(
      cfg.text.hidden_size, cfg.projection_dim, use_bias=False, axes=("embed", "joint"), rngs=rngs
    )
    self.logit_scale = nnx.Param(jnp.asarray(4.6052, jnp.float32))

  def text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    """(B, L) prompt ids -> (B, E), CLIP's pooled EOS state projected."""
    return self.text_projection(self.text_model(input_ids, attention_mask)[2])

  def patch_embeddings(self, feats: jax.Array) -> jax.Array:
    """(..., F) patches -> (..., E)."""
    return self.visual_projection(self.visual_ln(feats))

  @classmethod
  def from_clip(cls, clip: CLIPModel) -> RelevanceScorer:
    """The scorer as PPLLaVA initialises it for SFT: CLIP's own tensors, shared."""
    cfg = ScorerConfig(
      clip.cfg.text,
      clip.cfg.vision.hidden_size,
      clip.cfg.projection_dim,
      clip.cfg.vision.layer_norm_eps,
    )
    scorer = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
    for ours, theirs in (
      (scorer.text_model, clip.text_model),
      (scorer.visual_ln, clip.vision_model.post_layernorm),
      (scorer.visual_projection, clip.visual_projection),
      (scorer.text_projection, clip.text_projection),
    ):
      nnx.update(ours, nnx.state(theirs))
    scorer.logit_scale.set_value(clip.logit_scale[...])
    return scorer


class SiglipRelevanceScorer(_Scorer):
  def __init__(self, cfg: SiglipScorerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.text_model = SiglipTextTransformer(cfg.text, rngs=rngs)
    self.visual_ln = LayerNorm(cfg.vision.hidden_size, cfg.vision.layer_norm_eps)
    self.visual_head = SiglipPoolingHead(cfg.vision, rngs=rngs)
    self.logit_scale = nnx.Param(jnp.zeros((1,), jnp.float32))
    self.logit_bias = nnx.Param(jnp.zeros((1,), jnp.float32))

  def text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    """(B, L) prompt ids -> (B, E), SigLIP's pooled text state through its head: the last
    position of a padded row (evaluation's form), the last real token of a row that ends in
    ``siglip.NO_TOKEN`` ids (the original's unpadded training text, ``data.sft.samples``)."""
    return self.text_model(input_ids, attention_mask)[2]

  def patch_embeddings(self, feats: jax.Array) -> jax.Array:
    """(..., F) patches -> (..., E), SigLIP's joint space being its vision width."""
    return self.visual_head.per_patch(self.visual_ln(feats))

  @classmethod
  def from_siglip(cls, siglip: SiglipModel) -> SiglipRelevanceScorer:
    """The scorer as PPLLaVA's Qwen model initialises it: SigLIP's own tensors, shared."""
    if siglip.vision_model.head is None:
      raise ValueError(
        "the SigLIP scorer needs the vision pooling head, and this SigLIP has "
        "none (vision_use_head=False)"
      )
    cfg = SiglipScorerConfig(siglip.cfg.text, siglip.cfg.vision)
    scorer = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
    for ours, theirs in (
      (scorer.text_model, siglip.text_model),
      (scorer.visual_ln, siglip.vision_model.post_layernorm),
      (scorer.visual_head, siglip.vision_model.head),
    ):
      nnx.update(ours, nnx.state(theirs))
    scorer.logit_scale.set_value(siglip.logit_scale[...])
    scorer.logit_bias.set_value(siglip.logit_bias[...])
    return scorer
