"""Logical axis names -> mesh axes, in one rules table (as MaxText / big_vision do).

Parameters carry logical names as ``axes`` metadata (``nnx.Param(..., axes=("embed",
"mlp"))``); activations are constrained with ``constrain(x, ("batch", "length",
"embed"))``. A mesh with axes ``data``, ``fsdp`` and ``tensor`` then shards the model
through ``LOGICAL_RULES`` alone, so training code never edits the model to shard it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

LOGICAL_RULES: Rules = (
  ("batch", ("data", "fsdp")),
  ("length", None),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("mlp", "tensor"),
  ("vocab", "tensor"),
  ("joint", "tensor"),  # the scorer's joint embedding (Eq. 1; shape letter e)
)


def logical_to_spec(axes: Sequence[str | None], rules: Rules = LOGICAL_RULES) -> PartitionSpec:
  """PartitionSpec for logical ``axes``. A mesh axis serves one dimension only: an axis
  already taken by an earlier dimension is dropped (so activations (batch, length,
  embed) shard the batch over data+fsdp and leave embed whole), as MaxText resolves it."""
  table = dict(rules)
  unknown = [a for a in axes if a is not None and a not in table]
  if unknown:
    raise ValueError(f"logical axes {unknown} have no rule; rules cover {sorted(table)}")
  used: set[str]
  used, spec = set(), []
  for axis in axes:
    target = table.get(axis) if axis is not None else None
    mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
    free = tuple(m for m in mesh_axes if m not in used)
    used.update(free)
    spec.append(None if not free else free[0] if len(free) == 1 else free)
  return PartitionSpec(*spec)


def fit_spec(
  spec: PartitionSpec, shape: Sequence[int], mesh: Mesh, name: str = "an array"
) -> PartitionSpec:
  """``spec`` with the mesh axes that do not divide their dimension dropped (that dimension
  replicated, and logged): a 5-head tower on a 2-way tensor axis still loads."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    if names and dim % math.prod(mesh.shape[a] for a in names):
      log.info("%s: dimension %d is not divisible by mesh axes %s: replicated", name, dim, names)
      names = ()
    out.append(None if not names else names[0] if len(names) == 1 else names)
  return PartitionSpec(*out)


def variable_sharding(
  var: nnx.Variable, mesh: Mesh, rules: Rules = LOGICAL_RULES, name: str = "a variable"
) -> NamedSharding:
  """Where ``var`` lives: by its logical ``axes`` (``fit_spec`` to its shape), replicated
  without."""
  axes = var.get_metadata().get("axes")
  if axes is None:
    return NamedSharding(mesh, PartitionSpec())
  return NamedSharding(
    mesh, fit_spec(logical_to_spec(axes, rules), var.get_value().shape, mesh, name)
  )


def param_shardings(
  model: nnx.Module, mesh: Mesh, rules: Rules = LOGICAL_RULES
) -> dict[tuple, NamedSharding]:
  """A NamedSharding per variable path of ``model`` (``variable_sharding``)."""
  return {
    path: variable_sharding(var, mesh, rules, "/".join(map(str, path)))
    for path, var in nnx.to_flat_state(nnx.state(model))
  }


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> nnx.Module:
  """Places every variable of ``model`` on ``mesh`` by the rules (in place; returns it)."""
  shardings = param_shardings(model, mesh, rules)
  flat = nnx.to_flat_state(nnx.state(model))
  for path, var in flat:
    var.set_value(jax.device_put(var[...], shardings[path]))
  nnx.update(model, nnx.from_flat_state(flat))
  return model


def constrain(x: jax.Array, axes: Sequence[str | None], rules: Rules = LOGICAL_RULES) -> jax.Array:
  """Sharding hint for an activation; a no-op unless traced under a mesh (``jax.set_mesh``)."""
  if jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, rules))
