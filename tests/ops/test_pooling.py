import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from support import numpy_reference as ref

from ppllava_jax import ops


def random_inputs(rng, shape, peaked=False):
  """x (B,T,H,W,D) and probs (B,T,H,W) summing to 1 per sample, like Eq. 1 gives."""
  b, t, h, w, d = shape
  x = rng.standard_normal(shape).astype(np.float32)
  # Scaled like CLIP logits (exp(4.6) * cos) so temperature-0.01 softmaxes are non-trivial.
  logits = rng.standard_normal((b, t * h * w)) * (8.0 if peaked else 3.0)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs = (probs / probs.sum(-1, keepdims=True)).reshape(b, t, h, w).astype(np.float32)
  return x, probs


@st.composite
def pool_cases(draw):
  sizes = [draw(st.integers(1, 6)), draw(st.integers(1, 12)), draw(st.integers(1, 12))]
  kernel = tuple(draw(st.integers(1, n)) for n in sizes)
  stride = tuple(draw(st.integers(1, n)) for n in sizes)
  # Bounded window size keeps compile time per example low; wide windows have
  # their own cases below.
  assume(np.prod(kernel) <= 48)
  b, d = draw(st.integers(1, 2)), draw(st.integers(1, 3))
  mode = draw(st.sampled_from(ops.POOL_MODES))
  return (b, *sizes, d), kernel, stride, mode, draw(st.integers(0, 2**16))


@settings(max_examples=40, deadline=None)
@given(pool_cases())
def test_matches_numpy_loops(case):
  shape, kernel, stride, mode, seed = case
  x, probs = random_inputs(np.random.default_rng(seed), shape)
  got = ops.prompt_guided_pool(jnp.asarray(x), jnp.asarray(probs), kernel, stride, mode=mode)
  want = ref.pool(x, probs, kernel, stride, mode)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5)


@pytest.mark.parametrize(
  "shape, kernel, stride",
  [
    ((2, 32, 24, 24, 3), (2, 3, 3), (2, 3, 3)),  # the paper's video setting
    ((1, 1, 24, 24, 2), (1, 3, 3), (1, 3, 3)),  # a single image
    ((1, 5, 6, 7, 2), (2, 3, 3), (2, 3, 3)),  # remainders on every axis
    ((2, 6, 7, 7, 2), (3, 3, 2), (2, 1, 2)),  # overlap (kernel > stride) and gaps
    ((1, 3, 10, 9, 2), (1, 10, 9), (1, 10, 9)),  # wide tiled windows (folded path)
    ((1, 20, 10, 9, 2), (10, 2, 9), (10, 1, 9)),  # folded axes mixed with overlap
  ],
)
@pytest.mark.parametrize("mode", ops.POOL_MODES)
def test_paper_and_edge_shapes_match_numpy_loops(rng, shape, kernel, stride, mode):
  x, probs = random_inputs(rng, shape, peaked=True)
  got = ops.prompt_guided_pool(jnp.asarray(x), jnp.asarray(probs), kernel, stride, mode=mode)
  np.testing.assert_allclose(
    np.asarray(got), ref.pool(x, probs, kernel, stride, mode), rtol=0, atol=2e-5
  )


def test_uniform_relevance_softmax_equals_average(rng):
  x, _ = random_inputs(rng, (2, 5, 7, 6, 4))
  uniform = jnp.full(x.shape[:4], 1.0 / np.prod(x.shape[1:4]), jnp.float32)
  for kernel, stride in [((2, 3, 3), (2, 3, 3)), ((3, 2, 4), (1, 2, 1))]:
    soft = ops.prompt_guided_pool(x, uniform, kernel, stride, mode="softmax")
    avg = ops.prompt_guided_pool(x, uniform * 0.0 + 123.0, kernel, stride, mode="average")
    np.testing.assert_allclose(np.asarray(soft), np.asarray(avg), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["softmax", "average", "max"])
def test_window_weights_sum_to_one(rng, mode):
  _, probs = random_inputs(rng, (2, 7, 9, 8, 1), peaked=True)
  out, kernel, stride = ops.pool_geometry(probs.shape[1:], kernel=(3, 3, 2), stride=(2, 2, 3))
  w = ops.window_weights(jnp.asarray(probs), out, kernel, stride, mode, 0.01)
  assert w.shape == (2, *out, *kernel)
  np.testing.assert_allclose(np.asarray(w).reshape(2, *out, -1).sum(-1), 1.0, atol=1e-6)
  assert (np.asarray(w) >= 0).all()


def test_one_hot_relevance_selects_that_token(rng):
  x, _ = random_inputs(rng, (1, 4, 6, 6, 5))
  probs = np.zeros(x.shape[:4], np.float32)
  chosen = [(0, 0, 1, 2), (0, 1, 3, 5), (0, 3, 4, 0)]  # one token in three different windows
  for pos in chosen:
    probs[pos] = 1.0 / len(chosen)
  for mode in ["softmax", "max"]:
    out = np.asarray(ops.prompt_guided_pool(x, probs, (2, 3, 3), mode=mode, temperature=1e-3))
    for b, t, h, w in chosen:
      np.testing.assert_allclose(out[b, t // 2, h // 3, w // 3], x[b, t, h, w], atol=1e-5)


def test_weighted_sum_is_the_papers_unnormalised_eq3(rng):
  x, probs = random_inputs(rng, (1, 4, 6, 6, 3))
  out = ops.prompt_guided_pool(x, probs, (2, 3, 3), mode="weighted_sum")
  # With kernel == stride covering the input, the windows partition it: summing all
  # outputs gives sum_(t,h,w) s * v, the relevance-weighted mean of the whole video.
  np.testing.assert_allclose(
    np.asarray(out).sum((1, 2, 3)), np.einsum("bthwd,bthw->bd", x, probs), atol=1e-5
  )


def test_separate_spatiotemporal_layout(rng):
  x, probs = random_inputs(rng, (2, 4, 3, 5, 2), peaked=True)
  for mode in ops.POOL_MODES:
    got = np.asarray(ops.separate_spatiotemporal_pool(x, probs, mode=mode))
    assert got.shape == (2, 4 + 3 * 5, 2)
    per_frame = ref.pool(x, probs, (1, 3, 5), (1, 3, 5), mode)  # (B, T, 1, 1, D)
    per_position = ref.pool(x, probs, (4, 1, 1), (4, 1, 1), mode)  # (B, 1, H, W, D)
    np.testing.assert_allclose(got[:, :4], per_frame.reshape(2, 4, 2), atol=2e-5)
    np.testing.assert_allclose(got[:, 4:], per_position.reshape(2, 15, 2), atol=2e-5)


def test_separate_spatiotemporal_token_count_of_the_paper():
  x = jnp.zeros((1, 32, 24, 24, 1))
  assert ops.separate_spatiotemporal_pool(x, x[..., 0]).shape == (1, 608, 1)


def test_multi_kernel_layout(rng):
  x, probs = random_inputs(rng, (1, 8, 6, 6, 2), peaked=True)
  kernels, strides = [(1, 3, 3), (4, 2, 2)], [None, (2, 2, 2)]
  got = np.asarray(ops.multi_kernel_pool(x, probs, kernels, strides))
  first = ref.pool(x, probs, (1, 3, 3), (1, 3, 3), "softmax").reshape(1, -1, 2)
  second = ref.pool(x, probs, (4, 2, 2), (2, 2, 2), "softmax").reshape(1, -1, 2)
  assert first.shape[1] == 8 * 2 * 2 and second.shape[1] == 3 * 3 * 3
  np.testing.assert_allclose(got, np.concatenate([first, second], 1), atol=2e-5)


@pytest.mark.parametrize(
  "kernels, tokens", [([(1, 6, 6), (8, 2, 2)], 1088), ([(4, 3, 3), (2, 4, 4)], 1088)]
)
def test_multi_kernel_token_counts_of_the_paper(kernels, tokens):
  x = jnp.zeros((1, 32, 24, 24, 1))
  assert ops.multi_kernel_pool(x, x[..., 0], kernels).shape == (1, tokens, 1)


@pytest.mark.parametrize(
  "x_shape, p_shape, words",
  [
    ((2, 4, 6, 6), (2, 4, 6, 6), "x must be (B, T, H, W, D), got shape (2, 4, 6, 6)"),
    ((2, 4, 6, 6, 3), (2, 4, 6, 5), "probs must be (B, T, H, W) = (2, 4, 6, 6)"),
    ((2, 4, 6, 6, 3), (2, 4, 6, 6, 1), "got shape (2, 4, 6, 6, 1)"),
  ],
)
def test_bad_shapes_raise_with_the_shapes(x_shape, p_shape, words):
  for fn in (
    lambda x, p: ops.prompt_guided_pool(x, p, (2, 3, 3)),
    ops.separate_spatiotemporal_pool,
    lambda x, p: ops.multi_kernel_pool(x, p, [(2, 3, 3)]),
  ):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
      fn(jnp.zeros(x_shape), jnp.zeros(p_shape))


def test_bad_mode_kernel_and_temperature():
  x, p = jnp.zeros((1, 4, 6, 6, 2)), jnp.zeros((1, 4, 6, 6))
  with pytest.raises(ValueError, match="mode must be one of"):
    ops.prompt_guided_pool(x, p, (2, 3, 3), mode="mean")
  with pytest.raises(ValueError, match="temperature must be > 0"):
    ops.prompt_guided_pool(x, p, (2, 3, 3), temperature=0.0)
  with pytest.raises(ValueError, match="time axis .* kernel larger than input \\(5 > 4\\)"):
    ops.prompt_guided_pool(x, p, (5, 3, 3))
  with pytest.raises(ValueError, match="2 kernels but 1 strides"):
    ops.multi_kernel_pool(x, p, [(2, 3, 3), (1, 2, 2)], [(2, 3, 3)])
