"""Softmax attention for every tower: the ViT encoders and the grouped-query LLM.

``attention(q_bthe, k_bske, v_bske, mask_bts)``: ``h`` query heads share ``k``
key/value heads in groups of ``g = h // k`` (``k == h`` for the ViTs); ``mask_bts``
(True = may attend) carries causality, padding and cache validity alike. The result
is that of the dense ``softmax(where(mask, q·k / sqrt(e), finfo.min)) · v`` with f32
scores, softmax and accumulation, in the queries' dtype: in particular a fully masked
row is uniform over all keys (the mean of ``v``), as transformers gives padded rows.

One formulation, FlashAttention's online softmax: per key block, scores ``s``, the
running row max ``m``, the denominator ``l = Σ exp(s - m)`` and the f32 accumulator
``Σ exp(s - m) · v``, each rescaled by ``exp(m_old - m_new)``; one division at the end.

- Queries and keys both up to ``BLOCK`` long are one block, no loop: the text
  encoders, short prompts, and decode steps (a score block holds at most ``BLOCK²``
  entries per head, so T = 1 takes any cache in one key block; cutting an 18k-slot
  cache into 512-key blocks made a decode step 1.6-2.9x slower). Dividing the (T, E)
  output once, not the (T, S) probabilities, made this 1.7-1.8x faster than the
  former ``jax.nn.softmax`` code at 256-577 tokens, and no slower for decode steps.
- Longer: ``lax.map`` over query blocks, ``lax.scan`` over key blocks. Scores exist one
  (B, H, bq, bk) block at a time, so memory is O(T + S) beside the mask, not O(T·S);
  a key block the mask rules out for the whole query block is skipped by ``lax.cond``
  (static shapes; a causal mask skips about half). Under ``vmap`` with a batched mask
  the cond becomes a select: still correct, no longer skipping. CLIP-336's 577 tokens
  are two query blocks against one key block (32 frames x 16 heads: 1.3x faster
  than the former code).

``BLOCK`` = 512, measured at 4096 causal tokens (8 x 64 heads, f32): blocks of 256
took 1.45x as long, 1024 1.03-1.09x; at 512 tokens one block beat two or four.
Lengths the block does not divide are cut into equal blocks (multiples of 8), the
last overlapping its neighbour instead of padding, so nothing (the (B, T, S) mask
above all) is copied to a padded size: overlapped query rows are computed twice and
kept once, overlapped keys are masked out of the later block. q, k and v are put
heads-first once, so each block is a plain batched matmul (blocks sliced from the
(B, T, H, E) layout took 1.7x as long at 4.6k tokens). Tried without gain: a third
cond branch without the ``where`` for all-valid blocks, keys pre-transposed to
(E, S), q and k flattened to 3-D batched matmuls (1.25x slower in the scan). For
decode steps: a block-diagonal (K·E, H) query matrix, one GEMM over the (B, S, K·E)
cache as stored, was 1.3-7.6x faster alone but 2x slower inside the decode
``while_loop``, where XLA fused the cache write into both this read and the carried
cache and so copied the cache each step; a heads-first cache did the same (1.45 ms
alone, 2x slower in the loop); multiply-reduce forms were 8x slower.

Differentiation: each block step is ``jax.checkpoint``-ed, so the backward pass
recomputes a block's scores and keeps only the running (m, l, acc) per key block,
not every (bq, bk) block (O(T·S) again).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

BLOCK = 512  # query / key block length (module doc)
_NEG = float(jnp.finfo(jnp.float32).min)  # a masked score, as transformers and the old dense code

Carry = tuple[jax.Array, jax.Array, jax.Array]  # m (B,K,G,Q), l (B,K,G,Q), acc (B,K,G,Q,E) f32


def attention(q_bthe: jax.Array, k_bske: jax.Array, v_bske: jax.Array,
              mask_bts: jax.Array | None = None, *, block: int = BLOCK) -> jax.Array:
  """Softmax attention (B, T, H, E) of queries over keys/values (B, S, K, E), K | H.

  ``mask_bts`` (B, T, S) bool, True where a query may attend a key, or None (all may).
  ``block`` overrides the measured block length (the tests use small ones).
  """
  (b, t, h, e), s, kv = q_bthe.shape, k_bske.shape[1], k_bske.shape[2]
  if h % kv or k_bske.shape != v_bske.shape or (k_bske.shape[0], k_bske.shape[3]) != (b, e):
    raise ValueError(f"queries {q_bthe.shape} need keys/values (B, S, K, E) with K dividing "
                     f"the heads, got {k_bske.shape} / {v_bske.shape}")
  if mask_bts is not None and mask_bts.shape != (b, t, s):
    raise ValueError(f"mask must be (B, T, S) = {(b, t, s)}, got {mask_bts.shape}")
  # Heads first, sequence next to the head width: every block is a batched matmul.
  q_bkgte = q_bthe.reshape(b, t, kv, h // kv, e).transpose(0, 2, 3, 1, 4)
  k_bkse = k_bske.astype(q_bthe.dtype).transpose(0, 2, 1, 3)
  v_bkse = v_bske.transpose(0, 2, 1, 3)
  bq, nq = _split(t, block)
  bk, nk = _split(s, block * block // bq)
  if nq == nk == 1:
    keep = None if mask_bts is None else mask_bts[:, None, None]
    _, l_bkgt, acc_bkgte = _step(_init(q_bkgte), q_bkgte, k_bkse, v_bkse, keep)
    out_bkgte = acc_bkgte / l_bkgt[..., None]
  else:
    out_bkgte = _blockwise(q_bkgte, k_bkse, v_bkse, mask_bts, bq, nq, bk, nk)
  return out_bkgte.transpose(0, 3, 1, 2, 4).reshape(b, t, h, e).astype(q_bthe.dtype)


def _split(n: int, target: int) -> tuple[int, int]:
  """(length, count): ceil(n / target) equal blocks covering n, their length rounded up
  to a multiple of 8 (so the last one may overlap its neighbour)."""
  count = -(-n // target)
  if count == 1:
    return n, 1
  length = -(-n // count)
  return min(-(-length // 8) * 8, n), count


def _init(q_bkgqe: jax.Array) -> Carry:
  m_bkgq = jnp.full(q_bkgqe.shape[:-1], -jnp.inf, jnp.float32)
  return m_bkgq, jnp.zeros_like(m_bkgq), jnp.zeros(q_bkgqe.shape, jnp.float32)


def _step(carry: Carry, q_bkgqe, k_bkse, v_bkse, keep_bkgqs) -> Carry:
  """Folds one key block into the running max, denominator and accumulator."""
  m_bkgq, l_bkgq, acc_bkgqe = carry
  scores = jnp.einsum("bkgqe,bkse->bkgqs", q_bkgqe, k_bkse, preferred_element_type=jnp.float32)
  scores = scores * q_bkgqe.shape[-1] ** -0.5
  if keep_bkgqs is not None:
    scores = jnp.where(keep_bkgqs, scores, _NEG)
  m_new = jnp.maximum(m_bkgq, scores.max(-1))
  p_bkgqs = jnp.exp(scores - m_new[..., None])
  rescale = jnp.exp(m_bkgq - m_new)  # 0 on the first block (m = -inf)
  pv_bkgqe = jnp.einsum("bkgqs,bkse->bkgqe", p_bkgqs.astype(v_bkse.dtype), v_bkse,
                        preferred_element_type=jnp.float32)
  return (m_new, l_bkgq * rescale + p_bkgqs.sum(-1),
          acc_bkgqe * rescale[..., None] + pv_bkgqe)


def _blockwise(q_bkgte, k_bkse, v_bkse, mask_bts, bq, nq, bk, nk):
  """``lax.map`` over query blocks of a ``lax.scan`` over key blocks (module doc)."""
  t, s = q_bkgte.shape[3], k_bkse.shape[2]
  offsets_s = jnp.arange(bk)
  mean_bkge = v_bkse.astype(jnp.float32).mean(axis=2)

  def query_block(i):
    q0 = jnp.minimum(i * bq, t - bq)
    q_bkgqe = lax.dynamic_slice_in_dim(q_bkgte, q0, bq, axis=3)
    mask_bqs = None if mask_bts is None else lax.dynamic_slice_in_dim(mask_bts, q0, bq, axis=1)

    @jax.checkpoint
    def step(carry, k0, keep_bkgqs):
      return _step(carry, q_bkgqe, lax.dynamic_slice_in_dim(k_bkse, k0, bk, axis=2),
                   lax.dynamic_slice_in_dim(v_bkse, k0, bk, axis=2), keep_bkgqs)

    def key_block(carry, j):
      k0 = jnp.minimum(j * bk, s - bk)
      keep_s = k0 + offsets_s >= j * bk  # False on keys the previous block already had
      if mask_bqs is None:
        return step(carry, k0, keep_s), None
      keep_bqs = lax.dynamic_slice_in_dim(mask_bqs, k0, bk, axis=2) & keep_s
      return lax.cond(keep_bqs.any(), step, lambda carry, *_: carry,
                      carry, k0, keep_bqs[:, None, None]), None

    m_bkgq, l_bkgq, acc_bkgqe = lax.scan(key_block, _init(q_bkgqe), jnp.arange(nk))[0]
    out_bkgqe = acc_bkgqe / l_bkgq[..., None]
    if mask_bts is None:
      return out_bkgqe
    # A row with no key left: skipped blocks and overlaps made its sums partial, so
    # give it what one dense softmax over all-masked scores gives, the mean of v.
    return jnp.where((m_bkgq > _NEG)[..., None], out_bkgqe, mean_bkge[:, :, None, None])

  out_nbkgqe = lax.map(query_block, jnp.arange(nq))
  # The first nq - 1 blocks' rows, then the rows of the last block past them.
  b, kv, g, e = out_nbkgqe.shape[1:4] + out_nbkgqe.shape[-1:]
  head = out_nbkgqe[:-1].transpose(1, 2, 3, 0, 4, 5).reshape(b, kv, g, (nq - 1) * bq, e)
  tail = out_nbkgqe[-1][:, :, :, (nq - 1) * bq - (t - bq):]
  return jnp.concatenate([head, tail], axis=3)
