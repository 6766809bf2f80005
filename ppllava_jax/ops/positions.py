"""Text position-table extension for long prompts (paper Eq. 4).

``interpolate_positions`` is the paper's uniform linear interpolation:
``P'_i = P_floor(j) + (j - floor(j)) * (P_floor(j)+1 - P_floor(j))`` with
``j = i * r`` and ``r = L / new_length``. Indices past the last row extrapolate
along the last segment (the original code does the same for its final rows).

``extend_positions`` is what the released checkpoints were trained with
(``convert_text_position`` in farewellthree/PPLLaVA ``ppllava/models/clip.py``):
the first ``keep`` rows are copied (r = 1), the rest are interpolated with
``r = 1 / ratio``, i.e. it equals
``concat(table[:keep], interpolate_positions(table[keep:], ratio * (L - keep)))``.
New length ``ratio * L - (ratio - 1) * keep``: 77 -> 248 (CLIP), 64 -> 196 (SigLIP).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ppllava_jax.ops.dtypes import compute_dtype


def _check_table(table: jax.Array, fn: str) -> None:
  if table.ndim != 2:
    raise ValueError(f"{fn}: table must be (length, dim), got shape {tuple(table.shape)}")
  if table.shape[0] < 2:
    raise ValueError(f"{fn}: table needs >= 2 rows to interpolate, got shape {tuple(table.shape)}")


def interpolate_positions(table: jax.Array, new_length: int) -> jax.Array:
  """Resamples a (L, D) position table to (new_length, D), paper Eq. 4."""
  _check_table(table, "interpolate_positions")
  if new_length < 1:
    raise ValueError(f"interpolate_positions: new_length must be >= 1, got {new_length}")
  length = table.shape[0]
  dtype = compute_dtype(table.dtype)
  j = jnp.arange(new_length, dtype=dtype) * (length / new_length)
  base = jnp.minimum(jnp.floor(j).astype(jnp.int32), length - 1)
  # Past the last row, the slope of the last segment extrapolates (base stays the
  # last row, so grid points are copied exactly, as the original code does).
  seg_lo = jnp.minimum(base, length - 2)
  frac = (j - base)[:, None]
  precise = table.astype(dtype)
  slope = precise[seg_lo + 1] - precise[seg_lo]
  return (precise[base] + frac * slope).astype(table.dtype)


def extend_positions(table: jax.Array, keep: int = 20, ratio: int = 4) -> jax.Array:
  """The original asymmetric extension: (L, D) -> (ratio*L - (ratio-1)*keep, D)."""
  _check_table(table, "extend_positions")
  length = table.shape[0]
  if not 0 <= keep <= length - 2:
    raise ValueError(
      f"extend_positions: keep must be in [0, {length - 2}] for a table of "
      f"{length} rows (two rows are needed past it), got {keep}"
    )
  if not isinstance(ratio, int) or ratio < 1:
    raise ValueError(f"extend_positions: ratio must be an int >= 1, got {ratio!r}")
  tail = interpolate_positions(table[keep:], ratio * (length - keep))
  return jnp.concatenate([table[:keep], tail], axis=0)
