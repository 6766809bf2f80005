"""Independent PyTorch reference for PPLLaVA's BT-Adapter CLIP vision tower.

Ported by hand from the original ``ppllava/models/clip_btadapter.py`` and kept in its
token layout: the adapter stream is (B, 1 + P*T, D), patch-major and frame-minor, and
per-frame tensors are (B*T, 1 + P, D). Built, as the original is, from transformers'
CLIP pieces, so its state dict has the original checkpoint's key names. Inference
only (no drop-path). Imports nothing from ppllava_jax.

Frames come in as (B, T, C, H, W). ``guess_layout=True`` reproduces the original's
guess instead: any 5-D input whose axis 1 has size 3 is read as (B, C, T, H, W).
"""

import torch
from torch import nn
from transformers.models.clip.modeling_clip import (
  CLIPMLP,
  CLIPAttention,
  CLIPEncoder,
  CLIPVisionEmbeddings,
)


def frames_first(x, b, p, t):
  """(b, p*t, m) patch-major -> (b*t, p, m)."""
  return x.reshape(b, p, t, -1).permute(0, 2, 1, 3).reshape(b * t, p, -1)


def patches_first(x, b, p, t):
  """(b*t, p, m) -> (b, p*t, m) patch-major."""
  return x.reshape(b, t, p, -1).permute(0, 2, 1, 3).reshape(b, p * t, -1)


class SpatialLayer(nn.Module):
  def __init__(self, config):
    super().__init__()
    d = config.hidden_size
    self.self_attn = CLIPAttention(config)
    self.layer_norm1 = nn.LayerNorm(d)
    self.mlp = CLIPMLP(config)
    self.layer_norm2 = nn.LayerNorm(d)

  def forward(self, x, T):
    residual = x
    cls, patches = x[:, :1], x[:, 1:]
    b, pt, m = patches.shape
    p = pt // T
    cls = cls.unsqueeze(1).repeat(1, T, 1, 1).reshape(b * T, 1, m)
    h = torch.cat((cls, frames_first(patches, b, p, T)), 1)
    h, _ = self.self_attn(self.layer_norm1(h))
    cls = h[:, :1].reshape(b, T, 1, m).mean(1)
    h = residual + torch.cat((cls, patches_first(h[:, 1:], b, p, T)), 1)
    return h + self.mlp(self.layer_norm2(h))


class TemporalLayer(nn.Module):
  def __init__(self, config):
    super().__init__()
    d = config.hidden_size
    self.self_attn = CLIPAttention(config)
    self.layer_norm1 = nn.LayerNorm(d)
    self.temporal_fc = nn.Linear(d, d)

  def forward(self, x, T):
    cls, patches = x[:, :1], x[:, 1:]
    b, pt, m = patches.shape
    p = pt // T
    h = patches.reshape(b * p, T, m)  # patch-major rows: each row is one patch's frames
    h, _ = self.self_attn(self.layer_norm1(h))
    h = self.temporal_fc(h).reshape(b, p * T, m)
    return torch.cat((cls, patches + h), 1)


class BTAdapterVision(nn.Module):
  def __init__(self, config, depth, max_T):
    super().__init__()
    d = config.hidden_size
    self.depth = depth
    self.embeddings = CLIPVisionEmbeddings(config)
    self.pre_layrnorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
    self.encoder = CLIPEncoder(config)
    self.post_layernorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
    self.btadapter_S_layers = nn.ModuleList([SpatialLayer(config) for _ in range(depth)])
    self.btadapter_T_layers = nn.ModuleList([TemporalLayer(config) for _ in range(depth)])
    self.btadapter_time_embed = nn.Embedding(max_T, d)
    self.btadapter_cls_token = nn.Parameter(torch.zeros(1, 1, d))

  def start_stream(self, x, B, T):
    """Adapter input at block 0. x: (B, T, 1+P, D) CLIP output."""
    cls_old = x[:, :, 0].mean(1).unsqueeze(1)
    x = x[:, :, 1:].reshape(B * T, -1, x.shape[-1])
    x = torch.cat((self.btadapter_cls_token.expand(B * T, 1, -1), x), 1)
    x = x + self.embeddings.position_embedding.weight[None]
    cls = x[:B, 0].unsqueeze(1)
    p = x.shape[1] - 1
    x = x[:, 1:].reshape(B, T, p, -1).permute(0, 2, 1, 3).reshape(B * p, T, -1)
    x = x + self.btadapter_time_embed.weight[:T][None]
    x = x.reshape(B, p * T, -1)
    return torch.cat(((cls_old + cls) / 2, x), 1)

  def adapter(self, x1, x2, k, T):
    B = x1.shape[0] // T
    x1 = x1.reshape(B, T, *x1.shape[1:])
    if x2 is None:
      x = self.start_stream(x1, B, T)
    else:
      cls = x1[:, :, 0].mean(1).unsqueeze(1)
      p = x1.shape[2] - 1
      patches = x1[:, :, 1:].permute(0, 2, 1, 3).reshape(B, p * T, -1)
      x = x2 + torch.cat((cls, patches), 1)
    x = self.btadapter_T_layers[k](x, T)
    return self.btadapter_S_layers[k](x, T)

  def combine(self, x, x2, T):
    p = x.shape[1] - 1
    x2_patches = frames_first(x2[:, 1:], x2.shape[0], p, T)
    return torch.cat((x[:, :1], (x[:, 1:] + x2_patches) / 2), 1)

  def forward(self, pixel_values, guess_layout=False):
    x = pixel_values
    if guess_layout and x.shape[1] == 3:
      x = x.permute(0, 2, 1, 3, 4)
    B, T = x.shape[:2]
    x = self.pre_layrnorm(self.embeddings(x.reshape(B * T, *x.shape[2:])))
    total = len(self.encoder.layers)
    states, x2 = [], None
    for idx, layer in enumerate(self.encoder.layers):
      states.append(x if x2 is None else self.combine(x, x2, T))
      x = layer(x, None)
      if idx >= total - self.depth:
        x2 = self.adapter(x, x2, idx - (total - self.depth), T)
    states.append(self.combine(x, x2, T))
    cls = x[:, 0] + x2[:, 0].repeat(1, T).reshape(B * T, -1)
    return states, self.post_layernorm(cls)


class BTAdapterTower(nn.Module):
  """The original's CLIPVisionModel_BTAdapter: everything under ``vision_model``."""

  def __init__(self, config, depth, max_T):
    super().__init__()
    config._attn_implementation = "eager"
    self.vision_model = BTAdapterVision(config, depth, max_T)

  def forward(self, pixel_values, guess_layout=False):
    """(per-layer states (B*T, 1+P, D), pooled (B*T, D)), rows frame-minor."""
    return self.vision_model(pixel_values, guess_layout)
