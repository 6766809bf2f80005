"""Accelerators a plan is read against: peak dense bfloat16 FLOP/s and HBM per chip.

Sources (vendors' pages, read 2026):
- TPU v5e: cloud.google.com/tpu/docs/v5e, "197 TFLOPs" bf16 peak and "16 GiB" HBM2 per chip.
- TPU v5p: cloud.google.com/tpu/docs/v5p, "459 TFLOPs" bf16 peak and "95 GiB" HBM2e per chip.
- H100 SXM: NVIDIA H100 Tensor Core GPU datasheet, 989 TFLOPS bf16 dense (1,979 is with
  2:4 sparsity, which training does not use) and 80 GB HBM3 (taken as 80 GiB: nvidia-smi
  shows 81,559 MiB).
"""

from __future__ import annotations

import dataclasses

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  bf16_flops: float  # peak dense bf16 FLOP/s
  hbm_bytes: int


CHIPS = (
  Chip("TPU v5e", 197e12, 16 * GIB),
  Chip("TPU v5p", 459e12, 95 * GIB),
  Chip("H100 SXM", 989e12, 80 * GIB),
)
