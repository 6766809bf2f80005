import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import numpy_reference as ref

from ppllava_jax import ops


@pytest.mark.parametrize("length, dim, new_length", [(77, 768, 248), (64, 1152, 196)])
def test_original_extension_clip_and_siglip(rng, length, dim, new_length):
  table = rng.standard_normal((length, dim)).astype(np.float32)
  got = np.asarray(ops.extend_positions(jnp.asarray(table), keep=20, ratio=4))
  assert got.shape == (new_length, dim)
  np.testing.assert_allclose(got, ref.extend_positions_original(table, keep=20), atol=1e-5)
  np.testing.assert_array_equal(got[:20], table[:20])  # the frozen part is copied exactly
  np.testing.assert_array_equal(got[20::4][: length - 20], table[20:])  # grid points kept


@pytest.mark.slow
@settings(max_examples=30, deadline=None)
@given(
  length=st.integers(2, 40),
  keep=st.integers(0, 38),
  dim=st.integers(1, 4),
  seed=st.integers(0, 2**16),
)
def test_extension_rule_for_any_keep(length, keep, dim, seed):
  keep = min(keep, length - 2)
  table = np.random.default_rng(seed).standard_normal((length, dim)).astype(np.float32)
  got = np.asarray(ops.extend_positions(jnp.asarray(table), keep=keep, ratio=4))
  np.testing.assert_allclose(got, ref.extend_positions_original(table, keep=keep), atol=1e-5)


@pytest.mark.slow
@settings(max_examples=30, deadline=None)
@given(
  length=st.integers(2, 40),
  new_length=st.integers(1, 300),
  dim=st.integers(1, 4),
  seed=st.integers(0, 2**16),
)
def test_interpolation_matches_eq4(length, new_length, dim, seed):
  table = np.random.default_rng(seed).standard_normal((length, dim)).astype(np.float32)
  got = np.asarray(ops.interpolate_positions(jnp.asarray(table), new_length))
  np.testing.assert_allclose(got, ref.interpolate_positions(table, new_length), atol=1e-4)


def test_interpolation_identity_and_keep_zero_equivalence(rng):
  table = rng.standard_normal((77, 8)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(ops.interpolate_positions(table, 77)), table, atol=1e-6)
  np.testing.assert_allclose(
    np.asarray(ops.extend_positions(table, keep=0, ratio=4)),
    np.asarray(ops.interpolate_positions(table, 4 * 77)),
    atol=1e-6,
  )


def test_bf16_table_keeps_dtype(rng):
  table = jnp.asarray(rng.standard_normal((77, 8)), jnp.bfloat16)
  got = ops.extend_positions(table)
  assert got.dtype == jnp.bfloat16
  want = ref.extend_positions_original(np.asarray(table, np.float32))
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-2)


@pytest.mark.parametrize(
  "call, words",
  [
    (lambda: ops.extend_positions(jnp.zeros((77,))), "table must be (length, dim)"),
    (lambda: ops.extend_positions(jnp.zeros((1, 4)), keep=0), "needs >= 2 rows"),
    (lambda: ops.extend_positions(jnp.zeros((77, 4)), keep=76), "keep must be in [0, 75]"),
    (lambda: ops.extend_positions(jnp.zeros((77, 4)), ratio=0), "ratio must be an int >= 1"),
    (lambda: ops.interpolate_positions(jnp.zeros((77, 4)), 0), "new_length must be >= 1"),
  ],
)
def test_bad_input(call, words):
  with pytest.raises(ValueError) as err:
    call()
  assert words in str(err.value)
