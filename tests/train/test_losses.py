"""train.core.losses against NumPy written from the definitions, on explicit logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppllava_jax.train.core import losses


def numpy_logprobs(hidden, head, labels):
  """log softmax(hidden @ head) of each next-token label, in float64, and its mask."""
  logits = np.einsum("bld,dv->blv", hidden.astype(np.float64), head.astype(np.float64))
  logits -= logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  targets = labels[:, 1:]
  mask = targets != -100
  picked = np.take_along_axis(logp[:, :-1], np.maximum(targets, 0)[..., None], -1)[..., 0]
  return np.where(mask, picked, 0.0), mask


def inputs(b=2, l=13, d=8, v=37, seed=0):
  rng = np.random.default_rng(seed)
  hidden = rng.standard_normal((b, l, d)).astype(np.float32)
  head = rng.standard_normal((d, v)).astype(np.float32)
  labels = rng.integers(0, v, (b, l))
  labels[0, :5] = -100  # a prompt
  labels[1, 9:] = -100  # right padding
  return hidden, head, labels


@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 1024])
def test_cross_entropy_is_the_token_sum_and_count(chunk):
  hidden, head, labels = inputs()
  total, count = jax.jit(losses.cross_entropy, static_argnums=3)(hidden, head, labels, chunk)
  logp, mask = numpy_logprobs(hidden, head, labels)
  assert count == mask.sum() == (12 - 4) + 8
  np.testing.assert_allclose(total, -logp.sum(), rtol=1e-5)


def test_sequence_logprobs_per_row():
  hidden, head, labels = inputs(seed=1)
  total_b, count_b = losses.sequence_logprobs(hidden, head, labels, chunk=4)
  logp, mask = numpy_logprobs(hidden, head, labels)
  np.testing.assert_allclose(total_b, logp.sum(1), rtol=1e-5)
  np.testing.assert_array_equal(count_b, mask.sum(1))


def test_nothing_supervised_is_zero_not_nan():
  hidden, head, labels = inputs()
  total, count = losses.cross_entropy(hidden, head, np.full_like(labels, -100))
  assert float(total) == 0.0 and float(count) == 0.0
  grad = jax.grad(lambda h: losses.cross_entropy(h, head, np.full_like(labels, -100))[0])(hidden)
  assert np.all(np.isfinite(grad)) and not np.any(grad)


@pytest.mark.parametrize("chunk", [5, 1024])
def test_gradients_equal_those_of_the_full_logits(chunk):
  """The fused backward (gradients taken with the forward's chunks, scaled by the
  cotangent) against autodiff of the formulation that builds all (B, L, vocab) logits."""
  hidden, head, labels = inputs(seed=2)

  def full(h, w):
    logp = jax.nn.log_softmax(h @ w, axis=-1)[:, :-1]
    t = labels[:, 1:]
    return -jnp.sum(
      jnp.where(t != -100, jnp.take_along_axis(logp, np.maximum(t, 0)[..., None], -1)[..., 0], 0.0)
    )

  ours = lambda h, w: 0.37 * losses.cross_entropy(h, w, labels, chunk=chunk)[0]  # a cotangent != 1
  got = jax.jit(jax.grad(ours, (0, 1)))(hidden, head)
  want = jax.grad(lambda h, w: 0.37 * full(h, w), (0, 1))(hidden, head)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_bfloat16_gradients_keep_their_dtypes():
  hidden, head, labels = inputs(seed=3)
  h16, w16 = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(head, jnp.bfloat16)
  got = jax.grad(lambda h, w: losses.cross_entropy(h, w, labels, chunk=4)[0], (0, 1))(h16, w16)
  want = jax.grad(lambda h, w: losses.cross_entropy(h, w, labels, chunk=4)[0], (0, 1))(
    *(np.asarray(x, np.float32) for x in (h16, w16))
  )
  for g, w in zip(got, want):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=2**-6, atol=2**-6)


def test_memory_stays_below_the_full_logits():
  """8k positions x 32k vocabulary: the gradient's temporaries hold a chunk's logits and
  their gradient (2 x 31 MiB), not one row's full float32 logits (1000 MiB)."""
  hidden = jax.ShapeDtypeStruct((1, 8192, 64), jnp.float32)
  head = jax.ShapeDtypeStruct((64, 32000), jnp.float32)
  labels = jax.ShapeDtypeStruct((1, 8192), jnp.int32)
  grad = jax.grad(lambda h, w, y: losses.cross_entropy(h, w, y)[0], (0, 1))
  temp = jax.jit(grad).lower(hidden, head, labels).compile().memory_analysis().temp_size_in_bytes
  chunk_bytes = losses.CHUNK * 32000 * 4
  assert temp < 3 * chunk_bytes < 8192 * 32000 * 4 / 2, temp / 2**20
