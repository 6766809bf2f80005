"""The model made trainable: remat per layer (LLM, vision towers), logical axes on the
vision tower and the scorer, the BT-Adapter's drop path with keys from the caller."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P
from support.train_data import tiny_model_config

from ppllava_jax.models.btadapter import BTAdapterConfig, BTAdapterVisionTransformer
from ppllava_jax.models.clip import CLIPTextConfig, CLIPVisionConfig, CLIPVisionTransformer
from ppllava_jax.models.layers import set_remat
from ppllava_jax.models.llm import CausalLM, DecoderConfig
from ppllava_jax.models.ppllava import PPLLaVA
from ppllava_jax.models.scorer import RelevanceScorer, ScorerConfig
from ppllava_jax.models.sharding import param_shardings, shard_model

LLM_CFG = DecoderConfig(
  vocab_size=64,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=8,
)
VIT_CFG = CLIPVisionConfig(
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  image_size=16,
  patch_size=4,
)
POLICIES = ("nothing_saveable", "dots_saveable")


def _grads_and_hlo(model, loss, *args):
  """{remat: (gradient leaves, stablehlo optimization barriers, compiled dot ops)}."""
  graphdef, state = nnx.split(model)

  def objective(state, remat, *args):
    return loss(set_remat(nnx.merge(graphdef, state), remat), *args)

  out = {}
  for remat in ("none", *POLICIES):
    grad = jax.jit(jax.grad(objective), static_argnums=1)
    lowered = grad.lower(state, remat, *args)
    compiled = lowered.compile().as_text()
    out[remat] = (
      jax.tree.leaves(grad(state, remat, *args)),
      lowered.as_text().count("optimization_barrier"),
      len(re.findall(r" dot\(", compiled)),
    )
  return out


def _assert_remat(out, layers):
  want, barriers, dots = out["none"]
  assert barriers == 0
  for remat in POLICIES:
    got, got_barriers, got_dots = out[remat]
    for a, b in zip(got, want, strict=True):  # 1e-6 of the gradient's scale (jit fuses
      # the two programs differently, so float32 rounding differs)
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * max(1.0, float(np.abs(b).max())))
    assert got_barriers >= layers, remat  # one checkpoint per layer reaches the HLO
  # nothing_saveable: the backward recomputes the forward's matmuls, in the compiled program
  assert out["nothing_saveable"][2] > dots


def test_llm_remat_keeps_gradients_and_recomputes():
  model = CausalLM(LLM_CFG, rngs=nnx.Rngs(0))
  ids = jnp.arange(16).reshape(2, 8) % 64

  def loss(m, ids):  # next-token cross-entropy
    logp = jax.nn.log_softmax(m(ids).logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

  out = _grads_and_hlo(model, loss, ids)
  _assert_remat(out, LLM_CFG.num_hidden_layers)


def test_vision_tower_remat_keeps_gradients_and_recomputes():
  model = CLIPVisionTransformer(VIT_CFG, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 3, 16, 16))
  out = _grads_and_hlo(model, lambda m, x: jnp.mean(jnp.sin(m(x)[-1])), x)
  _assert_remat(out, VIT_CFG.num_hidden_layers)


def test_btadapter_remat_with_drop_path_keeps_gradients():
  adapter = BTAdapterConfig(depth=2, max_T=4, drop_path_rate=0.5, temporal_drop_path_rate=0.5)
  model = BTAdapterVisionTransformer(VIT_CFG, adapter, rngs=nnx.Rngs(0))
  model.train()  # drop path on: the same key must drop the same rows when recomputed
  x = jax.random.normal(jax.random.key(1), (2, 3, 3, 16, 16))

  def loss(m, x, key):
    hidden, pooled = m(x, nnx.Rngs(dropout=key))
    return jnp.mean(jnp.sin(hidden[-2])) + jnp.mean(jnp.sin(pooled))

  out = _grads_and_hlo(model, loss, x, jax.random.key(2))
  _assert_remat(out, VIT_CFG.num_hidden_layers + 2 * adapter.depth)


def test_set_remat_reaches_llm_and_tower_and_checks_the_name():
  model = PPLLaVA(dataclasses.replace(tiny_model_config(5), btadapter=None), rngs=nnx.Rngs(0))
  model.set_remat("dots_saveable")
  assert model.language_model.model.remat == "dots_saveable"
  assert model.vision_tower.encoder.remat == "dots_saveable"
  assert model.scorer.text_model.encoder.remat == "none"  # frozen text tower: left alone
  with pytest.raises(ValueError, match="checkpoint_policies"):
    model.set_remat("save_everything_please")


# ---- logical axes ----------------------------------------------------------------------------


def _mesh():
  return Mesh(
    mesh_utils.create_device_mesh((2, 2, 2)),
    ("data", "fsdp", "tensor"),
    axis_types=(AxisType.Auto,) * 3,
  )


def test_vit_and_scorer_params_shard_under_the_mesh():
  mesh = _mesh()
  tower = CLIPVisionTransformer(VIT_CFG, rngs=nnx.Rngs(0))
  specs = {".".join(map(str, k)): v.spec for k, v in param_shardings(tower, mesh).items()}
  layer = "encoder.layers.0."
  for name in ("q_proj", "k_proj", "v_proj"):
    assert specs[layer + f"self_attn.{name}.kernel"] == P("fsdp", "tensor")
    assert specs[layer + f"self_attn.{name}.bias"] == P("tensor")
  assert specs[layer + "self_attn.out_proj.kernel"] == P("tensor", "fsdp")
  assert specs[layer + "mlp.fc1.kernel"] == P("fsdp", "tensor")
  assert specs[layer + "mlp.fc2.kernel"] == P("tensor", "fsdp")
  assert specs[layer + "layer_norm1.weight"] == P("fsdp")
  assert specs["embeddings.patch_embedding.kernel"] == P(None, None, None, "fsdp")
  assert specs["embeddings.position_embedding.weight"] == P(None, "fsdp")

  scorer = RelevanceScorer(
    ScorerConfig(
      text=CLIPTextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=16,
      ),
      vision_width=32,
      projection_dim=16,
    ),
    rngs=nnx.Rngs(0),
  )
  specs = {".".join(map(str, k)): v.spec for k, v in param_shardings(scorer, mesh).items()}
  assert specs["visual_projection.kernel"] == P("fsdp", "tensor")
  assert specs["text_projection.kernel"] == P("fsdp", "tensor")
  assert specs["text_model.encoder.layers.0.self_attn.q_proj.kernel"] == P("fsdp", "tensor")
  assert specs["text_model.embeddings.token_embedding.weight"] == P("tensor", "fsdp")


def test_sharded_clip_tower_forward_equals_unsharded():
  tower = CLIPVisionTransformer(VIT_CFG, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 3, 16, 16))
  forward = nnx.jit(lambda m, x: m(x)[-1])
  want = np.asarray(forward(tower, x))
  mesh = _mesh()
  sharded = shard_model(CLIPVisionTransformer(VIT_CFG, rngs=nnx.Rngs(0)), mesh)
  q = sharded.encoder.layers[0].self_attn.q_proj.kernel[...]
  assert q.sharding.spec == P("fsdp", "tensor") and len(q.addressable_shards) == 8
  with jax.set_mesh(mesh):
    got = np.asarray(forward(sharded, x))
  np.testing.assert_allclose(got, want, atol=1e-5)


# ---- drop path in training ------------------------------------------------------------------


def test_patch_features_drop_path_in_training_mode():
  cfg = dataclasses.replace(
    tiny_model_config(5),
    vision=dataclasses.replace(tiny_model_config(5).vision, num_hidden_layers=3),
    # spatial pair 0 never drops and fresh temporal blocks are identities: hidden state -2
    # sees pair 1 (rate 0.25) only with depth 3
    btadapter=BTAdapterConfig(depth=3, max_T=4, drop_path_rate=0.5, temporal_drop_path_rate=0.5),
  )
  model = PPLLaVA(cfg, rngs=nnx.Rngs(0))
  frames = jax.random.normal(jax.random.key(1), (2, 3, 3, 24, 24))
  features = nnx.jit(lambda m, x, key: m.patch_features(x, nnx.Rngs(dropout=key)))
  key = jax.random.fold_in(jax.random.key(7), 3)  # as a step would: fold_in(state.rng, step)
  evaluated = np.asarray(features(model, frames, key))
  no_keys = nnx.jit(lambda m, x: m.patch_features(x))
  np.testing.assert_allclose(evaluated, np.asarray(no_keys(model, frames)), atol=1e-6)
  model.train()
  trained = np.asarray(features(model, frames, key))
  assert not np.allclose(trained, evaluated)  # rows dropped
  np.testing.assert_array_equal(trained, np.asarray(features(model, frames, key)))
  assert not np.allclose(trained, np.asarray(features(model, frames, jax.random.key(8))))
  model.eval()
  np.testing.assert_array_equal(np.asarray(features(model, frames, key)), evaluated)
