"""Prompt-guided strided 3D pooling (paper Eq. 3) and its Table 7 variants.

Every variant is one computation: for each output position, a weight per token of
its window, then the weighted sum of those tokens' features. Modes differ only in
the weights ``w`` of a window ``W`` with relevance probabilities ``p``:

- ``"softmax"``      ``w = softmax(p_W / temperature)``: the original code
                     (``weighted_adaptive_avg_pool3d_unfold``), a renormalised average.
- ``"weighted_sum"`` ``w = p_W``: the paper's Eq. 3 as printed, no renormalisation
                     (outputs are tiny, ~1/(T*H*W) scale, since ``p`` sums to 1 globally).
- ``"average"``      ``w = 1 / |W|``: plain average pooling, ``p`` ignored.
- ``"max"``          ``w = onehot(argmax p_W)``: each window emits the feature of
                     its most relevant token (first one on ties).

The weighted sum is formed as a sum over the ``kt*kh*kw`` kernel offsets of strided
slices of ``x``. XLA fuses that into one pass over ``x``: no unfolded copy of the
features is ever materialised, which is what lets (8, 64, 24, 24, 4096) f32 pool in
24 GiB. Only the (small, feature-less) window weights are unfolded.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp

from ppllava_jax.ops.dtypes import compute_dtype
from ppllava_jax.ops.geometry import Size3, pool_geometry

PoolMode = Literal["softmax", "weighted_sum", "average", "max"]
POOL_MODES: tuple[str, ...] = ("softmax", "weighted_sum", "average", "max")


def _check_inputs(x, probs, fn: str) -> None:
  if x.ndim != 5:
    raise ValueError(f"{fn}: x must be (B, T, H, W, D), got shape {tuple(x.shape)}")
  if probs.ndim != 4 or tuple(probs.shape) != tuple(x.shape[:4]):
    raise ValueError(
      f"{fn}: probs must be (B, T, H, W) = {tuple(x.shape[:4])} to match x "
      f"{tuple(x.shape)}, got shape {tuple(probs.shape)}"
    )


# Axes whose windows tile them (kernel == stride) and are at least this wide are
# reduced over a reshaped view; narrower or overlapping ones are summed over kernel
# offsets. Offset sums are the fastest form on CPU (one fused pass, measured in
# benchmarks/pooling.py), but a whole-frame window (1, 24, 24) would unroll into
# 576 terms, so wide tiled axes are folded instead.
_FOLD_MIN_KERNEL = 9


def _gather_windows(probs_bthw: jax.Array, out: Size3, kernel: Size3, stride: Size3) -> jax.Array:
  """Unfolds the (small) probabilities: (B, T', H', W', kt, kh, kw)."""
  idx = [
    jnp.arange(n)[:, None] * s + jnp.arange(k)[None, :] for n, k, s in zip(out, kernel, stride)
  ]
  t_idx = idx[0][:, None, None, :, None, None]
  h_idx = idx[1][None, :, None, None, :, None]
  w_idx = idx[2][None, None, :, None, None, :]
  return probs_bthw[:, t_idx, h_idx, w_idx]


def window_weights(
  probs_bthw: jax.Array,
  out: Size3,
  kernel: Size3,
  stride: Size3,
  mode: PoolMode,
  temperature: float,
) -> jax.Array:
  """Per-window token weights, (B, T', H', W', kt, kh, kw), at least float32."""
  p_bthwo = _gather_windows(probs_bthw.astype(compute_dtype(probs_bthw.dtype)), out, kernel, stride)
  p_bthwo = p_bthwo.reshape(p_bthwo.shape[:4] + (-1,))
  if mode == "softmax":
    w_bthwo = jax.nn.softmax(p_bthwo / temperature, axis=-1)
  elif mode == "weighted_sum":
    w_bthwo = p_bthwo
  elif mode == "average":
    w_bthwo = jnp.full_like(p_bthwo, 1.0 / p_bthwo.shape[-1])
  elif mode == "max":
    w_bthwo = jax.nn.one_hot(jnp.argmax(p_bthwo, axis=-1), p_bthwo.shape[-1], dtype=p_bthwo.dtype)
  else:
    raise ValueError(f"mode must be one of {POOL_MODES}, got {mode!r}")
  return w_bthwo.reshape(w_bthwo.shape[:4] + tuple(kernel))


def _weighted_window_sum(
  x: jax.Array, w_bthwooo: jax.Array, out: Size3, kernel: Size3, stride: Size3
) -> jax.Array:
  """sum over each window of x * w, as strided views of x: (B, T', H', W', D) in w's dtype."""
  fold = [k == s and k >= _FOLD_MIN_KERNEL for k, s in zip(kernel, stride)]
  # Offsets to loop over per axis; None = the whole (folded) window at once.
  offsets = [[None] if f else range(k) for f, k in zip(fold, kernel)]
  b, d = x.shape[0], x.shape[-1]
  acc_bthwd = None
  for offset in itertools.product(*offsets):
    x_slices, w_slices, view = [slice(None)], [slice(None)] * 4, [b]
    for o, n, k, s in zip(offset, out, kernel, stride):
      if o is None:
        x_slices.append(slice(0, n * k))
        w_slices.append(slice(None))
        view += [n, k]
      else:
        x_slices.append(slice(o, o + s * (n - 1) + 1, s))
        w_slices.append(slice(o, o + 1))
        view += [n, 1]
    # (B,T',ft,H',fh,W',fw,D) and (B,T',ft,H',fh,W',fw)
    x_view = x[tuple(x_slices)].astype(w_bthwooo.dtype).reshape(view + [d])
    w_view = w_bthwooo[tuple(w_slices)].transpose(0, 1, 4, 2, 5, 3, 6)
    term = jnp.sum(x_view * w_view[..., None], axis=(2, 4, 6))
    acc_bthwd = term if acc_bthwd is None else acc_bthwd + term
  assert acc_bthwd is not None  # kernel sizes are >= 1: at least one offset
  return acc_bthwd


@functools.partial(jax.jit, static_argnames=("out", "kernel", "stride", "mode"))
def _pool(
  x, probs, temperature, *, out: Size3, kernel: Size3, stride: Size3, mode: PoolMode
) -> jax.Array:
  # Jitted so eager callers pay one dispatch, not one per kernel offset.
  w_bthwooo = window_weights(probs, out, kernel, stride, mode, temperature)
  return _weighted_window_sum(x, w_bthwooo, out, kernel, stride).astype(x.dtype)


def prompt_guided_pool(
  x: jax.Array,
  probs: jax.Array,
  kernel: Sequence[int],
  stride: Sequence[int] | None = None,
  mode: PoolMode = "softmax",
  temperature: float | jax.Array = 0.01,
) -> jax.Array:
  """Pools ``x`` (B, T, H, W, D) with relevance ``probs`` (B, T, H, W).

  Returns (B, T', H', W', D) in ``x.dtype`` with ``T' = (T - kt) // st + 1`` etc.
  (``stride`` defaults to ``kernel``; a trailing remainder is dropped, see
  ``pool_geometry``). Weights and accumulation are float32 for bf16/f16/f32
  inputs (float64 under x64).
  ``temperature`` only matters for ``mode="softmax"``; it may be a traced scalar.
  """
  _check_inputs(x, probs, "prompt_guided_pool")
  if mode not in POOL_MODES:
    raise ValueError(f"prompt_guided_pool: mode must be one of {POOL_MODES}, got {mode!r}")
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f"prompt_guided_pool: temperature must be > 0, got {temperature}")
  out, kernel, stride = pool_geometry(x.shape[1:4], kernel=kernel, stride=stride)
  return _pool(x, probs, temperature, out=out, kernel=kernel, stride=stride, mode=mode)


def separate_spatiotemporal_pool(
  x: jax.Array, probs: jax.Array, mode: PoolMode = "softmax", temperature: float = 0.01
) -> jax.Array:
  """Paper Table 7 "separate S-T": whole frames and whole time lines pooled apart.

  Returns (B, T + H*W, D): first T temporal tokens (token t pools all H*W patches
  of frame t), then H*W spatial tokens in row-major (h, w) order (token h*W + w
  pools position (h, w) across all T frames). 32 frames of 24x24 give 608 tokens.
  """
  _check_inputs(x, probs, "separate_spatiotemporal_pool")
  b, t, h, w, d = x.shape
  per_frame = prompt_guided_pool(x, probs, (1, h, w), mode=mode, temperature=temperature)
  per_position = prompt_guided_pool(x, probs, (t, 1, 1), mode=mode, temperature=temperature)
  return jnp.concatenate([per_frame.reshape(b, t, d), per_position.reshape(b, h * w, d)], axis=1)


def multi_kernel_pool(
  x: jax.Array,
  probs: jax.Array,
  kernels: Sequence[Sequence[int]],
  strides: Sequence[Sequence[int] | None] | None = None,
  mode: PoolMode = "softmax",
  temperature: float = 0.01,
) -> jax.Array:
  """Paper Table 7 "multiple": several poolings of the same input, concatenated.

  Returns (B, sum_i T'_i*H'_i*W'_i, D): the tokens of ``kernels[0]`` flattened
  time-major (t, h, w), then those of ``kernels[1]``, and so on. ``strides[i]``
  defaults to ``kernels[i]``. E.g. 32x24x24 with (1,6,6) and (8,2,2): 512 + 576 tokens.
  """
  _check_inputs(x, probs, "multi_kernel_pool")
  if not kernels:
    raise ValueError("multi_kernel_pool: give at least one kernel")
  strides = [None] * len(kernels) if strides is None else list(strides)
  if len(strides) != len(kernels):
    raise ValueError(f"multi_kernel_pool: {len(kernels)} kernels but {len(strides)} strides")
  b, d = x.shape[0], x.shape[-1]
  pooled = [
    prompt_guided_pool(x, probs, k, s, mode=mode, temperature=temperature)
    for k, s in zip(kernels, strides)
  ]
  return jnp.concatenate([p.reshape(b, -1, d) for p in pooled], axis=1)
