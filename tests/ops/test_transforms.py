"""jit / vmap / grad / bf16 / sharding behaviour of the ops."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads
from support import numpy_reference as ref

from ppllava_jax import ops


def inputs(rng, shape=(2, 5, 6, 6, 4), e=8):
  patch = rng.standard_normal(shape[:4] + (e,)).astype(np.float32)
  text = rng.standard_normal((shape[0], e)).astype(np.float32)
  x = rng.standard_normal(shape).astype(np.float32)
  return x, patch, text


def pipeline(x, patch, text, mode="softmax", temperature=0.01):
  probs = ops.relevance_scores(patch, text, 4.6052)
  return ops.prompt_guided_pool(x, probs, (2, 3, 3), mode=mode, temperature=temperature)


@pytest.mark.parametrize("mode", ops.POOL_MODES)
def test_jit_equals_eager(rng, mode):
  x, patch, text = inputs(rng)
  eager = pipeline(x, patch, text, mode)
  jitted = jax.jit(functools.partial(pipeline, mode=mode))(x, patch, text)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=0, atol=1e-6)
  table = rng.standard_normal((77, 8)).astype(np.float32)
  # Fused multiply-adds under jit may move the last bit.
  np.testing.assert_allclose(
    np.asarray(jax.jit(ops.extend_positions)(table)),
    np.asarray(ops.extend_positions(table)),
    rtol=0,
    atol=1e-6,
  )


def test_vmap_over_an_extra_axis(rng):
  # E.g. several prompts for the same batch of videos: (prompts, B, ...).
  x, patch, text = inputs(rng)
  texts = np.stack([text, -text, text * 2 + 1])
  got = jax.vmap(pipeline, in_axes=(None, None, 0))(x, patch, texts)
  assert got.shape == (3, 2, 2, 2, 2, 4)
  for i in range(3):
    np.testing.assert_allclose(
      np.asarray(got[i]), np.asarray(pipeline(x, patch, texts[i])), atol=1e-6
    )
  tables = rng.standard_normal((2, 30, 4)).astype(np.float32)
  got = jax.vmap(functools.partial(ops.extend_positions, keep=5))(tables)
  for i in range(2):
    np.testing.assert_allclose(
      np.asarray(got[i]), ref.extend_positions_original(tables[i], 5), atol=1e-5
    )


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["softmax", "weighted_sum", "average"])
def test_gradients_match_finite_differences(rng, mode):
  x, patch, text = inputs(rng, shape=(1, 3, 4, 3, 2), e=4)
  # float64 so central differences are accurate; a mild temperature keeps the
  # softmax-of-softmax smooth at the finite-difference step.
  with jax.enable_x64(True):
    args = tuple(jnp.asarray(a, jnp.float64) for a in (x, patch, text))
    fn = lambda x, p, t: jnp.sum(jnp.sin(pipeline(x, p, t, mode, temperature=0.05)))
    check_grads(fn, args, order=1, modes=["rev", "fwd"], eps=1e-5, atol=1e-6, rtol=1e-5)


def test_gradients_finite_at_paper_temperature(rng):
  x, patch, text = inputs(rng, shape=(2, 4, 6, 6, 3))
  grads = jax.grad(lambda *a: jnp.sum(pipeline(*a) ** 2), argnums=(0, 1, 2))(x, patch, text)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
  assert np.abs(np.asarray(grads[2])).sum() > 0  # relevance does shape the output


def test_bf16_within_stated_tolerance_of_f32(rng):
  x, patch, text = inputs(rng, shape=(2, 4, 6, 6, 16), e=32)
  probs = ops.relevance_scores(patch, text, 4.6052)
  for mode in ops.POOL_MODES:
    f32 = np.asarray(ops.prompt_guided_pool(x, probs, (2, 3, 3), mode=mode))
    bf16 = ops.prompt_guided_pool(jnp.asarray(x, jnp.bfloat16), probs, (2, 3, 3), mode=mode)
    assert bf16.dtype == jnp.bfloat16
    # Input rounding (<= 2^-8 relative) plus output rounding (<= 2^-8 relative);
    # all modes but weighted_sum are convex combinations, bounded by max |x|.
    scale = np.abs(x).max() if mode != "weighted_sum" else np.abs(f32).max()
    np.testing.assert_allclose(np.asarray(bf16, np.float32), f32, rtol=0, atol=2**-7 * scale)
  # Cosines from bf16 embeddings stay within 1e-2 of the f32 ones.
  cos32 = np.asarray(ops.relevance_logits(patch, text))
  cos16 = np.asarray(
    ops.relevance_logits(jnp.asarray(patch, jnp.bfloat16), jnp.asarray(text, jnp.bfloat16))
  )
  np.testing.assert_allclose(cos16, cos32, rtol=0, atol=1e-2)


def test_batch_sharded_equals_unsharded(rng):
  assert jax.device_count() == 8, "tests/conftest.py sets 8 host devices"
  mesh = Mesh(mesh_utils.create_device_mesh((8,)), ("data",))
  x, patch, text = inputs(rng, shape=(8, 4, 6, 6, 4))
  batch = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
  sharded = jax.jit(pipeline)(batch(x), batch(patch), batch(text))
  assert sharded.sharding.spec[0] == "data"  # stays split over the batch
  np.testing.assert_allclose(
    np.asarray(sharded), np.asarray(pipeline(x, patch, text)), rtol=0, atol=1e-6
  )
