"""Causal attention: dense JAX vs ``models.attention`` vs torch SDPA, one run.

8 heads x 64, f32, batch 1, causal, at 1100 / 4631 / 18432 tokens (a short prompt,
LLaVA-NeXT-Video's 32 x 144 video tokens plus text, PPLLaVA's unpooled 32 x 576):

- dense: the formulation the towers used before ``models/attention.py`` (one (N, L, S)
  f32 score tensor, ``jax.nn.softmax``, a second einsum), under ``jax.jit``.
- ours: ``attention(q, k, v, mask)`` under ``jax.jit``, given the (B, L, S) boolean key
  mask the LLM builds (causality there is data, not a flag).
- torch: ``F.scaled_dot_product_attention(..., is_causal=True)``, PyTorch's fused
  FlashAttention CPU kernel on its fastest (mask-free) path, heads-first layout.

Each contender and length runs in a fresh worker process: median wall time of a few
calls after a warm-up, and peak memory as VmHWM above the resident size once inputs
exist (and, for JAX, the program is compiled). Dense is skipped, saying so, where
three (N, L, S) f32 score tensors exceed MemAvailable: its XLA temporaries are ~1.9
of them (1309 MiB at 4631 tokens), and the machine is shared.

``--block`` runs ours with another block length (``models.attention.BLOCK`` = 512 was
picked that way: at 4096 tokens 256 took 1.45x as long, 1024 1.03-1.09x).
``--implementation`` runs ours through another of ``models.attention.IMPLEMENTATIONS``
("cudnn" on a GPU, in bfloat16, which cuDNN needs; "pallas" on a TPU), given the
structured causal ``Mask`` the kernels take instead of the dense mask.

  python benchmarks/attention.py [--lengths 1100 4631 18432] [--block 512] [--implementation xla]
"""

from __future__ import annotations

import argparse
import json
import os

import common
import numpy as np
from common import available_bytes, median_time, status_kib

HEADS, HEAD_DIM = 8, 64


def _inputs(length: int, seed: int = 0):
  """q, k, v (1, L, N, A) f32 and the causal (1, L, L) mask, as NumPy."""
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal((1, length, HEADS, HEAD_DIM), dtype=np.float32) for _ in range(3))
  return q, k, v, np.tril(np.ones((length, length), bool))[None]


def dense_attention(q_blna, k_bsna, v_bsna, mask_bls):
  """The pre-``models/attention.py`` code: scores, jax.nn.softmax, einsum."""
  import jax
  import jax.numpy as jnp

  scores = jnp.einsum("blna,bsna->bnls", q_blna, k_bsna) * q_blna.shape[-1] ** -0.5
  scores = jnp.where(mask_bls[:, None], scores, jnp.finfo(jnp.float32).min)
  return jnp.einsum("bnls,bsna->blna", jax.nn.softmax(scores, axis=-1), v_bsna)


def _ours(length: int, implementation: str, q, k, v, mask):
  """attention through ``implementation`` and its inputs: the dense mask for "xla" (what
  the numbers above measured), the causal ``Mask`` for the kernels; bfloat16 for cuDNN."""
  import functools

  import jax.numpy as jnp

  from ppllava_jax.models.attention import Mask, attention

  if implementation == "xla":
    return attention, (q, k, v, mask)
  if implementation == "cudnn":
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
  return (
    functools.partial(attention, implementation=implementation),
    (q, k, v, Mask(valid_bs=np.ones((1, length), bool), causal=True)),
  )


def worker(impl: str, length: int, reps: int, block: int, implementation: str) -> dict:
  q, k, v, mask = _inputs(length)
  extra = {}
  if impl in ("dense", "ours"):
    import functools

    import jax

    if impl == "dense":
      fn, args = dense_attention, (q, k, v, mask)
    else:
      fn, args = _ours(length, implementation, q, k, v, mask)
      fn = functools.partial(fn, block=block)
    args = [jax.device_put(x) for x in args]
    compiled = jax.jit(fn).lower(*args).compile()
    extra["xla_temp_mib"] = compiled.memory_analysis().temp_size_in_bytes / 2**20
    del q, k, v, mask
    base = status_kib("VmRSS")
    sec, _ = median_time(lambda: compiled(*args).block_until_ready(), reps)
  elif impl == "torch":
    import torch
    import torch.nn.functional as F

    q, k, v = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (q, k, v))
    del mask
    base = status_kib("VmRSS")
    with torch.no_grad():
      sec, _ = median_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), reps)
  else:
    raise ValueError(impl)
  return dict(
    impl=impl, seconds=sec, peak_extra_mib=max(status_kib("VmHWM") - base, 0) / 1024, **extra
  )


def check_agreement(implementation: str, length: int = 1100) -> dict[str, float]:
  """Max |ours - dense| and |ours - torch| at ``length``: the contenders agree."""
  import jax
  import torch
  import torch.nn.functional as F

  q, k, v, mask = _inputs(length, seed=1)
  fn, args = _ours(length, implementation, q, k, v, mask)
  ours = np.asarray(jax.jit(fn)(*args), np.float32)
  dense = np.asarray(jax.jit(dense_attention)(q, k, v, mask))
  with torch.no_grad():
    ref = (
      F.scaled_dot_product_attention(
        *(torch.from_numpy(x).transpose(1, 2) for x in (q, k, v)), is_causal=True
      )
      .transpose(1, 2)
      .numpy()
    )
  return dict(dense=float(np.abs(ours - dense).max()), torch=float(np.abs(ours - ref).max()))


def run_worker(impl: str, length: int, reps: int, block: int, implementation: str) -> dict:
  return dict(impl=impl) | common.run_worker(
    __file__,
    [
      "--worker",
      impl,
      "--lengths",
      str(length),
      "--reps",
      str(reps),
      "--block",
      str(block),
      "--implementation",
      implementation,
    ],
  )


def main() -> None:
  from ppllava_jax.models.attention import IMPLEMENTATIONS

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", type=int, nargs="+", default=[1100, 4631, 18432])
  parser.add_argument(
    "--block",
    type=int,
    default=None,
    help="block length for ours (default: models.attention.BLOCK)",
  )
  parser.add_argument("--reps", type=int, default=None, help="timed calls (default by length)")
  parser.add_argument(
    "--implementation",
    default="xla",
    choices=IMPLEMENTATIONS,
    help="ours through this implementation (models.attention)",
  )
  parser.add_argument("--worker", choices=["dense", "ours", "torch"], help=argparse.SUPPRESS)
  args = parser.parse_args()
  if not args.worker:
    print(common.machine())  # the line each figure is read with
  if args.block is None:
    from ppllava_jax.models.attention import BLOCK

    args.block = BLOCK
  if args.worker:
    print(
      json.dumps(worker(args.worker, args.lengths[0], args.reps, args.block, args.implementation))
    )
    return

  agree = check_agreement(args.implementation)
  print(
    f"agreement at 1100 tokens: max |ours - dense| = {agree['dense']:.1e}, "
    f"max |ours - torch SDPA| = {agree['torch']:.1e}"
  )
  print(
    f"causal attention, batch 1, {HEADS} heads x {HEAD_DIM}, f32, ours through "
    f"{args.implementation!r} (bfloat16 for cudnn), block {args.block}; "
    f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start"
  )
  print(f"{'tokens':>7s} {'contender':10s}{'median ms':>11s}{'peak MiB':>10s}{'XLA temp MiB':>14s}")
  rows = {}
  for length in args.lengths:
    reps = args.reps or (5 if length <= 2048 else 3 if length <= 8192 else 2)
    scores_bytes = HEADS * length * length * 4
    for impl in ("dense", "ours", "torch"):
      if impl == "dense" and 3 * scores_bytes > available_bytes():
        r = dict(
          impl=impl,
          error=f"skipped: 3 x its {scores_bytes / 2**30:.1f} GiB score "
          f"tensor exceed the {available_bytes() / 2**30:.1f} GiB available",
        )
      else:
        r = run_worker(impl, length, reps, args.block, args.implementation)
      rows[length, impl] = r
      if "error" in r:
        print(f"{length:7d} {impl:10s}  {r['error']}")
      else:
        temp = f"{r['xla_temp_mib']:14.0f}" if "xla_temp_mib" in r else f"{'-':>14s}"
        print(
          f"{length:7d} {impl:10s}{r['seconds'] * 1e3:11.1f}{r['peak_extra_mib']:10.0f}{temp}",
          flush=True,
        )
  print("ratios (time of the other / time of ours; > 1 means ours is faster):")
  for length in args.lengths:
    ours = rows[length, "ours"]
    if "error" in ours:
      continue
    parts = [
      f"{impl} {rows[length, impl]['seconds'] / ours['seconds']:.2f}x"
      for impl in ("dense", "torch")
      if "error" not in rows[length, impl]
    ]
    print(f"{length:7d}: " + ", ".join(parts))


if __name__ == "__main__":
  main()
