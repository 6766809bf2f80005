"""merge_media against a NumPy loop written from its layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ppllava_jax.ops.merge import check_media_counts, merge_media

PH = 7  # placeholder id


def reference_merge(text, ids, media, mask):
  """Walk the batch row-major; the k-th placeholder takes the k-th unmasked media row."""
  real = iter(media[n] for n in range(len(media)) if mask[n])
  out = text.copy()
  for b in range(ids.shape[0]):
    for l in range(ids.shape[1]):
      if ids[b, l] == PH:
        out[b, l] = next(real)
  assert next(real, None) is None, "the test data must use every real media token"
  return out


def make_batch(rng, placeholders_per_item, length=12, d=5):
  """Ids with each sample's items as runs of placeholders; a buffer padded after each item."""
  b = len(placeholders_per_item)
  ids = rng.integers(0, PH, size=(b, length))  # ids < PH: text only
  rows, mask = [], []
  for i, items in enumerate(placeholders_per_item):
    at = 1
    for count in items:
      ids[i, at : at + count] = PH
      at += count + 1
      rows.append(rng.standard_normal((count, d)))
      mask += [True] * count
      pad = int(rng.integers(0, 3))  # padding rows between items, masked out
      rows.append(rng.standard_normal((pad, d)) + 100.0)
      mask += [False] * pad
  rows.append(np.full((3, d), 1e6))  # trailing padding
  mask += [False] * 3
  text = rng.standard_normal((b, length, d)).astype(np.float32)
  media = np.concatenate(rows).astype(np.float32)
  return text, ids.astype(np.int32), media, np.asarray(mask)


# Samples with several items, none, one long one.
ITEMS = [[3, 2], [], [5], [1, 1, 2]]


def test_matches_numpy_loop(rng):
  text, ids, media, mask = make_batch(rng, ITEMS)
  assert not mask[: np.flatnonzero(mask)[-1]].all(), "padding between items is what bites"
  got = merge_media(jnp.asarray(text), jnp.asarray(ids), jnp.asarray(media), jnp.asarray(mask), PH)
  np.testing.assert_array_equal(np.asarray(got), reference_merge(text, ids, media, mask))


def test_jit_equals_eager(rng):
  text, ids, media, mask = make_batch(rng, ITEMS)
  eager = merge_media(text, ids, media, mask, PH)
  jitted = jax.jit(merge_media)(text, ids, media, mask, PH)
  np.testing.assert_array_equal(np.asarray(jitted), np.asarray(eager))


def test_casts_media_to_the_text_dtype(rng):
  text, ids, media, mask = make_batch(rng, ITEMS)
  got = merge_media(jnp.asarray(text, jnp.bfloat16), ids, media, mask, PH)
  assert got.dtype == jnp.bfloat16
  want = reference_merge(
    np.asarray(jnp.asarray(text, jnp.bfloat16), np.float32),
    ids,
    np.asarray(jnp.asarray(media, jnp.bfloat16), np.float32),
    mask,
  )
  np.testing.assert_array_equal(np.asarray(got, np.float32), want)


def test_gradients_reach_media_and_non_placeholder_text_only(rng):
  text, ids, media, mask = make_batch(rng, ITEMS)
  weights = rng.standard_normal(text.shape).astype(np.float32)
  loss = lambda t, m: jnp.sum(merge_media(t, ids, m, mask, PH) * weights)
  g_text, g_media = jax.jit(jax.grad(loss, argnums=(0, 1)))(text, media)
  is_ph = ids == PH
  np.testing.assert_array_equal(np.asarray(g_text), np.where(is_ph[..., None], 0.0, weights))
  want_media = np.zeros_like(media)
  want_media[mask] = weights[is_ph]  # k-th real row <- k-th placeholder, row-major
  np.testing.assert_array_equal(np.asarray(g_media), want_media)


def test_batch_sharded_equals_reference(rng):
  assert jax.device_count() == 8, "tests/conftest.py sets 8 host devices"
  mesh = Mesh(mesh_utils.create_device_mesh((8,)), ("data",))
  text, ids, media, mask = make_batch(rng, ITEMS * 2)
  batch = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
  got = jax.jit(merge_media)(batch(text), batch(ids), media, mask, PH)
  assert got.sharding.spec[0] == "data"  # stays split over the batch
  np.testing.assert_array_equal(np.asarray(got), reference_merge(text, ids, media, mask))


def test_text_only_batch(rng):
  text, ids, _, _ = make_batch(rng, [[], []])
  got = merge_media(text, ids, np.zeros((0, 5), np.float32), np.zeros(0, bool), PH)
  np.testing.assert_array_equal(np.asarray(got), text)


def test_count_mismatch_names_both_counts(rng):
  text, ids, media, mask = make_batch(rng, ITEMS)
  mask = mask.copy()
  mask[np.flatnonzero(mask)[-1]] = False  # one real token short
  with pytest.raises(ValueError) as err:
    merge_media(text, ids, media, mask, PH)
  assert "14 placeholder tokens" in str(err.value) and "13 media tokens" in str(err.value)
  assert "[5, 0, 5, 4]" in str(err.value)
  with pytest.raises(ValueError) as err:
    check_media_counts(ids, PH, [5, 1, 5, 3])
  message = str(err.value)
  assert "sample 1: 0 placeholder tokens but 1 media tokens" in message
  assert "sample 3: 4 placeholder tokens but 3 media tokens" in message
  assert "sample 0" not in message and "sample 2" not in message
  check_media_counts(ids, PH, [5, 0, 5, 4])  # matching counts pass


@pytest.mark.parametrize(
  "args, words",
  [
    (dict(text=(2, 4, 3), ids=(2, 5), media=(1, 3), mask=(1,)), ["(2, 4, 3)", "(2, 5)"]),
    (dict(text=(2, 4, 3), ids=(2, 4), media=(1, 2), mask=(1,)), ["(N, D=3)", "(1, 2)"]),
    (dict(text=(2, 4, 3), ids=(2, 4), media=(2, 3), mask=(3,)), ["(2, 3)", "(3,)"]),
  ],
)
def test_bad_shapes_are_named(args, words):
  with pytest.raises(ValueError) as err:
    merge_media(
      np.zeros(args["text"]),
      np.zeros(args["ids"], np.int32),
      np.zeros(args["media"]),
      np.zeros(args["mask"], bool),
      PH,
    )
  for word in words:
    assert word in str(err.value), (word, str(err.value))
