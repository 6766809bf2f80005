"""The train state and its shardings on a mesh.

``TrainState`` is a small pytree: the update count, the trainable parameters (float32
masters), their optimizer state, a base PRNG key and a count of skipped updates. The
frozen parameters are a separate ``nnx.State``: never donated, never in the optimizer,
not part of the state a checkpoint must save (they are the initial checkpoint's).

Shardings come from abstract shapes (``jax.eval_shape``): a parameter's ``NamedSharding``
is its logical ``axes`` metadata through ``models.sharding.LOGICAL_RULES`` (a dimension a
mesh axis does not divide is replicated instead, and logged); optimizer moments take
their parameter's sharding, scalars are replicated. ``abstract_state`` gives the state and
the frozen state as shapes with their shardings: what a checkpoint restores into, what
lowers a step without any weights (``ppllava_jax.plan``), and what
``train.run.assembly.fresh_state`` / ``place_frozen`` fill under
``jax.jit(out_shardings=...)`` when a run starts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ppllava_jax.models.sharding import LOGICAL_RULES, Rules, logical_to_spec, variable_sharding
from ppllava_jax.train.core.config import MeshConfig
from ppllava_jax.train.core.partition import Partition, map_by_path

log = logging.getLogger(__name__)
MESH_AXES = ("data", "fsdp", "tensor")


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 (): updates applied; the schedule and AdamW's count follow it
  params: nnx.State  # the trainable parameters
  opt_state: optax.OptState
  rng: jax.Array  # uint32 (2,) base key; the key of update n is fold_in(rng, n)
  skipped: jax.Array  # int32 (): batches whose update was skipped (train.core.step)


@dataclasses.dataclass(frozen=True)
class Shardings:
  """Where everything lives: the mesh, a ``TrainState`` of shardings, the frozen state's."""

  mesh: Mesh
  state: TrainState
  frozen: nnx.State

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())


def make_mesh(cfg: MeshConfig = MeshConfig(), devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh of ``devices`` (default: all), Auto axes (so the model's
  ``with_sharding_constraint`` hints apply; ``jax.make_mesh`` defaults to Explicit)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = cfg.shape(len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def param_shardings(state: nnx.State, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> nnx.State:
  """A ``NamedSharding`` per variable of ``state`` (same structure), from its ``axes``."""
  return map_by_path(lambda name, var: variable_sharding(var, mesh, rules, name), state)


def _moment_shardings(opt_state, params, params_sh, replicated):
  """The optimizer state's shardings: each subtree shaped like ``params`` (AdamW's mu, nu)
  takes ``params_sh``, every other leaf (counts) is replicated."""
  treedef = jax.tree.structure(params)
  like = lambda x: not isinstance(x, jax.ShapeDtypeStruct) and jax.tree.structure(x) == treedef
  return jax.tree.map(lambda x: params_sh if like(x) else replicated, opt_state, is_leaf=like)


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), tree)


def cast_floating(tree, dtype):
  """Floating leaves (arrays or shapes) in ``dtype``; None: unchanged."""
  if dtype is None:
    return tree

  def one(x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    return (
      jax.ShapeDtypeStruct(x.shape, dtype)
      if isinstance(x, jax.ShapeDtypeStruct)
      else (x.astype(dtype))
    )

  return jax.tree.map(one, tree)


def placed(tree, shardings):
  """``tree``'s shapes and dtypes (arrays or shapes) with ``shardings``, a tree of the same
  structure: a restore target, or an abstract argument to lower with."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings
  )


def abstract_state(
  model: nnx.Module | Callable[[], nnx.Module],
  part: Partition,
  tx: optax.GradientTransformation,
  mesh: Mesh,
  *,
  frozen_dtype=None,
  rules: Rules = LOGICAL_RULES,
) -> tuple[nnx.GraphDef, TrainState, nnx.State, Shardings]:
  """(graphdef, state, frozen, shardings) of a run of ``model`` (a module, abstract or not,
  or a constructor) on ``mesh``: the state and the frozen state as
  ``jax.ShapeDtypeStruct``s carrying their shardings, nothing materialised;
  ``frozen_dtype`` (bfloat16 compute) is the frozen state's dtype."""
  graphdef, params, frozen = part.split(
    model if isinstance(model, nnx.Module) else nnx.eval_shape(model)
  )
  params_a, frozen_a = _abstract(params), cast_floating(_abstract(frozen), frozen_dtype)
  replicated = NamedSharding(mesh, PartitionSpec())
  params_sh = param_shardings(params_a, mesh, rules)
  opt_a = jax.eval_shape(tx.init, params_a)
  # TrainStates of shardings and of abstract arrays: pytrees of the state's shape
  shardings = Shardings(
    mesh,
    TrainState(
      replicated,  # type: ignore[arg-type]
      params_sh,
      _moment_shardings(opt_a, params_a, params_sh, replicated),
      replicated,  # type: ignore[arg-type]
      replicated,  # type: ignore[arg-type]
    ),
    param_shardings(frozen_a, mesh, rules),
  )
  count = jax.ShapeDtypeStruct((), jnp.int32)
  key = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
  state_a = TrainState(count, params_a, opt_a, key, count)  # type: ignore[arg-type]
  return (graphdef, placed(state_a, shardings.state), placed(frozen_a, shardings.frozen), shardings)


# ---- batches ------------------------------------------------------------------------------

_UNSHARDED = ("image_gather", "image_gather_mask")  # indices into a table built per step


def batch_axes(rules: Rules = LOGICAL_RULES) -> tuple[str, ...]:
  """The mesh axes the ``batch`` rule splits a batch's rows over (data, fsdp)."""
  axes = logical_to_spec(("batch",), rules)[0]
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def batch_devices(mesh_shape, rules: Rules = LOGICAL_RULES) -> int:
  """Devices a batch's rows split over on a mesh of ``mesh_shape`` (axis -> size)."""
  return math.prod(mesh_shape[a] for a in batch_axes(rules))


def batch_shardings(batch, mesh: Mesh, micro: bool = False, rules: Rules = LOGICAL_RULES):
  """A ``TrainBatch`` of shardings for ``batch`` (arrays or shapes): each field's row / slot
  axis over the ``batch`` rule's mesh axes (data x fsdp) where they divide it, else
  replicated; the image gather indices replicated. ``micro``: fields carry a leading
  micro-batch axis (gradient accumulation), never sharded."""
  names = batch_axes(rules)
  shards = batch_devices(mesh.shape, rules)
  lead = (None,) if micro else ()

  def one(field, x):
    shape = np.shape(x)
    dim = shape[len(lead)] if len(shape) > len(lead) else 0
    if field in _UNSHARDED or not names or not dim or dim % shards:
      return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, PartitionSpec(*lead, names))

  fields = {f.name: one(f.name, getattr(batch, f.name)) for f in dataclasses.fields(batch)}
  return batch.replace(**fields)
