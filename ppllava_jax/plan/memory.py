"""A train step's per-device memory read from its program, for the compilers XLA:CPU cannot
stand in for.

XLA:CPU does not honour remat: a 16-layer tanh MLP's gradient plans 432 MiB of temporaries
with ``nothing_saveable`` and 433 MiB without, and the 7B step 494 vs 491 GiB. TPU and GPU
compilers recompute where the program says. So the plan counts, from the jaxpr, what a
compiler that follows the program holds:

- ``shard_bytes``: the step's arguments (state, constants, batch) per device, exact, from
  their shardings' shard shapes.
- ``saved_residuals``: the arrays ``jax.vjp`` keeps from the forward for the backward (the
  leaves of its vjp function that are not the function's own arguments): the activations
  remat decides.
- ``largest_layer``: in the gradient's jaxpr, each remat'd layer's backward is one
  differentiated ``remat`` equation (its recomputed forward, then its transpose); the
  largest peak of its live values in program order (``live_peak``) is what the backward
  adds on top of the residuals.
- ``DeviceShare``: a device's share of each array: parameter-shaped ones as the parameter
  is sharded, activations over the batch axes.

``MemoryEstimate.total`` adds two float32 buffers of the trainable shard (one
micro-batch's gradient, and the scan's accumulator or, in one micro-batch, the optimizer's
update). It is an estimate, not a bound either way: the layer term counts every value of
the layer's backward unfused (XLA fuses elementwise chains: fewer), and the compiler's own
buffers are left out (a layer's all-gathered weights, collectives' staging, the internals
of loops inside a layer such as attention's blocks: more). A step whose estimate is near
HBM does not fit.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.extend import core as jcore

REMAT = "remat2"  # jax.checkpoint's primitive


def itemsize(dtype) -> int:
  """Bytes per element, extended dtypes (PRNG keys) included."""
  return (
    dtype.itemsize
    if jax.dtypes.issubdtype(dtype, jax.dtypes.extended)
    else (np.dtype(dtype).itemsize)
  )


def shard_bytes(tree) -> int:
  """Bytes one device holds of ``tree``'s arrays or shapes: each leaf's shard shape where it
  carries a sharding, else the whole leaf."""
  total = 0
  for x in jax.tree.leaves(tree):
    sharding = getattr(x, "sharding", None)
    shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
    total += math.prod(shape) * itemsize(x.dtype)
  return total


def saved_residuals(fn, diff, *rest) -> list[jax.core.ShapedArray]:
  """The arrays ``jax.vjp(lambda d: fn(d, *rest), diff)`` keeps for its backward, less those
  that are ``diff`` or ``rest`` themselves (already counted as arguments); each once. The
  arguments may be ``jax.ShapeDtypeStruct``s: only the jaxpr is built."""

  def forward(d, *r):
    return jax.vjp(lambda x: fn(x, *r), d)[1]  # a Partial: its leaves are the residuals

  closed = jax.make_jaxpr(forward)(diff, *rest)
  inputs = set(closed.jaxpr.invars)
  fresh: dict[jcore.Var, jax.core.ShapedArray] = {}
  for v in closed.jaxpr.outvars:
    if isinstance(v, jcore.Var) and v not in inputs:
      fresh.setdefault(v, v.aval)  # type: ignore[arg-type]  # an array's aval is a ShapedArray
  return list(fresh.values())


def _differentiated_remats(jaxpr):
  """The bodies of ``jaxpr``'s differentiated ``remat`` equations, nested ones included: in a
  gradient's jaxpr, each is one remat'd layer's recomputed forward and its backward."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == REMAT and eqn.params["differentiated"]:
      yield eqn.params["jaxpr"]
      continue
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jcore.ClosedJaxpr):
          yield from _differentiated_remats(sub.jaxpr)
        elif isinstance(sub, jcore.Jaxpr):
          yield from _differentiated_remats(sub)


def live_peak(jaxpr, share) -> int:
  """The largest total ``share(aval)`` of the values ``jaxpr``'s equations make that are live
  at once, in program order (each from its equation to its last use; outputs to the end).
  Its inputs are the caller's; a nested jaxpr's own buffers are not counted."""
  last = {}
  for i, eqn in enumerate(jaxpr.eqns):
    for v in eqn.invars:
      if isinstance(v, jcore.Var):
        last[v] = i
  for v in jaxpr.outvars:
    if isinstance(v, jcore.Var):
      last[v] = len(jaxpr.eqns)
  live = peak = 0
  frees: dict[int, int] = {}
  for i, eqn in enumerate(jaxpr.eqns):
    for v in eqn.outvars:
      size = share(v.aval)
      live += size
      end = last.get(v, i) if not isinstance(v, jcore.DropVar) else i
      frees[end] = frees.get(end, 0) + size
    peak = max(peak, live)
    live -= frees.pop(i, 0)
  return peak


def largest_layer(fn, share, *args) -> int:
  """The largest ``live_peak`` (bytes by ``share``) of a remat'd layer's backward in the
  gradient of ``fn(*args)`` with respect to ``args[0]``: its recomputed residuals and the
  cotangents in flight; 0 when nothing is remat'd. Layers of one signature are done once."""
  closed = jax.make_jaxpr(jax.grad(fn))(*args)
  seen: dict[tuple, int] = {}
  for body in _differentiated_remats(closed.jaxpr):
    key = (tuple((v.aval.shape, str(v.aval.dtype)) for v in body.invars), len(body.eqns))
    if key not in seen:
      seen[key] = live_peak(body, share)
  return max(seen.values(), default=0)


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Per-device bytes of one train step as a compiler that follows the program holds them
  (module doc), with remat ``policy`` and without."""

  policy: str
  arguments: int  # state, constants and batch, as passed (XLA drops what the step never reads)
  gradients: int  # two float32 copies of the trainable state's shard
  residuals: int  # one micro-batch's saved residuals under ``policy``, this device's rows
  residuals_without_remat: int  # the same with remat "none"
  largest_layer: int  # the largest remat'd layer's backward (``largest_layer``), this device's

  @property
  def total(self) -> int:
    return self.arguments + self.gradients + self.residuals + self.largest_layer

  @property
  def total_without_remat(self) -> int:
    return self.arguments + self.gradients + self.residuals_without_remat


class DeviceShare:
  """Bytes one device holds of an array of the step: one shaped like a parameter (its
  compute-dtype copy, its gradient) is split as that parameter is; any other is an
  activation of the batch, split over the ``batch_devices`` of the batch axes (with
  tensor > 1 this overcounts the activations tensor parallelism splits)."""

  def __init__(self, params, batch_devices: int):
    self.batch_devices = batch_devices
    self.shards: dict[tuple, int] = {}
    for x in jax.tree.leaves(params):
      sharding = getattr(x, "sharding", None)
      shard = x.shape if sharding is None else sharding.shard_shape(x.shape)
      self.shards.setdefault(tuple(x.shape), math.prod(shard))

  def __call__(self, aval) -> int:
    shape = tuple(getattr(aval, "shape", ()))
    elements = self.shards.get(shape, -(-math.prod(shape) // self.batch_devices))
    return elements * itemsize(aval.dtype) if hasattr(aval, "dtype") else 0

  def of(self, avals) -> int:
    return sum(self(a) for a in avals)
