"""train.core.partition: the rules resolve as documented, and each preset trains exactly the
parameters its recipe names (hand-listed on tiny models built with the right parts)."""

import dataclasses

import pytest
from flax import nnx
from support.train_data import tiny_model_config

from ppllava_jax.models.btadapter import BTAdapterConfig
from ppllava_jax.models.layers import LayerNorm
from ppllava_jax.models.llm import RMSNorm
from ppllava_jax.models.ppllava import PPLLaVA
from ppllava_jax.models.scorer import SiglipScorerConfig
from ppllava_jax.models.siglip import SiglipTextConfig, SiglipVisionConfig
from ppllava_jax.train.core.partition import (
  DECAY_RULES,
  DPO,
  QWEN_SFT,
  VICUNA_SFT,
  decay_mask,
  partition,
  path_name,
  resolve,
)

LLM = """
language_model/lm_head/kernel
language_model/model/embed_tokens/weight
language_model/model/layers/0/input_layernorm/weight
language_model/model/layers/0/mlp/down_proj/kernel
language_model/model/layers/0/mlp/gate_proj/kernel
language_model/model/layers/0/mlp/up_proj/kernel
language_model/model/layers/0/post_attention_layernorm/weight
language_model/model/layers/0/self_attn/k_proj/kernel
language_model/model/layers/0/self_attn/o_proj/kernel
language_model/model/layers/0/self_attn/q_proj/kernel
language_model/model/layers/0/self_attn/v_proj/kernel
language_model/model/norm/weight
""".split()
PROJECTOR = """
image_newline
multi_modal_projector/linear_1/bias
multi_modal_projector/linear_1/kernel
multi_modal_projector/linear_2/bias
multi_modal_projector/linear_2/kernel
""".split()
CLIP_SCORER = """
scorer/text_projection/kernel
scorer/visual_ln/bias
scorer/visual_ln/weight
scorer/visual_projection/kernel
""".split()
_ATTN = [f"self_attn/{p}_proj/{w}" for p in ("k", "out", "q", "v") for w in ("bias", "kernel")]
BTADAPTER = (
  ["vision_tower/btadapter_cls_token", "vision_tower/btadapter_time_embed/weight"]
  + [
    f"vision_tower/btadapter_S_layers/0/{p}"
    for p in [
      "layer_norm1/bias",
      "layer_norm1/weight",
      "layer_norm2/bias",
      "layer_norm2/weight",
      "mlp/fc1/bias",
      "mlp/fc1/kernel",
      "mlp/fc2/bias",
      "mlp/fc2/kernel",
      *_ATTN,
    ]
  ]
  + [
    f"vision_tower/btadapter_T_layers/0/{p}"
    for p in [
      "layer_norm1/bias",
      "layer_norm1/weight",
      "temporal_fc/bias",
      "temporal_fc/kernel",
      *_ATTN,
    ]
  ]
)
_LAYER = [
  "layer_norm1/bias",
  "layer_norm1/weight",
  "layer_norm2/bias",
  "layer_norm2/weight",
  "mlp/fc1/bias",
  "mlp/fc1/kernel",
  "mlp/fc2/bias",
  "mlp/fc2/kernel",
  *_ATTN,
]
SIGLIP_SCORER = (
  [
    "scorer/text_model/embeddings/position_embedding_res",
    "scorer/text_model/embeddings/token_embedding/weight",
    "scorer/text_model/final_layer_norm/bias",
    "scorer/text_model/final_layer_norm/weight",
    "scorer/text_model/head/bias",
    "scorer/text_model/head/kernel",
  ]
  + [f"scorer/text_model/encoder/layers/0/{p}" for p in _LAYER]
  + [
    "scorer/visual_ln/bias",
    "scorer/visual_ln/weight",
    "scorer/visual_head/attention/in_proj/bias",
    "scorer/visual_head/attention/in_proj/kernel",
    "scorer/visual_head/layernorm/bias",
    "scorer/visual_head/layernorm/weight",
    "scorer/visual_head/mlp/fc1/bias",
    "scorer/visual_head/mlp/fc1/kernel",
    "scorer/visual_head/mlp/fc2/bias",
    "scorer/visual_head/mlp/fc2/kernel",
  ]
)


def vicuna_model():
  """CLIP tower with a BT-Adapter, CLIP scorer with the extended text positions."""
  cfg = tiny_model_config(7)
  text = dataclasses.replace(cfg.scorer.text, extend_keep=4)
  cfg = dataclasses.replace(
    cfg,
    btadapter=BTAdapterConfig(depth=1, max_T=8),
    scorer=dataclasses.replace(cfg.scorer, text=text),
  )
  return nnx.eval_shape(lambda: PPLLaVA(cfg, rngs=nnx.Rngs(0)))


def qwen_model():
  """SigLIP tower (with its head), SigLIP scorer with the extended text positions."""
  cfg = tiny_model_config(7)
  vision = SiglipVisionConfig(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=24,
    patch_size=4,
  )
  text = SiglipTextConfig(
    vocab_size=600,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    max_position_embeddings=40,
    projection_size=16,
    extend_keep=4,
  )
  cfg = dataclasses.replace(
    cfg,
    vision=vision,
    scorer=SiglipScorerConfig(text, vision),
    drop_cls=False,
    vision_feature_layer=-1,
  )
  return nnx.eval_shape(lambda: PPLLaVA(cfg, rngs=nnx.Rngs(0)))


def all_params(model):
  return {path_name(p) for p, v in nnx.to_flat_state(nnx.state(model)) if type(v) is nnx.Param}


@pytest.mark.parametrize(
  "build, rules, want",
  [
    (vicuna_model, VICUNA_SFT, LLM + PROJECTOR + CLIP_SCORER + BTADAPTER),
    (qwen_model, QWEN_SFT, LLM + PROJECTOR + SIGLIP_SCORER),
    (vicuna_model, DPO, LLM),
    (qwen_model, DPO, LLM),
  ],
)
def test_preset_trains_what_the_recipe_says(build, rules, want):
  model = build()
  part = partition(model, rules)
  assert sorted(part.trainable) == sorted(want)
  _, trainable, frozen = part.split(model)
  assert sorted(path_name(p) for p, _ in nnx.to_flat_state(trainable)) == sorted(want)
  frozen_names = {path_name(p) for p, _ in nnx.to_flat_state(frozen)}
  assert frozen_names.isdisjoint(want) and frozen_names | set(want) == {
    path_name(p) for p, _ in nnx.to_flat_state(nnx.state(model))
  }
  assert "scorer/text_model/embeddings/position_embedding" in frozen_names  # Frozen, always
  assert part.rows[-1].tensors == 1  # the Frozen table
  if rules is not DPO:  # the SFT presets name every group; DPO leaves the rest to the default
    assert part.rows[-2].tensors == 0 and not part.unused


def test_qwen_preset_freezes_what_gets_no_gradient():
  frozen = all_params(qwen_model()) - partition(qwen_model(), QWEN_SFT).trainable
  assert {
    "scorer/visual_head/probe",
    "scorer/visual_head/attention/out_proj/kernel",
    "scorer/visual_head/attention/out_proj/bias",
    "scorer/logit_scale",
    "scorer/logit_bias",
    "vision_tower/head/probe",
  } <= frozen
  assert all(n.startswith(("vision_tower/", "scorer/")) for n in frozen)


def test_first_match_wins_and_default_applies():
  names = ["a/b/kernel", "a/c/kernel", "d/kernel"]
  got = resolve(((r"a/b/.*", False), (r"a/.*", True)), names, "dflt")
  assert got == {"a/b/kernel": (False, 0), "a/c/kernel": (True, 1), "d/kernel": ("dflt", None)}
  assert resolve(((r"b/kernel", True),), ["a/b/kernel"], False)["a/b/kernel"] == (False, None)


def test_default_true_and_table():
  model = vicuna_model()
  part = partition(model, ((r"vision_tower/.*", False),), default=True)
  assert part.trainable == {n for n in all_params(model) if not n.startswith("vision_tower/")}
  table = part.table()
  assert "vision_tower/.*" in table and "(no rule: default)" in table
  assert f"in {len(part.trainable)} tensors" in table.splitlines()[-1]
  assert partition(model, ((r"nothing/.*", True),)).unused == ("nothing/.*",)
  with pytest.raises(ValueError, match="True / False"):
    partition(model, ((r".*", 1.0),))
  with pytest.raises(ValueError, match="not a regex"):
    partition(model, ((r"(", True),))


@pytest.mark.parametrize("build", [vicuna_model, qwen_model])
def test_decay_mask_skips_every_norm_and_bias(build):
  model = build()
  norms = set()
  for path, node in nnx.iter_graph(model):
    if isinstance(node, (LayerNorm, RMSNorm)):
      norms |= {path_name(path) + "/weight", path_name(path) + "/bias"}
  _, params, _ = nnx.split(model, nnx.Param, ...)
  mask = {path_name(p): v.get_value() for p, v in nnx.to_flat_state(decay_mask(params))}
  assert mask and all(isinstance(v, bool) for v in mask.values())
  for name, decays in mask.items():
    if name in norms or name.endswith("/bias"):
      assert not decays, name
    else:
      assert decays, name  # kernels, embeddings, tokens, tables
  assert mask["language_model/model/embed_tokens/weight"] and mask["image_newline"]
  with pytest.raises(ValueError, match="catch-all"):
    decay_mask(params, DECAY_RULES[:-1])
