"""PPLLaVA's relevance scorer: the parts of CLIP (or SigLIP) that Eq. 1 needs, and nothing else.

CLIP (the Vicuna models, reference section 1): the original projector keeps CLIP's
text transformer, the vision tower's ``post_layernorm`` (applied to the LLaVA vision
tower's layer -2 patches), both projections and ``logit_scale``; CLIP's own vision
transformer is never run.

SigLIP (the Qwen model, reference 1b): SigLIP's text transformer (its pooled output
already ends in SigLIP's text head), the vision ``post_layernorm``, and the attention-
pooling head used per patch (value projection, then the residual MLP). SigLIP's
``logit_bias`` is kept (the checkpoints hold it) but adds the same constant to every
patch of an item, so it does not change the softmax and Eq. 1 ignores it.

Released checkpoints store both kinds as ``multi_modal_projector.clip_*``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ppllava_jax import ops
from ppllava_jax.models.clip import CLIPModel, CLIPTextConfig, CLIPTextTransformer
from ppllava_jax.models.layers import LayerNorm, Linear
from ppllava_jax.models.siglip import (SiglipModel, SiglipPoolingHead, SiglipTextConfig,
                                       SiglipTextTransformer, SiglipVisionConfig)

_PREFIX = "multi_modal_projector."


@dataclasses.dataclass(frozen=True)
class ScorerConfig:
  text: CLIPTextConfig
  vision_width: int  # the LLaVA vision tower's width, which visual_ln normalises
  projection_dim: int
  layer_norm_eps: float = 1e-5  # CLIP vision's

  @classmethod
  def from_hf(cls, hf: dict) -> "ScorerConfig":
    return cls(text=CLIPTextConfig(**hf["text_config"]), vision_width=hf["vision_width"],
               projection_dim=hf["projection_dim"], layer_norm_eps=hf["layer_norm_eps"])

  def to_hf(self) -> dict:
    hf = dataclasses.asdict(self)
    return dict(hf, text_config=hf.pop("text"))

  @classmethod
  def infer(cls, shapes: dict[str, tuple[int, ...]], vision_width: int) -> "ScorerConfig":
    """The config of a checkpoint's scorer tensors, for PPLLaVA's own folders, whose
    config.json does not record it (reference section 9).

    Sizes come from the tensor shapes; what shapes cannot tell follows OpenAI CLIP,
    which every released model starts from: 64-wide heads, quick-GELU, eps 1e-5,
    legacy EOS pooling (``eos_token_id=2``: the highest id, CLIP's EOS), and ``keep=20``
    when the two extended position tables are there.
    """
    return cls(text=CLIPTextConfig(**_text_sizes(shapes, head_dim=64), eos_token_id=2),
               vision_width=vision_width,
               projection_dim=shapes[_PREFIX + "clip_text_projection.weight"][0])


def _text_sizes(shapes: dict[str, tuple[int, ...]], head_dim: int) -> dict:
  """A stored text tower's sizes, from its tensor shapes (``keep=20`` when extended)."""
  text = _PREFIX + "clip_text_model."
  vocab, hidden = shapes[text + "embeddings.token_embedding.weight"]
  extended = text + "embeddings.position_embedding_res" in shapes
  positions = shapes[text + ("embeddings.position_embedding" if extended
                             else "embeddings.position_embedding.weight")][0]
  layers = len({k[len(text):].split(".")[2] for k in shapes
                if k.startswith(text + "encoder.layers.")})
  return dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
              num_attention_heads=hidden // head_dim,
              intermediate_size=shapes[text + "encoder.layers.0.mlp.fc1.weight"][0],
              max_position_embeddings=positions, extend_keep=20 if extended else None)


@dataclasses.dataclass(frozen=True)
class SiglipScorerConfig:
  text: SiglipTextConfig
  vision: SiglipVisionConfig  # the LLaVA vision tower's: visual_ln and the head are its width

  @classmethod
  def from_hf(cls, hf: dict) -> "SiglipScorerConfig":
    return cls(text=SiglipTextConfig(**hf["text_config"]),
               vision=SiglipVisionConfig(**hf["vision_config"]))

  def to_hf(self) -> dict:
    return dict(kind="siglip", text_config=dataclasses.asdict(self.text),
                vision_config=dataclasses.asdict(self.vision))

  @classmethod
  def infer(cls, shapes: dict[str, tuple[int, ...]],
            vision: SiglipVisionConfig) -> "SiglipScorerConfig":
    """As ``ScorerConfig.infer``, following google/siglip-so400m-patch14-384 (72-wide
    heads, tanh GELU, eps 1e-6), which the released Qwen model starts from."""
    text = SiglipTextConfig(**_text_sizes(shapes, head_dim=72),
                            projection_size=shapes[_PREFIX + "clip_text_model.head.weight"][0])
    return cls(text=text, vision=vision)


def scorer_config_from_hf(hf: dict) -> ScorerConfig | SiglipScorerConfig:
  """A ``ppllava_scorer`` config.json entry of either kind."""
  return (SiglipScorerConfig if hf.get("kind") == "siglip" else ScorerConfig).from_hf(hf)


def infer_scorer_config(shapes: dict[str, tuple[int, ...]],
                        vision) -> ScorerConfig | SiglipScorerConfig:
  """The scorer of a checkpoint whose config.json does not describe it: SigLIP's when it
  holds the pooling head, CLIP's otherwise."""
  if _PREFIX + "clip_visual_head.probe" in shapes:
    return SiglipScorerConfig.infer(shapes, vision)
  return ScorerConfig.infer(shapes, vision.hidden_size)


def build_scorer(cfg: ScorerConfig | SiglipScorerConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  return (SiglipRelevanceScorer if isinstance(cfg, SiglipScorerConfig) else RelevanceScorer)(
      cfg, rngs=rngs)


class _Scorer(nnx.Module):
  """Eq. 1 from ``patch_embeddings`` and ``text_features``, which subclasses define."""

  def __call__(self, feats_btggv: jax.Array, text_be: jax.Array) -> jax.Array:
    """Eq. 1 over all (t, h, w) of each item: (B, T, g, g) probabilities."""
    return ops.relevance_scores(self.patch_embeddings(feats_btggv), text_be,
                                self.logit_scale[...].reshape(()))


class RelevanceScorer(_Scorer):

  def __init__(self, cfg: ScorerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.text_model = CLIPTextTransformer(cfg.text, rngs=rngs)
    self.visual_ln = LayerNorm(cfg.vision_width, cfg.layer_norm_eps)
    self.visual_projection = Linear(cfg.vision_width, cfg.projection_dim, use_bias=False, rngs=rngs)
    self.text_projection = Linear(cfg.text.hidden_size, cfg.projection_dim, use_bias=False,
                                  rngs=rngs)
    self.logit_scale = nnx.Param(jnp.asarray(4.6052, jnp.float32))

  def text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    """(B, L) prompt ids -> (B, E), CLIP's pooled EOS state projected."""
    return self.text_projection(self.text_model(input_ids, attention_mask)[2])

  def patch_embeddings(self, feats: jax.Array) -> jax.Array:
    """(..., vision_width) patches -> (..., E)."""
    return self.visual_projection(self.visual_ln(feats))

  @classmethod
  def from_clip(cls, clip: CLIPModel) -> "RelevanceScorer":
    """The scorer as PPLLaVA initialises it for SFT: CLIP's own tensors, shared."""
    cfg = ScorerConfig(clip.cfg.text, clip.cfg.vision.hidden_size, clip.cfg.projection_dim,
                       clip.cfg.vision.layer_norm_eps)
    scorer = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
    for ours, theirs in ((scorer.text_model, clip.text_model),
                         (scorer.visual_ln, clip.vision_model.post_layernorm),
                         (scorer.visual_projection, clip.visual_projection),
                         (scorer.text_projection, clip.text_projection)):
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
    """(B, L) prompt ids -> (B, P), SigLIP's pooled (last position) text state through its head."""
    return self.text_model(input_ids, attention_mask)[2]

  def patch_embeddings(self, feats: jax.Array) -> jax.Array:
    """(..., vision_width) patches -> (..., vision_width)."""
    return self.visual_head.per_patch(self.visual_ln(feats))

  @classmethod
  def from_siglip(cls, siglip: SiglipModel) -> "SiglipRelevanceScorer":
    """The scorer as PPLLaVA's Qwen model initialises it: SigLIP's own tensors, shared."""
    if siglip.vision_model.head is None:
      raise ValueError("the SigLIP scorer needs the vision pooling head, and this SigLIP has "
                       "none (vision_use_head=False)")
    cfg = SiglipScorerConfig(siglip.cfg.text, siglip.cfg.vision)
    scorer = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
    for ours, theirs in ((scorer.text_model, siglip.text_model),
                         (scorer.visual_ln, siglip.vision_model.post_layernorm),
                         (scorer.visual_head, siglip.vision_model.head)):
      nnx.update(ours, nnx.state(theirs))
    scorer.logit_scale.set_value(siglip.logit_scale[...])
    scorer.logit_bias.set_value(siglip.logit_bias[...])
    return scorer
