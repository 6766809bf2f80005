"""Losses as pure functions of the LLM's final hidden states, never of full logits.

The (B, L, vocab) float32 logits of a 7B LLM at 8k tokens are 1 GiB a row (trl
#1189: DPO out of memory on exactly these), so every loss here goes through
``token_logprobs``: the log-probability of each target token, computed over chunks of
``chunk`` positions whose logits exist one chunk at a time and are recomputed in the
backward pass (``jax.checkpoint``), not stored. ``cross_entropy``, a scalar, instead takes
its gradients in the forward pass while each chunk's logits exist (a custom VJP): three
(Q, D) x (D, V) matmuls a chunk, as PyTorch's, instead of four; at 2 x 1024 tokens and a
32k vocabulary its gradient took 22% less CPU time. Chunks of 256 positions rather than
1024: the (B, Q, vocab) logits and their gradient then stay near the cache, and the loss's
gradient alone at 2 x 1024 tokens took 1.26 s instead of 2.15 s (512: 1.33, 128: 1.29),
and the whole train step of ``benchmarks/train_step.py`` 3.50 s instead of 3.60 s.

Targets follow transformers' convention: ``labels_bl`` align with the input ids,
position ``i`` predicts ``labels[i + 1]``, and ``IGNORE`` (-100) marks what is not
supervised (prompt, media placeholders, padding).

Losses return ``(sum, count)`` rather than a mean, as tunix does: gradient
accumulation and data parallelism then add sums and counts and divide once, which is
the global token mean (torchtune #1875: a mean of micro-batch means weights short
batches up). A batch with nothing supervised gives (0, 0), never NaN; the caller
divides by ``max(count, 1)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ppllava_jax.data.batching import IGNORE

CHUNK = 256  # positions per logits chunk: (B, 256, vocab) f32 at a time (speed: module doc)


def shifted_targets(labels_bl: jax.Array) -> jax.Array:
  """(B, L) labels -> the token each position predicts: ``labels[:, 1:]``, then IGNORE."""
  return jnp.concatenate([labels_bl[:, 1:], jnp.full_like(labels_bl[:, :1], IGNORE)], axis=1)


def _chunked(hidden_bld: jax.Array, targets_bl: jax.Array, chunk: int):
  """(hidden (J, B, Q, D), targets (J, B, Q)): ``l`` cut into chunks of ``Q = min(chunk, L)``,
  the last padded with IGNORE targets."""
  b, l, d = hidden_bld.shape
  chunk = min(chunk, l)
  n = -(-l // chunk)
  pad = n * chunk - l
  hidden_bjqd = jnp.pad(hidden_bld, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d)
  targets_bjq = jnp.pad(targets_bl, ((0, 0), (0, pad)), constant_values=IGNORE).reshape(b, n, chunk)
  return hidden_bjqd.swapaxes(0, 1), targets_bjq.swapaxes(0, 1)


def _logits(x_bqd: jax.Array, head_dv: jax.Array) -> jax.Array:
  return jnp.einsum(
    "bqd,dv->bqv", x_bqd, head_dv.astype(x_bqd.dtype), preferred_element_type=jnp.float32
  )


def _chunk_logprobs(x_bqd, head_dv, t_bq):
  logits_bqv = _logits(x_bqd, head_dv)
  picked = jnp.take_along_axis(logits_bqv, jnp.maximum(t_bq, 0)[..., None], axis=-1)[..., 0]
  return jnp.where(t_bq == IGNORE, 0.0, picked - jax.nn.logsumexp(logits_bqv, axis=-1))


def token_logprobs(
  hidden_bld: jax.Array, head_dv: jax.Array, targets_bl: jax.Array, chunk: int = CHUNK
) -> jax.Array:
  """log softmax(hidden @ head)[target] per position, (B, L) float32; 0 where the
  target is IGNORE. Logits exist ``chunk`` positions at a time (module doc)."""
  b, l, _ = hidden_bld.shape
  one_chunk = jax.checkpoint(lambda args: _chunk_logprobs(args[0], head_dv, args[1]))
  logp_jbq = lax.map(one_chunk, _chunked(hidden_bld, targets_bl, chunk))
  return logp_jbq.transpose(1, 0, 2).reshape(b, -1)[:, :l]


def cross_entropy(
  hidden_bld: jax.Array, head_dv: jax.Array, labels_bl: jax.Array, chunk: int = CHUNK
) -> tuple[jax.Array, jax.Array]:
  """Next-token cross-entropy as (sum over supervised tokens, their count), float32."""
  targets_bl = shifted_targets(labels_bl)
  return (
    _nll_sum(hidden_bld, head_dv, targets_bl, chunk),
    (targets_bl != IGNORE).sum().astype(jnp.float32),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _nll_sum(hidden_bld, head_dv, targets_bl, chunk):
  """-Σ token_logprobs, with a fused backward (``_nll_sum_fwd``)."""
  return -token_logprobs(hidden_bld, head_dv, targets_bl, chunk).sum()


def _nll_sum_fwd(hidden_bld, head_dv, targets_bl, chunk):
  """The sum and, while each chunk's logits exist, its gradients: the output is a scalar,
  so they are those of a unit cotangent, scaled in the backward. Three (Q, D) x (D, V)
  matmuls a chunk (logits, dX, dW), where autodiff through the checkpointed chunk took
  four (the logits again)."""
  b, l, d = hidden_bld.shape
  x_jbqd, t_jbq = _chunked(hidden_bld, targets_bl, chunk)
  head = head_dv.astype(hidden_bld.dtype)

  def one_chunk(carry, args):
    total, dw_dv = carry
    x_bqd, t_bq = args
    logits_bqv = _logits(x_bqd, head)
    lse_bq = jax.nn.logsumexp(logits_bqv, axis=-1)
    picked = jnp.take_along_axis(logits_bqv, jnp.maximum(t_bq, 0)[..., None], axis=-1)[..., 0]
    valid_bq = t_bq != IGNORE
    # d(-log p[t]) / d logits = softmax - onehot(t), on supervised positions only
    g_bqv = jnp.where(
      valid_bq[..., None],
      jnp.exp(logits_bqv - lse_bq[..., None])
      - jax.nn.one_hot(t_bq, logits_bqv.shape[-1], dtype=jnp.float32),
      0.0,
    )
    g_bqv = g_bqv.astype(head.dtype)
    dx_bqd = jnp.einsum("bqv,dv->bqd", g_bqv, head, preferred_element_type=jnp.float32)
    dw_dv = dw_dv + jnp.einsum("bqd,bqv->dv", x_bqd, g_bqv, preferred_element_type=jnp.float32)
    return (total - jnp.where(valid_bq, picked - lse_bq, 0.0).sum(), dw_dv), dx_bqd

  zero = (jnp.zeros((), jnp.float32), jnp.zeros(head_dv.shape, jnp.float32))
  (total, dw_dv), dx_jbqd = lax.scan(one_chunk, zero, (x_jbqd, t_jbq))
  dx_bld = dx_jbqd.swapaxes(0, 1).reshape(b, -1, d)[:, :l]
  return total, (dx_bld.astype(hidden_bld.dtype), dw_dv.astype(head_dv.dtype))


def _nll_sum_bwd(chunk, residuals, g):
  dx_bld, dw_dv = residuals
  return (g * dx_bld).astype(dx_bld.dtype), (g * dw_dv).astype(dw_dv.dtype), None


_nll_sum.defvjp(_nll_sum_fwd, _nll_sum_bwd)


def sequence_logprobs(
  hidden_bld: jax.Array, head_dv: jax.Array, labels_bl: jax.Array, chunk: int = CHUNK
) -> tuple[jax.Array, jax.Array]:
  """Per row: (summed log-probability of its supervised tokens, their count), (B,) each:
  what DPO compares (the mean is sum / count, as IPO takes it)."""
  targets_bl = shifted_targets(labels_bl)
  logp_bl = token_logprobs(hidden_bld, head_dv, targets_bl, chunk)
  return logp_bl.sum(axis=1), (targets_bl != IGNORE).sum(axis=1).astype(jnp.float32)


def supervised_targets(labels_bl: jax.Array) -> jax.Array:
  """Per position, whether it predicts a supervised token (``shifted_targets``);
  works on any leading axes (micro-batches)."""
  return labels_bl[..., 1:] != IGNORE
