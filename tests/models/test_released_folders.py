"""PPLLaVA's own folders: the original's config.json keys are read, checked against the
tensors, and what fills in when they are absent (explicit arguments > config.json > a
``clip_weight`` folder's config > inference from shapes)."""

import dataclasses
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
from support import numpy_reference as ref
from support.hf_fixtures import (
  as_released,
  make_llava_next_video,
  make_llava_onevision,
  make_scorer_clip,
  make_scorer_siglip,
  text_batch,
)

from ppllava_jax.models.ppllava import PoolingConfig, PPLLaVA


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
  return make_llava_next_video(tmp_path_factory.mktemp("llava"))[1]


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
  """A CLIP whose text tower (width 20, 2 heads, EOS 98) fits no assumed convention."""
  return make_scorer_clip(tmp_path_factory.mktemp("scorer"))[1]


@pytest.fixture(scope="module")
def saved(llava, scorer, tmp_path_factory):
  """(model, folder): the tiny LLaVA with the scorer inside, 16 -> 52 text positions (keep 4)."""
  model = PPLLaVA.from_pretrained(llava, clip=scorer, clip_extend_keep=4)
  return model, model.save_pretrained(tmp_path_factory.mktemp("saved") / "ppllava")


@pytest.fixture(scope="module")
def with_adapter(saved, tmp_path_factory):
  """The saved folder plus BT-Adapter tensors under the released names: depth 2, 8 time rows."""
  from flax import nnx
  from safetensors.numpy import load_file, save_file

  from ppllava_jax.convert.btadapter import BTADAPTER_RULES
  from ppllava_jax.convert.loader import hf_tensors
  from ppllava_jax.models import BTAdapterConfig, CLIPVisionBTAdapter

  model, folder = saved
  tower = CLIPVisionBTAdapter.from_clip(
    model.vision_tower, BTAdapterConfig(depth=2, max_T=8), rngs=nnx.Rngs(0)
  )
  tensors = load_file(folder / "model.safetensors")
  tensors.update(
    {
      f"vision_tower.{name}": np.asarray(value)
      for name, value in hf_tensors(tower, BTADAPTER_RULES)
      if "btadapter" in name
    }
  )
  dst = tmp_path_factory.mktemp("adapter")
  save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
  (dst / "config.json").write_text((folder / "config.json").read_text())
  return dst


def test_pooling_may_be_a_mode_string(llava):
  assert PPLLaVA.from_pretrained(llava, pooling="average").cfg.pooling == PoolingConfig("average")


@pytest.mark.parametrize(
  "keys, pooling, kernel, stride",
  [
    (
      dict(
        pooling_kernel=[2, 3, 3],
        pooling_stride="(1,3,3)",
        image_pooling_kernel="(1,2,2)",
        image_pooling_stride=[1, 2, 2],
        pooling_temp=0.5,
      ),
      dict(video_stride=(1, 3, 3), image_kernel=(1, 2, 2), temperature=0.5),
      (2, 3, 3),
      (1, 3, 3),
    ),
    # the output-size form: stride = I // O, kernel = I - (O - 1) * stride on 4 x 6 x 6
    (
      dict(pllava_pooling_shape=[2, 3, 3]),
      dict(video_kernel=None, video_output=(2, 3, 3)),
      (2, 2, 2),
      (2, 2, 2),
    ),
  ],
  ids=["kernel_and_stride", "output_size"],
)
def test_the_originals_pooling_keys_are_read(saved, tmp_path, keys, pooling, kernel, stride):
  """JSON lists or the original's YAML strings; the video tokens are the NumPy window pooling
  with that kernel and stride; saving keeps them; a field set away from its default wins."""
  model, folder = saved
  released = as_released(
    folder, tmp_path / "released", ppllava_scorer=model.cfg.scorer.to_hf(), **keys
  )
  model = PPLLaVA.from_pretrained(released)
  assert model.cfg.pooling == PoolingConfig(**pooling)
  video = jnp.asarray(np.random.default_rng(4).standard_normal((1, 4, 3, 24, 24)), jnp.float32)
  clip_ids, clip_mask = text_batch(99, 98, [6], 8)
  text = model.scorer.text_features(jnp.asarray(clip_ids), jnp.asarray(clip_mask))
  feats = model.patch_features(video)
  probs = ref.relevance(
    np.asarray(model.scorer.patch_embeddings(feats)),
    np.asarray(text),
    float(model.scorer.logit_scale[...]),
  )
  want = ref.pool(
    np.asarray(model.multi_modal_projector(feats), np.float64),
    probs,
    kernel,
    stride,
    "softmax",
    model.cfg.pooling.temperature,
  )
  got = np.asarray(model.encode_videos(video, text))
  assert got.shape[1] == model.cfg.video_tokens(4) == np.prod(want.shape[1:4])
  np.testing.assert_allclose(got.reshape(want.shape), want, rtol=0, atol=1e-5)
  again = PPLLaVA.from_pretrained(model.save_pretrained(tmp_path / "again"))
  assert again.cfg.pooling == model.cfg.pooling
  explicit = PPLLaVA.from_pretrained(released, pooling=PoolingConfig(temperature=0.02))
  assert explicit.cfg.pooling == dataclasses.replace(model.cfg.pooling, temperature=0.02)


def test_the_scorer_is_described_by_clip_or_a_clip_weight_folder(saved, scorer, tmp_path, caplog):
  model, folder = saved
  bare = as_released(folder, tmp_path / "bare")
  no_convention = r"text width 20 is not a multiple of the 64-wide heads.*clip=.*clip_weight"
  with pytest.raises(ValueError, match=no_convention):
    PPLLaVA.from_pretrained(bare)
  with caplog.at_level("WARNING"), pytest.raises(ValueError, match=no_convention):
    PPLLaVA.from_pretrained(
      as_released(folder, tmp_path / "hub_id", clip_weight="openai/clip-vit-large-patch14-336")
    )
  assert "clip_weight 'openai/clip-vit-large-patch14-336' is not a folder" in caplog.text
  for name, keys, clip in [
    ("relative", dict(clip_weight=os.path.relpath(scorer, tmp_path / "rel")), None),
    ("absolute", dict(clip_weight=str(scorer)), None),
    ("clip", {}, scorer),
  ]:
    got = PPLLaVA.from_pretrained(as_released(folder, tmp_path / name[:3], **keys), clip=clip)
    assert got.cfg.scorer == model.cfg.scorer, name
  # config.json's own entry wins over inference and clip_weight; clip= wins over it
  ours = dict(model.cfg.scorer.to_hf(), layer_norm_eps=1e-3)
  edited = as_released(folder, tmp_path / "ours", ppllava_scorer=ours, clip_weight=str(scorer))
  assert PPLLaVA.from_pretrained(edited).cfg.scorer.layer_norm_eps == 1e-3
  assert PPLLaVA.from_pretrained(edited, clip=scorer).cfg.scorer == model.cfg.scorer
  _, wide = make_scorer_clip(tmp_path / "wide", openai_like=True)  # text width 64
  with pytest.raises(
    ValueError,
    match=r"clip_weight .*wide.* does not describe the scorer's "
    r"tensors: text.hidden_size: 64 there, 20 in the tensors",
  ):
    PPLLaVA.from_pretrained(as_released(folder, tmp_path / "mismatch", clip_weight=str(wide)))


@pytest.mark.parametrize(
  "keys, error",
  [
    ({}, None),
    (dict(btadapter=True, btadapter_depth=2, max_T=8, vision_config_depth=2), None),
    (dict(btadapter_depth=3), r"btadapter_depth=3, but .* gives 2"),
    (dict(max_T=64), r"max_T=64, but .* gives 8"),
    (dict(vision_config_depth=3), r"vision_config.depth=3, but .* gives 2"),
    (dict(btadapter=False), r"btadapter=False, but .* gives True"),
  ],
)
def test_btadapter_keys_are_read_and_checked(saved, with_adapter, tmp_path, caplog, keys, error):
  import json

  from ppllava_jax.models import BTAdapterConfig

  depth = keys.pop("vision_config_depth", None)
  folder = as_released(
    with_adapter, tmp_path / "released", ppllava_scorer=saved[0].cfg.scorer.to_hf(), **keys
  )
  if depth is not None:  # the original stamps depth onto the vision config too
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["depth"] = depth
    (folder / "config.json").write_text(json.dumps(config))
  if error:
    with pytest.raises(ValueError, match=f"{re.escape(str(folder))}: config.json {error}"):
      PPLLaVA.from_pretrained(folder, pooling=PoolingConfig("average"))
    return
  with caplog.at_level("WARNING"):
    model = PPLLaVA.from_pretrained(folder, pooling=PoolingConfig("average"))
  assert model.cfg.btadapter == BTAdapterConfig(depth=2, max_T=8)
  assert ("read off the tensors (the last resort)" in caplog.text) == (not keys)


@pytest.mark.parametrize(
  "keys, error",
  [
    (dict(qwen=False, frame_shape=[6, 6], extend_clip=True), None),
    (dict(qwen=True), r"qwen=True, but the CLIP vision tower gives False"),
    (dict(frame_shape="(24,24)"), r"frame_shape=\(24, 24\), but .* gives \(6, 6\)"),
    (dict(extend_clip=False), r"extend_clip=False, but .* gives True"),
  ],
)
def test_keys_the_tensors_also_fix_must_agree(saved, tmp_path, keys, error):
  model, folder = saved
  folder = as_released(
    folder, tmp_path / "released", ppllava_scorer=model.cfg.scorer.to_hf(), **keys
  )
  if error:
    with pytest.raises(ValueError, match=f"{re.escape(str(folder))}: config.json {error}"):
      PPLLaVA.from_pretrained(folder)
  else:
    assert PPLLaVA.from_pretrained(folder).cfg.scorer == model.cfg.scorer


def test_a_siglip_scorer_is_described_by_clip(tmp_path):
  """The Qwen model's layout: a SigLIP scorer whose text width (20) is no multiple of
  so400m's 72-wide heads loads with clip=; qwen must say SigLIP."""
  _, onevision = make_llava_onevision(tmp_path / "onevision")
  _, siglip = make_scorer_siglip(tmp_path / "siglip")
  model = PPLLaVA.from_pretrained(onevision, clip=siglip, clip_extend_keep=4)
  saved = model.save_pretrained(tmp_path / "saved")
  folder = as_released(saved, tmp_path / "released", qwen=True)
  with pytest.raises(ValueError, match="text width 20 is not a multiple of the 72-wide heads"):
    PPLLaVA.from_pretrained(folder)
  assert PPLLaVA.from_pretrained(folder, clip=siglip).cfg.scorer == model.cfg.scorer
  with pytest.raises(ValueError, match="qwen=False, but the SigLIP vision tower gives True"):
    PPLLaVA.from_pretrained(as_released(saved, tmp_path / "not_qwen", qwen=False), clip=siglip)
