"""PPLLaVA's relevance scorer: the parts of CLIP that Eq. 1 needs, and nothing else.

The original projector keeps CLIP's text transformer, the vision tower's
``post_layernorm`` (applied to the LLaVA vision tower's layer -2 patches), both
projections and ``logit_scale`` (reference section 1); CLIP's own vision transformer
is never run. Released checkpoints store them as ``multi_modal_projector.clip_*``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ppllava_jax import ops
from ppllava_jax.models.clip import CLIPModel, CLIPTextConfig, CLIPTextTransformer
from ppllava_jax.models.layers import LayerNorm, Linear


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
    return dict(dataclasses.asdict(self), text_config=dataclasses.asdict(self.text))

  @classmethod
  def infer(cls, shapes: dict[str, tuple[int, ...]], vision_width: int,
            prefix: str = "multi_modal_projector.") -> "ScorerConfig":
    """The config of a checkpoint's scorer tensors, for PPLLaVA's own folders, whose
    config.json does not record it (reference section 9).

    Sizes come from the tensor shapes; what shapes cannot tell follows OpenAI CLIP,
    which every released model starts from: 64-wide heads, quick-GELU, eps 1e-5,
    legacy EOS pooling (``eos_token_id=2``: the highest id, CLIP's EOS), and ``keep=20``
    when the two extended position tables are there.
    """
    text = prefix + "clip_text_model."
    vocab, hidden = shapes[text + "embeddings.token_embedding.weight"]
    extended = text + "embeddings.position_embedding_res" in shapes
    positions = shapes[text + ("embeddings.position_embedding" if extended
                               else "embeddings.position_embedding.weight")][0]
    layers = len({k[len(text):].split(".")[2] for k in shapes
                  if k.startswith(text + "encoder.layers.")})
    return cls(
        text=CLIPTextConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=hidden // 64,
            intermediate_size=shapes[text + "encoder.layers.0.mlp.fc1.weight"][0],
            max_position_embeddings=positions, eos_token_id=2,
            extend_keep=20 if extended else None),
        vision_width=vision_width,
        projection_dim=shapes[prefix + "clip_text_projection.weight"][0])


class RelevanceScorer(nnx.Module):

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

  def __call__(self, feats_btggv: jax.Array, text_be: jax.Array) -> jax.Array:
    """Eq. 1 over all (t, h, w) of each item: (B, T, g, g) probabilities."""
    return ops.relevance_scores(self.patch_embeddings(feats_btggv), text_be, self.logit_scale[...])

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
