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
DPO_RUN = ("configs/dpo_tiny.py",
           ["preference.sample.max_length=64", "preference.seq_buckets=(64,)"])


def _plan(tmp_path, config, overrides, mesh="data=2,fsdp=2"):
  out = tmp_path / "plan.json"
  cmd = [sys.executable, "-m", "ppllava_jax.plan", "--config", config, "--mesh", mesh,
         "--json", str(out)] + [a for o in overrides for a in ("--set", o)]
  run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  return run.stdout, json.loads(out.read_text())


def _param_counts(trainable_rules):
  """(trainable, frozen, LLM) element counts of the tiny model, from its shapes."""
  from flax import nnx

  from ppllava_jax.data.tokenizer import char_tokenizer
  from ppllava_jax.models.tiny import TinyConfig, build_tiny
  from ppllava_jax.train.partition import partition
  tiny = TinyConfig(frames=4, image_size=126, patch_size=14, vision_width=32, vision_layers=1,
                    llm_width=64, llm_layers=1, text_width=32, text_layers=1)
  model = nnx.eval_shape(lambda: build_tiny(tiny, len(char_tokenizer())))
  _, params, frozen = partition(model, trainable_rules).split(model)
  size = lambda tree: sum(int(np.prod(x.shape)) for x in __import__("jax").tree.leaves(tree))
  return size(params), size(frozen), size(nnx.state(model.language_model, nnx.Param))


def _check_numbers(plan, trainable, frozen, fsdp):
  assert (plan["trainable_params"], plan["frozen_params"]) == (trainable, frozen)
  # float32 params + AdamW mu + nu, and the float32 frozen ones, sharded at most fsdp ways
  state_bytes = 3 * 4 * trainable + 4 * frozen
  assert state_bytes / fsdp <= plan["argument_bytes"] <= state_bytes + 16 * 2 ** 20
  assert plan["alias_bytes"] > 0  # the donated state
  assert plan["peak_bytes"] >= plan["argument_bytes"]
  # every LLM weight is used in 2 (forward) + 4 (backward) FLOPs a token; attention, the
  # towers and the optimizer add some. No remat, one micro-batch, one attention block and
  # one loss chunk here, so XLA's count (loop bodies once) is the whole step's.
  llm_6nd = 6 * plan["llm_params"] * plan["tokens"]
  assert plan["model_flops"] == plan["executed_flops"] >= llm_6nd
  xla = plan["xla_flops_per_device"] * plan["devices"]
  assert 1.0 <= xla / llm_6nd <= 10.0, (xla, llm_6nd)
  assert 0.5 <= xla / plan["model_flops"] <= 2.0, (xla, plan["model_flops"])

def test_sft_plan(tmp_path):
  from ppllava_jax.train.partition import VICUNA_SFT
  trainable, frozen, llm = _param_counts(VICUNA_SFT)
  stdout, plan = _plan(tmp_path, *SFT_RUN)
  for line in ("memory per device", "arguments", "temporaries", "FLOPs per step", "TPU v5e",
               "H100 SXM", "fits"):
    assert line in stdout
  assert (plan["mesh"], plan["devices"], plan["kind"]) == (
      {"data": 2, "fsdp": 2, "tensor": 1}, 4, "SFT")
  assert (plan["rows"], plan["seq_len"], plan["micro_batches"]) == (4, 64, 1)
  _check_numbers(plan, trainable, frozen, fsdp=2)
  assert plan["llm_params"] == llm


def test_dpo_plan(tmp_path):
  from ppllava_jax.train.partition import DPO
  trainable, frozen, llm = _param_counts(DPO)
  assert trainable == llm  # only the LLM trains
  stdout, plan = _plan(tmp_path, *DPO_RUN)
  assert "DPO, cached reference" in stdout
  assert (plan["rows"], plan["seq_len"]) == (8, 64)  # 4 pairs, interleaved
  _check_numbers(plan, trainable, frozen, fsdp=2)


@pytest.mark.parametrize("text, where", [("data=1,fsdp=0", "'fsdp=0'"), ("fsdp8", "'fsdp8'"),
                                         ("data=1,pipe=2", "'pipe=2'"),
                                         ("data=2,data=2", "given twice")])
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
  run = subprocess.run(cmd + ["--mesh", "data=8"] + [a for o in SFT_RUN[1] for a in ("--set", o)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode == 2 and "not divisible by the 8 devices" in run.stderr
