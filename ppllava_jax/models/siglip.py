"""SigLIP dual encoder (google/siglip-so400m-patch14-384 family) in Flax NNX.

Matches transformers 5.23 ``SiglipModel``: no CLS token, ``post_layernorm`` on every
patch, an attention-pooling head (a learned probe attending over the patches) for
image features, a bidirectional text encoder with padding mask whose pooled output
is the **last** position (padding included, as transformers does: SigLIP expects
``padding="max_length"``). PPLLaVA's Qwen model extends the text context 64 -> 196.

A row may also hold a text shorter than the batch: ``NO_TOKEN`` (-1) ids past its end.
Those positions are no input at all (never attended, never pooled), so the row's pooled
output is its last real token's, what transformers gives on that text alone. This is how
a fixed-shape batch carries the original's unpadded training text (``data.sft.samples``,
``SampleConfig.scorer_padding="none"``); rows without ``NO_TOKEN`` pool as transformers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ppllava_jax.convert.siglip import SIGLIP_RULES
from ppllava_jax.models.attention import Mask, attention
from ppllava_jax.models.dual_encoder import DualEncoder, towers_from_hf, towers_to_hf
from ppllava_jax.models.layers import (
  MLP,
  Embedding,
  Encoder,
  LayerNorm,
  Linear,
  PatchEmbedding,
  channels_last,
)
from ppllava_jax.models.text import TextEmbeddings, prepare_text_inputs

NO_TOKEN = -1  # an id past the end of a row's text (module doc)


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig:
  hidden_size: int = 1152
  intermediate_size: int = 4304
  num_hidden_layers: int = 27
  num_attention_heads: int = 16
  image_size: int = 384
  patch_size: int = 14
  num_channels: int = 3
  hidden_act: str = "gelu_pytorch_tanh"
  layer_norm_eps: float = 1e-6
  vision_use_head: bool = True

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class SiglipTextConfig:
  vocab_size: int = 32000
  hidden_size: int = 1152
  intermediate_size: int = 4304
  num_hidden_layers: int = 27
  num_attention_heads: int = 16
  max_position_embeddings: int = 64
  hidden_act: str = "gelu_pytorch_tanh"
  layer_norm_eps: float = 1e-6
  projection_size: int = 1152
  pad_token_id: int = 1
  bos_token_id: int = 49406
  eos_token_id: int = 49407
  extend_keep: int | None = None  # as CLIPTextConfig.extend_keep (PPLLaVA Qwen: 64 -> 196)


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
  vision: SiglipVisionConfig = SiglipVisionConfig()
  text: SiglipTextConfig = SiglipTextConfig()

  @classmethod
  def from_hf(cls, hf: dict) -> SiglipConfig:
    from transformers import SiglipConfig as HFSiglipConfig

    _, vision, text = towers_from_hf(HFSiglipConfig, hf, SiglipVisionConfig, SiglipTextConfig)
    return cls(vision=vision, text=text)

  def to_hf(self) -> dict:
    from transformers import SiglipConfig as HFSiglipConfig

    return towers_to_hf(HFSiglipConfig, self.vision, self.text)


class SiglipVisionEmbeddings(nnx.Module):
  def __init__(self, cfg: SiglipVisionConfig, *, rngs: nnx.Rngs):
    self.patch_embedding = PatchEmbedding(
      cfg.num_channels, cfg.hidden_size, cfg.patch_size, use_bias=True, rngs=rngs
    )
    self.position_embedding = Embedding(
      cfg.grid**2, cfg.hidden_size, axes=(None, "embed"), rngs=rngs
    )

  def __call__(self, x_bhwc: jax.Array) -> jax.Array:
    x_bld = self.patch_embedding(x_bhwc)
    return x_bld + self.position_embedding.weight[...].astype(x_bld.dtype)


class PoolingAttention(nnx.Module):
  """torch.nn.MultiheadAttention's math with packed q|k|v input projection."""

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.in_proj = Linear(dim, 3 * dim, axes=("embed", "heads"), rngs=rngs)  # q | k | v
    self.out_proj = Linear(dim, dim, axes=("heads", "embed"), rngs=rngs)
    self.implementation = "xla"  # layers.set_attention

  def value(self, x_bld: jax.Array) -> jax.Array:
    """The v projection alone (PPLLaVA scores each patch with it, reference 1b)."""
    d = x_bld.shape[-1]
    kernel, bias = self.in_proj.kernel[...], self.in_proj.bias[...]  # type: ignore[index]  # biased
    return x_bld @ kernel[:, 2 * d :].astype(x_bld.dtype) + bias[2 * d :].astype(x_bld.dtype)

  def __call__(self, q_bld: jax.Array, x_bld: jax.Array) -> jax.Array:
    d = x_bld.shape[-1]
    heads = lambda t: t.reshape(t.shape[0], t.shape[1], self.num_heads, d // self.num_heads)
    q = self.in_proj(q_bld)[..., :d]
    kv = self.in_proj(x_bld)
    out_blna = attention(
      heads(q),
      heads(kv[..., d : 2 * d]),
      heads(kv[..., 2 * d :]),
      None,
      implementation=self.implementation,
    )
    return self.out_proj(out_blna.reshape(q_bld.shape))


class SiglipPoolingHead(nnx.Module):
  """A learned probe attends over the patches, then a residual MLP: (B, L, D) -> (B, D)."""

  def __init__(self, cfg: SiglipVisionConfig, *, rngs: nnx.Rngs):
    self.probe = nnx.Param(
      jax.random.normal(rngs.params(), (1, 1, cfg.hidden_size)) * 0.02, axes=(None, None, "embed")
    )
    self.attention = PoolingAttention(cfg.hidden_size, cfg.num_attention_heads, rngs=rngs)
    self.layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
    self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, rngs=rngs)

  def __call__(self, x_bld: jax.Array) -> jax.Array:
    probe_b1d = jnp.broadcast_to(
      self.probe[...].astype(x_bld.dtype), (x_bld.shape[0], 1, x_bld.shape[-1])
    )
    h_b1d = self.attention(probe_b1d, x_bld)
    return (h_b1d + self.mlp(self.layernorm(h_b1d)))[:, 0]

  def per_patch(self, x: jax.Array) -> jax.Array:
    """(..., D) -> (..., D): each patch through the head's value projection (no
    ``out_proj``) and residual MLP, as PPLLaVA's SigLIP scorer does (reference 1b)."""
    v = self.attention.value(x)
    return v + self.mlp(self.layernorm(v))


class SiglipVisionTransformer(nnx.Module):
  def __init__(self, cfg: SiglipVisionConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embeddings = SiglipVisionEmbeddings(cfg, rngs=rngs)
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
    self.head = SiglipPoolingHead(cfg, rngs=rngs) if cfg.vision_use_head else None

  def __call__(self, pixel_values: jax.Array) -> list[jax.Array]:
    """Every hidden state (B, grid^2, D): the embeddings, then each layer (no final norm)."""
    x_bhwc = channels_last(pixel_values, self.cfg.num_channels, self.cfg.image_size)
    return self.encoder(self.embeddings(x_bhwc))


class SiglipTextTransformer(nnx.Module):
  def __init__(self, cfg: SiglipTextConfig, *, rngs: nnx.Rngs):
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
    self.head = Linear(cfg.hidden_size, cfg.projection_size, axes=("embed", "joint"), rngs=rngs)

  def __call__(self, ids_bl: jax.Array, mask_bl: jax.Array | None = None):
    """(hidden states, last (B, L, D) after final_layer_norm, pooled (B, P) = head(last at
    each row's end)): the end is the last position, or the last before ``NO_TOKEN`` ids."""
    ids_bl, mask_bl = prepare_text_inputs(ids_bl, mask_bl, self.cfg.max_position_embeddings, None)
    present_bl = ids_bl != NO_TOKEN
    valid_bl = mask_bl.astype(bool) & present_bl
    hidden = self.encoder(
      self.embeddings(jnp.where(present_bl, ids_bl, 0)), Mask(valid_bs=valid_bl)
    )
    last_bld = self.final_layer_norm(hidden[-1])
    end_b = jnp.max(jnp.where(present_bl, jnp.arange(ids_bl.shape[1]), 0), axis=1)
    pooled_bd = jnp.take_along_axis(last_bld, end_b[:, None, None], axis=1)[:, 0]
    return hidden, last_bld, self.head(pooled_bd)


class SiglipModel(DualEncoder):
  """SigLIP with ``get_image_features`` / ``get_text_features`` like transformers."""

  config_class = SiglipConfig
  model_types = ("siglip",)
  rules = SIGLIP_RULES

  def __init__(self, cfg: SiglipConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.vision_model = SiglipVisionTransformer(cfg.vision, rngs=rngs)
    self.text_model = SiglipTextTransformer(cfg.text, rngs=rngs)
    self.logit_scale = nnx.Param(jnp.zeros((1,), jnp.float32))
    self.logit_bias = nnx.Param(jnp.zeros((1,), jnp.float32))

  def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
    if self.vision_model.head is None:
      raise ValueError("this SigLIP vision tower has no pooling head (vision_use_head=False)")
    last_bld = self.vision_model.post_layernorm(self.vision_model(pixel_values)[-1])
    return self.vision_model.head(last_bld)

  def get_text_features(
    self, input_ids: jax.Array, attention_mask: jax.Array | None = None
  ) -> jax.Array:
    return self.text_model(input_ids, attention_mask)[2]
