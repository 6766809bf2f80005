"""Window geometry of strided 3D pooling (paper Eq. 2), in plain Python ints.

Per axis, ``output = (input - kernel) // stride + 1``; any two of (output, kernel,
stride) determine the third, with the original code's rules (``get_size`` in
farewellthree/PPLLaVA ``ppllava/models/utils.py``):

- output only:      ``stride = input // output``, ``kernel = input - (output - 1) * stride``
- kernel + stride:  ``output = (input - kernel) // stride + 1``
- output + stride:  ``kernel = input - (output - 1) * stride``
- output + kernel:  ``stride = (input - kernel) // (output - 1)``

Two additions the original lacks: ``kernel`` alone means ``stride = kernel`` (the
paper's configs, e.g. (2,3,3) for video), and all three may be given if they agree.
A trailing remainder (``input - kernel`` not divisible by ``stride``) is dropped, as
in the original: 33 frames with kernel 2 pool to 16 frames; the 33rd frame only
contributes through the global relevance softmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

Size3 = tuple[int, int, int]
_AXES = ("time", "height", "width")


@overload
def _as_size3(value: Sequence[int], name: str) -> Size3: ...
@overload
def _as_size3(value: None, name: str) -> None: ...
@overload
def _as_size3(value: Sequence[int] | None, name: str) -> Size3 | None: ...
def _as_size3(value: Sequence[int] | None, name: str) -> Size3 | None:
  if value is None:
    return None
  if isinstance(value, int):
    raise ValueError(f"{name} must be a 3-tuple (time, height, width), got the int {value}")
  value = tuple(value)
  if len(value) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
    raise ValueError(f"{name} must be 3 ints (time, height, width), got {value!r}")
  return value  # type: ignore[return-value]


def _axis_geometry(
  axis: str, size: int, out: int | None, k: int | None, s: int | None
) -> tuple[int, int, int]:
  def fail(why: str) -> ValueError:
    given = ", ".join(
      f"{n}={v}" for n, v in (("output", out), ("kernel", k), ("stride", s)) if v is not None
    )
    return ValueError(f"pool_geometry: {axis} axis (input={size}, {given}): {why}")

  if size < 1:
    raise fail("input size must be >= 1")
  for name, v in (("output", out), ("kernel", k), ("stride", s)):
    if v is not None and v < 1:
      raise fail(f"{name} must be >= 1")
  if out is not None and out > size:
    raise fail(f"output larger than input ({out} > {size})")
  if k is not None and k > size:
    raise fail(f"kernel larger than input ({k} > {size})")

  if k is None and s is None:
    assert out is not None  # pool_geometry refuses output_size and kernel both missing
    s = size // out
    k = size - (out - 1) * s
  elif k is None:
    assert s is not None  # not both None (the branch above)
    if out is None:
      raise fail("give at least two of output/kernel/stride, or kernel alone")
    k = size - (out - 1) * s
    if k < 1:
      raise fail(f"{out} windows of stride {s} do not fit (kernel would be {k})")
  elif s is None:
    if out is None:
      s = k
    elif out == 1:
      s = size  # a single window: any stride > size - kernel works; this one is explicit
    else:
      s = (size - k) // (out - 1)
      if s < 1:
        raise fail(f"{out} windows of kernel {k} do not fit")
  assert s is not None  # every branch above sets it, or found it given
  found = (size - k) // s + 1
  if out is not None and found != out:
    raise fail(f"these give {found} windows, not {out}")
  return found, k, s


def pool_geometry(
  input_size: Sequence[int],
  output_size: Sequence[int] | None = None,
  kernel: Sequence[int] | None = None,
  stride: Sequence[int] | None = None,
) -> tuple[Size3, Size3, Size3]:
  """Resolves ``(output_size, kernel, stride)`` for a (T, H, W) input.

  Raises ``ValueError`` naming the axis and the numbers for any combination
  that does not describe a valid pooling (zero or negative sizes, kernel or
  output larger than the input, or sizes that disagree).
  """
  input_size = _as_size3(input_size, "input_size")
  output_size = _as_size3(output_size, "output_size")
  kernel = _as_size3(kernel, "kernel")
  stride = _as_size3(stride, "stride")
  if output_size is None and kernel is None:
    raise ValueError("pool_geometry: give output_size, kernel, or both with stride")
  per_axis = [
    _axis_geometry(
      axis,
      input_size[i],
      None if output_size is None else output_size[i],
      None if kernel is None else kernel[i],
      None if stride is None else stride[i],
    )
    for i, axis in enumerate(_AXES)
  ]
  out, k, s = (tuple(v) for v in zip(*per_axis))
  return out, k, s  # type: ignore[return-value]
