"""LLaMA (Vicuna) and Qwen2 decoders in Flax NNX, with a preallocated KV cache.

Both are the same network: RMSNorm, rotary positions (rotate-half, as transformers),
grouped-query attention, SwiGLU. Qwen2 adds biases to q/k/v. Numerics follow
transformers 5.23 (RMSNorm in f32, softmax in f32, RoPE tables in f32).

Attention always runs over *slots*: without a cache the slots are the input's own
positions; with a ``KVCache`` the new keys/values are written at ``cache.index`` with
``lax.dynamic_update_slice`` and the queries attend over every slot of the cache that
holds a real token and is not after them. Shapes stay static under jit: prefill and
each decode step are the same code. Shape suffixes follow docs/architecture.md's table of shape
letters: ``l`` the new tokens, ``s`` the slots attended over (the cache's, or the new
tokens' own).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from ppllava_jax.convert.llm import LLM_RULES
from ppllava_jax.convert.loader import load_into
from ppllava_jax.models import pretrained
from ppllava_jax.models.attention import PALLAS, Mask, attention
from ppllava_jax.models.generate import generate
from ppllava_jax.models.layers import (
  REMAT_NONE,
  Embedding,
  Linear,
  remat_call,
  set_attention,
  set_remat,
)
from ppllava_jax.models.sharding import constrain


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int = 32
  head_dim: int = 128
  max_position_embeddings: int = 4096
  rms_norm_eps: float = 1e-6
  # transformers 5.x `rope_parameters`, as sorted (key, value) pairs so the config hashes.
  rope: tuple[tuple[str, object], ...] = (("rope_theta", 10000.0), ("rope_type", "default"))
  hidden_act: str = "silu"
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  bos_token_id: int | None = 1
  eos_token_id: tuple[int, ...] = (2,)
  pad_token_id: int | None = None
  model_type: str = "llama"

  @classmethod
  def from_hf(cls, hf: dict) -> DecoderConfig:
    """From a config.json dict of model_type llama or qwen2 (transformers fills defaults)."""
    from transformers import AutoConfig

    full = AutoConfig.for_model(**hf)
    if getattr(full, "use_sliding_window", False):
      raise ValueError("Qwen2 sliding-window attention (use_sliding_window=true) is not supported")
    qwen2 = full.model_type == "qwen2"
    eos = full.eos_token_id
    return cls(
      vocab_size=full.vocab_size,
      hidden_size=full.hidden_size,
      intermediate_size=full.intermediate_size,
      num_hidden_layers=full.num_hidden_layers,
      num_attention_heads=full.num_attention_heads,
      num_key_value_heads=full.num_key_value_heads or full.num_attention_heads,
      head_dim=getattr(full, "head_dim", None) or full.hidden_size // full.num_attention_heads,
      max_position_embeddings=full.max_position_embeddings,
      rms_norm_eps=full.rms_norm_eps,
      rope=tuple(sorted(dict(full.rope_parameters).items())),
      hidden_act=full.hidden_act,
      qkv_bias=True if qwen2 else full.attention_bias,
      o_bias=False if qwen2 else full.attention_bias,
      mlp_bias=False if qwen2 else full.mlp_bias,
      tie_word_embeddings=full.tie_word_embeddings,
      bos_token_id=full.bos_token_id,
      eos_token_id=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
      pad_token_id=full.pad_token_id,
      model_type=full.model_type,
    )

  def to_hf(self) -> dict:
    from transformers import AutoConfig

    fields = dict(
      vocab_size=self.vocab_size,
      hidden_size=self.hidden_size,
      intermediate_size=self.intermediate_size,
      num_hidden_layers=self.num_hidden_layers,
      num_attention_heads=self.num_attention_heads,
      num_key_value_heads=self.num_key_value_heads,
      head_dim=self.head_dim,
      max_position_embeddings=self.max_position_embeddings,
      rms_norm_eps=self.rms_norm_eps,
      rope_parameters=dict(self.rope),
      hidden_act=self.hidden_act,
      tie_word_embeddings=self.tie_word_embeddings,
      bos_token_id=self.bos_token_id,
      pad_token_id=self.pad_token_id,
      eos_token_id=list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0],
    )
    if self.model_type == "llama":
      fields.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
    return AutoConfig.for_model(self.model_type, **fields).to_dict()


def rope_inv_freq(cfg: DecoderConfig) -> tuple[jax.Array, float]:
  """Inverse frequencies (head_dim/2,) and the cos/sin scale, per rope_type."""
  rope: dict[str, Any] = dict(cfg.rope)
  kind = rope.get("rope_type", "default")
  dim = int(cfg.head_dim * rope.get("partial_rotary_factor", 1.0))
  inv = 1.0 / (rope["rope_theta"] ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  if kind == "default":
    return inv, 1.0
  if kind == "linear":
    return inv / rope["factor"], 1.0
  if kind == "llama3":
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return jnp.where(medium, smoothed, scaled), 1.0
  raise NotImplementedError(f"rope_type {kind!r} is not supported (default, linear, llama3 are)")


def apply_rope(
  x_blna: jax.Array, positions_bl: jax.Array, inv_freq: jax.Array, scale: float
) -> jax.Array:
  freqs_bla = positions_bl[..., None].astype(jnp.float32) * inv_freq  # (B, L, A / 2)
  angles = jnp.concatenate([freqs_bla, freqs_bla], axis=-1)[:, :, None, :]
  cos, sin = (
    (jnp.cos(angles) * scale).astype(x_blna.dtype),
    (jnp.sin(angles) * scale).astype(x_blna.dtype),
  )
  half = x_blna.shape[-1] // 2
  rotated = jnp.concatenate([-x_blna[..., half:], x_blna[..., :half]], axis=-1)
  return x_blna * cos + rotated * sin


@struct.dataclass
class KVCache:
  """Keys/values, one (B, S, kv_heads, head_dim) array per layer; which slots hold real
  tokens (B, S); the next slot to write (scalar int32).

  Per-layer arrays, not one stacked (layers, ...) array: inside the decode
  ``while_loop`` XLA copied the whole stacked cache for every layer's read, which made
  a 4-layer step at 4.7k slots take 40 ms instead of 13 ms.
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  valid: jax.Array
  index: jax.Array

  @classmethod
  def init(cls, cfg: DecoderConfig, batch: int, length: int, dtype=jnp.float32) -> KVCache:
    shape = (batch, length, cfg.num_key_value_heads, cfg.head_dim)
    layers = range(cfg.num_hidden_layers)
    return cls(
      tuple(jnp.zeros(shape, dtype) for _ in layers),
      tuple(jnp.zeros(shape, dtype) for _ in layers),
      jnp.zeros((batch, length), bool),
      jnp.zeros((), jnp.int32),
    )


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,)), axes=("embed",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(x.dtype) * y.astype(x.dtype)


class Attention(nnx.Module):
  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    n, k, a, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    if n % k:
      raise ValueError(f"{n} attention heads are not a multiple of {k} key/value heads")
    self.cfg = cfg
    self.q_proj = Linear(d, n * a, use_bias=cfg.qkv_bias, axes=("embed", "heads"), rngs=rngs)
    self.k_proj = Linear(d, k * a, use_bias=cfg.qkv_bias, axes=("embed", "kv_heads"), rngs=rngs)
    self.v_proj = Linear(d, k * a, use_bias=cfg.qkv_bias, axes=("embed", "kv_heads"), rngs=rngs)
    self.o_proj = Linear(n * a, d, use_bias=cfg.o_bias, axes=("heads", "embed"), rngs=rngs)
    self.implementation = "xla"  # layers.set_attention

  def __call__(self, x_bld, positions_bl, rope, key_mask, kv_cache):
    """kv_cache: None, or (k_bska, v_bska, index): this layer's cache and the slot to
    write at. Returns (out, the updated (k, v) or None). Under "pallas" the cache steps
    run "xla": splash fixes its causal offset when built, and a cache's index is traced
    (``models.attention``'s module doc)."""
    cfg = self.cfg
    b, l, _ = x_bld.shape
    n, k, a = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q_blna = apply_rope(self.q_proj(x_bld).reshape(b, l, n, a), positions_bl, *rope)
    k_blka = apply_rope(self.k_proj(x_bld).reshape(b, l, k, a), positions_bl, *rope)
    v_blka = self.v_proj(x_bld).reshape(b, l, k, a)
    if kv_cache is not None:
      k_bska, v_bska, index = kv_cache
      k_bska = jax.lax.dynamic_update_slice(k_bska, k_blka.astype(k_bska.dtype), (0, index, 0, 0))
      v_bska = jax.lax.dynamic_update_slice(v_bska, v_blka.astype(v_bska.dtype), (0, index, 0, 0))
      kv_cache = (k_bska, v_bska)
    else:
      k_bska, v_bska = k_blka, v_blka
    cached_pallas = kv_cache is not None and self.implementation in PALLAS
    out_blna = attention(
      q_blna,
      k_bska,
      v_bska,
      key_mask,
      implementation="xla" if cached_pallas else self.implementation,
    )
    return self.o_proj(out_blna.reshape(b, l, n * a)), kv_cache


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    if cfg.hidden_act != "silu":
      raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported (silu is)")
    d, m, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
    self.gate_proj = Linear(d, m, use_bias=bias, axes=("embed", "mlp"), rngs=rngs)
    self.up_proj = Linear(d, m, use_bias=bias, axes=("embed", "mlp"), rngs=rngs)
    self.down_proj = Linear(m, d, use_bias=bias, axes=("mlp", "embed"), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.self_attn = Attention(cfg, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x_bld, positions_bl, rope, key_mask, kv_cache):
    attn, kv = self.self_attn(self.input_layernorm(x_bld), positions_bl, rope, key_mask, kv_cache)
    x_bld = x_bld + attn
    x_bld = x_bld + self.mlp(self.post_attention_layernorm(x_bld))
    return constrain(x_bld, ("batch", "length", "embed")), kv


class Decoder(nnx.Module):
  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.embed_tokens = Embedding(
      cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"), rngs=rngs
    )
    self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    # "none" or a jax.checkpoint_policies name each layer runs under (layers.remat_call)
    self.remat = REMAT_NONE


@struct.dataclass
class CausalLMOutput:
  logits: jax.Array  # (B, L, V) float32
  cache: KVCache | None = None


def positions_from_mask(mask_bl: jax.Array) -> jax.Array:
  """Left-padding-aware positions, as transformers' generate: cumsum(mask) - 1, pads at 1."""
  mask_bl = mask_bl.astype(jnp.int32)
  return jnp.where(mask_bl > 0, jnp.cumsum(mask_bl, axis=1) - 1, 1)


class CausalLM(nnx.Module):
  """A decoder with its LM head; ``LlamaForCausalLM`` and ``Qwen2ForCausalLM`` name it."""

  model_types: tuple[str, ...] = ("llama", "qwen2")

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.model = Decoder(cfg, rngs=rngs)
    self.lm_head = (
      None
      if cfg.tie_word_embeddings
      else Linear(
        cfg.hidden_size, cfg.vocab_size, use_bias=False, axes=("embed", "vocab"), rngs=rngs
      )
    )

  def embed(self, input_ids: jax.Array) -> jax.Array:
    return self.model.embed_tokens(input_ids)

  def set_remat(self, remat: str) -> CausalLM:
    """Every decoder layer under ``remat``: "none" or a ``jax.checkpoint_policies`` name
    (``layers.set_remat``); returns the model."""
    return set_remat(self, remat)

  def set_attention(self, implementation: str) -> CausalLM:
    """Every decoder layer's attention through ``implementation`` ("xla", "cudnn",
    "pallas", "pallas_interpret": ``models.attention``; ``layers.set_attention``); returns
    the model."""
    return set_attention(self, implementation)

  def __call__(
    self,
    input_ids: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    position_ids: jax.Array | None = None,
    inputs_embeds: jax.Array | None = None,
    cache: KVCache | None = None,
    last_only: bool = False,
  ) -> CausalLMOutput:
    """Logits (B, L, V) float32 for ``input_ids`` (or ``inputs_embeds`` (B, L, D)).

    ``attention_mask`` (B, L) marks real tokens (left or right padding); positions
    default to ``positions_from_mask``. With ``cache``, the tokens are written at
    ``cache.index`` and attend to every earlier real slot; the updated cache is returned.
    ``last_only``: logits of the last position only, (B, 1, V), as a prefill needs
    (a 18k-token video prompt would otherwise spend 2.4 GB on 32k-word logits).
    Training takes ``hidden_states`` and ``head_dv`` instead and never builds the
    full logits (``ppllava_jax.train.core.losses``).
    """
    x_bld, cache = self.hidden_states(input_ids, attention_mask, position_ids, inputs_embeds, cache)
    x_bld = x_bld[:, -1:] if last_only else x_bld
    logits = x_bld @ self.head_dv.astype(x_bld.dtype)
    return CausalLMOutput(
      constrain(logits.astype(jnp.float32), ("batch", "length", "vocab")), cache
    )

  @property
  def head_dv(self) -> jax.Array:
    """The LM head as a (D, V) matrix: ``lm_head``, or the token table when tied."""
    if self.lm_head is None:
      return self.model.embed_tokens.weight[...].T
    return self.lm_head.kernel[...]

  def hidden_states(
    self,
    input_ids: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    position_ids: jax.Array | None = None,
    inputs_embeds: jax.Array | None = None,
    cache: KVCache | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """The final-norm hidden states (B, L, D) and the updated cache (arguments as
    ``__call__``)."""
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("give exactly one of input_ids or inputs_embeds")
    # no inputs_embeds: input_ids is given (exactly one, checked above)
    x_bld = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # type: ignore[arg-type]
    b, l = x_bld.shape[:2]
    mask_bl = jnp.ones((b, l), bool) if attention_mask is None else attention_mask.astype(bool)
    if position_ids is None:
      position_ids = positions_from_mask(mask_bl)
    if cache is None:
      key_mask = Mask(valid_bs=mask_bl, causal=True)
    else:
      valid_bs = jax.lax.dynamic_update_slice(cache.valid, mask_bl, (0, cache.index))
      key_mask = Mask(valid_bs=valid_bs, q_start=cache.index, causal=True)
    rope = rope_inv_freq(self.cfg)
    x_bld = constrain(x_bld, ("batch", "length", "embed"))
    new_keys, new_values = [], []
    for i, layer in enumerate(self.model.layers):
      x_bld, kv = remat_call(
        layer,
        self.model.remat,
        x_bld,
        position_ids,
        rope,
        key_mask,
        None if cache is None else (cache.k[i], cache.v[i], cache.index),
      )
      if kv is not None:
        new_keys.append(kv[0])
        new_values.append(kv[1])
    if cache is not None:
      cache = KVCache(tuple(new_keys), tuple(new_values), valid_bs, cache.index + l)
    return self.model.norm(x_bld), cache

  def init_cache(self, batch: int, length: int, dtype=None) -> KVCache:
    """An empty cache in ``dtype``, by default the model's (bf16 weights: a bf16 cache,
    as transformers keeps it, half the memory and traffic of f32)."""
    return KVCache.init(self.cfg, batch, length, dtype or self.model.embed_tokens.weight[...].dtype)

  def generate(self, input_ids, attention_mask=None, **kwargs):
    """Token ids (B, L + max_new_tokens): see ``ppllava_jax.models.generate.generate``."""
    return generate(self, input_ids, attention_mask, **kwargs)

  @classmethod
  def from_pretrained(cls, path: str | Path, dtype: jnp.dtype | None = None):
    """Reads a transformers LlamaForCausalLM / Qwen2ForCausalLM folder (or hub id)."""
    path = pretrained.resolve_checkpoint(path)
    cfg = DecoderConfig.from_hf(pretrained.read_config(path, cls.model_types))
    return load_into(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))), path, LLM_RULES, dtype)

  def save_pretrained(self, path: str | Path) -> Path:
    """Writes model.safetensors and config.json in the transformers layout."""
    return pretrained.save_pretrained(self, path, LLM_RULES, self.cfg.to_hf())


class LlamaForCausalLM(CausalLM):
  model_types = ("llama",)


class Qwen2ForCausalLM(CausalLM):
  model_types = ("qwen2",)
