"""Models as pure functions of their state, for jax.jit / grad / sharding.

Split once, merge once per call: ``fn, state = pure(model, "get_image_features")``
then ``jax.jit(fn)(state, pixel_values)``. The state is an ordinary pytree, so it can
be cast (``jax.tree.map``), sharded or donated like any array tree.
"""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx


def pure(model: nnx.Module, method: str) -> tuple[Callable, nnx.State]:
  graphdef, state = nnx.split(model)

  def fn(state: nnx.State, *args, **kwargs):
    return getattr(nnx.merge(graphdef, state), method)(*args, **kwargs)

  return fn, state
