"""CLIP dual encoder (OpenAI ViT-L/14-336 and any config) in Flax NNX.

Matches transformers 5.23 ``CLIPModel`` numerically. Vision runs NHWC inside but
takes the NCHW ``pixel_values`` that HF image processors produce. The text tower
optionally carries PPLLaVA's extended context (77 -> 248 positions): a frozen table
read at positions < ``keep`` and a trainable one read at the rest, both initialised
by ``ops.extend_positions`` (reference section 3).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ppllava_jax.convert.clip import CLIP_RULES
from ppllava_jax.models.attention import Mask
from ppllava_jax.models.dual_encoder import DualEncoder, towers_from_hf, towers_to_hf
from ppllava_jax.models.layers import (
  Embedding,
  Encoder,
  LayerNorm,
  Linear,
  PatchEmbedding,
  channels_last,
)
from ppllava_jax.models.text import TextEmbeddings, prepare_text_inputs


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  image_size: int = 336
  patch_size: int = 14
  num_channels: int = 3
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  pad_token_id: int = 1
  bos_token_id: int = 49406
  # PPLLaVA's extension: positions < keep read a frozen table, the rest a trainable
  # one; None = plain CLIP. max_position_embeddings is then the extended length.
  extend_keep: int | None = None


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  vision: CLIPVisionConfig = CLIPVisionConfig()
  text: CLIPTextConfig = CLIPTextConfig()
  projection_dim: int = 768
  logit_scale_init_value: float = 2.6592

  @classmethod
  def from_hf(cls, hf: dict) -> CLIPConfig:
    from transformers import CLIPConfig as HFCLIPConfig

    full, vision, text = towers_from_hf(HFCLIPConfig, hf, CLIPVisionConfig, CLIPTextConfig)
    return cls(
      vision=vision,
      text=text,
      projection_dim=full.projection_dim,
      logit_scale_init_value=full.logit_scale_init_value,
    )

  def to_hf(self) -> dict:
    from transformers import CLIPConfig as HFCLIPConfig

    return towers_to_hf(
      HFCLIPConfig,
      self.vision,
      self.text,
      projection_dim=self.projection_dim,
      logit_scale_init_value=self.logit_scale_init_value,
    )


class CLIPVisionEmbeddings(nnx.Module):
  def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
    self.class_embedding = nnx.Param(
      jax.random.normal(rngs.params(), (cfg.hidden_size,)) * 0.02, axes=("embed",)
    )
    self.patch_embedding = PatchEmbedding(
      cfg.num_channels, cfg.hidden_size, cfg.patch_size, use_bias=False, rngs=rngs
    )
    self.position_embedding = Embedding(
      cfg.grid**2 + 1, cfg.hidden_size, axes=(None, "embed"), rngs=rngs
    )

  def __call__(self, x_bhwc: jax.Array) -> jax.Array:
    patches_bld = self.patch_embedding(x_bhwc)
    cls_b1d = jnp.broadcast_to(
      self.class_embedding[...].astype(patches_bld.dtype),
      (patches_bld.shape[0], 1, patches_bld.shape[-1]),
    )
    x_bld = jnp.concatenate([cls_b1d, patches_bld], axis=1)
    return x_bld + self.position_embedding.weight[...].astype(x_bld.dtype)


class CLIPVisionTransformer(nnx.Module):
  def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embeddings = CLIPVisionEmbeddings(cfg, rngs=rngs)
    self.pre_layrnorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
    self.encoder = Encoder(
      cfg.num_hidden_layers,
      cfg.hidden_size,
      cfg.intermediate_size,
      cfg.num_attention_heads,
      cfg.hidden_act,
      cfg.layer_norm_eps,
      rngs=rngs,
    )
    self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

  def __call__(self, pixel_values: jax.Array) -> list[jax.Array]:
    """Every hidden state (B, 1 + grid^2, D): the embeddings (after pre_layrnorm), then each
    layer."""
    x_bhwc = channels_last(pixel_values, self.cfg.num_channels, self.cfg.image_size)
    return self.encoder(self.pre_layrnorm(self.embeddings(x_bhwc)))


class CLIPTextTransformer(nnx.Module):
  def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embeddings = TextEmbeddings(
      cfg.vocab_size, cfg.hidden_size, cfg.max_position_embeddings, cfg.extend_keep, rngs=rngs
    )
    self.encoder = Encoder(
      cfg.num_hidden_layers,
      cfg.hidden_size,
      cfg.intermediate_size,
      cfg.num_attention_heads,
      cfg.hidden_act,
      cfg.layer_norm_eps,
      rngs=rngs,
    )
    self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

  def __call__(self, ids_bl: jax.Array, mask_bl: jax.Array | None = None):
    """(hidden states, last (B, L, D) after final_layer_norm, pooled (B, D)).

    Hidden states are HF's: embeddings, then each layer, no final norm. ``pooled`` is
    the last state at the EOS position exactly as transformers 5.23 picks it.
    """
    ids_bl, mask_bl = prepare_text_inputs(
      ids_bl, mask_bl, self.cfg.max_position_embeddings, self.cfg.eos_token_id
    )
    mask = Mask(valid_bs=mask_bl.astype(bool), causal=True)
    hidden = self.encoder(self.embeddings(ids_bl), mask)
    last_bld = self.final_layer_norm(hidden[-1])
    if self.cfg.eos_token_id == 2:  # legacy configs: the highest id is EOS
      eos_b = jnp.argmax(ids_bl, axis=-1)
    else:  # the first EOS
      eos_b = jnp.argmax(ids_bl == self.cfg.eos_token_id, axis=-1)
    pooled_bd = jnp.take_along_axis(last_bld, eos_b[:, None, None], axis=1)[:, 0]
    return hidden, last_bld, pooled_bd


class CLIPModel(DualEncoder):
  """CLIP with ``get_image_features`` / ``get_text_features`` like transformers."""

  config_class = CLIPConfig
  model_types = ("clip",)
  rules = CLIP_RULES

  def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.vision_model = CLIPVisionTransformer(cfg.vision, rngs=rngs)
    self.text_model = CLIPTextTransformer(cfg.text, rngs=rngs)
    self.visual_projection = Linear(
      cfg.vision.hidden_size, cfg.projection_dim, use_bias=False, axes=("embed", "joint"), rngs=rngs
    )
    self.text_projection = Linear(
      cfg.text.hidden_size, cfg.projection_dim, use_bias=False, axes=("embed", "joint"), rngs=rngs
    )
    self.logit_scale = nnx.Param(jnp.asarray(cfg.logit_scale_init_value, jnp.float32))

  def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
    last_bld = self.vision_model(pixel_values)[-1]
    return self.visual_projection(self.vision_model.post_layernorm(last_bld[:, 0]))

  def get_text_features(
    self, input_ids: jax.Array, attention_mask: jax.Array | None = None
  ) -> jax.Array:
    return self.text_projection(self.text_model(input_ids, attention_mask)[2])
