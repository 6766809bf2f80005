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

Differentiation: the blockwise path has FlashAttention-2's backward as a custom VJP
(``_flash_bwd``): the forward saves only the output and each row's log-sum-exp, and the
backward recomputes each block's probabilities from them, so gradient memory is
O(T + S) like the forward. Measured at 4096 causal tokens (8 x 64 heads, f32, this
2-core CPU): 79 MiB of temporaries and 1.8-3.3 s, against 1431 MiB and 7.3-9.9 s for
autodiff through ``jax.checkpoint``-ed key-block steps, whose carried (m, l, acc) per
key block still grew 7x per doubling of the length (and 39.8 GiB for a 4 x 512 LLM at
8k tokens with the checkpoint inside the block-skipping cond). The one-block path
(up to 512 x 512) is differentiated by autodiff.
"""

from __future__ import annotations

import functools

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
  return _flash(q_bkgte, k_bkse, v_bkse, mask_bts, (bq, nq, bk, nk))


def _key_keep(mask_bqs, k0, j, bk):
  """Which keys of the block at ``k0`` count: not those the previous block already had,
  and (with a mask) only those the (B, Q, S) mask rows allow. Shapes (bk,) / (B,1,1,Q,bk)."""
  keep_s = k0 + jnp.arange(bk) >= j * bk
  if mask_bqs is None:
    return keep_s
  return (lax.dynamic_slice_in_dim(mask_bqs, k0, bk, axis=2) & keep_s)[:, None, None]


def _forward(q_bkgte, k_bkse, v_bkse, mask_bts, blocks):
  """(out (B, K, G, T, E) f32, log-sum-exp (B, K, G, T); +inf on rows with no key)."""
  bq, nq, bk, nk = blocks
  t, s = q_bkgte.shape[3], k_bkse.shape[2]
  mean_bkge = v_bkse.astype(jnp.float32).mean(axis=2)

  def query_block(i):
    q0 = jnp.minimum(i * bq, t - bq)
    q_bkgqe = lax.dynamic_slice_in_dim(q_bkgte, q0, bq, axis=3)
    mask_bqs = None if mask_bts is None else lax.dynamic_slice_in_dim(mask_bts, q0, bq, axis=1)

    def step(carry, k0, keep):
      return _step(carry, q_bkgqe, lax.dynamic_slice_in_dim(k_bkse, k0, bk, axis=2),
                   lax.dynamic_slice_in_dim(v_bkse, k0, bk, axis=2), keep)

    def key_block(carry, j):
      k0 = jnp.minimum(j * bk, s - bk)
      keep = _key_keep(mask_bqs, k0, j, bk)
      if mask_bqs is None:
        return step(carry, k0, keep), None
      return lax.cond(keep.any(), step, lambda carry, *_: carry, carry, k0, keep), None

    m_bkgq, l_bkgq, acc_bkgqe = lax.scan(key_block, _init(q_bkgqe), jnp.arange(nk))[0]
    valid_bkgq = m_bkgq > _NEG
    # A row with no key left: skipped blocks and overlaps made its sums partial, so
    # give it what one dense softmax over all-masked scores gives, the mean of v.
    out_bkgqe = jnp.where(valid_bkgq[..., None], acc_bkgqe / l_bkgq[..., None],
                          mean_bkge[:, :, None, None])
    return out_bkgqe, jnp.where(valid_bkgq, m_bkgq + jnp.log(l_bkgq), jnp.inf)

  return tuple(_assemble(x, t, bq) for x in lax.map(query_block, jnp.arange(nq)))


def _assemble(x_nbkgq, t, bq):
  """Per-query-block results (N, B, K, G, Q, ...) -> (B, K, G, T, ...): the first N - 1
  blocks' rows, then the rows of the last block past them."""
  nq = x_nbkgq.shape[0]
  head = jnp.moveaxis(x_nbkgq[:-1], 0, 3)
  head = head.reshape(*head.shape[:3], (nq - 1) * bq, *head.shape[5:])
  tail = x_nbkgq[-1][:, :, :, (nq - 1) * bq - (t - bq):]
  return jnp.concatenate([head, tail], axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q_bkgte, k_bkse, v_bkse, mask_bts, blocks):
  return _forward(q_bkgte, k_bkse, v_bkse, mask_bts, blocks)[0]


def _flash_fwd(q_bkgte, k_bkse, v_bkse, mask_bts, blocks):
  out_bkgte, lse_bkgt = _forward(q_bkgte, k_bkse, v_bkse, mask_bts, blocks)
  return out_bkgte, (q_bkgte, k_bkse, v_bkse, mask_bts, out_bkgte, lse_bkgt)


def _flash_bwd(blocks, residuals, dout_bkgte):
  """FlashAttention-2's backward: per (query block, key block) the probabilities are
  recomputed from the saved log-sum-exp, ``dS = P * (dO·Vᵀ - rowsum(dO * O))``, and
  dQ += dS·K, dK += dSᵀ·Q, dV += Pᵀ·dO. A scan over key blocks carries the whole dQ,
  an inner scan over query blocks that key block's dK and dV: memory O(T + S), no
  stored scores. Rows with no key are the mean of v: their gradient goes to v alone."""
  bq, nq, bk, nk = blocks
  q_bkgte, k_bkse, v_bkse, mask_bts, out_bkgte, lse_bkgt = residuals
  (b, kv, g, t, e), s = q_bkgte.shape, k_bkse.shape[2]
  scale = e**-0.5
  valid_bkgt = jnp.isfinite(lse_bkgt)
  do_bkgte = jnp.where(valid_bkgt[..., None], dout_bkgte.astype(jnp.float32), 0.0)
  delta_bkgt = jnp.sum(do_bkgte * out_bkgte, axis=-1)
  dtype = q_bkgte.dtype

  def query_step(carry, i, k0, j):
    dk_bkse, dv_bkse, dq_bkgte = carry
    q0 = jnp.minimum(i * bq, t - bq)
    owned_q = q0 + jnp.arange(bq) >= i * bq  # rows the previous query block already had
    q_bkgqe = lax.dynamic_slice_in_dim(q_bkgte, q0, bq, axis=3)
    do_bkgqe = jnp.where(owned_q[:, None], lax.dynamic_slice_in_dim(do_bkgte, q0, bq, axis=3), 0)
    lse_bkgq = lax.dynamic_slice_in_dim(lse_bkgt, q0, bq, axis=3)
    delta_bkgq = jnp.where(owned_q, lax.dynamic_slice_in_dim(delta_bkgt, q0, bq, axis=3), 0)
    mask_bqs = None if mask_bts is None else lax.dynamic_slice_in_dim(mask_bts, q0, bq, axis=1)
    keep = _key_keep(mask_bqs, k0, j, bk)
    k_blk = lax.dynamic_slice_in_dim(k_bkse, k0, bk, axis=2)
    v_blk = lax.dynamic_slice_in_dim(v_bkse, k0, bk, axis=2)

    def step(carry):
      dk_bkse, dv_bkse, dq_bkgte = carry
      scores = jnp.einsum("bkgqe,bkse->bkgqs", q_bkgqe, k_blk,
                          preferred_element_type=jnp.float32) * scale
      p_bkgqs = jnp.exp(jnp.where(keep, scores, _NEG) - lse_bkgq[..., None])
      dp_bkgqs = jnp.einsum("bkgqe,bkse->bkgqs", do_bkgqe.astype(dtype), v_blk,
                            preferred_element_type=jnp.float32)
      ds_bkgqs = (p_bkgqs * (dp_bkgqs - delta_bkgq[..., None]) * scale).astype(dtype)
      dv_bkse = dv_bkse + jnp.einsum("bkgqs,bkgqe->bkse", p_bkgqs.astype(dtype),
                                     do_bkgqe.astype(dtype), preferred_element_type=jnp.float32)
      dk_bkse = dk_bkse + jnp.einsum("bkgqs,bkgqe->bkse", ds_bkgqs, q_bkgqe,
                                     preferred_element_type=jnp.float32)
      dq_bkgqe = jnp.einsum("bkgqs,bkse->bkgqe", ds_bkgqs, k_blk,
                            preferred_element_type=jnp.float32)
      return dk_bkse, dv_bkse, _add_at(dq_bkgte, dq_bkgqe, q0, axis=3)

    if mask_bqs is None:
      return step(carry), None
    return lax.cond(keep.any(), step, lambda carry: carry, carry), None

  def key_block(carry, j):
    dk_full, dv_full, dq_bkgte = carry
    k0 = jnp.minimum(j * bk, s - bk)
    zeros = jnp.zeros((b, kv, bk, e), jnp.float32)
    (dk_bkse, dv_bkse, dq_bkgte), _ = lax.scan(
        lambda c, i: query_step(c, i, k0, j), (zeros, zeros, dq_bkgte), jnp.arange(nq))
    return (_add_at(dk_full, dk_bkse, k0, axis=2), _add_at(dv_full, dv_bkse, k0, axis=2),
            dq_bkgte), None

  kv_zeros = jnp.zeros((b, kv, s, e), jnp.float32)
  (dk_bkse, dv_bkse, dq_bkgte), _ = lax.scan(
      key_block, (kv_zeros, kv_zeros, jnp.zeros(q_bkgte.shape, jnp.float32)), jnp.arange(nk))
  # Rows with no key: out = mean over all S keys of v, so each key gets dO / S.
  masked_do_bke = jnp.sum(jnp.where(valid_bkgt[..., None], 0.0,
                                    dout_bkgte.astype(jnp.float32)), axis=(2, 3))
  dv_bkse = dv_bkse + masked_do_bke[:, :, None] / s
  return (dq_bkgte.astype(q_bkgte.dtype), dk_bkse.astype(k_bkse.dtype),
          dv_bkse.astype(v_bkse.dtype), None)


def _add_at(full, block, start, axis):
  """``full`` with ``block`` added at ``start`` along ``axis`` (blocks may overlap)."""
  current = lax.dynamic_slice_in_dim(full, start, block.shape[axis], axis=axis)
  return lax.dynamic_update_slice_in_dim(full, current + block, start, axis=axis)


_flash.defvjp(_flash_fwd, _flash_bwd)
