"""CLIP vision tower with PPLLaVA's BT-Adapter (the released Vicuna models; reference section 4).

Beside CLIP's last ``depth`` layers runs a second token stream per video: one CLS
token and every frame's patches. Each CLIP layer ``start + k`` (``start = layers -
depth``) is followed by adapter block pair ``k``: a temporal block (each patch
attends to itself across frames) then a spatial block (each frame's patches attend
with the video's CLS token, as a CLIP layer would). The stream starts from CLIP
layer ``start``'s output plus the adapter's own CLS token, CLIP's position table and
a time embedding; every later CLIP output is added into it. Hidden states past
``start`` are handed out as ``cat(cls, (clip_patch + adapter_patch) / 2)``.

Input layout is explicit: frames (B, T, C, H, W), each NCHW as HF image processors
give. Images are one-frame videos (B, 1, C, H, W). Stochastic depth runs only after
``model.train()`` (or ``nnx.view(model, deterministic=False)``) with ``rngs`` given;
otherwise the tower is deterministic.

Parameter names mirror the original checkpoint under ``vision_model.``, so the key
table (``convert.btadapter.BTADAPTER_RULES``) is CLIP's plus ``temporal_fc``.
Shape suffixes follow docs/architecture.md's table of shape letters: ``b`` videos, ``l`` = 1 + p
(a frame's CLS and patches); folded into the batch, the frames (B·T rows) or the patch
positions (B·P rows) keep ``b``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from ppllava_jax.convert.btadapter import BTADAPTER_RULES
from ppllava_jax.convert.loader import load_into
from ppllava_jax.models import pretrained
from ppllava_jax.models.clip import CLIPVisionConfig, CLIPVisionTransformer
from ppllava_jax.models.layers import (
  REMAT_NONE,
  Embedding,
  EncoderLayer,
  LayerNorm,
  Linear,
  SelfAttention,
  channels_last,
  remat_call,
)

# The original builds its adapter LayerNorms with torch's default eps, not CLIP's.
ADAPTER_LN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class BTAdapterConfig:
  """The adapter's settings; defaults are the released Vicuna models'.

  depth: block pairs, beside CLIP's last ``depth`` layers.
  max_T: rows of the time embedding, the most frames a video may have.
  drop_path_rate: spatial block ``i`` drops its attention branch with rate
    ``linspace(0, drop_path_rate, depth)[i]`` (so the first never drops).
  temporal_drop_path_rate: every temporal block's rate. The original hands the
    spatial schedule to an unused argument of its temporal block, whose own default
    (0.1) then applies to all.
  """

  depth: int = 4
  max_T: int = 64
  drop_path_rate: float = 0.1
  temporal_drop_path_rate: float = 0.1

  def spatial_drop_path_rate(self, i: int) -> float:
    return self.drop_path_rate * i / (self.depth - 1) if self.depth > 1 else 0.0

  @classmethod
  def from_shapes(cls, shapes: dict[str, tuple[int, ...]], prefix: str) -> BTAdapterConfig:
    """What the adapter tensors under ``prefix`` fix (depth, max_T); drop-path rates, which
    only training reads and no tensor records, stay the original's."""
    pairs = {
      k[len(prefix) :].split(".")[1] for k in shapes if k.startswith(prefix + "btadapter_S_layers.")
    }
    return cls(depth=len(pairs), max_T=shapes[prefix + "btadapter_time_embed.weight"][0])

  @classmethod
  def from_hf(cls, vision_config: dict) -> BTAdapterConfig:
    """Reads ``depth`` / ``max_T``, which the original stamps onto the CLIP vision config."""
    return cls(
      depth=vision_config.get("depth", cls.depth), max_T=vision_config.get("max_T", cls.max_T)
    )


def vision_config_from_hf(hf: dict) -> CLIPVisionConfig:
  from transformers import CLIPVisionConfig as HFCLIPVisionConfig  # fills omitted defaults

  return pretrained.pick_fields(CLIPVisionConfig, HFCLIPVisionConfig.from_dict(hf))


def drop_path(rate: float) -> nnx.Dropout:
  """Stochastic depth: drops whole rows of the leading axis (axes 1 and 2 share the draw)."""
  return nnx.Dropout(rate, broadcast_dims=(1, 2), deterministic=True)


class TemporalBlock(nnx.Module):
  """Attention across frames at each patch position, added through ``temporal_fc``.

  ``temporal_fc`` starts at zero, so a fresh block is exactly the identity. The CLS
  token does not take part.
  """

  def __init__(self, cfg: CLIPVisionConfig, drop_rate: float, *, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.layer_norm1 = LayerNorm(d, ADAPTER_LN_EPS)
    self.self_attn = SelfAttention(d, cfg.num_attention_heads, rngs=rngs)
    self.temporal_fc = Linear(d, d, axes=("embed", "embed"), rngs=rngs)  # as Projector.linear_2
    self.temporal_fc.kernel.set_value(jnp.zeros((d, d)))
    self.drop_path = drop_path(drop_rate)

  def __call__(self, patches_btpd: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    b, t, p, d = patches_btpd.shape
    x_btd = patches_btpd.transpose(0, 2, 1, 3).reshape(b * p, t, d)  # B·P rows
    res_btd = self.drop_path(self.self_attn(self.layer_norm1(x_btd)), rngs=rngs)
    res_btpd = self.temporal_fc(res_btd).reshape(b, p, t, d).transpose(0, 2, 1, 3)
    return patches_btpd + res_btpd


class SpatialBlock(EncoderLayer):
  """A CLIP layer run on each frame with the video's one CLS token.

  The attention branch's CLS outputs are averaged over frames before the residual
  (so the stream keeps one CLS per video); the MLP half is CLIP's, token by token.
  With one frame this is exactly ``EncoderLayer``.
  """

  def __init__(self, cfg: CLIPVisionConfig, drop_rate: float, *, rngs: nnx.Rngs):
    super().__init__(
      cfg.hidden_size,
      cfg.intermediate_size,
      cfg.num_attention_heads,
      cfg.hidden_act,
      ADAPTER_LN_EPS,
      rngs=rngs,
    )
    self.drop_path = drop_path(drop_rate)

  # an EncoderLayer's weights on the adapter's inputs: never called as an EncoderLayer
  def __call__(  # type: ignore[override]
    self, cls_bd: jax.Array, patches_btpd: jax.Array, rngs: nnx.Rngs | None = None
  ) -> tuple[jax.Array, jax.Array]:
    b, t, p, d = patches_btpd.shape
    cls_bt1d = jnp.broadcast_to(cls_bd[:, None, None], (b, t, 1, d))
    x_bld = jnp.concatenate([cls_bt1d, patches_btpd], axis=2).reshape(b * t, 1 + p, d)  # B·T rows
    res_bld = self.drop_path(self.self_attn(self.layer_norm1(x_bld)), rngs=rngs)
    res_btld = res_bld.reshape(b, t, 1 + p, d)
    cls_bd = cls_bd + res_btld[:, :, 0].mean(axis=1)
    patches_btpd = patches_btpd + res_btld[:, :, 1:]
    mlp = lambda x: x + self.mlp(self.layer_norm2(x))
    return mlp(cls_bd), mlp(patches_btpd)


class BTAdapterVisionTransformer(CLIPVisionTransformer):
  """CLIP's vision transformer (same parameters) plus the adapter's, run on videos."""

  def __init__(self, cfg: CLIPVisionConfig, adapter: BTAdapterConfig, *, rngs: nnx.Rngs):
    if not 1 <= adapter.depth <= cfg.num_hidden_layers:
      raise ValueError(
        f"adapter depth {adapter.depth} must be in 1..{cfg.num_hidden_layers} "
        "(the CLIP layers it runs beside)"
      )
    super().__init__(cfg, rngs=rngs)
    self.adapter_cfg = adapter
    self.btadapter_S_layers = nnx.List(
      [
        SpatialBlock(cfg, adapter.spatial_drop_path_rate(i), rngs=rngs)
        for i in range(adapter.depth)
      ]
    )
    self.btadapter_T_layers = nnx.List(
      [TemporalBlock(cfg, adapter.temporal_drop_path_rate, rngs=rngs) for _ in range(adapter.depth)]
    )
    self.btadapter_time_embed = Embedding(
      adapter.max_T, cfg.hidden_size, axes=(None, "embed"), rngs=rngs
    )
    self.btadapter_cls_token = nnx.Param(
      jnp.zeros((1, 1, cfg.hidden_size)),  # original's shape
      axes=(None, None, "embed"),
    )
    # The policy of every CLIP layer and adapter block this tower's own loop runs (it calls
    # ``encoder.layers`` itself); ``layers.set_remat`` sets it with the encoder's.
    self.remat = REMAT_NONE

  def _stream_input(self, x_btld: jax.Array, stream: tuple[jax.Array, jax.Array] | None):
    """What adapter block pair k reads: CLIP layer start+k's output, its CLS averaged
    over frames, added to the stream. Pair 0 has no stream yet: its patches get CLIP's
    position table and the time embedding, its CLS is the mean of CLIP's and the
    adapter's own (plus position 0)."""
    cls_bd, patches_btpd = x_btld[:, :, 0].mean(axis=1), x_btld[:, :, 1:]
    if stream is not None:
      return stream[0] + cls_bd, stream[1] + patches_btpd
    pos_ld = self.embeddings.position_embedding.weight[...].astype(x_btld.dtype)
    time_td = self.btadapter_time_embed.weight[: x_btld.shape[1]].astype(x_btld.dtype)
    own_cls_d = self.btadapter_cls_token[0, 0].astype(x_btld.dtype) + pos_ld[0]
    return (cls_bd + own_cls_d) / 2, patches_btpd + pos_ld[1:] + time_td[:, None]

  # CLIP's tower with the adapter: video input, (hidden states, pooled) out (PPLLaVA knows)
  def __call__(  # type: ignore[override]
    self, pixel_values: jax.Array, rngs: nnx.Rngs | None = None
  ) -> tuple[list[jax.Array], jax.Array]:
    """(hidden states, pooled) for frames ``pixel_values`` (B, T, C, H, W), each NCHW.

    Hidden states are (B, T, 1 + P, D), ``num_hidden_layers + 1`` of them like HF's:
    plain CLIP up to layer ``start``'s output, then each later layer's output combined
    with the adapter stream as ``cat(cls, (clip_patch + adapter_patch) / 2)``. Pooled
    (B, T, D) is ``post_layernorm(frame CLS + the video's adapter CLS)``.
    """
    if pixel_values.ndim != 5:
      raise ValueError(
        "pixel_values must be video frames (B, T, C, H, W), each NCHW; got "
        f"shape {tuple(pixel_values.shape)} (an image batch is (B, 1, C, H, W))"
      )
    b, t = pixel_values.shape[:2]
    if t > self.adapter_cfg.max_T:
      raise ValueError(f"{t} frames exceed the time embedding's max_T={self.adapter_cfg.max_T}")
    x_bhwc = channels_last(
      pixel_values.reshape(b * t, *pixel_values.shape[2:]),  # B·T rows
      self.cfg.num_channels,
      self.cfg.image_size,
    )
    x_bld = self.pre_layrnorm(self.embeddings(x_bhwc))
    frames = lambda x: x.reshape(b, t, *x.shape[1:])
    hidden, stream = [frames(x_bld)], None
    start = self.cfg.num_hidden_layers - self.adapter_cfg.depth
    for idx, layer in enumerate(self.encoder.layers):
      x_bld = remat_call(layer, self.remat, x_bld)
      x_btld = frames(x_bld)
      if idx < start:
        hidden.append(x_btld)
        continue
      k = idx - start
      cls_bd, patches_btpd = self._stream_input(x_btld, stream)
      patches_btpd = remat_call(self.btadapter_T_layers[k], self.remat, patches_btpd, rngs)
      stream = remat_call(self.btadapter_S_layers[k], self.remat, cls_bd, patches_btpd, rngs)
      hidden.append(jnp.concatenate([x_btld[:, :, :1], (x_btld[:, :, 1:] + stream[1]) / 2], axis=2))
    assert stream is not None  # depth >= 1 (checked in __init__): the last layer set it
    pooled_btd = self.post_layernorm(x_btld[:, :, 0] + stream[0][:, None])
    return hidden, pooled_btd


class CLIPVisionBTAdapter(nnx.Module):
  """The tower as the original's ``CLIPVisionModel_BTAdapter``: all under ``vision_model``."""

  def __init__(
    self, vision: CLIPVisionConfig, adapter: BTAdapterConfig = BTAdapterConfig(), *, rngs: nnx.Rngs
  ):
    self.cfg = vision
    self.adapter_cfg = adapter
    self.vision_model = BTAdapterVisionTransformer(vision, adapter, rngs=rngs)

  def __call__(
    self, pixel_values: jax.Array, rngs: nnx.Rngs | None = None
  ) -> tuple[list[jax.Array], jax.Array]:
    """See ``BTAdapterVisionTransformer.__call__``; PPLLaVA reads hidden state -2."""
    return self.vision_model(pixel_values, rngs)

  @classmethod
  def from_clip(
    cls,
    clip: CLIPVisionTransformer,
    adapter: BTAdapterConfig = BTAdapterConfig(),
    *,
    rngs: nnx.Rngs,
  ) -> CLIPVisionBTAdapter:
    """A fresh adapter on a CLIP vision tower, initialised as the original does.

    CLIP's tensors are taken as they are; spatial block k starts as CLIP layer
    ``start + k``; ``temporal_fc`` is zero (temporal blocks start as identities) and the
    CLS token zero; the time embedding is N(0, 1) (torch's ``nn.Embedding`` default)
    and the temporal attention keeps this module's random init.
    """
    model = cls(clip.cfg, adapter, rngs=rngs)
    tower = model.vision_model
    for name in ("embeddings", "pre_layrnorm", "encoder", "post_layernorm"):
      nnx.update(getattr(tower, name), nnx.state(getattr(clip, name)))
    start = clip.cfg.num_hidden_layers - adapter.depth
    for k, block in enumerate(tower.btadapter_S_layers):
      nnx.update(block, nnx.state(clip.encoder.layers[start + k]))
    tower.btadapter_time_embed.weight.set_value(
      jax.random.normal(rngs.params(), (adapter.max_T, clip.cfg.hidden_size))
    )
    return model

  # ---- checkpoints -------------------------------------------------------------------

  @classmethod
  def from_pretrained(cls, path: str | Path, dtype: jnp.dtype | None = None) -> CLIPVisionBTAdapter:
    """Loads a folder whose config.json is a CLIP vision config carrying the original's
    ``depth`` / ``max_T`` and whose tensors use the original's ``vision_model.`` names."""
    path = pretrained.resolve_checkpoint(path)
    hf = pretrained.read_config(path, ["clip_vision_model"])
    vision, adapter = vision_config_from_hf(hf), BTAdapterConfig.from_hf(hf)
    return load_into(
      nnx.eval_shape(lambda: cls(vision, adapter, rngs=nnx.Rngs(0))), path, BTADAPTER_RULES, dtype
    )

  def save_pretrained(self, path: str | Path) -> Path:
    from transformers import CLIPVisionConfig as HFCLIPVisionConfig

    hf = HFCLIPVisionConfig(**dataclasses.asdict(self.cfg)).to_dict()
    hf.update(depth=self.adapter_cfg.depth, max_T=self.adapter_cfg.max_T)
    return pretrained.save_pretrained(self, path, BTADAPTER_RULES, hf)
