"""Transformer primitives shared by the CLIP and SigLIP towers (pre-LN ViT blocks).

Parameter names mirror transformers' (``q_proj``, ``layer_norm1``, ``fc1``...) so the
conversion tables read as one-to-one maps. Shape suffixes follow docs/architecture.md's table of
shape letters (``d`` here is the tower's own width).

Parameters carry the LLM's logical axis names (``models.sharding``): a tower's width is
``embed``, its attention projections ``heads``, its MLP ``mlp``, so a ViT shards under the
same (data, fsdp, tensor) rules as the LLM.

Remat: a module that runs a stack of layers keeps a ``remat`` policy name ("none" or a
``jax.checkpoint_policies`` name, default "none") and calls each layer through
``remat_call``; ``set_remat(module, policy)`` sets it on every such module below
``module`` (what a trainer does on the model it differentiates).

Attention: every module that calls ``models.attention.attention`` keeps an
``implementation`` name ("xla", the default, or another of ``attention.IMPLEMENTATIONS``);
``set_attention(module, implementation)`` sets it on every such module below ``module``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from ppllava_jax.models.attention import Mask, attention, check_implementation

_ModuleT = TypeVar("_ModuleT", bound=nnx.Module)  # set_remat / set_attention return their module


class Frozen(nnx.Variable):
  """A loaded tensor that is never trained (optimisers built with wrt=nnx.Param skip it)."""


REMAT_NONE = "none"


def remat_policy(name: str):
  """The ``jax.checkpoint_policies`` entry called ``name`` (a ValueError for any other)."""
  policy = getattr(jax.checkpoint_policies, name, None) if not name.startswith("_") else None
  if policy is None or not callable(policy):
    raise ValueError(f"remat policy {name!r} is neither 'none' nor a jax.checkpoint_policies name")
  return policy


def remat_call(layer: nnx.Module, remat: str, *args):
  """``layer(*args)``; under ``nnx.remat`` with policy ``remat`` unless it is "none"
  (the backward pass then recomputes what the policy does not save)."""
  if remat == REMAT_NONE:
    return layer(*args)
  return nnx.remat(lambda m, *a: m(*a), policy=remat_policy(remat))(layer, *args)


def set_remat(module: _ModuleT, remat: str) -> _ModuleT:
  """Sets the remat policy of every layer-stack module under ``module`` (those with a
  ``remat`` attribute, ``module`` included); returns ``module``. A static attribute: set
  it on the model a step merges (or before ``nnx.split``, then the graphdef carries it)."""
  if remat != REMAT_NONE:
    remat_policy(remat)
  for _, sub in nnx.iter_modules(module):
    if hasattr(sub, "remat"):
      sub.remat = remat
  return module


def set_attention(module: _ModuleT, implementation: str) -> _ModuleT:
  """Sets the attention implementation (``models.attention``'s module doc) of every
  attention module under ``module`` (those with an ``implementation`` attribute, ``module``
  included); returns ``module``. A static attribute, like ``set_remat``'s."""
  check_implementation(implementation)
  for _, sub in nnx.iter_modules(module):
    if hasattr(sub, "implementation"):
      sub.implementation = implementation
  return module


def quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "quick_gelu": quick_gelu,
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


class LayerNorm(nnx.Module):
  """LayerNorm with float32 statistics whatever the activation dtype."""

  def __init__(self, dim: int, eps: float, *, dtype=jnp.float32):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), dtype), axes=("embed",))
    self.bias = nnx.Param(jnp.zeros((dim,), dtype), axes=("embed",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(
      x.dtype
    )


Axes = tuple[str | None, ...]  # logical axis names of a parameter (see models/sharding.py)


class Linear(nnx.Module):
  """y = x @ kernel + bias, kernel stored (in, out); ``axes`` names (in, out) logically."""

  def __init__(
    self,
    d_in: int,
    d_out: int,
    *,
    use_bias: bool = True,
    rngs: nnx.Rngs,
    axes: Axes = (None, None),
    dtype=jnp.float32,
  ):
    self.kernel = nnx.Param(
      jax.random.normal(rngs.params(), (d_in, d_out), dtype) * d_in**-0.5, axes=axes
    )
    self.bias = nnx.Param(jnp.zeros((d_out,), dtype), axes=axes[1:]) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x @ self.kernel[...].astype(x.dtype)
    return y if self.bias is None else y + self.bias[...].astype(x.dtype)


class SelfAttention(nnx.Module):
  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
    self.num_heads = num_heads
    self.q_proj = Linear(dim, dim, axes=("embed", "heads"), rngs=rngs)
    self.k_proj = Linear(dim, dim, axes=("embed", "heads"), rngs=rngs)
    self.v_proj = Linear(dim, dim, axes=("embed", "heads"), rngs=rngs)
    self.out_proj = Linear(dim, dim, axes=("heads", "embed"), rngs=rngs)
    self.implementation = "xla"  # set_attention

  def __call__(self, x_bld: jax.Array, mask: Mask | jax.Array | None = None) -> jax.Array:
    b, l, d = x_bld.shape
    heads = lambda t: t.reshape(b, l, self.num_heads, d // self.num_heads)
    out_blna = attention(
      heads(self.q_proj(x_bld)),
      heads(self.k_proj(x_bld)),
      heads(self.v_proj(x_bld)),
      mask,
      implementation=self.implementation,
    )
    return self.out_proj(out_blna.reshape(b, l, d))


class MLP(nnx.Module):
  def __init__(self, dim: int, hidden: int, act: str, *, rngs: nnx.Rngs):
    self.act = activation(act)
    self.fc1 = Linear(dim, hidden, axes=("embed", "mlp"), rngs=rngs)
    self.fc2 = Linear(hidden, dim, axes=("mlp", "embed"), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nnx.Module):
  """Pre-LN block: x + attn(ln1(x)), then + mlp(ln2(x))."""

  def __init__(
    self, dim: int, hidden: int, num_heads: int, act: str, eps: float, *, rngs: nnx.Rngs
  ):
    self.layer_norm1 = LayerNorm(dim, eps)
    self.self_attn = SelfAttention(dim, num_heads, rngs=rngs)
    self.layer_norm2 = LayerNorm(dim, eps)
    self.mlp = MLP(dim, hidden, act, rngs=rngs)

  def __call__(self, x_bld: jax.Array, mask: Mask | jax.Array | None = None) -> jax.Array:
    x_bld = x_bld + self.self_attn(self.layer_norm1(x_bld), mask)
    return x_bld + self.mlp(self.layer_norm2(x_bld))


class Encoder(nnx.Module):
  """A stack of EncoderLayers returning every hidden state (input first, like HF); each
  layer runs under the ``remat`` policy (module doc)."""

  def __init__(
    self,
    num_layers: int,
    dim: int,
    hidden: int,
    num_heads: int,
    act: str,
    eps: float,
    *,
    rngs: nnx.Rngs,
  ):
    self.layers = nnx.List(
      [EncoderLayer(dim, hidden, num_heads, act, eps, rngs=rngs) for _ in range(num_layers)]
    )
    self.remat = REMAT_NONE

  def __call__(self, x_bld: jax.Array, mask: Mask | jax.Array | None = None) -> list[jax.Array]:
    hidden = [x_bld]
    for layer in self.layers:
      hidden.append(remat_call(layer, self.remat, hidden[-1], mask))
    return hidden


class Embedding(nnx.Module):
  def __init__(self, num: int, dim: int, *, rngs: nnx.Rngs, axes: Axes = (None, None)):
    self.weight = nnx.Param(jax.random.normal(rngs.params(), (num, dim)) * 0.02, axes=axes)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.weight[...], ids, axis=0)


class PatchEmbedding(nnx.Module):
  """Non-overlapping patch projection, NHWC: (B, H, W, C) -> (B, H/p * W/p, D) row-major."""

  def __init__(self, channels: int, dim: int, patch: int, *, use_bias: bool, rngs: nnx.Rngs):
    self.patch = patch
    self.kernel = nnx.Param(
      jax.random.normal(rngs.params(), (patch, patch, channels, dim)) * 0.02,
      axes=(None, None, None, "embed"),
    )
    self.bias = nnx.Param(jnp.zeros((dim,)), axes=("embed",)) if use_bias else None

  def __call__(self, x_bhwc: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(
      x_bhwc,
      self.kernel[...].astype(x_bhwc.dtype),
      (self.patch, self.patch),
      "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    return y.reshape(y.shape[0], -1, y.shape[-1])


def channels_last(pixel_values: jax.Array, channels: int, size: int) -> jax.Array:
  """(B, C, H, W) pixels, as HF image processors give them -> (B, H, W, C)."""
  if pixel_values.ndim != 4 or pixel_values.shape[1:] != (channels, size, size):
    raise ValueError(
      f"pixel_values must be (B, {channels}, {size}, {size}) (NCHW, as HF image "
      f"processors give), got shape {tuple(pixel_values.shape)}"
    )
  return pixel_values.transpose(0, 2, 3, 1)
