"""Softmax attention for every tower: the ViT encoders and the grouped-query LLM.

``attention(q_blna, k_bska, v_bska, mask, implementation=)`` (suffixes: docs/architecture.md's table
of shape letters): ``n`` query heads share ``k`` key/value heads in groups of ``r = n // k``
(``k == n`` for the ViTs); ``mask`` (True = may attend) is a ``Mask`` (what the towers
build: key validity, causality, segments) or a dense (B, L, S) boolean array; the
blockwise path cuts the ``l`` queries into ``j`` blocks of ``q``. The result is that of
the dense ``softmax(where(mask, q·k / sqrt(a), finfo.min)) · v`` with f32 scores, softmax
and accumulation, in the queries' dtype: in particular a fully masked row is uniform over
all keys (the mean of ``v``), as transformers gives padded rows.

Implementations (``implementation=``; on a model ``set_attention``, ``layers.set_attention``):

- ``"xla"`` (default): the code below, on any platform, and the reference the others
  are tested against (it is itself tested against float64 NumPy).
- ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN's fused
  flash attention, on an NVIDIA GPU, float16 / bfloat16 only (cuDNN has no float32
  kernel; a float32 input is a ValueError, not a silent cast). The mask goes in dense, as
  ``mask`` (B, 1, L, S), which JAX hands cuDNN as an additive bias: any mask works, a KV
  cache's included. A ``Mask`` that is causal from slot 0 with L == S (training, the text
  towers) also sets ``is_causal``, so cuDNN skips the blocks above the diagonal. Not the
  sequence-length form (``key_value_seq_lengths``): it expresses right padding only, and
  prompts are left-padded.
- ``"pallas"``: splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``) on
  TPU; ``"pallas_interpret"``: the same kernel in Pallas' interpret mode on any platform
  (slow; what the CPU tests run). Splash takes a static per-head mask and per-row segment
  ids, so the mask must be a ``Mask`` (a traced (B, L, S) array cannot be taken apart
  into those under jit: hence the towers build ``Mask``es). Causality becomes splash's
  ``CausalMask`` (else ``FullMask``), padding and segments its segment ids (a key's id is
  its segment, 0 without segments, and int32 min where it is not valid, which no query id
  matches). L
  and S are padded to multiples of 128 (the kernel's lane width): padded keys are not
  valid, padded query rows are dropped. A dense boolean mask, or a causal ``Mask`` whose
  first query slot is traced (a KV cache's write index), is a ValueError: splash fixes
  its mask when the kernel is built. (Splash also takes a dense mask as an array, but in
  JAX 0.10.2 building that kernel under jit fails, its ``is_dynamic_mask`` flag becoming a
  tracer, and it would keep the whole mask once per head.) The LLM's cache steps run
  "xla" under "pallas" (``llm.Attention``). Not done: the kernel is not wrapped in
  ``shard_map``, and XLA cannot partition a Mosaic kernel, so "pallas" is refused on a
  mesh of more than one device (``check_attention``: by ``TrainConfig`` for the mesh's
  fixed axes, and when traced under ``jax.set_mesh``, as the train steps are), not left
  to fail when the step compiles. "pallas_interpret" lowers to plain XLA ops and is not.
- Rows with no key to attend: cuDNN's bias leaves them a softmax over biased scores and
  splash one over the key blocks it visits; both are replaced by the mean of ``v`` (rows
  found by ``mask.any(-1)``), so every implementation gives this module's result.
- An implementation whose platform is absent (cudnn off an NVIDIA GPU, pallas off a TPU)
  is a RuntimeError naming it and the platform found. JAX calls ROCm GPUs "gpu" too, and
  they have no cuDNN: CUDA is told by the backend's ``platform_version``, as JAX's own
  cuDNN attention tells it. Neither kernel has run compiled on its hardware in this
  repository's sessions (no GPU or TPU was lent); the tests that would run them there are
  skipped elsewhere, saying why.

The XLA path is one formulation, FlashAttention's online softmax: per key block, scores
``s``, the running row max ``m``, the denominator ``l = Σ exp(s - m)`` and the f32
accumulator ``Σ exp(s - m) · v``, each rescaled by ``exp(m_old - m_new)``; one division at
the end.

- Queries and keys both up to ``BLOCK`` long are one block, no loop: the text
  encoders, short prompts, and decode steps (a score block holds at most ``BLOCK²``
  entries per head, so L = 1 takes any cache in one key block; cutting an 18k-slot
  cache into 512-key blocks made a decode step 1.6-2.9x slower). Dividing the (L, A)
  output once, not the (L, S) probabilities, made this 1.7-1.8x faster than the
  former ``jax.nn.softmax`` code at 256-577 tokens, and no slower for decode steps.
- Longer: ``lax.map`` over query blocks, ``lax.scan`` over key blocks. Scores exist one
  (B, N, bq, bk) block at a time, so memory is O(L + S) beside the mask, not O(L·S);
  a key block the mask rules out for the whole query block is skipped by ``lax.cond``
  (static shapes; a causal mask skips about half). Under ``vmap`` with a batched mask
  the cond becomes a select: still correct, no longer skipping. CLIP-336's 577 tokens
  are two query blocks against one key block (32 frames x 16 heads: 1.3x faster
  than the former code).

``BLOCK`` = 512, measured at 4096 causal tokens (8 x 64 heads, f32): blocks of 256
took 1.45x as long, 1024 1.03-1.09x; at 512 tokens one block beat two or four.
Lengths the block does not divide are cut into equal blocks (multiples of 8), the
last overlapping its neighbour instead of padding, so nothing (the (B, L, S) mask
above all) is copied to a padded size: overlapped query rows are computed twice and
kept once, overlapped keys are masked out of the later block. q, k and v are put
heads-first once, so each block is a plain batched matmul (blocks sliced from the
(B, L, N, A) layout took 1.7x as long at 4.6k tokens). Tried without gain: a third
cond branch without the ``where`` for all-valid blocks, keys pre-transposed to
(A, S), q and k flattened to 3-D batched matmuls (1.25x slower in the scan). For
decode steps: a block-diagonal (K·A, N) query matrix, one GEMM over the (B, S, K·A)
cache as stored, was 1.3-7.6x faster alone but 2x slower inside the decode
``while_loop``, where XLA fused the cache write into both this read and the carried
cache and so copied the cache each step; a heads-first cache did the same (1.45 ms
alone, 2x slower in the loop); multiply-reduce forms were 8x slower.

Differentiation: the blockwise path has FlashAttention-2's backward as a custom VJP
(``_flash_bwd``): the forward saves only the output and each row's log-sum-exp, and the
backward recomputes each block's probabilities from them, so gradient memory is
O(L + S) like the forward. Measured at 4096 causal tokens (8 x 64 heads, f32, this
2-core CPU): 79 MiB of temporaries and 1.8-3.3 s, against 1431 MiB and 7.3-9.9 s for
autodiff through ``jax.checkpoint``-ed key-block steps, whose carried (m, l, acc) per
key block still grew 7x per doubling of the length (and 39.8 GiB for a 4 x 512 LLM at
8k tokens with the checkpoint inside the block-skipping cond). The backward's score
blocks are keys-first, (B, K, bk, R, Q), and dQ is accumulated transposed, (B, K, A, R,
L): every matmul then contracts axes XLA:CPU's GEMMs take as they lie, where the
queries-first blocks had two (bk, Q) score-sized blocks copied transposed per block pair
(the largest ops of the backward). At 2 x 1024 causal tokens (8 x 64 heads) that took the
gradient from 330-380 to 240-280 ms of CPU time, bit-identical. The one-block path (up to
512 x 512) is differentiated by autodiff.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

BLOCK = 512  # query / key block length (module doc)
_NEG = float(jnp.finfo(jnp.float32).min)  # a masked score, as transformers and the old dense code
IMPLEMENTATIONS = ("xla", "cudnn", "pallas", "pallas_interpret")  # module doc
PALLAS = ("pallas", "pallas_interpret")
_PLATFORMS = {"cudnn": ("cuda", "an NVIDIA GPU (CUDA, for cuDNN)"), "pallas": ("tpu", "a TPU")}
_LANES = 128  # splash pads L and S to multiples of this
_NO_SEGMENT = int(jnp.iinfo(jnp.int32).min)  # splash's segment id of keys that are not valid

Carry = tuple[jax.Array, jax.Array, jax.Array]  # m (B,K,R,Q), l (B,K,R,Q), acc (B,K,R,Q,A) f32


@struct.dataclass
class Mask:
  """Which keys each query may attend, by structure (what the kernels take; module doc).

  Query ``l`` of row ``b`` may attend key slot ``s`` when ``valid_bs[b, s]`` (the slot holds
  a real token: not padding, not an unwritten cache slot), and, if ``causal``,
  ``s <= q_start + l`` (query ``l`` sits at slot ``q_start + l``: a KV cache's write
  index, None for 0), and, with segments, ``q_segment_bl[b, l] == kv_segment_bs[b, s]``
  (packed sequences: give both or neither).
  """

  valid_bs: jax.Array
  q_segment_bl: jax.Array | None = None
  kv_segment_bs: jax.Array | None = None
  q_start: jax.Array | None = None
  causal: bool = struct.field(pytree_node=False, default=False)

  def dense(self, l: int) -> jax.Array:
    """The (B, L, S) boolean mask for ``l`` queries."""
    valid_bs = jnp.asarray(self.valid_bs, bool)
    b, s = valid_bs.shape
    keep_bls = jnp.broadcast_to(valid_bs[:, None, :], (b, l, s))
    if self.causal:
      q_slot_l = jnp.arange(l) + (0 if self.q_start is None else self.q_start)
      keep_bls = keep_bls & (jnp.arange(s)[None, None, :] <= q_slot_l[None, :, None])
    if self.q_segment_bl is not None:  # kv_segment_bs too: both or neither (class doc)
      keep_bls = keep_bls & (self.q_segment_bl[:, :, None] == self.kv_segment_bs[:, None, :])  # type: ignore[index]
    return keep_bls


def check_implementation(implementation: str) -> str:
  """``implementation`` if it is one of ``IMPLEMENTATIONS``, else a ValueError."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
  return implementation


def check_attention(implementation: str, devices: int) -> str:
  """``implementation`` if it can run on a mesh of ``devices`` devices, else a ValueError:
  "pallas" needs one, its kernel not being wrapped in ``shard_map`` (module doc), which
  Mosaic would otherwise report only when the step is lowered, the model long built."""
  check_implementation(implementation)
  if implementation == "pallas" and devices > 1:
    raise ValueError(
      f"attention implementation 'pallas' (splash attention) runs on one device: "
      f"the kernel is not wrapped in shard_map, and XLA cannot partition a Mosaic "
      f"kernel over {devices} devices; use 'xla', or a 1-device mesh"
    )
  return implementation


def attention(
  q_blna: jax.Array,
  k_bska: jax.Array,
  v_bska: jax.Array,
  mask: Mask | jax.Array | None = None,
  *,
  implementation: str = "xla",
  block: int = BLOCK,
) -> jax.Array:
  """Softmax attention (B, L, N, A) of queries over keys/values (B, S, K, A), K | N.

  ``mask``: a ``Mask``, a (B, L, S) bool array (True where a query may attend a key), or
  None (all may). ``implementation``: one of ``IMPLEMENTATIONS`` (module doc). ``block``
  overrides the XLA path's measured block length (the tests use small ones).
  """
  (b, l, n, a), s, kv = q_blna.shape, k_bska.shape[1], k_bska.shape[2]
  if n % kv or k_bska.shape != v_bska.shape or (k_bska.shape[0], k_bska.shape[3]) != (b, a):
    raise ValueError(
      f"queries {q_blna.shape} need keys/values (B, S, K, A) with K dividing "
      f"the heads, got {k_bska.shape} / {v_bska.shape}"
    )
  _check_mask(mask, b, l, s)
  check_attention(implementation, _partitioned_devices())
  if implementation == "xla":
    return _xla(q_blna, k_bska, v_bska, _dense(mask, l), block)
  _check_platform(implementation)
  if implementation == "cudnn":
    if q_blna.dtype not in (jnp.float16, jnp.bfloat16):
      raise ValueError(
        f"attention implementation 'cudnn': cuDNN's flash attention takes "
        f"float16 / bfloat16, got {q_blna.dtype} (compute in bfloat16, or use "
        "'xla')"
      )
    return _dot_product(q_blna, k_bska, v_bska, mask, "cudnn")
  return _splash(q_blna, k_bska, v_bska, mask, interpret=implementation == "pallas_interpret")


def _check_mask(mask, b: int, l: int, s: int) -> None:
  if isinstance(mask, Mask):
    want = {"valid_bs": (b, s), "q_segment_bl": (b, l), "kv_segment_bs": (b, s)}
    got = {name: getattr(mask, name) for name in want}
    bad = any(x is not None and x.shape != want[name] for name, x in got.items())
    if bad or (got["q_segment_bl"] is None) != (got["kv_segment_bs"] is None):
      raise ValueError(
        f"Mask for B, L, S = {(b, l, s)} needs valid_bs {want['valid_bs']} and "
        f"both or neither of q_segment_bl {want['q_segment_bl']} / "
        f"kv_segment_bs {want['kv_segment_bs']}; got "
        + ", ".join(f"{k} {None if x is None else x.shape}" for k, x in got.items())
      )
  elif mask is not None and mask.shape != (b, l, s):
    raise ValueError(f"mask must be (B, L, S) = {(b, l, s)}, got {mask.shape}")


def _dense(mask: Mask | jax.Array | None, l: int) -> jax.Array | None:
  return mask.dense(l) if isinstance(mask, Mask) else mask


def _partitioned_devices() -> int:
  """The devices XLA partitions this trace over: those of the mesh set by ``jax.set_mesh``
  (as the train steps trace) but its manual axes (inside ``shard_map``); 1 without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  manual = set(mesh.manual_axes)
  return math.prod(n for axis, n in zip(mesh.axis_names, mesh.axis_sizes) if axis not in manual)


def _platform() -> str:
  """JAX's default platform, its "gpu" told apart as "cuda" or "rocm" (only CUDA has
  cuDNN) by the backend's ``platform_version``, as JAX's cuDNN attention does; "gpu"
  where that names neither."""
  found = jax.default_backend()
  if found != "gpu":
    return found
  from jax.extend import backend

  version = backend.get_backend().platform_version.lower()
  return next((name for name in ("cuda", "rocm") if name in version), found)


def _check_platform(implementation: str) -> None:
  if implementation == "pallas_interpret":
    return
  platform, what = _PLATFORMS[implementation]
  found = _platform()
  if found != platform:
    hint = {
      "tpu": " ('pallas_interpret' runs the kernel interpreted anywhere)",
      "cuda": " (cuDNN is NVIDIA's: on ROCm or other GPUs use 'xla')",
    }[platform]
    raise RuntimeError(
      f"attention implementation {implementation!r} needs {what}; JAX's "
      f"platform here is {found!r}{hint}"
    )


def _xla(q_blna, k_bska, v_bska, mask_bls, block):
  """The blockwise online softmax (module doc)."""
  (b, l, n, a), s, kv = q_blna.shape, k_bska.shape[1], k_bska.shape[2]
  # Heads first, sequence next to the head width: every block is a batched matmul.
  q_bkrla = q_blna.reshape(b, l, kv, n // kv, a).transpose(0, 2, 3, 1, 4)
  k_bksa = k_bska.astype(q_blna.dtype).transpose(0, 2, 1, 3)
  v_bksa = v_bska.transpose(0, 2, 1, 3)
  bq, nq = _split(l, block)
  bk, nk = _split(s, block * block // bq)
  if nq == nk == 1:
    keep = None if mask_bls is None else mask_bls[:, None, None]
    _, l_bkrl, acc_bkrla = _step(_init(q_bkrla), q_bkrla, k_bksa, v_bksa, keep)
    out_bkrla = acc_bkrla / l_bkrl[..., None]
  else:
    out_bkrla = _blockwise(q_bkrla, k_bksa, v_bksa, mask_bls, bq, nq, bk, nk)
  return out_bkrla.transpose(0, 3, 1, 2, 4).reshape(b, l, n, a).astype(q_blna.dtype)


def _split(n: int, target: int) -> tuple[int, int]:
  """(length, count): ceil(n / target) equal blocks covering n, their length rounded up
  to a multiple of 8 (so the last one may overlap its neighbour)."""
  count = -(-n // target)
  if count == 1:
    return n, 1
  length = -(-n // count)
  return min(-(-length // 8) * 8, n), count


def _init(q_bkrqa: jax.Array) -> Carry:
  m_bkrq = jnp.full(q_bkrqa.shape[:-1], -jnp.inf, jnp.float32)
  return m_bkrq, jnp.zeros_like(m_bkrq), jnp.zeros(q_bkrqa.shape, jnp.float32)


def _step(carry: Carry, q_bkrqa, k_bksa, v_bksa, keep_bkrqs) -> Carry:
  """Folds one key block into the running max, denominator and accumulator."""
  m_bkrq, l_bkrq, acc_bkrqa = carry
  scores = jnp.einsum("bkrqa,bksa->bkrqs", q_bkrqa, k_bksa, preferred_element_type=jnp.float32)
  scores = scores * q_bkrqa.shape[-1] ** -0.5
  if keep_bkrqs is not None:
    scores = jnp.where(keep_bkrqs, scores, _NEG)
  m_new = jnp.maximum(m_bkrq, scores.max(-1))
  p_bkrqs = jnp.exp(scores - m_new[..., None])
  rescale = jnp.exp(m_bkrq - m_new)  # 0 on the first block (m = -inf)
  pv_bkrqa = jnp.einsum(
    "bkrqs,bksa->bkrqa", p_bkrqs.astype(v_bksa.dtype), v_bksa, preferred_element_type=jnp.float32
  )
  return (m_new, l_bkrq * rescale + p_bkrqs.sum(-1), acc_bkrqa * rescale[..., None] + pv_bkrqa)


def _blockwise(q_bkrla, k_bksa, v_bksa, mask_bls, bq, nq, bk, nk):
  """``lax.map`` over query blocks of a ``lax.scan`` over key blocks (module doc)."""
  return _flash(q_bkrla, k_bksa, v_bksa, mask_bls, (bq, nq, bk, nk))


def _key_keep(mask_bqs, k0, j, bk, keys_first=False):
  """Which keys of the block at ``k0`` count: not those the previous block already had,
  and (with a mask) only those the (B, Q, S) mask rows allow. Shapes (bk,) / (B,1,1,Q,bk),
  or with ``keys_first`` (bk,1,1) / (B,1,bk,1,Q), as the backward's score blocks."""
  keep_s = k0 + jnp.arange(bk) >= j * bk
  if mask_bqs is None:
    return keep_s[:, None, None] if keys_first else keep_s
  keep_bqs = lax.dynamic_slice_in_dim(mask_bqs, k0, bk, axis=2) & keep_s
  return keep_bqs.swapaxes(1, 2)[:, None, :, None] if keys_first else keep_bqs[:, None, None]


def _forward(q_bkrla, k_bksa, v_bksa, mask_bls, blocks):
  """(out (B, K, R, L, A) f32, log-sum-exp (B, K, R, L); +inf on rows with no key)."""
  bq, nq, bk, nk = blocks
  l, s = q_bkrla.shape[3], k_bksa.shape[2]
  mean_bka = v_bksa.astype(jnp.float32).mean(axis=2)

  def query_block(i):
    q0 = jnp.minimum(i * bq, l - bq)
    q_bkrqa = lax.dynamic_slice_in_dim(q_bkrla, q0, bq, axis=3)
    mask_bqs = None if mask_bls is None else lax.dynamic_slice_in_dim(mask_bls, q0, bq, axis=1)

    def step(carry, k0, keep):
      return _step(
        carry,
        q_bkrqa,
        lax.dynamic_slice_in_dim(k_bksa, k0, bk, axis=2),
        lax.dynamic_slice_in_dim(v_bksa, k0, bk, axis=2),
        keep,
      )

    def key_block(carry, j):
      k0 = jnp.minimum(j * bk, s - bk)
      keep = _key_keep(mask_bqs, k0, j, bk)
      if mask_bqs is None:
        return step(carry, k0, keep), None
      return lax.cond(keep.any(), step, lambda carry, *_: carry, carry, k0, keep), None

    m_bkrq, l_bkrq, acc_bkrqa = lax.scan(key_block, _init(q_bkrqa), jnp.arange(nk))[0]
    valid_bkrq = m_bkrq > _NEG
    # A row with no key left: skipped blocks and overlaps made its sums partial, so
    # give it what one dense softmax over all-masked scores gives, the mean of v.
    out_bkrqa = jnp.where(
      valid_bkrq[..., None], acc_bkrqa / l_bkrq[..., None], mean_bka[:, :, None, None]
    )
    return out_bkrqa, jnp.where(valid_bkrq, m_bkrq + jnp.log(l_bkrq), jnp.inf)

  return tuple(_assemble(x, l, bq) for x in lax.map(query_block, jnp.arange(nq)))


def _assemble(x_jbkrq, l, bq):
  """Per-query-block results (J, B, K, R, Q, ...) -> (B, K, R, L, ...): the first J - 1
  blocks' rows, then the rows of the last block past them."""
  nq = x_jbkrq.shape[0]
  head = jnp.moveaxis(x_jbkrq[:-1], 0, 3)
  head = head.reshape(*head.shape[:3], (nq - 1) * bq, *head.shape[5:])
  tail = x_jbkrq[-1][:, :, :, (nq - 1) * bq - (l - bq) :]
  return jnp.concatenate([head, tail], axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q_bkrla, k_bksa, v_bksa, mask_bls, blocks):
  return _forward(q_bkrla, k_bksa, v_bksa, mask_bls, blocks)[0]


def _flash_fwd(q_bkrla, k_bksa, v_bksa, mask_bls, blocks):
  out_bkrla, lse_bkrl = _forward(q_bkrla, k_bksa, v_bksa, mask_bls, blocks)
  return out_bkrla, (q_bkrla, k_bksa, v_bksa, mask_bls, out_bkrla, lse_bkrl)


def _flash_bwd(blocks, residuals, dout_bkrla):
  """FlashAttention-2's backward: per (query block, key block) the probabilities are
  recomputed from the saved log-sum-exp, ``dS = P * (dO·Vᵀ - rowsum(dO * O))``, and
  dQ += dS·K, dK += dSᵀ·Q, dV += Pᵀ·dO, on keys-first blocks (module doc). A scan over
  key blocks carries the whole dQ, an inner scan over query blocks that key block's dK
  and dV: memory O(L + S), no stored scores. Rows with no key are the mean of v: their
  gradient goes to v alone."""
  bq, nq, bk, nk = blocks
  q_bkrla, k_bksa, v_bksa, mask_bls, out_bkrla, lse_bkrl = residuals
  (b, kv, _, l, a), s = q_bkrla.shape, k_bksa.shape[2]
  scale = a**-0.5
  valid_bkrl = jnp.isfinite(lse_bkrl)
  do_bkrla = jnp.where(valid_bkrl[..., None], dout_bkrla.astype(jnp.float32), 0.0)
  delta_bkrl = jnp.sum(do_bkrla * out_bkrla, axis=-1)
  dtype = q_bkrla.dtype
  k_bkas = k_bksa.swapaxes(2, 3)  # dQ^T's left operand, contracting its minor axis

  def query_step(carry, i, k0, j):
    q0 = jnp.minimum(i * bq, l - bq)
    owned_q = q0 + jnp.arange(bq) >= i * bq  # rows the previous query block already had
    q_bkrqa = lax.dynamic_slice_in_dim(q_bkrla, q0, bq, axis=3)
    do_bkrqa = jnp.where(owned_q[:, None], lax.dynamic_slice_in_dim(do_bkrla, q0, bq, axis=3), 0)
    lse_bkrq = lax.dynamic_slice_in_dim(lse_bkrl, q0, bq, axis=3)
    delta_bkrq = jnp.where(owned_q, lax.dynamic_slice_in_dim(delta_bkrl, q0, bq, axis=3), 0)
    mask_bqs = None if mask_bls is None else lax.dynamic_slice_in_dim(mask_bls, q0, bq, axis=1)
    keep = _key_keep(mask_bqs, k0, j, bk, keys_first=True)
    k_block_bksa = lax.dynamic_slice_in_dim(k_bksa, k0, bk, axis=2)
    v_block_bksa = lax.dynamic_slice_in_dim(v_bksa, k0, bk, axis=2)
    k_block_bkas = lax.dynamic_slice_in_dim(k_bkas, k0, bk, axis=3)
    f32 = jnp.float32

    def step(carry):
      # Keys-first score blocks (module doc): dK, dV contract their minor (R, Q) axes and
      # dQᵀ = Kᵀ·dS is a plain matmul, so no (bk, R·Q) block is ever transposed.
      dk_bksa, dv_bksa, dq_bkarl = carry
      scores_bksrq = (
        jnp.einsum("bksa,bkrqa->bksrq", k_block_bksa, q_bkrqa, preferred_element_type=f32) * scale
      )
      p_bksrq = jnp.exp(jnp.where(keep, scores_bksrq, _NEG) - lse_bkrq[:, :, None])
      dp_bksrq = jnp.einsum(
        "bksa,bkrqa->bksrq", v_block_bksa, do_bkrqa.astype(dtype), preferred_element_type=f32
      )
      ds_bksrq = (p_bksrq * (dp_bksrq - delta_bkrq[:, :, None]) * scale).astype(dtype)
      dv_bksa = dv_bksa + jnp.einsum(
        "bksrq,bkrqa->bksa",
        p_bksrq.astype(dtype),
        do_bkrqa.astype(dtype),
        preferred_element_type=f32,
      )
      dk_bksa = dk_bksa + jnp.einsum(
        "bksrq,bkrqa->bksa", ds_bksrq, q_bkrqa, preferred_element_type=f32
      )
      dq_bkarq = jnp.einsum("bkas,bksrq->bkarq", k_block_bkas, ds_bksrq, preferred_element_type=f32)
      return dk_bksa, dv_bksa, _add_at(dq_bkarl, dq_bkarq, q0, axis=4)

    if mask_bqs is None:
      return step(carry), None
    return lax.cond(keep.any(), step, lambda carry: carry, carry), None

  def key_block(carry, j):
    dk_full, dv_full, dq_bkarl = carry
    k0 = jnp.minimum(j * bk, s - bk)
    zeros = jnp.zeros((b, kv, bk, a), jnp.float32)
    (dk_bksa, dv_bksa, dq_bkarl), _ = lax.scan(
      lambda c, i: query_step(c, i, k0, j), (zeros, zeros, dq_bkarl), jnp.arange(nq)
    )
    return (
      _add_at(dk_full, dk_bksa, k0, axis=2),
      _add_at(dv_full, dv_bksa, k0, axis=2),
      dq_bkarl,
    ), None

  kv_zeros = jnp.zeros((b, kv, s, a), jnp.float32)
  dq_zeros = jnp.zeros((b, kv, a, q_bkrla.shape[2], l), jnp.float32)
  (dk_bksa, dv_bksa, dq_bkarl), _ = lax.scan(
    key_block, (kv_zeros, kv_zeros, dq_zeros), jnp.arange(nk)
  )
  dq_bkrla = dq_bkarl.transpose(0, 1, 3, 4, 2)
  # Rows with no key: out = mean over all S keys of v, so each key gets dO / S.
  masked_do_bka = jnp.sum(
    jnp.where(valid_bkrl[..., None], 0.0, dout_bkrla.astype(jnp.float32)), axis=(2, 3)
  )
  dv_bksa = dv_bksa + masked_do_bka[:, :, None] / s
  return (
    dq_bkrla.astype(q_bkrla.dtype),
    dk_bksa.astype(k_bksa.dtype),
    dv_bksa.astype(v_bksa.dtype),
    None,
  )


def _add_at(full, block, start, axis):
  """``full`` with ``block`` added at ``start`` along ``axis`` (blocks may overlap)."""
  current = lax.dynamic_slice_in_dim(full, start, block.shape[axis], axis=axis)
  return lax.dynamic_update_slice_in_dim(full, current + block, start, axis=axis)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---- cuDNN and Pallas (module doc) -----------------------------------------------------


def _uniform_rows(out_blna, v_bska, mask_bls):
  """``out_blna`` with the rows that may attend no key set to the mean of ``v`` over all
  keys, what the XLA path gives them (a kernel's own value there is its own)."""
  if mask_bls is None:
    return out_blna
  r = out_blna.shape[2] // v_bska.shape[2]
  mean_b1na = jnp.repeat(v_bska.astype(jnp.float32).mean(axis=1), r, axis=1)[:, None]
  return jnp.where(mask_bls.any(-1)[:, :, None, None], out_blna, mean_b1na.astype(out_blna.dtype))


def _dot_product(q_blna, k_bska, v_bska, mask, implementation):
  """``jax.nn.dot_product_attention`` with ``implementation`` on our masks: the dense mask
  (B, 1, L, S), and ``is_causal`` where a ``Mask`` is causal from slot 0 with L == S (where
  JAX's and cuDNN's causal alignments agree). The tests run this with JAX's "xla"
  implementation to check the mapping where no GPU is."""
  l, s = q_blna.shape[1], k_bska.shape[1]
  mask_bls = _dense(mask, l)
  causal = isinstance(mask, Mask) and mask.causal and mask.q_start is None and l == s
  out_blna = jax.nn.dot_product_attention(
    q_blna,
    k_bska.astype(q_blna.dtype),
    v_bska.astype(q_blna.dtype),
    mask=None if mask_bls is None else mask_bls[:, None],
    is_causal=causal,
    implementation=implementation,
  )
  return _uniform_rows(out_blna, v_bska, mask_bls)


def _splash(q_blna, k_bska, v_bska, mask, interpret: bool):
  """Splash attention, one kernel vmapped over the batch: the static causal / full mask,
  padding and segments as segment ids, L and S padded to the lanes (module doc)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

  (b, l, n, a), s = q_blna.shape, k_bska.shape[1]
  if mask is not None and not isinstance(mask, Mask):
    raise ValueError(
      "attention implementation 'pallas' (splash attention) takes a "
      "models.attention.Mask (validity, causality, segments), not a dense "
      "(B, L, S) boolean mask: splash's mask is static per head plus segment ids"
    )
  if mask is not None and mask.causal and mask.q_start is not None:
    raise ValueError(
      "attention implementation 'pallas' (splash attention): a causal Mask "
      "whose first query slot (q_start, a KV cache's index) is traced; splash "
      "fixes its causal offset when the kernel is built (use 'xla' or 'cudnn')"
    )
  lp, sp = -(-l // _LANES) * _LANES, -(-s // _LANES) * _LANES
  kernel = _splash_kernel(lp, sp, n, mask is not None and mask.causal, interpret)
  pad = lambda x, length: jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))
  dtype = q_blna.dtype
  q_bnla = pad((q_blna * a**-0.5).astype(dtype).transpose(0, 2, 1, 3), lp)
  k_bksa = pad(k_bska.astype(dtype).transpose(0, 2, 1, 3), sp)
  v_bksa = pad(v_bska.astype(dtype).transpose(0, 2, 1, 3), sp)
  valid_bs = jnp.ones((b, s), bool) if mask is None else jnp.asarray(mask.valid_bs, bool)
  segmented = mask is not None and mask.q_segment_bl is not None
  # segmented: mask and both segment arrays are given (Mask's doc), which mypy cannot see
  kv_ids_bs = jnp.where(valid_bs, mask.kv_segment_bs if segmented else 0, _NO_SEGMENT)  # type: ignore[union-attr,arg-type]
  q_ids_bl = mask.q_segment_bl if segmented else jnp.zeros((b, l), jnp.int32)  # type: ignore[union-attr]
  ids = SegmentIds(
    jnp.pad(q_ids_bl.astype(jnp.int32), ((0, 0), (0, lp - l))),  # type: ignore[union-attr]
    jnp.pad(kv_ids_bs.astype(jnp.int32), ((0, 0), (0, sp - s)), constant_values=_NO_SEGMENT),
  )
  out_bnla = jax.vmap(kernel)(q_bnla, k_bksa, v_bksa, ids)
  return _uniform_rows(out_bnla[:, :, :l].transpose(0, 2, 1, 3), v_bska, _dense(mask, l))


@functools.cache
def _splash_kernel(lp: int, sp: int, heads: int, causal: bool, interpret: bool):
  """The splash kernel for (lp, sp) blocks of ``heads`` heads, built once: blocks of
  512, 256 or 128 (the largest dividing each padded length; not tuned, no TPU here).
  Its mask tables are built outside any trace, so the cached kernel holds no tracer."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  bq, bk = (next(size for size in (512, 256, 128) if length % size == 0) for length in (lp, sp))
  blocks = splash.BlockSizes(
    block_q=bq,
    block_kv=bk,
    block_kv_compute=bk,
    block_q_dkv=bq,
    block_kv_dkv=bk,
    block_kv_dkv_compute=bk,
    block_q_dq=bq,
    block_kv_dq=bk,
  )
  head_mask = splash.CausalMask((lp, sp)) if causal else splash.FullMask((lp, sp))
  with jax.ensure_compile_time_eval():
    return splash.make_splash_mha(
      splash.MultiHeadMask([head_mask] * heads),
      block_sizes=blocks,
      head_shards=1,
      q_seq_shards=1,
      interpret=interpret,
    )
