"""Batched generation under one jit: prefill, then a ``lax.while_loop`` of cached steps.

Prompts are left-padded (B, T) with an attention mask; the cache is preallocated to
T + max_new_tokens slots, so every shape is static. Greedy when ``temperature`` is 0,
otherwise temperature sampling restricted to the top-p nucleus. A row that emits a
stop token is finished: later positions hold ``pad_token_id``. The loop ends when
every row is finished or ``max_new_tokens`` are out, like transformers' ``generate``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Sampling:
  max_new_tokens: int
  temperature: float = 0.0  # 0: greedy
  top_p: float = 1.0
  stop_tokens: tuple[int, ...] = ()
  pad_token_id: int = 0


def choose(logits_bv: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
  """Next token per row: argmax, or a sample from the temperature-scaled top-p nucleus."""
  if sampling.temperature == 0.0:
    return jnp.argmax(logits_bv, axis=-1)
  logits_bv = logits_bv / sampling.temperature
  if sampling.top_p < 1.0:
    sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
    probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
    before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
    kept = jnp.sum(before_bv < sampling.top_p, axis=-1, keepdims=True)
    threshold_b1 = jnp.take_along_axis(sorted_bv, kept - 1, axis=-1)
    logits_bv = jnp.where(logits_bv >= threshold_b1, logits_bv, -jnp.inf)
  return jax.random.categorical(rng, logits_bv, axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "static_media"))
def _generate(
  graphdef,
  state,
  input_ids,
  attention_mask,
  rng,
  media,
  *,
  sampling: Sampling,
  static_media: tuple = (),
):
  model = nnx.merge(graphdef, state)
  b, t = input_ids.shape
  out = model(
    input_ids,
    attention_mask,
    cache=model.init_cache(b, t + sampling.max_new_tokens),
    last_only=True,
    **media,
    **dict(static_media),
  )
  positions_b = jnp.sum(attention_mask, axis=1).astype(jnp.int32)  # next position per row
  stops = jnp.asarray(sampling.stop_tokens or (-1,), jnp.int32)
  tokens = jnp.full((b, sampling.max_new_tokens), sampling.pad_token_id, jnp.int32)

  def cond(carry):
    step, _, _, _, done, _, _ = carry
    return (step < sampling.max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, tokens, cache, logits_bv, done, positions_b, rng = carry
    rng, key = jax.random.split(rng)
    token_b = jnp.where(done, sampling.pad_token_id, choose(logits_bv, key, sampling))
    tokens = tokens.at[:, step].set(token_b.astype(jnp.int32))
    done = done | jnp.isin(token_b, stops)
    step_out = model(token_b[:, None], jnp.ones((b, 1), bool), positions_b[:, None], cache=cache)
    return step + 1, tokens, step_out.cache, step_out.logits[:, -1], done, positions_b + 1, rng

  carry = (
    jnp.zeros((), jnp.int32),
    tokens,
    out.cache,
    out.logits[:, -1],
    jnp.zeros((b,), bool),
    positions_b,
    rng,
  )
  return jax.lax.while_loop(cond, body, carry)[1]


def generate(
  model: nnx.Module,
  input_ids: jax.Array,
  attention_mask: jax.Array | None = None,
  *,
  max_new_tokens: int,
  temperature: float = 0.0,
  top_p: float = 1.0,
  stop_tokens: Sequence[int] | None = None,
  pad_token_id: int | None = None,
  rng: jax.Array | None = None,
  media: dict | None = None,
  static_media: dict | None = None,
) -> jax.Array:
  """(B, T + max_new_tokens) ids: the prompt, then the generated tokens (pad after a stop).

  ``stop_tokens`` default to the model config's EOS ids; ``pad_token_id`` to its pad id
  (or 0). ``model`` is anything with ``__call__(ids, mask, positions, cache=,
  last_only=)`` and ``init_cache(batch, length)``, such as ``LlamaForCausalLM``;
  ``media`` (arrays) go to the prefill call only, e.g. a PPLLaVA video; so do
  ``static_media`` (hashable host values such as anyres image sizes, which fix token
  counts), as compile-time constants: each distinct value compiles once.
  """
  input_ids = jnp.asarray(input_ids, jnp.int32)
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
  mask = (
    jnp.ones(input_ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
  )
  if not bool(jnp.all(mask[:, -1])):
    raise ValueError("prompts must be left-padded: the last position of every row must be real")
  # the model of the protocol above has a cfg; nnx.Module does not declare it
  cfg: Any = getattr(model.cfg, "text", model.cfg)  # type: ignore[attr-defined]  # multimodal: LLM's
  sampling = Sampling(
    max_new_tokens=max_new_tokens,
    temperature=float(temperature),
    top_p=float(top_p),
    stop_tokens=tuple(cfg.eos_token_id if stop_tokens is None else stop_tokens),
    pad_token_id=int(pad_token_id if pad_token_id is not None else (cfg.pad_token_id or 0)),
  )
  graphdef, state = nnx.split(model)
  rng = jax.random.key(0) if rng is None else rng
  new = _generate(
    graphdef,
    state,
    input_ids,
    mask,
    rng,
    media or {},
    sampling=sampling,
    static_media=tuple(sorted((static_media or {}).items())),
  )
  return jnp.concatenate([input_ids, new], axis=1)


def compilations() -> int:
  """How many programs generation has compiled in this process (one per distinct batch
  shape, sampling setting and static media), for evaluation logs."""
  return _generate._cache_size()  # type: ignore[attr-defined]  # jit's, absent from its stubs
