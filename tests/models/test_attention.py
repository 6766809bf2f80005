"""models.attention against a float64 NumPy reference written from the equation.

Small ``block`` values force the blockwise path (several query and key blocks, lengths
no block divides, so the overlapping last block is exercised); the default block takes
the one-block path at these sizes. Gradients are compared with the dense
softmax-then-matmul formulation the towers used before.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ppllava_jax.models.attention import BLOCK, attention

F32_MIN = np.finfo(np.float32).min


def reference(q_blna, k_bska, v_bska, mask_bls=None):
  """softmax(where(mask, q·k / sqrt(a), finfo(f32).min)) · v in float64, head n reading
  kv head n // (N / K). All-masked rows come out uniform over the keys, as in torch."""
  q, k, v = (np.asarray(x, np.float64) for x in (q_blna, k_bska, v_bska))
  b, l, n, a = q.shape
  group = n // k.shape[2]
  out = np.zeros((b, l, n, a))
  for head in range(n):
    scores = np.einsum("bla,bsa->bls", q[:, :, head], k[:, :, head // group]) / np.sqrt(a)
    if mask_bls is not None:
      scores = np.where(mask_bls, scores, F32_MIN)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    out[:, :, head] = np.einsum(
      "bls,bsa->bla", p / p.sum(-1, keepdims=True), v[:, :, head // group]
    )
  return out


def dense(q_blna, k_bska, v_bska, mask_bls):
  """The one-tensor formulation (scores, jax.nn.softmax, matmul), for gradients."""
  b, l, n, a = q_blna.shape
  k_bsna = jnp.repeat(k_bska, n // k_bska.shape[2], axis=2)
  v_bsna = jnp.repeat(v_bska, n // v_bska.shape[2], axis=2)
  scores = jnp.einsum("blna,bsna->bnls", q_blna, k_bsna) * a**-0.5
  scores = jnp.where(mask_bls[:, None], scores, F32_MIN)
  return jnp.einsum("bnls,bsna->blna", jax.nn.softmax(scores, axis=-1), v_bsna)


def qkv(b, l, s, n, k, a=8, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return (
    rng.standard_normal((b, l, n, a)).astype(dtype),
    rng.standard_normal((b, s, k, a)).astype(dtype),
    rng.standard_normal((b, s, k, a)).astype(dtype),
  )


def llm_mask(l, s, pads):
  """The LLM's key mask: queries are the last l of s cache slots (causal), row i of the
  batch left-padded by pads[i] slots. Padded query rows are fully masked."""
  causal_ls = np.arange(s)[None] <= np.arange(l)[:, None] + (s - l)
  valid_bs = np.arange(s)[None] >= np.asarray(pads)[:, None]
  return causal_ls[None] & valid_bs[:, None]


CASES = {  # name: (B, L, S, N, K, block)
  "self, several blocks": (2, 37, 37, 4, 4, 16),
  "gqa, cache longer than queries": (2, 50, 61, 6, 3, 16),
  "one kv head": (1, 29, 45, 4, 1, 8),
  "few queries, key blocks only": (2, 3, 100, 4, 2, 8),
  "decode step": (2, 1, 45, 4, 2, 8),
  "one block (default)": (2, 37, 53, 4, 2, BLOCK),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_matches_reference(case, masked):
  b, l, s, n, kv, block = CASES[case]
  q, k, v = qkv(b, l, s, n, kv)
  mask = llm_mask(l, s, [0, s // 2][:b]) if masked else None
  got = jax.jit(lambda q, k, v, m: attention(q, k, v, m, block=block))(q, k, v, mask)
  assert got.shape == q.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), reference(q, k, v, mask), rtol=0, atol=2e-6)


def test_fully_masked_rows_are_uniform_over_all_keys():
  """Whole blocks of padding are skipped, yet padded rows still get mean(v), as dense."""
  q, k, v = qkv(2, 70, 70, 2, 2, seed=1)
  mask = llm_mask(70, 70, [40, 0])  # row 0: queries 0-39 see nothing; blocks of 16 skipped
  mask[1, 13] = False  # one isolated all-masked query in an otherwise causal row
  got = np.asarray(attention(q, k, v, mask, block=16))
  np.testing.assert_allclose(got[0, :40], np.broadcast_to(v[0].mean(0), (40, 2, 8)), atol=2e-6)
  np.testing.assert_allclose(got[1, 13], v[1].mean(0), atol=2e-6)
  np.testing.assert_allclose(got, reference(q, k, v, mask), rtol=0, atol=2e-6)


@pytest.mark.parametrize("block", [16, BLOCK])
def test_bfloat16_inputs(block):
  q, k, v = (x.astype(jnp.bfloat16) for x in qkv(2, 45, 45, 4, 2, seed=2))
  mask = llm_mask(45, 45, [0, 10])
  got = attention(q, k, v, mask, block=block)
  assert got.dtype == jnp.bfloat16
  want = reference(*(np.asarray(x, np.float32) for x in (q, k, v)), mask)
  # bf16 keeps 8 significant bits: probabilities and the output are rounded once each.
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2**-7, atol=2**-7)


GRAD_CASES = {  # name: (L, S, N, K, pads, block); pads of 20 leave 12 rows with no key
  "one block": (27, 35, 4, 2, [0, 20], BLOCK),
  "gqa, overlapping query and key blocks": (27, 35, 4, 2, [0, 20], 8),
  "no mask, several blocks": (37, 37, 2, 2, None, 16),
  "decode-like, few queries": (3, 50, 4, 1, [0, 30], 8),
}


@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradients_match_dense(case):
  """The blockwise path's hand-written backward (FlashAttention-2's) against autodiff of
  the dense formulation, including padded rows that see no key (their gradient is v's)."""
  l, s, n, kv, pads, block = GRAD_CASES[case]
  q, k, v = qkv(2, l, s, n, kv, seed=3)
  mask = np.ones((2, l, s), bool) if pads is None else llm_mask(l, s, pads)
  cot = np.random.default_rng(4).standard_normal(q.shape).astype(np.float32)
  loss = lambda fn, m: jax.jit(
    jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, m) * cot), argnums=(0, 1, 2))
  )
  got = loss(lambda *a: attention(*a, block=block), None if pads is None else mask)(q, k, v)
  want = loss(dense, mask)(q, k, v)
  for name, g, w in zip("qkv", got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=2e-5, err_msg=name)


def test_gradient_memory_grows_linearly_with_length():
  """XLA's temporaries for the gradient: doubling the length at most doubles them (plus
  slack), where stored per-block residuals grew them 4-7x per doubling."""

  def temp_bytes(l):
    x = jax.ShapeDtypeStruct((1, l, 2, 16), jnp.float32)
    m = jax.ShapeDtypeStruct((1, l, l), jnp.bool_)
    grad = jax.grad(lambda q, k, v, m: attention(q, k, v, m, block=64).sum(), argnums=(0, 1, 2))
    return jax.jit(grad).lower(x, x, x, m).compile().memory_analysis().temp_size_in_bytes

  small, large = temp_bytes(1024), temp_bytes(2048)
  assert large < 2.3 * small, (small, large)


def test_vmap_with_batched_masks():
  """Under vmap the block-skipping cond turns into a select: same result."""
  q, k, v = qkv(3, 40, 40, 2, 2, seed=5)
  masks = np.stack([llm_mask(40, 40, [p]) for p in (0, 17, 40)])  # (3, 1, 40, 40)
  fn = jax.vmap(lambda q, k, v, m: attention(q[None], k[None], v[None], m, block=16)[0])
  got = np.asarray(jax.jit(fn)(q, k, v, masks))
  for i in range(3):
    np.testing.assert_allclose(
      got[i], reference(q[i : i + 1], k[i : i + 1], v[i : i + 1], masks[i])[0], rtol=0, atol=2e-6
    )


def test_sharded_over_batch_and_heads():
  assert jax.device_count() == 8
  q, k, v = qkv(4, 40, 40, 4, 2, seed=6)
  mask = llm_mask(40, 40, [0, 5, 20, 40])
  mesh = Mesh(
    np.asarray(jax.devices()).reshape(4, 2), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2
  )
  heads = NamedSharding(mesh, P("data", None, "tensor"))
  args = [jax.device_put(x, heads) for x in (q, k, v)]
  got = jax.jit(lambda q, k, v, m: attention(q, k, v, m, block=16))(
    *args, jax.device_put(mask, NamedSharding(mesh, P("data")))
  )
  np.testing.assert_allclose(np.asarray(got), reference(q, k, v, mask), rtol=0, atol=2e-6)


def test_long_sequences_never_hold_the_score_tensor():
  """At 4096 tokens XLA's temporaries stay far below one (N, L, S) f32 score tensor."""
  shape = jax.ShapeDtypeStruct((1, 4096, 8, 64), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, 4096, 4096), jnp.bool_)
  compiled = jax.jit(attention).lower(shape, shape, shape, mask).compile()
  scores_bytes = 8 * 4096 * 4096 * 4
  assert compiled.memory_analysis().temp_size_in_bytes < scores_bytes / 8
