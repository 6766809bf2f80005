"""train.core.optimizer: the schedules are transformers', and clip + AdamW + the decay mask
update as torch's clip_grad_norm_ + AdamW with param groups do."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from transformers.optimization import (
  get_constant_schedule_with_warmup,
  get_cosine_schedule_with_warmup,
  get_linear_schedule_with_warmup,
)

from ppllava_jax.train.core.config import MeshConfig, OptimConfig
from ppllava_jax.train.core.optimizer import lr_schedule, make_optimizer

HF = {
  "cosine": get_cosine_schedule_with_warmup,
  "linear": get_linear_schedule_with_warmup,
  "constant": get_constant_schedule_with_warmup,
}


def torch_lrs(cfg: OptimConfig, steps: int) -> np.ndarray:
  opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
  args = (cfg.warmup_steps,) if cfg.schedule == "constant" else (cfg.warmup_steps, cfg.total_steps)
  sched = HF[cfg.schedule](opt, *args)
  out = []
  for _ in range(steps):
    out.append(sched.get_last_lr()[0])  # the lr the next optimizer.step() uses
    opt.step()
    sched.step()
  return np.array(out)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("total, ratio", [(250, 0.03), (100, 0.1), (37, 0.0), (5, 1.0)])
def test_schedule_equals_transformers(schedule, total, ratio):
  cfg = OptimConfig(lr=2e-5, schedule=schedule, warmup_ratio=ratio, total_steps=total)
  assert cfg.warmup_steps == math.ceil(total * ratio)  # TrainingArguments.get_warmup_steps
  steps = total + 5  # past the end: cosine and linear stay at 0
  ours = np.asarray(jax.jit(jax.vmap(lr_schedule(cfg)))(jnp.arange(steps)))
  np.testing.assert_allclose(ours, torch_lrs(cfg, steps), rtol=1e-6, atol=1e-12)
  if ratio:
    assert ours[0] == 0.0  # the first update of a warmed-up run has lr 0, as transformers


def test_adamw_clip_and_mask_equal_torch():
  rng = np.random.default_rng(0)
  params = {
    "w": rng.normal(size=(4, 3)).astype(np.float32),
    "b": rng.normal(size=(3,)).astype(np.float32),
    "norm": rng.normal(size=(3,)).astype(np.float32),
  }
  mask = {"w": True, "b": False, "norm": False}
  cfg = OptimConfig(
    lr=1e-2, schedule="cosine", warmup_ratio=0.2, total_steps=10, weight_decay=0.1, clip_norm=1.0
  )
  grads = [
    {k: (rng.normal(size=v.shape) * s).astype(np.float32) for k, v in params.items()}
    for s in (3.0, 0.1, 5.0, 0.2, 2.0, 1.0)
  ]  # clipped and unclipped steps

  tx = make_optimizer(cfg, mask)
  ours, opt_state = jax.tree.map(jnp.asarray, params), tx.init(params)
  update = jax.jit(tx.update)
  for g in grads:
    upd, opt_state = update(g, opt_state, ours)
    ours = optax.apply_updates(ours, upd)

  theirs = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
  groups = [
    {"params": [theirs[k] for k in params if mask[k]], "weight_decay": cfg.weight_decay},
    {"params": [theirs[k] for k in params if not mask[k]], "weight_decay": 0.0},
  ]
  opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=cfg.eps)
  sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, cfg.total_steps)
  for g in grads:
    for k, p in theirs.items():
      p.grad = torch.tensor(g[k])
    torch.nn.utils.clip_grad_norm_(list(theirs.values()), cfg.clip_norm)
    opt.step()
    sched.step()
  for k in params:
    np.testing.assert_allclose(
      np.asarray(ours[k]), theirs[k].detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=k
    )


@pytest.mark.parametrize("name, lr", [("sft_vicuna7b", 2e-5), ("sft_qwen7b", 1e-5)])
def test_recipe_configs_load(name, lr):
  from pathlib import Path

  from ppllava_jax.config import load_config
  from ppllava_jax.train.run.config import RunConfig

  run = load_config(Path(__file__).parents[2] / "configs" / f"{name}.py", RunConfig)
  cfg = run.train
  assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.grad_accum, cfg.compute_dtype) == (
    lr,
    "cosine",
    2,
    "bfloat16",
  )
  assert cfg.mesh.shape(8) == (1, 8, 1)
  # one epoch of the recipe's data, what the schedule decays over
  assert cfg.optim.total_steps is None and run.resolved().train.optim.total_steps == run.steps


def test_config_checks():
  assert MeshConfig(data=-1, fsdp=2, tensor=2).shape(8) == (2, 2, 2)
  assert MeshConfig().shape(3) == (3, 1, 1)
  for bad in (MeshConfig(-1, -1, 1), MeshConfig(3, 1, 1), MeshConfig(0, 1, 1)):
    with pytest.raises(ValueError):
      bad.shape(8)
  with pytest.raises(ValueError, match="schedule"):
    OptimConfig(schedule="step")
  with pytest.raises(ValueError, match="accum_reduction"):
    OptimConfig(accum_reduction="mean")
