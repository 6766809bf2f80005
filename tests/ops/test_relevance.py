import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import numpy_reference as ref

from ppllava_jax import ops

CLIP_LOGIT_SCALE = 4.6052  # log(100), CLIP's trained value


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(
  b=st.integers(1, 3),
  t=st.integers(1, 4),
  h=st.integers(1, 5),
  w=st.integers(1, 5),
  e=st.integers(1, 8),
  scale=st.floats(0.0, 4.7),
  seed=st.integers(0, 2**16),
)
def test_scores_match_numpy_loops(b, t, h, w, e, scale, seed):
  rng = np.random.default_rng(seed)
  patch = rng.standard_normal((b, t, h, w, e)).astype(np.float32)
  text = rng.standard_normal((b, e)).astype(np.float32)
  got = ops.relevance_scores(jnp.asarray(patch), jnp.asarray(text), scale)
  assert got.dtype == jnp.float32 and got.shape == (b, t, h, w)
  np.testing.assert_allclose(
    np.asarray(got), ref.relevance(patch, text, scale), rtol=1e-4, atol=1e-7
  )
  np.testing.assert_allclose(np.asarray(got).sum((1, 2, 3)), 1.0, atol=1e-5)


def test_logits_are_cosines(rng):
  patch = rng.standard_normal((2, 3, 4, 4, 16)).astype(np.float32)
  text = rng.standard_normal((2, 16)).astype(np.float32)
  got = np.asarray(ops.relevance_logits(patch, text))
  want = np.einsum("bthwe,be->bthw", patch, text) / (
    np.linalg.norm(patch, axis=-1) * np.linalg.norm(text, axis=-1)[:, None, None, None]
  )
  np.testing.assert_allclose(got, want, atol=1e-6)
  # Scale-invariant in both arguments, as a cosine must be.
  np.testing.assert_allclose(
    np.asarray(ops.relevance_logits(patch * 7.0, text * 0.1)), want, atol=1e-6
  )


def test_softmax_spans_the_whole_sample_not_each_frame(rng):
  patch = rng.standard_normal((1, 4, 3, 3, 8)).astype(np.float32)
  text = rng.standard_normal((1, 8)).astype(np.float32)
  probs = np.asarray(ops.relevance_scores(patch, text, CLIP_LOGIT_SCALE))
  assert abs(probs.sum() - 1.0) < 1e-5
  assert not np.allclose(probs.sum((2, 3)), 1.0)  # frames are not normalised separately


def test_mask_excludes_padding_frames(rng):
  patch = rng.standard_normal((2, 5, 3, 4, 8)).astype(np.float32)
  text = rng.standard_normal((2, 8)).astype(np.float32)
  mask = np.ones((2, 5, 3, 4), bool)
  mask[0, 3:] = False  # sample 0 has 3 real frames, sample 1 has 5
  got = np.asarray(ops.relevance_scores(patch, text, CLIP_LOGIT_SCALE, mask=mask))
  np.testing.assert_allclose(
    got, ref.relevance(patch, text, CLIP_LOGIT_SCALE, mask), rtol=1e-4, atol=1e-7
  )
  assert (got[0, 3:] == 0).all()
  # The real frames score exactly as if the padding were not there.
  alone = np.asarray(ops.relevance_scores(patch[:1, :3], text[:1], CLIP_LOGIT_SCALE))
  np.testing.assert_allclose(got[0, :3], alone[0], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
  "patch_shape, text_shape, fn_words",
  [
    ((2, 4, 3, 3), (2, 4), "patch_emb must be (B, T, H, W, E), got shape (2, 4, 3, 3)"),
    ((2, 4, 3, 3, 8), (2, 7), "text_emb must be (B, E) = (2, 8)"),
    ((2, 4, 3, 3, 8), (3, 8), "got shape (3, 8)"),
    ((2, 4, 3, 3, 8), (8,), "got shape (8,)"),
  ],
)
def test_bad_shapes_raise_with_the_shapes(patch_shape, text_shape, fn_words):
  for fn in (ops.relevance_logits, lambda p, t: ops.relevance_scores(p, t, 4.6)):
    with pytest.raises(ValueError) as err:
      fn(jnp.zeros(patch_shape), jnp.zeros(text_shape))
    assert fn_words in str(err.value)


def test_bad_mask_shape():
  with pytest.raises(ValueError, match=r"mask must be \(B, T, H, W\) = \(1, 2, 3, 3\)"):
    ops.relevance_scores(
      jnp.ones((1, 2, 3, 3, 4)), jnp.ones((1, 4)), 4.6, mask=jnp.ones((1, 2, 3), bool)
    )
