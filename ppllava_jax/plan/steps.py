"""A run's train step from abstract state: its memory estimate, and XLA's memory and FLOPs.

``plan_step(cfg)`` builds what a run builds (``train.run.assembly.assemble``: partition,
optimizer, shardings, the objective and its constants) but from ``nnx.eval_shape`` and
``train.core.state.abstract_state``, so the state is ``jax.ShapeDtypeStruct``s with shardings;
the batch is one of the config's global layout at its largest sequence bucket
(``abstract_batch``). Two readings of the step:

- ``estimate_memory``: what a compiler that follows the program holds per device, from the
  jaxpr (``plan.memory``: exact argument shards, one micro-batch's saved residuals with
  remat and without, the largest remat'd layer's backward). Tracing only: seconds for 7B.
- ``compile_step``: the step lowered with ``Steps.lower_train`` and compiled for the mesh
  of ``cfg.train.mesh`` over this process's devices (the CLI simulates them), then
  ``compiled.memory_analysis()`` and ``cost_analysis()`` of XLA:CPU's SPMD-partitioned
  program, i.e. one device's (a jitted (1024 x 512) @ (512 x 256) matmul with its rows over
  4 host devices reports a quarter of its 2mnk FLOPs). XLA:CPU is not the TPU / GPU
  compiler: it ignores remat (``plan.memory``), so its temporaries are XLA:CPU's buffers,
  not a TPU / GPU measurement; and its cost analysis counts a loop body once (the
  micro-batch scan, attention's block loops, the loss chunks), so the step times use the
  analytic count of ``step_flops``. 20-30 min for a 7B step on 2 cores.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import jax
from flax import nnx

from ppllava_jax.data.batching import pad_batch
from ppllava_jax.data.dpo.pairs import PairBatch, collate_pairs
from ppllava_jax.data.sft.batches import TrainBatch, collate
from ppllava_jax.models.ppllava import PPLLaVA
from ppllava_jax.models.ppllava_config import PPLLaVAConfig
from ppllava_jax.plan.architectures import RELEASES, release_for
from ppllava_jax.plan.memory import (
  DeviceShare,
  MemoryEstimate,
  largest_layer,
  saved_residuals,
  shard_bytes,
)
from ppllava_jax.train.core.config import TrainConfig
from ppllava_jax.train.core.state import batch_devices, batch_shardings, placed
from ppllava_jax.train.run import config as rc
from ppllava_jax.train.run.assembly import assemble, objective
from ppllava_jax.train.run.metrics import cost_flops


@dataclasses.dataclass(frozen=True)
class Compiled:
  """XLA:CPU's numbers of the compiled partitioned program, per device."""

  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  code_bytes: int
  alias_bytes: int  # outputs written into donated arguments (the state)
  flops: float  # the cost analysis (each loop body once: a lower bound)
  lower_s: float
  compile_s: float

  @property
  def peak_bytes(self) -> int:
    """What one device holds at the step's peak, as XLA plans it: arguments, outputs and
    temporaries, less the outputs aliased into donated arguments, plus the code."""
    return (
      self.argument_bytes + self.output_bytes + self.temp_bytes + self.code_bytes - self.alias_bytes
    )


def _compiled(compiled, lower_s: float, compile_s: float) -> Compiled:
  mem = compiled.memory_analysis()
  return Compiled(
    mem.argument_size_in_bytes,
    mem.output_size_in_bytes,
    mem.temp_size_in_bytes,
    mem.generated_code_size_in_bytes,
    mem.alias_size_in_bytes,
    cost_flops(compiled.cost_analysis()) or 0.0,
    lower_s,
    compile_s,
  )


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """One planned train step: sizes per device unless named global."""

  kind: str  # "SFT", "DPO, cached reference", "DPO, live reference"
  model: str  # where the architecture came from
  mesh: dict[str, int]
  remat: str
  micro_batches: int
  rows: int  # LLM rows of one micro-batch (global; DPO: 2 per pair)
  seq_len: int
  frames: int
  trainable_params: int
  frozen_params: int
  llm_params: int
  memory: MemoryEstimate  # per device, from the program (plan.memory)
  replicated: dict[str, int]  # batch fields whose slots the batch axes do not divide: bytes
  compiled: Compiled | None  # XLA:CPU's numbers; None: not compiled (--no-compile)
  model_flops: float  # global, analytic (``step_flops``): what MFU counts as useful
  executed_flops: float  # global, analytic: model FLOPs plus remat's recomputed forward

  @property
  def devices(self) -> int:
    return math.prod(self.mesh.values())

  @property
  def batch_devices(self) -> int:
    return batch_devices(self.mesh)

  @property
  def tokens(self) -> int:
    """LLM tokens of one step (every micro-batch)."""
    return self.micro_batches * self.rows * self.seq_len


def step_flops(
  llm_params: int,
  layers: int,
  width: int,
  seq_len: int,
  tokens: int,
  tower_trainable: int,
  tower_frozen: int,
  media_tokens: int,
  live_reference: bool,
  remat: bool,
) -> tuple[float, float]:
  """(model FLOPs, executed FLOPs) of one step, global. The LLM: 6 N per token and PaLM's
  12 x layers x width x sequence for attention (forward 1/3, backward 2/3); a live DPO
  reference adds a forward. The rest of the model (towers, scorer, projector) is counted as
  running on every media token (vision patches): 6 FLOPs per trainable parameter, 2 per
  frozen one, a small overestimate (the scorer reads text). Remat recomputes the forward
  once (nothing_saveable; an upper bound for the other policies). XLA's own count is no
  substitute: its cost analysis counts a loop body once (the micro-batch scan, attention's
  block loops, the loss chunks)."""
  llm_fwd = 2 * llm_params * tokens + 4 * layers * width * seq_len * tokens
  tower_fwd = 2 * (tower_trainable + tower_frozen) * media_tokens
  model = 3 * llm_fwd + tower_fwd + 4 * tower_trainable * media_tokens
  if live_reference:
    model += llm_fwd
  return float(model), float(model + (llm_fwd + tower_fwd if remat else 0))


def model_config(cfg: rc.RunConfig, arch: str | None = None) -> tuple[PPLLaVAConfig, str]:
  """(the model's architecture, where it came from): ``cfg.model.checkpoint``'s config.json
  when the folder is here, else the release ``arch`` names or the checkpoint's name points
  to (``architectures``); no checkpoint: the tiny model. ``model.btadapter`` adds an
  adapter to a tower without one, as training does."""
  m = cfg.model
  if arch is not None:
    if arch not in RELEASES:
      raise ValueError(f"--arch {arch!r}: expected one of {sorted(RELEASES)}")
    model, source = RELEASES[arch], f"built-in {arch}"
  elif not m.checkpoint:
    from ppllava_jax.data.text.tokenizer import char_tokenizer

    return m.tiny.model_config(len(char_tokenizer())), "tiny, built in code"
  elif Path(m.checkpoint).is_dir():
    model, source = _folder_config(Path(m.checkpoint)), f"{m.checkpoint}/config.json"
  elif release_for(m.checkpoint):
    arch = release_for(m.checkpoint)  # not None: the condition above
    model, source = RELEASES[arch], f"built-in {arch} ({m.checkpoint} is not on this machine)"  # type: ignore[index]
  else:
    raise ValueError(
      f"model.checkpoint {m.checkpoint!r} is not a folder here and names no "
      f"built-in architecture: give --arch (one of {sorted(RELEASES)})"
    )
  if m.btadapter is not None and model.btadapter is None:
    model = dataclasses.replace(model, btadapter=m.btadapter)
  return model, source


def _folder_config(path: Path) -> PPLLaVAConfig:
  """A checkpoint folder's architecture from its config.json and tensor headers, as
  ``PPLLaVA.from_pretrained`` reads it (a folder that holds its scorer: PPLLaVA's, ours)."""
  from ppllava_jax.convert.loader import checkpoint_shapes
  from ppllava_jax.models import pretrained
  from ppllava_jax.models.ppllava_config import MODEL_TYPES, PoolingConfig
  from ppllava_jax.models.released import complete_config, pooling_for

  hf, shapes = pretrained.read_config(path, MODEL_TYPES), checkpoint_shapes(path)
  hf = complete_config(hf, shapes, path)
  model = PPLLaVAConfig.from_hf(hf, pooling_for(PoolingConfig(), hf, shapes, path))
  if model.scorer is None and model.pooling.scored:
    raise ValueError(
      f"{path} holds no relevance scorer (a llava-hf folder with clip=): the "
      f"plan reads no CLIP folder; give --arch (one of {sorted(RELEASES)})"
    )
  return model


def abstract_batch(cfg: rc.RunConfig, model: PPLLaVAConfig):
  """The step's global batch as shapes: ``shards`` (default 1: one process) batches of the
  config's layout joined on their rows, at the largest sequence bucket, with the leading
  micro-batch axis under ``grad_accum``. One empty batch is collated for the layout (its
  zero-filled pixel buffers are never touched, so never paged in)."""
  scorer_length = model.scorer.text.max_position_embeddings if model.scorer else 0
  one: PairBatch | TrainBatch
  if cfg.preference is not None:
    shards, buckets = cfg.preference.shards, cfg.preference.seq_buckets
    one = collate_pairs([], model, cfg.preference, scorer_length=scorer_length)
  else:
    assert cfg.data is not None  # RunConfig: data, when not preference
    shards, buckets = cfg.data.shards, cfg.data.batch.seq_buckets
    one = collate([], model, cfg.data.batch, scorer_length=scorer_length)
  shards = shards or 1
  one = pad_batch(one, buckets[-1])
  k = cfg.train.optim.grad_accum
  lead = (k,) if k > 1 else ()
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(lead + (x.shape[0] * shards, *x.shape[1:]), x.dtype), one
  )


def _check_rows(batch, mesh, micro: bool) -> None:
  devices, rows = batch_devices(mesh.shape), batch.input_ids.shape[1 if micro else 0]
  if rows % devices:
    raise ValueError(
      f"the step's {rows} LLM rows per micro-batch are not divisible by the {devices} "
      "devices of the batch axes (data x fsdp): the batch would be replicated, not the "
      "run's program; change batch_size or shards (--set data.shards=N / "
      "preference.shards=N)"
    )


def estimate_memory(
  train_cfg: TrainConfig, objective_for, state, constants, batch, mesh
) -> MemoryEstimate:
  """The step's per-device memory as a compiler that follows the program holds it
  (``plan.memory``), with ``train_cfg.remat`` (nothing_saveable where it is "none") and
  without: ``batch`` placed on its shardings, one micro-batch's residuals, the largest
  remat'd layer. ``objective_for(train_cfg)``: the step's objective."""
  micro = train_cfg.optim.grad_accum > 1
  first = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[micro:], x.dtype), batch)
  key = jax.ShapeDtypeStruct(state.rng.shape, state.rng.dtype)
  totals = jax.eval_shape(objective_for(train_cfg).totals, batch)
  args = (state.params, constants, first, key, totals)
  policy = train_cfg.remat if train_cfg.remat != "none" else "nothing_saveable"
  loss = lambda remat: (
    lambda *a: objective_for(dataclasses.replace(train_cfg, remat=remat)).share(*a)[0]
  )
  share = DeviceShare((state.params, constants), batch_devices(mesh.shape))
  held = lambda remat: share.of(saved_residuals(loss(remat), *args))
  with jax.set_mesh(mesh):
    residuals, without = held(policy), held("none")
    layer = largest_layer(loss(policy), share, *args)
  return MemoryEstimate(
    policy=policy,
    arguments=shard_bytes((state, constants, batch)),
    gradients=2 * shard_bytes(state.params),
    residuals=residuals,
    residuals_without_remat=without,
    largest_layer=layer,
  )


def plan_step(cfg: rc.RunConfig, arch: str | None = None, compile_step: bool = True) -> StepPlan:
  """The plan of ``cfg``'s train step (module doc); ``compile_step=False``: the estimate
  from the program alone, no XLA numbers."""
  model_cfg, source = model_config(cfg, arch)
  abstract = nnx.eval_shape(lambda: PPLLaVA(model_cfg, rngs=nnx.Rngs(cfg.train.seed)))
  a = assemble(abstract, cfg.train, cfg.dpo)
  mesh, state, frozen, constants = a.mesh, a.state, a.frozen, a.constants
  batch = abstract_batch(cfg, model_cfg)
  micro = cfg.train.optim.grad_accum > 1
  _check_rows(batch, mesh, micro)
  kind = (
    "SFT"
    if cfg.dpo is None
    else f"DPO, {'cached' if cfg.dpo.precompute_reference else 'live'} reference"
  )
  objective_for = lambda train_cfg: objective(a.graphdef, train_cfg, cfg.dpo)
  sharded = placed(batch, batch_shardings(batch, mesh, micro))
  memory = estimate_memory(cfg.train, objective_for, state, constants, sharded, mesh)
  replicated = {
    f.name: shard_bytes(x)
    for f in dataclasses.fields(sharded)
    if (x := getattr(sharded, f.name)) is not None
    and x.sharding.is_fully_replicated
    and shard_bytes(x) >= 2**20
  }
  xla = None
  if compile_step:
    start = time.perf_counter()
    lowered = a.steps.lower_train(state, constants, batch)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    xla = _compiled(compiled, lower_s, time.perf_counter() - start)
  count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
  rows_axis = 1 if micro else 0
  llm = model_cfg.text
  llm_params = count(nnx.state(abstract.language_model, nnx.Param))
  trainable, frozen_params = count(state.params), count(frozen)
  patches = model_cfg.vision.grid**2 + 1
  media = sum(
    math.prod(getattr(batch, f).shape[:-3])  # frames, tiles, pictures: every slot
    for f in ("videos", "images", "pictures")
    if hasattr(batch, f)
  )
  model_flops, executed = step_flops(  # the LLM trains whole in every recipe
    llm_params,
    llm.num_hidden_layers,
    llm.num_attention_heads * llm.head_dim,
    batch.input_ids.shape[-1],
    math.prod(batch.input_ids.shape),
    max(trainable - llm_params, 0),
    frozen_params - max(llm_params - trainable, 0),
    media * patches,
    cfg.dpo is not None and not cfg.dpo.precompute_reference,
    cfg.train.remat != "none",
  )
  return StepPlan(
    kind=kind,
    model=source,
    mesh=dict(mesh.shape),
    remat=cfg.train.remat,
    micro_batches=cfg.train.optim.grad_accum,
    rows=batch.input_ids.shape[rows_axis],
    seq_len=batch.input_ids.shape[-1],
    frames=batch.videos.shape[rows_axis + 1],
    trainable_params=trainable,
    frozen_params=frozen_params,
    llm_params=llm_params,
    memory=memory,
    replicated=replicated,
    compiled=xla,
    model_flops=model_flops,
    executed_flops=executed,
  )
