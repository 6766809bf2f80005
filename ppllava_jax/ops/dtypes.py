"""The precision the ops compute in."""

import jax.numpy as jnp


def compute_dtype(*dtypes) -> jnp.dtype:
  """At least float32: bf16/f16 inputs are widened, float64 (under x64) is kept.

  Relevance softmaxes span ~18k positions and pooling temperatures divide by
  0.01, both of which bf16's 8 mantissa bits cannot carry.
  """
  return jnp.result_type(jnp.float32, *dtypes)
