"""Prompt-guided pooling: ppllava_jax vs a PyTorch `Tensor.unfold` version, one run.

Prints median wall time, peak memory and bandwidth of
``prompt_guided_pool(mode="softmax")`` and of the same math written with
``Tensor.unfold`` (the way the original PyTorch code does it), their ratio, and the
op's achieved GB/s next to a NumPy copy's GB/s measured in the same run.

Each contender runs in a fresh worker process so its peak memory (VmHWM above the
resident size once its inputs exist) is its own. ``--scale`` also pools
(B=8, T=64, 24x24, D=4096) f32, 4.8 GB of features, to show it fits in 24 GiB.

  python benchmarks/pooling.py [--scale]
"""

from __future__ import annotations

import argparse
import json

import common
import numpy as np
from common import median_time, status_kib

KERNEL = (2, 3, 3)
TEMPERATURE = 0.01


def _probs_np(shape, seed=1):
  b, t, h, w = shape
  logits = np.random.default_rng(seed).standard_normal((b, t * h * w)) * 3.0
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return (p / p.sum(-1, keepdims=True)).reshape(shape).astype(np.float32)


def torch_unfold_pool(x_bdthw, p_bthw, kernel, stride, temperature):
  """The same math with Tensor.unfold, channel-first like the original code."""
  import torch

  b, d = x_bdthw.shape[:2]
  x_unf = x_bdthw
  p_unf = p_bthw
  for axis, (k, s) in enumerate(zip(kernel, stride)):
    x_unf = x_unf.unfold(2 + axis, k, s)
    p_unf = p_unf.unfold(1 + axis, k, s)
  out_thw = x_unf.shape[2:5]
  x_unf = x_unf.contiguous().view(b, d, *out_thw, -1)  # the materialised copy
  w = torch.softmax(p_unf.contiguous().view(b, *out_thw, -1) / temperature, dim=-1)
  return (x_unf * w.unsqueeze(1)).sum(-1)  # (B, D, T', H', W')


def worker(impl: str, shape: tuple[int, ...], reps: int) -> dict:
  b, t, h, w, d = shape
  if impl == "copy":
    src = np.random.default_rng(0).standard_normal(b * t * h * w * d, dtype=np.float32)
    dst = np.empty_like(src)
    base = status_kib("VmRSS")
    sec, _ = median_time(lambda: np.copyto(dst, src), reps)
    moved = 2 * src.nbytes
  elif impl == "jax":
    import jax
    import jax.numpy as jnp

    from ppllava_jax.ops import prompt_guided_pool

    x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    p = jnp.asarray(_probs_np(shape[:4]))
    pool = jax.jit(
      lambda x, p: prompt_guided_pool(x, p, KERNEL, mode="softmax", temperature=TEMPERATURE)
    )
    compiled = pool.lower(x, p).compile()
    x.block_until_ready()
    base = status_kib("VmRSS")
    out = compiled(x, p)
    sec, _ = median_time(lambda: compiled(x, p).block_until_ready(), reps)
    moved = x.nbytes + p.nbytes + out.nbytes
    xla_temp = compiled.memory_analysis().temp_size_in_bytes
  elif impl == "torch":
    import torch

    torch.manual_seed(0)
    x = torch.randn(b, d, t, h, w)
    p = torch.from_numpy(_probs_np(shape[:4]))
    base = status_kib("VmRSS")
    with torch.no_grad():
      out = torch_unfold_pool(x, p, KERNEL, KERNEL, TEMPERATURE)
      sec, _ = median_time(lambda: torch_unfold_pool(x, p, KERNEL, KERNEL, TEMPERATURE), reps)
    moved = (x.numel() + p.numel() + out.numel()) * 4
  else:
    raise ValueError(impl)
  result = dict(
    impl=impl,
    seconds=sec,
    gbps=moved / sec / 1e9,
    peak_extra_mib=max(status_kib("VmHWM") - base, 0) / 1024,
  )
  if impl == "jax":
    result["xla_temp_mib"] = xla_temp / 2**20
  return result


def check_agreement() -> float:
  """Max |jax - torch| on a small case, so the timed contenders compute the same thing."""
  import torch

  from ppllava_jax.ops import prompt_guided_pool

  shape = (2, 5, 12, 12, 16)
  x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  p = _probs_np(shape[:4])
  got = np.asarray(prompt_guided_pool(x, p, KERNEL, mode="softmax", temperature=TEMPERATURE))
  ref = (
    torch_unfold_pool(
      torch.from_numpy(x).permute(0, 4, 1, 2, 3), torch.from_numpy(p), KERNEL, KERNEL, TEMPERATURE
    )
    .permute(0, 2, 3, 4, 1)
    .numpy()
  )
  return float(np.abs(got - ref).max())


def run_worker(impl: str, shape, reps: int) -> dict:
  result = common.run_worker(
    __file__, ["--worker", impl, "--shape", *map(str, shape), "--reps", str(reps)]
  )
  if "error" in result:
    raise RuntimeError(f"{impl} worker: {result['error']}")
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--shape", type=int, nargs=5, default=[2, 32, 24, 24, 4096], metavar=("B", "T", "H", "W", "D")
  )
  parser.add_argument("--reps", type=int, default=7)
  parser.add_argument(
    "--scale", action="store_true", help="also pool (8, 64, 24, 24, 4096) f32 with the JAX op"
  )
  parser.add_argument("--worker", choices=["copy", "jax", "torch"], help=argparse.SUPPRESS)
  args = parser.parse_args()
  if not args.worker:
    print(common.machine())  # the line each figure is read with
  shape = tuple(args.shape)
  if args.worker:
    print(json.dumps(worker(args.worker, shape, args.reps)))
    return

  print(f"agreement on (2, 5, 12, 12, 16): max |jax - torch| = {check_agreement():.2e}")
  print(f"shape (B, T, H, W, D) = {shape}, kernel = stride = {KERNEL}, f32, median of {args.reps}")
  results = {
    impl: run_worker(impl, shape, args.reps if impl != "torch" else min(args.reps, 5))
    for impl in ("copy", "jax", "torch")
  }
  print(f"{'':28s}{'median ms':>10s}{'GB/s':>8s}{'peak extra MiB':>16s}")
  for impl, label in (
    ("jax", "ppllava_jax (jit)"),
    ("torch", "torch Tensor.unfold"),
    ("copy", "numpy copy (same bytes)"),
  ):
    r = results[impl]
    print(f"{label:28s}{r['seconds'] * 1e3:10.1f}{r['gbps']:8.1f}{r['peak_extra_mib']:16.0f}")
  jax_r, torch_r, copy_r = results["jax"], results["torch"], results["copy"]
  print(f"XLA temp buffers of the compiled op: {jax_r['xla_temp_mib']:.2f} MiB")
  print(f"speed-up vs torch unfold: {torch_r['seconds'] / jax_r['seconds']:.1f}x (target >= 3x)")
  print(
    f"peak memory above the inputs: torch {torch_r['peak_extra_mib']:.0f} MiB, "
    f"jax {jax_r['peak_extra_mib']:.0f} MiB (its output buffer reuses freed pages)"
  )
  print(f"bandwidth vs numpy copy: {100 * jax_r['gbps'] / copy_r['gbps']:.0f}% (target >= 50%)")
  if args.scale:
    big = (8, 64, 24, 24, 4096)
    r = run_worker("jax", big, 3)
    print(
      f"scale {big} f32 ({np.prod(big) * 4 / 2**30:.1f} GiB of features): "
      f"{r['seconds'] * 1e3:.0f} ms, {r['gbps']:.1f} GB/s, "
      f"peak extra {r['peak_extra_mib']:.0f} MiB above the inputs"
    )


if __name__ == "__main__":
  main()
