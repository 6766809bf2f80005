"""Losses as pure functions of the LLM's final hidden states, never of full logits.

The (B, L, vocab) float32 logits of a 7B LLM at 8k tokens are 1 GiB a row (trl
#1189: DPO out of memory on exactly these), so every loss here goes through
``token_logprobs``: the log-probability of each target token, computed over chunks of
``chunk`` positions whose logits exist one chunk at a time and are recomputed in the
backward pass (``jax.checkpoint``), not stored.

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

import jax
import jax.numpy as jnp
from jax import lax

IGNORE = -100  # a label that is not supervised (transformers' ignore_index)
CHUNK = 1024  # positions per logits chunk: (B, 1024, vocab) f32 at a time


def shifted_targets(labels_bl: jax.Array) -> jax.Array:
  """(B, L) labels -> the token each position predicts: ``labels[:, 1:]``, then IGNORE."""
  return jnp.concatenate([labels_bl[:, 1:], jnp.full_like(labels_bl[:, :1], IGNORE)], axis=1)


def token_logprobs(hidden_bld: jax.Array, head_dv: jax.Array, targets_bl: jax.Array,
                   chunk: int = CHUNK) -> jax.Array:
  """log softmax(hidden @ head)[target] per position, (B, L) float32; 0 where the
  target is IGNORE. Logits exist ``chunk`` positions at a time (module doc)."""
  b, l, d = hidden_bld.shape
  chunk = min(chunk, l)
  n = -(-l // chunk)
  pad = n * chunk - l
  hidden_bjqd = jnp.pad(hidden_bld, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d)
  targets_bjq = jnp.pad(targets_bl, ((0, 0), (0, pad)), constant_values=IGNORE).reshape(b, n, chunk)

  @jax.checkpoint
  def one_chunk(args):
    x_bqd, t_bq = args
    logits_bqv = jnp.einsum("bqd,dv->bqv", x_bqd, head_dv.astype(x_bqd.dtype),
                            preferred_element_type=jnp.float32)
    picked = jnp.take_along_axis(logits_bqv, jnp.maximum(t_bq, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(t_bq == IGNORE, 0.0, picked - jax.nn.logsumexp(logits_bqv, axis=-1))

  logp_jbq = lax.map(one_chunk, (hidden_bjqd.swapaxes(0, 1), targets_bjq.swapaxes(0, 1)))
  return logp_jbq.transpose(1, 0, 2).reshape(b, n * chunk)[:, :l]


def cross_entropy(hidden_bld: jax.Array, head_dv: jax.Array, labels_bl: jax.Array,
                  chunk: int = CHUNK) -> tuple[jax.Array, jax.Array]:
  """Next-token cross-entropy as (sum over supervised tokens, their count), float32."""
  targets_bl = shifted_targets(labels_bl)
  logp_bl = token_logprobs(hidden_bld, head_dv, targets_bl, chunk)
  return -logp_bl.sum(), (targets_bl != IGNORE).sum().astype(jnp.float32)


def sequence_logprobs(hidden_bld: jax.Array, head_dv: jax.Array, labels_bl: jax.Array,
                      chunk: int = CHUNK) -> tuple[jax.Array, jax.Array]:
  """Per row: (summed log-probability of its supervised tokens, their count), (B,) each:
  what DPO compares (the mean is sum / count, as IPO takes it)."""
  targets_bl = shifted_targets(labels_bl)
  logp_bl = token_logprobs(hidden_bld, head_dv, targets_bl, chunk)
  return logp_bl.sum(axis=1), (targets_bl != IGNORE).sum(axis=1).astype(jnp.float32)
