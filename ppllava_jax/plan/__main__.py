"""``python -m ppllava_jax.plan --config CONFIG --mesh data=1,fsdp=8,tensor=1``: the memory and
FLOP plan of a config's train step on a mesh of that many simulated host devices
(``ppllava_jax.plan``). Options: ``--remat`` (train.remat), ``--set a.b=v`` (as train.py),
``--arch`` (a built-in architecture), ``--efficiency`` (the fraction of peak the step times
assume), ``--no-compile`` (the estimate from the program only), ``--json`` (the numbers,
for tables and tests).

The device count must be fixed before JAX starts its CPU backend, so the mesh is parsed
and ``XLA_FLAGS`` set before anything imports JAX.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path

from ppllava_jax.cli import add_debug_flag, run

MESH_AXES = ("data", "fsdp", "tensor")
_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def parse_mesh(text: str) -> dict[str, int]:
  """``data=1,fsdp=8,tensor=1`` -> sizes of the three axes; an axis left out is 1."""
  expected = (
    "expected comma-separated axis=size with axes from "
    f"{', '.join(MESH_AXES)} and sizes >= 1, e.g. data=1,fsdp=8,tensor=1"
  )
  sizes: dict[str, int] = {}
  for item in text.split(","):
    name, eq, value = item.strip().partition("=")
    if not eq or name not in MESH_AXES or not value.strip().isdigit() or int(value) < 1:
      raise ValueError(f"--mesh {text!r}: {item.strip()!r} is not valid; {expected}")
    if name in sizes:
      raise ValueError(f"--mesh {text!r}: axis {name!r} given twice; {expected}")
    sizes[name] = int(value)
  return {a: sizes.get(a, 1) for a in MESH_AXES}


def simulate_devices(count: int) -> None:
  """XLA_FLAGS asking the CPU backend for ``count`` devices (replacing a count already
  there), on the CPU platform whatever accelerator this machine has."""
  flags = re.sub(rf"{_DEVICE_FLAG}=\S+", "", os.environ.get("XLA_FLAGS", "")).split()
  os.environ["XLA_FLAGS"] = " ".join([*flags, f"{_DEVICE_FLAG}={count}"])
  os.environ["JAX_PLATFORMS"] = "cpu"


def load_run_config(path: str):
  """A config file's ``RunConfig`` (its ``get_config()``)."""
  from ppllava_jax.config import load_config
  from ppllava_jax.train.run.config import RunConfig

  return load_config(path, RunConfig)


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.2f} MiB"


def report(plan, config: str, efficiency: float, wall_s: float) -> str:
  from ppllava_jax.plan.chips import CHIPS

  mesh = ", ".join(f"{k}={v}" for k, v in plan.mesh.items())
  per_row = "pair (2 rows)" if plan.kind.startswith("DPO") else "row"
  m, c = plan.memory, plan.compiled
  lines = [
    f"plan of {config}: {plan.kind}, mesh {mesh} ({plan.devices} simulated host devices), "
    f"remat {plan.remat}",
    f"model: {plan.model}; {plan.trainable_params + plan.frozen_params:,} parameters, "
    f"{plan.trainable_params:,} trainable (float32 + AdamW mu, nu), {plan.frozen_params:,} "
    f"frozen; LLM {plan.llm_params:,}",
    f"batch: {plan.micro_batches} micro-batch(es) x {plan.rows} LLM rows x {plan.seq_len} "
    f"tokens (the largest sequence bucket; a video of {plan.frames} frames per {per_row}) = "
    f"{plan.tokens:,} tokens a step, {plan.rows / plan.batch_devices:g} rows per device per "
    "micro-batch",
    "memory per device as a compiler that follows the program holds it (plan.memory: an "
    "estimate from the jaxpr):",
    f"  arguments {_gib(m.arguments)} (state, constants, batch: exact), gradients "
    f"{_gib(m.gradients)} (2 x the float32 trainable shard), saved residuals "
    f"{_gib(m.residuals)} with remat {m.policy} ({_gib(m.residuals_without_remat)} "
    f"without), the largest remat'd layer's recomputation {_gib(m.largest_layer)}",
    f"  estimate: {_gib(m.total)} with remat {m.policy}, {_gib(m.total_without_remat)} without",
  ]
  if plan.replicated:
    lines.append(
      "  replicated on every device (their slots are not divisible by the batch axes; "
      "change batch_size or shards): "
      + ", ".join(f"{name} {_gib(n)}" for name, n in plan.replicated.items())
    )
  if c is None:
    lines.append("XLA:CPU: not compiled (--no-compile)")
  else:
    lines += [
      "memory per device, XLA:CPU's compiled partitioned program (it does not honour remat):",
      f"  arguments {_gib(c.argument_bytes)}, outputs {_gib(c.output_bytes)}, temporaries "
      f"{_gib(c.temp_bytes)}, generated code {_gib(c.code_bytes)}, aliased into donated "
      f"arguments -{_gib(c.alias_bytes)}; peak {_gib(c.peak_bytes)}",
    ]
  lines += [
    f"FLOPs per step (analytic, plan.steps.step_flops): model {plan.model_flops:.4g}, executed "
    f"{plan.executed_flops:.4g} with remat's recomputation, "
    f"{plan.executed_flops / plan.devices:.4g} per device; 6 x LLM parameters x tokens = "
    f"{6 * plan.llm_params * plan.tokens:.4g}"
  ]
  if c is not None:
    lines.append(
      f"  XLA:CPU's cost analysis: {c.flops:.4g} per device (it counts one device's share of "
      "the partitioned program, and each loop body once: the micro-batch scan, attention's "
      "block loops, the loss chunks; a lower bound)"
    )
  lines += [
    f"on {plan.devices} chips at {efficiency:.0%} of peak bf16 (step time = executed FLOPs / "
    f"(chips x {efficiency:g} x peak); MFU = model FLOPs / (chips x peak x step time)); fits: "
    "the estimate against HBM:",
    f"  {'chip':<10} {'peak TFLOP/s':>12} {'HBM':>8} {'fits, remat ' + m.policy:>34} "
    f"{'fits, no remat':>20} {'step s':>8} {'MFU':>6}",
  ]
  fits = lambda need, hbm: f"{'yes' if need <= hbm else 'NO'} ({need / hbm:.0%})"
  for chip in CHIPS:
    step_s = plan.executed_flops / (plan.devices * efficiency * chip.bf16_flops)
    mfu = plan.model_flops / (plan.devices * chip.bf16_flops * step_s)
    lines.append(
      f"  {chip.name:<10} {chip.bf16_flops / 1e12:>12.0f} "
      f"{chip.hbm_bytes / 2**30:>4.0f} GiB {fits(m.total, chip.hbm_bytes):>34} "
      f"{fits(m.total_without_remat, chip.hbm_bytes):>20} {step_s:>8.3g} {mfu:>6.1%}"
    )
  lines.append(
    f"took {wall_s:.0f} s"
    + ("" if c is None else f": lowering {c.lower_s:.0f} s, compiling {c.compile_s:.0f} s")
  )
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m ppllava_jax.plan",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--config", required=True, help="a configs/*.py file")
  parser.add_argument("--mesh", required=True, help="data=D,fsdp=F,tensor=T (left out: 1)")
  parser.add_argument("--remat", help="train.remat: none or a jax.checkpoint_policies name")
  parser.add_argument(
    "--set",
    dest="overrides",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="a config override, as train.py's",
  )
  parser.add_argument(
    "--arch", help="a built-in architecture (plan.architectures) instead of model.checkpoint's"
  )
  parser.add_argument(
    "--efficiency",
    type=float,
    default=0.4,
    help="the fraction of peak FLOP/s the step times assume (default 0.4)",
  )
  parser.add_argument(
    "--no-compile",
    dest="compile_step",
    action="store_false",
    help="the estimate from the program only: no XLA:CPU compile (which "
    "takes 20-30 min for a 7B step on a 2-core machine)",
  )
  parser.add_argument("--json", help="also write the numbers to this file")
  add_debug_flag(parser)
  args = parser.parse_args(argv)
  mesh = parse_mesh(args.mesh)
  if not 0 < args.efficiency <= 1:
    raise ValueError(f"--efficiency {args.efficiency}: expected a fraction in (0, 1]")
  devices = mesh["data"] * mesh["fsdp"] * mesh["tensor"]
  simulate_devices(devices)
  start = time.perf_counter()
  import jax

  from ppllava_jax.config import apply_overrides
  from ppllava_jax.plan.steps import plan_step
  from ppllava_jax.train.core.config import MeshConfig

  if jax.device_count() != devices:
    raise ValueError(
      f"JAX started with {jax.device_count()} devices, not the mesh's "
      f"{devices}: run the plan in a fresh process (python -m ppllava_jax.plan)"
    )
  overrides = list(args.overrides) + ([f"train.remat={args.remat}"] if args.remat else [])
  cfg = apply_overrides(load_run_config(args.config), overrides).resolved()
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mesh=MeshConfig(**mesh)))
  plan = plan_step(cfg, args.arch, args.compile_step)
  wall_s = time.perf_counter() - start
  print(report(plan, args.config, args.efficiency, wall_s), flush=True)
  if args.json:
    out = dict(
      dataclasses.asdict(plan),
      devices=plan.devices,
      tokens=plan.tokens,
      estimate_bytes=plan.memory.total,
      estimate_without_remat_bytes=plan.memory.total_without_remat,
      xla_peak_bytes=None if plan.compiled is None else plan.compiled.peak_bytes,
      wall_s=wall_s,
      config=args.config,
    )
    Path(args.json).write_text(json.dumps(out, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(run(main))
