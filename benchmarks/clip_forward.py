"""One CLIP ViT-L/14-336 vision forward over 32 frames on this machine, f32 and bf16.

The tower has the real shape (24 layers, width 1024, 577 tokens per frame) with
random weights (no download); the forward is jitted as a pure function of the
state (``models.pure``). Prints compile time and the median of the timed runs.

  python benchmarks/clip_forward.py [--frames 32] [--reps 2]
"""

from __future__ import annotations

import argparse
import time

import common
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ppllava_jax.models.clip import CLIPVisionConfig, CLIPVisionTransformer
from ppllava_jax.models.pure import pure


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--frames", type=int, default=32)
  parser.add_argument("--reps", type=int, default=2)
  args = parser.parse_args()
  print(common.machine())  # the line each figure is read with
  cfg = CLIPVisionConfig()  # ViT-L/14 at 336 px
  tower = CLIPVisionTransformer(cfg, rngs=nnx.Rngs(0))
  forward, state = pure(tower, "__call__")
  # PPLLaVA reads the penultimate layer; returning it keeps the other states dead.
  penultimate = jax.jit(lambda state, x: forward(state, x)[-2])
  pixels = np.random.default_rng(0).standard_normal((args.frames, 3, 336, 336)).astype(np.float32)
  tokens = args.frames * (cfg.grid**2 + 1)
  flops = 2 * tokens * 12 * cfg.hidden_size**2 * cfg.num_hidden_layers  # matmuls, rough
  print(
    f"CLIP ViT-L/14-336 vision tower, {args.frames} frames ({tokens} tokens), "
    f"{jax.device_count()} x {jax.devices()[0].platform}; ~{flops / 1e12:.1f} TFLOP of matmuls"
  )
  for dtype in (jnp.float32, jnp.bfloat16):
    st = jax.tree.map(lambda a: a.astype(dtype), state)
    x = jnp.asarray(pixels, dtype)
    start = time.perf_counter()
    compiled = penultimate.lower(st, x).compile()
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(args.reps):
      start = time.perf_counter()
      compiled(st, x).block_until_ready()
      times.append(time.perf_counter() - start)
    sec = float(np.median(times))
    print(
      f"{jnp.dtype(dtype).name:9s} compile {compile_s:6.1f} s   forward {sec:6.1f} s "
      f"({sec / args.frames * 1e3:.0f} ms/frame, {flops / sec / 1e9:.0f} GFLOP/s)"
    )


if __name__ == "__main__":
  main()
