"""One assembly of a run, for the loop, the export, the plan, the tests and the benchmarks.

``assemble(model, train, dpo)`` builds what a step needs and nothing that holds weights:
the partition (``train.core.partition``), the optimizer, the mesh, the state's shardings,
the objective and the jitted ``Steps``, with every state as an abstract array that
carries its sharding (``Assembly.state``: what a checkpoint restores into;
``Assembly.constants``: what the step reads besides the state, the frozen parameters and
for DPO the reference, whose shardings the step takes from them). ``model`` may be
abstract (``nnx.eval_shape``), as the memory plan builds it.

``load(cfg)`` loads the run's model and tokenizers (``PPLLaVA.from_pretrained`` and
``data.text.tokenizer``, or the tiny model built in code with the char tokenizer),
assembles it and places the frozen parameters on the mesh: a ``Run``. Its trainable
parameters stay as loaded, in ``Start``, until the run knows where it starts: a resumed
run restores its checkpoint into ``Assembly.state`` and never materialises a first state
(``fresh_state``), so one state is ever live; ``export`` restores the parameters alone.
A DPO run's reference is made from the starting parameters (``constants``), whatever
checkpoint it then resumes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ppllava_jax import distributed
from ppllava_jax.data.text.tokenizer import model_tokenizers, tokenizer_folders
from ppllava_jax.models.attention import check_attention
from ppllava_jax.models.ppllava_config import PPLLaVAConfig
from ppllava_jax.train.core.config import TrainConfig
from ppllava_jax.train.core.optimizer import make_optimizer
from ppllava_jax.train.core.partition import Partition, decay_mask, partition
from ppllava_jax.train.core.state import (
  Shardings,
  TrainState,
  abstract_state,
  cast_floating,
  make_mesh,
  placed,
)
from ppllava_jax.train.core.step import Objective, Steps
from ppllava_jax.train.dpo.losses import DPOConfig
from ppllava_jax.train.dpo.objective import (
  DPOConstants,
  PreferenceObjective,
  check_trainable,
  reference_copy,
)
from ppllava_jax.train.run import config as rc
from ppllava_jax.train.sft import TokenMean

if TYPE_CHECKING:
  from ppllava_jax.models.ppllava import PPLLaVA

log = logging.getLogger(__name__)


def objective(graphdef: nnx.GraphDef, train: TrainConfig, dpo: DPOConfig | None) -> Objective:
  """What the train step minimises: SFT's token mean, or DPO's preference loss."""
  return TokenMean(graphdef, train) if dpo is None else PreferenceObjective(graphdef, train, dpo)


@dataclasses.dataclass(frozen=True)
class Assembly:
  """A run's weightless parts (module doc); ``state``, ``frozen`` and ``constants`` are
  abstract arrays carrying their shardings."""

  model_cfg: PPLLaVAConfig
  graphdef: nnx.GraphDef
  partition: Partition
  tx: optax.GradientTransformation
  shardings: Shardings
  state: TrainState
  frozen: nnx.State
  constants: Any
  steps: Steps

  @property
  def mesh(self):
    return self.shardings.mesh


def assemble(
  model: PPLLaVA,
  train: TrainConfig,
  dpo: DPOConfig | None = None,
  *,
  devices=None,
  cast_frozen: bool = True,
) -> Assembly:
  """The weightless parts of a run of ``model`` (module doc). ``devices``: the mesh's
  (default: all); ``cast_frozen``: the frozen parameters in the compute dtype, as the
  step reads them (``export`` keeps them as loaded, so a bfloat16 run's frozen tower is
  written back bit for bit)."""
  part = partition(model, train.trainable)
  tx = make_optimizer(train.optim, decay_mask(part.split(model)[1]))
  mesh = make_mesh(train.mesh, devices)
  check_attention(train.attention, mesh.size)  # before any weight is placed
  frozen_dtype = train.dtype if train.compute_dtype != "float32" and cast_frozen else None
  graphdef, state, frozen, shardings = abstract_state(
    model, part, tx, mesh, frozen_dtype=frozen_dtype
  )
  goal = objective(graphdef, train, dpo)
  constants: nnx.State | DPOConstants
  if dpo is None:
    constants = frozen
    steps = Steps(graphdef, train, tx, shardings, goal, held_out=goal)
  else:
    check_trainable(part)
    reference = (
      None
      if dpo.precompute_reference
      else placed(
        cast_floating(state.params, jnp.dtype(dpo.reference_dtype)), shardings.state.params
      )
    )
    constants = DPOConstants(frozen, reference)
    steps = Steps(
      graphdef, train, tx, shardings, goal, jax.tree.map(lambda x: x.sharding, constants)
    )
  return Assembly(model.cfg, graphdef, part, tx, shardings, state, frozen, constants, steps)


def place_frozen(assembly: Assembly, model: nnx.Module) -> nnx.State:
  """``model``'s frozen parameters on the mesh, in the assembly's frozen dtype."""
  frozen = assembly.partition.split(model)[2]
  dtypes = jax.tree.map(lambda x: x.dtype, assembly.frozen)
  return jax.jit(
    lambda f: jax.tree.map(lambda x, d: x.astype(d), f, dtypes),
    out_shardings=assembly.shardings.frozen,
  )(frozen)


def fresh_state(assembly: Assembly, params: nnx.State, seed: int) -> TrainState:
  """A run's first state: ``params`` on the mesh, a fresh optimizer state, ``seed``'s key,
  no update made."""
  tx = assembly.tx

  def make(p):
    zero = jnp.zeros((), jnp.int32)
    return TrainState(zero, p, tx.init(p), jax.random.key_data(jax.random.key(seed)), zero)

  return jax.jit(make, out_shardings=assembly.shardings.state)(params)


def materialize(
  assembly: Assembly, model: nnx.Module, seed: int = 0
) -> tuple[TrainState, nnx.State]:
  """(first state, frozen state) of ``model`` on the assembly's mesh: what tests and
  benchmarks step from (a run resumes into ``assembly.state`` instead)."""
  return (
    fresh_state(assembly, assembly.partition.split(model)[1], seed),
    place_frozen(assembly, model),
  )


def constants(
  assembly: Assembly,
  frozen: nnx.State,
  dpo: DPOConfig | None,
  reference_params: Callable[[], nnx.State],
):
  """What the step reads besides the state, as ``assembly.constants`` lays it out: the
  frozen state; for DPO with a live reference, a copy of ``reference_params()`` (the
  run's starting parameters) in the reference dtype."""
  if dpo is None:
    return frozen
  if dpo.precompute_reference:
    return DPOConstants(frozen, None)
  return DPOConstants(
    frozen,
    reference_copy(
      reference_params(), jnp.dtype(dpo.reference_dtype), assembly.shardings.state.params
    ),
  )


@dataclasses.dataclass(frozen=True)
class Run:
  """A run's assembly with its tokenizers and frozen parameters on the mesh."""

  assembly: Assembly
  tokenizer: Any  # a transformers tokenizer
  scorer_tokenizer: Any  # the scorer's, or None
  frozen: nnx.State

  @property
  def model_cfg(self) -> PPLLaVAConfig:
    return self.assembly.model_cfg

  @property
  def graphdef(self) -> nnx.GraphDef:
    return self.assembly.graphdef

  @property
  def shardings(self) -> Shardings:
    return self.assembly.shardings

  @property
  def steps(self) -> Steps:
    return self.assembly.steps


class Start:
  """The loaded model's trainable parameters, as loaded (not on the mesh): where a run
  that has no checkpoint of its own starts, and a DPO run's reference. ``drop()`` lets
  them go as soon as the run knows it will not need them (a resume restores instead)."""

  def __init__(self, params: nnx.State):
    self._params: nnx.State | None = params

  @property
  def params(self) -> nnx.State:
    if self._params is None:
      raise RuntimeError("the loaded parameters were dropped: this run resumes a checkpoint")
    return self._params

  def drop(self) -> None:
    self._params = None


def _model(cfg: rc.RunConfig):
  """(loaded model, tokenizer, scorer tokenizer): the folder's, each checked against the
  embedding it feeds (``data.text.tokenizer.model_tokenizers``), or the tiny model of
  ``cfg.model.tiny`` (its seed's initialisation) with the char tokenizer."""
  if cfg.model.checkpoint:
    from ppllava_jax.models.ppllava import PPLLaVA

    m = cfg.model
    folders = tokenizer_folders(
      m.checkpoint, scorer_tokenizer=m.scorer_tokenizer or None, clip=m.clip or None
    )
    model = PPLLaVA.from_pretrained(
      m.checkpoint, clip=m.clip or None, pooling=None, progress=distributed.is_primary()
    )
    if m.btadapter is not None and model.cfg.btadapter is None:
      model.add_btadapter(m.btadapter, nnx.Rngs(cfg.train.seed))
      distributed.say(f"a fresh BT-Adapter ({m.btadapter}) on the vision tower of {m.checkpoint}")
    tok, scorer = model_tokenizers(model.cfg, folders, m.checkpoint)
    return model, tok, scorer
  from ppllava_jax.data.text.tokenizer import char_tokenizer
  from ppllava_jax.models.tiny import build_tiny

  tok = char_tokenizer()
  return build_tiny(cfg.model.tiny, len(tok)), tok, tok


def load(cfg: rc.RunConfig, cast_frozen: bool = True) -> tuple[Run, Start]:
  """(``Run``, ``Start``) of ``cfg`` (module doc)."""
  model, tok, scorer = _model(cfg)
  assembly = assemble(model, cfg.train, cfg.dpo, cast_frozen=cast_frozen)
  run = Run(assembly, tok, scorer, place_frozen(assembly, model))
  return run, Start(assembly.partition.split(model)[1])


def start_reference(
  run: Run, cfg: rc.RunConfig, workdir: Path, initial_params: Callable[[], nnx.State], read=None
):
  """(the step's constants, the cached reference table or None): for DPO, a live copy of
  ``initial_params()``, or the cached log-probs of the rows ``read``
  (``train.run.reference``, computed with ``initial_params()`` only when not cached)."""
  table = None
  if cfg.dpo is not None and cfg.dpo.precompute_reference:
    from ppllava_jax.train.run.reference import reference_table

    table = reference_table(run, cfg, workdir, initial_params, read)
  return constants(run.assembly, run.frozen, cfg.dpo, initial_params), table
