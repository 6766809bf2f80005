"""LLaVA-OneVision + SigLIP (PPLLaVA's Qwen model) against transformers on the same tiny weights."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from support import numpy_reference as ref
from support.hf_fixtures import (
  OV_PINPOINTS,
  assert_same_state,
  assert_same_tensors,
  make_llava_onevision,
  make_scorer_siglip,
  text_batch,
)
from support.llava_parity import (
  TOL,
  assert_generation_matches,
  assert_image_logits_match,
  assert_video_logits_match,
  image_prompt,
  video_prompt,
)

from ppllava_jax import ops
from ppllava_jax.models.ppllava import PoolingConfig, PPLLaVA

MAX_PATCHES = 2  # the fixture's anyres_max_2


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
  return make_llava_onevision(tmp_path_factory.mktemp("onevision"), max_patches=MAX_PATCHES)


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
  return make_scorer_siglip(tmp_path_factory.mktemp("siglip"))


@pytest.mark.slow
def test_video_logits_match_llava_onevision(onevision):
  hf, path = onevision
  ours = PPLLaVA.from_pretrained(path, pooling=PoolingConfig("llava_onevision"))
  # 7x7 patches -> 4x4 bilinear, and one newline per video
  assert_video_logits_match(hf, ours, *video_prompt(3, 3 * 4 * 4 + 1, 28))


@pytest.mark.slow
@pytest.mark.parametrize("size", [(30, 50), (50, 20), (60, 60)])
def test_anyres_image_logits_match_llava_onevision(onevision, size):
  """(30, 50) and (50, 20) unpad without the anyres_max resize; (60, 60) fills 2x2 tiles,
  14x14 features, 1.41x more than 2 tiles' worth, so resized to (int(14 // 1.41),) * 2 =
  9x9. transformers raises unless our placeholder count equals its feature count."""
  hf, path = onevision
  ours = PPLLaVA.from_pretrained(path, pooling=PoolingConfig("llava_onevision"))
  n_tokens = ours.cfg.image_tokens(size)
  if size == (60, 60):  # by hand: 49 base + 9x9 resized grid + 9 newlines
    assert n_tokens == 49 + 81 + 9 < ops.num_image_features(size, OV_PINPOINTS, 28, 4)
  assert_image_logits_match(hf, ours, *image_prompt(n_tokens, 28), size)


def test_video_generation_matches_transformers(onevision):
  hf, path = onevision
  ours = PPLLaVA.from_pretrained(path, pooling=PoolingConfig("llava_onevision"))
  ids, video = video_prompt(2, 2 * 16 + 1, 28, seed=2)
  assert_generation_matches(hf, ours, ids, pixel_values_videos=video)


@pytest.mark.slow
def test_siglip_scorer_is_reference_1b(onevision, siglip):
  """Per-patch embeddings: post_layernorm, the head's v slice of in_proj (no out_proj),
  then v + mlp(layernorm(v)), computed here with transformers' own SigLIP modules; text
  features: SigLIP's pooled text output; probabilities: Eq. 1 (the bias drops out)."""
  _, path = onevision
  sig_hf, sig_path = siglip
  model = PPLLaVA.from_pretrained(path, clip=sig_path, clip_extend_keep=None)
  scorer = model.scorer
  rng = np.random.default_rng(3)
  feats = rng.standard_normal((1, 2, 7, 7, 24)).astype(np.float32)
  clip_ids, clip_mask = text_batch(99, 98, [9], 12)
  head, d = sig_hf.vision_model.head, 24
  with torch.no_grad():
    x = sig_hf.vision_model.post_layernorm(torch.from_numpy(feats))
    v = torch.nn.functional.linear(
      x, head.attention.in_proj_weight[2 * d :], head.attention.in_proj_bias[2 * d :]
    )
    want_patch = (v + head.mlp(head.layernorm(v))).numpy()
    want_text = sig_hf.get_text_features(
      input_ids=torch.from_numpy(clip_ids), attention_mask=torch.from_numpy(clip_mask)
    )
    want_text = getattr(want_text, "pooler_output", want_text).numpy()
  got_patch = np.asarray(scorer.patch_embeddings(jnp.asarray(feats)))
  got_text = np.asarray(scorer.text_features(jnp.asarray(clip_ids), jnp.asarray(clip_mask)))
  assert np.abs(got_patch - want_patch).max() <= TOL
  assert np.abs(got_text - want_text).max() <= TOL
  probs = np.asarray(scorer(jnp.asarray(feats), jnp.asarray(got_text)))
  np.testing.assert_allclose(
    probs,
    ref.relevance(want_patch, want_text, float(sig_hf.logit_scale.item())),
    rtol=1e-4,
    atol=1e-9,
  )


@pytest.mark.slow
def test_uniform_relevance_makes_ppllava_equal_average(onevision, siglip):
  _, path = onevision
  from ppllava_jax.models import SiglipModel

  sig = SiglipModel.from_pretrained(siglip[1])
  # A zero value projection gives every patch the same embedding: uniform relevance.
  kernel = sig.vision_model.head.attention.in_proj.kernel
  kernel.set_value(kernel[...].at[:, 48:].set(0.0))
  sig.vision_model.head.attention.in_proj.bias.set_value(jnp.zeros(72))
  ppl = PPLLaVA.from_pretrained(path, clip=sig, pooling=PoolingConfig("ppllava"))
  avg = PPLLaVA.from_pretrained(path, pooling=PoolingConfig("average"))
  ids, video = video_prompt(4, 2 * 2 * 2, 28, seed=4)  # (2,3,3) on 4x7x7 -> 2x2x2
  clip_ids, clip_mask = text_batch(99, 98, [6], 8)
  a = ppl(
    jnp.asarray(ids),
    pixel_values_videos=jnp.asarray(video),
    clip_input_ids=jnp.asarray(clip_ids),
    clip_attention_mask=jnp.asarray(clip_mask),
  ).logits
  b = avg(jnp.asarray(ids), pixel_values_videos=jnp.asarray(video)).logits
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)


def test_save_round_trip_and_released_style_inference(onevision, tmp_path, caplog):
  """With the scorer inside, save -> load is bit-exact and transformers still loads the
  OneVision part; without ``ppllava_scorer`` in config.json (PPLLaVA's own folders) the
  SigLIP scorer is inferred from the tensors and computes the same."""
  from transformers import LlavaOnevisionForConditionalGeneration

  hf, path = onevision
  _, sig_path = make_scorer_siglip(tmp_path / "siglip", google_like=True)
  model = PPLLaVA.from_pretrained(path, clip=sig_path, clip_extend_keep=20)
  assert model.scorer.text_model.embeddings.position_embedding_res[...].shape == (36, 72)
  model.save_pretrained(tmp_path / "saved")
  config = json.loads((tmp_path / "saved" / "config.json").read_text())
  assert config["model_type"] == "llava_onevision" and config["ppllava_scorer"]["kind"] == "siglip"
  again = PPLLaVA.from_pretrained(tmp_path / "saved")
  assert again.cfg == model.cfg
  assert_same_state(model, again)
  assert_same_tensors(
    hf.state_dict(),
    LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "saved").state_dict(),
  )

  del config["ppllava_scorer"]
  (tmp_path / "saved" / "config.json").write_text(json.dumps(config))
  with caplog.at_level("WARNING"):
    released = PPLLaVA.from_pretrained(tmp_path / "saved")
  assert "scorer tensors found but config.json does not describe them" in caplog.text
  inferred = released.cfg.scorer.text
  assert (
    inferred.extend_keep,
    inferred.max_position_embeddings,
    inferred.num_attention_heads,
    inferred.projection_size,
  ) == (20, 4 * 24 - 3 * 20, 1, 24)
  clip_ids, clip_mask = text_batch(99, 98, [30, 7], 30)  # past position 20
  feats = jnp.asarray(np.random.default_rng(5).standard_normal((1, 2, 7, 7, 24)), jnp.float32)
  text = released.scorer.text_features(jnp.asarray(clip_ids), jnp.asarray(clip_mask))
  np.testing.assert_array_equal(
    np.asarray(text),
    np.asarray(model.scorer.text_features(jnp.asarray(clip_ids), jnp.asarray(clip_mask))),
  )
  np.testing.assert_array_equal(
    np.asarray(released.scorer(feats, text[:1])), np.asarray(model.scorer(feats, text[:1]))
  )
