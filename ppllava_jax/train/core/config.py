"""Typed settings of a training run: the optimizer, the mesh, what trains, the numerics.

Frozen dataclasses, checked when built, filled by a ``configs/*.py`` ``get_config()``
(``ppllava_jax.config.load_config``). Which parameters train and which decay are data:
ordered ``(path regex, value)`` tuples that ``train.core.partition`` resolves once, first
match wins (its presets: ``VICUNA_SFT``, ``QWEN_SFT``, ``DPO``, ``DECAY_RULES``).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from ppllava_jax.models.attention import IMPLEMENTATIONS, check_attention
from ppllava_jax.train.core import losses
from ppllava_jax.train.core.partition import DECAY_RULES, VICUNA_SFT, Rules

SCHEDULES = ("cosine", "linear", "constant")
ACCUM_REDUCTIONS = ("tokens", "micro_mean")
COMPUTE_DTYPES = ("float32", "bfloat16")
# "none", or a jax.checkpoint_policies name applied to every LLM decoder layer and vision-tower
# layer (PPLLaVA.set_remat)
REMAT_POLICIES = (
  "none",
  "nothing_saveable",
  "dots_saveable",
  "dots_with_no_batch_dims_saveable",
  "everything_saveable",
)


def _choice(owner: str, name: str, value, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"{owner}.{name} must be one of {allowed}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with a warmup then decay schedule, global-norm clipping, accumulation.

  The defaults are the original's SFT settings (2e-5, cosine, warmup 0.03, no weight
  decay, AdamW (0.9, 0.999, 1e-8), max grad norm 1.0) but one micro-batch per update and
  a placeholder ``total_steps``; ``configs/`` give whole recipes.

  total_steps: optimizer updates the schedule decays over (not micro-batches); None: the
    run's ``steps`` (``RunConfig.resolved``). A run may stop before it (``steps`` smaller),
    never after it: past ``total_steps`` the cosine would climb back to its peak.
  warmup_ratio: warmup updates are ``ceil(total_steps * warmup_ratio)``, as transformers'
    ``TrainingArguments.get_warmup_steps``.
  schedule: after the warmup, "cosine" (half a cosine to 0), "linear" (to 0) or "constant";
    exactly transformers' ``get_{cosine,linear,constant}_schedule_with_warmup``.
  clip_norm: max global gradient norm (None: no clipping).
  grad_accum: micro-batches per update, summed inside one jitted step.
  accum_reduction: "tokens" (the loss is the mean over every supervised token of the k
    micro-batches: sums and counts added, divided once) or "micro_mean" (the mean of the k
    micro-batch token means, what transformers 4.45 and so the original computed; it
    weights the tokens of short micro-batches up).
  decay_rules: which trainable parameters weight decay applies to (``train.core.partition``).
  """

  lr: float = 2e-5
  schedule: str = "cosine"
  warmup_ratio: float = 0.03
  total_steps: int | None = None
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_norm: float | None = 1.0
  grad_accum: int = 1
  accum_reduction: str = "tokens"
  decay_rules: Rules = DECAY_RULES

  def __post_init__(self):
    _choice("OptimConfig", "schedule", self.schedule, SCHEDULES)
    _choice("OptimConfig", "accum_reduction", self.accum_reduction, ACCUM_REDUCTIONS)
    if (self.total_steps is not None and self.total_steps < 1) or self.grad_accum < 1:
      raise ValueError(
        f"OptimConfig: total_steps and grad_accum must be >= 1, got "
        f"{self.total_steps}, {self.grad_accum}"
      )
    if not 0 <= self.warmup_ratio <= 1 or self.lr < 0 or self.weight_decay < 0:
      raise ValueError(
        f"OptimConfig: need 0 <= warmup_ratio <= 1, lr >= 0, weight_decay >= 0; "
        f"got {self.warmup_ratio}, {self.lr}, {self.weight_decay}"
      )
    if self.clip_norm is not None and self.clip_norm <= 0:
      raise ValueError(f"OptimConfig.clip_norm must be positive or None, got {self.clip_norm}")

  @property
  def warmup_steps(self) -> int:
    if self.total_steps is None:
      raise ValueError(
        "OptimConfig.total_steps is unset: RunConfig.resolved() sets it to the run's steps"
      )
    return math.ceil(self.total_steps * self.warmup_ratio)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh axes ``(data, fsdp, tensor)``; one of them may be -1: the rest of the
  devices. The model's logical axes map onto them by ``models.sharding.LOGICAL_RULES``
  (batch over data x fsdp, embed over fsdp, heads / mlp / vocab over tensor)."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def shape(self, devices: int) -> tuple[int, int, int]:
    sizes = (self.data, self.fsdp, self.tensor)
    if sizes.count(-1) > 1 or any(s < 1 and s != -1 for s in sizes):
      raise ValueError(f"MeshConfig{sizes}: sizes must be >= 1, with at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if devices % known:
      raise ValueError(f"MeshConfig{sizes} does not divide {devices} devices")
    shape = tuple(devices // known if s == -1 else s for s in sizes)
    if math.prod(shape) != devices:
      raise ValueError(f"MeshConfig{sizes} uses {math.prod(shape)} of the {devices} devices")
    return shape  # type: ignore[return-value]  # tuple() of 3 items: mypy sees tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """What the train step needs; the loop adds data, checkpoint and log sections.

  trainable: the rules of which parameters train (``train.core.partition`` presets); ``Frozen``
    variables never do, whatever the rules say.
  compute_dtype: "float32", or "bfloat16": master weights, gradients and optimizer state
    stay float32, the forward and backward run on a bfloat16 cast of the parameters (the
    frozen ones are stored in bfloat16, which the cast would give anyway).
  remat: "none", or the ``jax.checkpoint_policies`` name each LLM decoder layer and each
    vision-tower layer is rematerialised under (``PPLLaVA.set_remat``; "nothing_saveable":
    recompute all, as torch's gradient checkpointing, which every original recipe turns on).
  attention: the attention implementation of every tower (``PPLLaVA.set_attention``): "xla",
    "cudnn" (NVIDIA GPUs; bfloat16 compute only), "pallas" (TPU splash attention; one
    device only, not yet wrapped in shard_map: refused here when the mesh's fixed sizes
    exceed one device, else when the step is traced on a larger mesh) or
    "pallas_interpret" (that kernel interpreted, any platform, slow).
  loss_chunk: positions per logits chunk of the cross-entropy (``train.core.losses``).
  """

  optim: OptimConfig = OptimConfig()
  mesh: MeshConfig = MeshConfig()
  trainable: Rules = VICUNA_SFT
  compute_dtype: str = "float32"
  remat: str = "none"
  attention: str = "xla"
  loss_chunk: int = losses.CHUNK
  seed: int = 42

  def __post_init__(self):
    _choice("TrainConfig", "compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
    _choice("TrainConfig", "remat", self.remat, REMAT_POLICIES)
    _choice("TrainConfig", "attention", self.attention, IMPLEMENTATIONS)
    # the sizes that are fixed; a -1 axis is known only when the mesh is made
    check_attention(
      self.attention,
      math.prod(s for s in (self.mesh.data, self.mesh.fsdp, self.mesh.tensor) if s > 0),
    )
    if self.attention == "cudnn" and self.compute_dtype != "bfloat16":
      raise ValueError(
        "TrainConfig.attention='cudnn' needs compute_dtype='bfloat16' (cuDNN's "
        f"flash attention has no float32 kernel), got {self.compute_dtype!r}"
      )
    if self.loss_chunk < 1:
      raise ValueError(f"TrainConfig.loss_chunk must be >= 1, got {self.loss_chunk}")

  @property
  def dtype(self) -> np.dtype:
    """The compute dtype (also the frozen state's: ``train.run.assembly.assemble``)."""
    return jnp.dtype(self.compute_dtype)
