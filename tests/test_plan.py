"""The plan CLI (``python -m ppllava_jax.plan``) on the tiny configs, in subprocesses (the CLI
sets the host device count before JAX starts), checked against counts made here from the
parameter shapes with NumPy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ppllava_jax.plan.__main__ import parse_mesh

ROOT = Path(__file__).parents[1]
# Short sequences keep the compiles small; the layout is still the configs'.
SFT_RUN = ("configs/sft_tiny.py", ["data.sample.max_length=64", "data.batch.seq_buckets=(64,)"])
DPO_RUN = (
  "configs/dpo_tiny.py",
  ["preference.sample.max_length=64", "preference.seq_buckets=(64,)"],
)


def _plan(tmp_path, config, overrides, mesh="data=2,fsdp=2", extra=()):
  out = tmp_path / "plan.json"
  cmd = [
    sys.executable,
    "-m",
    "ppllava_jax.plan",
    "--config",
    config,
    "--mesh",
    mesh,
    "--json",
    str(out),
    *extra,
  ] + [a for o in overrides for a in ("--set", o)]
  run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  return run.stdout, json.loads(out.read_text())


def _param_counts(trainable_rules):
  """(trainable, frozen, LLM) element counts of the tiny model, from its shapes."""
  from flax import nnx

  from ppllava_jax.data.text.tokenizer import char_tokenizer
  from ppllava_jax.models.tiny import TinyConfig, build_tiny
  from ppllava_jax.train.core.partition import partition

  tiny = TinyConfig(
    frames=4,
    image_size=126,
    patch_size=14,
    vision_width=32,
    vision_layers=1,
    llm_width=64,
    llm_layers=1,
    text_width=32,
    text_layers=1,
  )
  model = nnx.eval_shape(lambda: build_tiny(tiny, len(char_tokenizer())))
  _, params, frozen = partition(model, trainable_rules).split(model)
  size = lambda tree: sum(int(np.prod(x.shape)) for x in __import__("jax").tree.leaves(tree))
  return size(params), size(frozen), size(nnx.state(model.language_model, nnx.Param))


def _check_numbers(plan, trainable, frozen, fsdp):
  assert (plan["trainable_params"], plan["frozen_params"]) == (trainable, frozen)
  # float32 params + AdamW mu, nu, and the float32 frozen ones, sharded at most fsdp ways
  state_bytes = 3 * 4 * trainable + 4 * frozen
  xla, memory = plan["compiled"], plan["memory"]
  assert state_bytes / fsdp <= xla["argument_bytes"] <= state_bytes + 16 * 2**20
  # the estimate's arguments are what the step is passed; XLA drops what it never reads
  assert xla["argument_bytes"] <= memory["arguments"] <= 1.05 * xla["argument_bytes"]
  assert memory["gradients"] == 2 * 4 * trainable / fsdp  # every trainable leaf splits
  assert 0 < memory["residuals"] < memory["residuals_without_remat"]
  assert xla["alias_bytes"] > 0  # the donated state
  assert plan["xla_peak_bytes"] >= xla["argument_bytes"]
  # every LLM weight is used in 2 (forward) + 4 (backward) FLOPs a token; attention, the
  # towers and the optimizer add some. No remat, one micro-batch, one attention block and
  # one loss chunk here, so XLA's count (loop bodies once) is the whole step's.
  llm_6nd = 6 * plan["llm_params"] * plan["tokens"]
  assert plan["model_flops"] == plan["executed_flops"] >= llm_6nd
  flops = xla["flops"] * plan["devices"]
  assert 1.0 <= flops / llm_6nd <= 10.0, (flops, llm_6nd)
  assert 0.5 <= flops / plan["model_flops"] <= 2.0, (flops, plan["model_flops"])


def test_sft_plan(tmp_path):
  from ppllava_jax.train.core.partition import VICUNA_SFT

  trainable, frozen, llm = _param_counts(VICUNA_SFT)
  stdout, plan = _plan(tmp_path, *SFT_RUN)
  for line in (
    "memory per device",
    "saved residuals",
    "estimate:",
    "temporaries",
    "FLOPs per step",
    "TPU v5e",
    "H100 SXM",
    "fits, remat nothing_saveable",
  ):
    assert line in stdout
  assert (plan["mesh"], plan["devices"], plan["kind"]) == (
    {"data": 2, "fsdp": 2, "tensor": 1},
    4,
    "SFT",
  )
  assert (plan["rows"], plan["seq_len"], plan["micro_batches"]) == (4, 64, 1)
  _check_numbers(plan, trainable, frozen, fsdp=2)
  assert plan["llm_params"] == llm


def test_dpo_plan(tmp_path):
  from ppllava_jax.train.core.partition import DPO

  trainable, frozen, llm = _param_counts(DPO)
  assert trainable == llm  # only the LLM trains
  stdout, plan = _plan(tmp_path, *DPO_RUN)
  assert "DPO, cached reference" in stdout
  assert (plan["rows"], plan["seq_len"]) == (8, 64)  # 4 pairs, interleaved
  _check_numbers(plan, trainable, frozen, fsdp=2)


@pytest.mark.parametrize(
  "text, where",
  [
    ("data=1,fsdp=0", "'fsdp=0'"),
    ("fsdp8", "'fsdp8'"),
    ("data=1,pipe=2", "'pipe=2'"),
    ("data=2,data=2", "given twice"),
  ],
)
def test_bad_mesh(text, where):
  assert parse_mesh("fsdp=8") == {"data": 1, "fsdp": 8, "tensor": 1}
  with pytest.raises(ValueError, match=where) as err:
    parse_mesh(text)
  assert text in str(err.value) and "data=1,fsdp=8,tensor=1" in str(err.value)


def test_bad_mesh_cli_and_batch_divisibility():
  """A bad --mesh fails before JAX starts; a batch the mesh's batch axes do not divide is
  refused with what to change."""
  cmd = [sys.executable, "-m", "ppllava_jax.plan", "--config", SFT_RUN[0]]
  run = subprocess.run(cmd + ["--mesh", "data=x"], cwd=ROOT, capture_output=True, text=True)
  assert run.returncode == 2 and "error: --mesh 'data=x'" in run.stderr
  run = subprocess.run(
    cmd + ["--mesh", "data=8"] + [a for o in SFT_RUN[1] for a in ("--set", o)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert run.returncode == 2 and "not divisible by the 8 devices" in run.stderr


# plan.memory, in this process: residual and liveness counts checked against hand counts.


def _mlp(policy):
  """A stack of residual tanh MLP layers; ``policy``: jax.checkpoint's, None: no remat."""
  import jax
  import jax.numpy as jnp

  def layer(w_kdd, x_nd):
    h_nd = jnp.tanh(x_nd @ w_kdd[0])
    g_nd = jnp.tanh(h_nd @ w_kdd[1])
    return x_nd + g_nd @ w_kdd[2]

  def loss(ws, x_nd):
    step = layer if policy is None else jax.checkpoint(layer, policy=policy)
    for w_kdd in ws:
      x_nd = step(w_kdd, x_nd)
    return jnp.sum(x_nd**2)

  return loss


def test_saved_residuals_are_what_the_backward_keeps():
  """With respect to the weights only: without remat each layer keeps its two tanh outputs
  and their derivatives (1 - t^2), its input (but the first layer's, an argument) and its
  three weight slices (but the first layer's w[0], needed only for the input's gradient);
  the loss keeps 2x. Under nothing_saveable only the layers' inputs and 2x are kept."""
  import jax
  import jax.numpy as jnp

  from ppllava_jax.plan.memory import saved_residuals

  layers, n, d = 4, 64, 32
  ws = [jax.ShapeDtypeStruct((3, d, d), jnp.float32) for _ in range(layers)]
  x = jax.ShapeDtypeStruct((n, d), jnp.float32)
  shapes = lambda policy: sorted(a.shape for a in saved_residuals(_mlp(policy), ws, x))
  assert shapes(None) == sorted(
    [(n, d)] * (4 * layers + layers - 1 + 1) + [(d, d)] * (3 * layers - 1)
  )
  assert shapes(jax.checkpoint_policies.nothing_saveable) == [(n, d)] * layers


def test_saved_residuals_agree_with_jax_print_saved_residuals(capsys):
  """Differentiated with respect to every input, the residuals are those JAX's own
  ``print_saved_residuals`` lists as made by an equation (not an argument)."""
  import re

  import jax
  import jax.numpy as jnp
  from jax.ad_checkpoint import print_saved_residuals

  from ppllava_jax.plan.memory import saved_residuals

  ws = [jnp.ones((3, 16, 16)) for _ in range(3)]
  x = jnp.ones((8, 16))
  for policy in (
    None,
    jax.checkpoint_policies.nothing_saveable,
    jax.checkpoint_policies.dots_saveable,
  ):
    ours = sorted(
      (str(a.dtype), a.shape) for a in saved_residuals(lambda both: _mlp(policy)(*both), (ws, x))
    )
    print_saved_residuals(_mlp(policy), ws, x)
    theirs = []
    for line in capsys.readouterr().out.splitlines():
      kind, dims, source = re.match(r"(\w+)\[([\d,]*)\] (.*)", line).groups()
      if source.startswith("output of"):
        theirs.append(({"f32": "float32"}[kind], tuple(int(n) for n in dims.split(",") if n)))
    assert ours and ours == sorted(theirs), policy


def test_live_peak_counts_values_live_at_once():
  """a = 2x; b = a + 1; c = a * b; sum(c): a, b and c are live together at the third
  equation, then only c and the scalar."""
  import jax
  import jax.numpy as jnp

  from ppllava_jax.plan.memory import DeviceShare, largest_layer, live_peak

  n = 1000
  x = jax.ShapeDtypeStruct((n,), jnp.float32)
  nbytes = lambda aval: int(np.prod(aval.shape)) * aval.dtype.itemsize
  jaxpr = jax.make_jaxpr(lambda x: (lambda a: jnp.sum(a * (a + 1)))(2 * x))(x).jaxpr
  assert [e.primitive.name for e in jaxpr.eqns] == ["mul", "add", "mul", "reduce_sum"]
  assert live_peak(jaxpr, nbytes) == 3 * n * 4
  # A remat'd layer's backward holds at least its four tanh residuals and its input's
  # cotangent; nothing remat'd: 0.
  layers, rows, d = 3, 64, 32
  ws = [jax.ShapeDtypeStruct((3, d, d), jnp.float32) for _ in range(layers)]
  x = jax.ShapeDtypeStruct((rows, d), jnp.float32)
  share = DeviceShare([], batch_devices=1)
  peak = largest_layer(_mlp(jax.checkpoint_policies.nothing_saveable), share, ws, x)
  assert 5 * rows * d * 4 <= peak <= 12 * rows * d * 4 + 6 * d * d * 4, peak
  assert largest_layer(_mlp(None), share, ws, x) == 0


def test_device_shares():
  """Shard shapes on an 8-device (fsdp) mesh: rows split 8 ways, a replicated leaf whole; a
  parameter-shaped residual split as its parameter, an activation over the batch devices."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec

  from ppllava_jax.plan.memory import DeviceShare, shard_bytes

  mesh = jax.make_mesh((8,), ("fsdp",))
  rows = NamedSharding(mesh, PartitionSpec("fsdp"))
  w = jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=rows)
  b = jax.ShapeDtypeStruct((3,), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))
  assert shard_bytes({"w": w, "b": b}) == 2 * 4 * 4 + 3 * 2
  share = DeviceShare({"w": w}, batch_devices=4)
  assert share(jax.ShapeDtypeStruct((16, 4), jnp.bfloat16)) == 2 * 4 * 2
  assert share(jax.ShapeDtypeStruct((10, 7), jnp.float32)) == 18 * 4  # ceil(70 / 4) elements


def test_no_compile_estimates_one_micro_batch(tmp_path):
  """``--no-compile``: the estimate only. Under two micro-batches the residuals are one
  micro-batch's, the same as a single batch's, and the arguments hold both batches."""
  _, one = _plan(tmp_path, *SFT_RUN, extra=["--no-compile"])
  stdout, two = _plan(
    tmp_path, SFT_RUN[0], SFT_RUN[1] + ["train.optim.grad_accum=2"], extra=["--no-compile"]
  )
  assert "XLA:CPU: not compiled (--no-compile)" in stdout and two["compiled"] is None
  assert two["micro_batches"] == 2
  for field in ("residuals", "residuals_without_remat", "largest_layer", "gradients"):
    assert two["memory"][field] == one["memory"][field], field
  assert two["memory"]["arguments"] > one["memory"]["arguments"]
