"""The PPLLaVA composition against transformers' LlavaNextVideo on the same tiny weights."""

import jax.numpy as jnp
import numpy as np
import pytest
from support import llava_parity as parity
from support import numpy_reference as ref
from support.hf_fixtures import (
  LLAVA_IMAGE_TOKEN,
  LLAVA_PINPOINTS,
  LLAVA_VIDEO_TOKEN,
  assert_same_state,
  assert_same_tensors,
  make_llava_next_video,
  make_scorer_clip,
  text_batch,
)

from ppllava_jax import ops
from ppllava_jax.models.ppllava import PoolingConfig, PPLLaVA


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
  return make_llava_next_video(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def scorer_path(tmp_path_factory):
  return make_scorer_clip(tmp_path_factory.mktemp("scorer"))[1]


def video_prompt(frames: int, tokens_per_frame: int, seed=0):
  return parity.video_prompt(frames, frames * tokens_per_frame, 24, seed)


def test_video_logits_match_llava_next_video(llava):
  hf, path = llava
  ours = PPLLaVA.from_pretrained(path, pooling=PoolingConfig("llava_next_video"))
  parity.assert_video_logits_match(hf, ours, *video_prompt(4, 9))  # 6x6 -> 2x2 mean -> 3x3


@pytest.mark.parametrize("size", [(30, 50), (50, 20)])
def test_anyres_image_logits_match_llava_next_video(llava, size):
  hf, path = llava
  ours = PPLLaVA.from_pretrained(path, pooling=PoolingConfig("llava_next_video"))
  n_tokens = ops.num_image_features(size, LLAVA_PINPOINTS, 24, 4)
  parity.assert_image_logits_match(hf, ours, *parity.image_prompt(n_tokens, 24), size)


def test_video_generation_matches_transformers(llava):
  hf, path = llava
  ours = PPLLaVA.from_pretrained(path, pooling=PoolingConfig("llava_next_video"))
  ids, video = video_prompt(2, 9, seed=2)
  parity.assert_generation_matches(hf, ours, ids, pixel_values_videos=video)


def test_anyres_image_generation_matches_transformers(llava):
  hf, path = llava
  ours = PPLLaVA.from_pretrained(path, pooling=PoolingConfig("llava_next_video"))
  size = (30, 50)  # 1 + 2x2 tiles
  ids, pixels = parity.image_prompt(ops.num_image_features(size, LLAVA_PINPOINTS, 24, 4), 24, 8)
  parity.assert_generation_matches(hf, ours, ids, pixel_values=pixels, image_sizes=[size])


def test_uniform_relevance_makes_ppllava_equal_average(llava, scorer_path):
  from ppllava_jax.models import CLIPModel

  _, path = llava
  scorer = CLIPModel.from_pretrained(scorer_path)
  # A zero visual projection gives every patch the same (zero) cosine: uniform relevance.
  scorer.visual_projection.kernel.set_value(jnp.zeros_like(scorer.visual_projection.kernel[...]))
  ppl = PPLLaVA.from_pretrained(path, clip=scorer, pooling=PoolingConfig("ppllava"))
  avg = PPLLaVA.from_pretrained(path, pooling=PoolingConfig("average"))
  ids, video = video_prompt(4, 2, seed=3)  # (2,3,3) on 4x6x6 -> 2x2x2 = 8 tokens
  clip_ids, clip_mask = text_batch(99, 98, [6], 8)
  a = ppl(
    jnp.asarray(ids),
    pixel_values_videos=jnp.asarray(video),
    clip_input_ids=jnp.asarray(clip_ids),
    clip_attention_mask=jnp.asarray(clip_mask),
  ).logits
  b = avg(jnp.asarray(ids), pixel_values_videos=jnp.asarray(video)).logits
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode, ref_mode", [("ppllava", "softmax"), ("paper", "weighted_sum")])
def test_scored_modes_pool_with_the_scorers_relevance(llava, scorer_path, mode, ref_mode):
  """The model's video tokens are the NumPy window pooling (Eq. 2-3 / the original's
  softmax) of its projected patches under Eq. 1's relevance, and not their average."""
  _, path = llava
  model = PPLLaVA.from_pretrained(
    path, clip=scorer_path, clip_extend_keep=4, pooling=PoolingConfig(mode)
  )
  _, video = video_prompt(4, 2, seed=4)
  clip_ids, clip_mask = text_batch(99, 98, [6], 8)
  text = model.scorer.text_features(jnp.asarray(clip_ids), jnp.asarray(clip_mask))
  feats = model.patch_features(jnp.asarray(video))
  probs = ref.relevance(
    np.asarray(model.scorer.patch_embeddings(feats)),
    np.asarray(text),
    float(model.scorer.logit_scale[...]),
  )
  projected = np.asarray(model.multi_modal_projector(feats), np.float64)
  kernel = model.cfg.pooling.video_kernel
  got = np.asarray(model.encode_videos(jnp.asarray(video), text)).reshape(1, 2, 2, 2, -1)
  np.testing.assert_allclose(
    got, ref.pool(projected, probs, kernel, kernel, ref_mode), rtol=0, atol=1e-5
  )
  average = ref.pool(projected, probs, kernel, kernel, "average")
  assert np.abs(got - average).max() > 100 * 1e-5


def test_relevance_follows_the_prompt(llava, scorer_path):
  """Frames showing what the prompt names take the relevance, exactly.

  Frames 0, 2, 3 show picture X (every patch feature e_0), frame 1 picture Y (e_1).
  With the scorer's visual LayerNorm the identity, its visual projection maps ln(e_0)
  to +axis and the prompt's text feature is that axis, so X patches have cosine +1
  and Y patches -1: at CLIP's scale (exp 4.6 ~ 100) frame 1 gets e^-200 of the weight
  of an X frame, and the three X frames share the rest equally.
  """
  _, path = llava
  model = PPLLaVA.from_pretrained(path, clip=scorer_path, clip_extend_keep=None)
  scorer = model.scorer
  scorer.logit_scale.set_value(jnp.asarray(4.6052, jnp.float32))  # CLIP's trained value
  scorer.visual_ln.weight.set_value(jnp.ones(24))
  scorer.visual_ln.bias.set_value(jnp.zeros(24))
  feats = np.zeros((1, 4, 6, 6, 24), np.float32)
  feats[0, [0, 2, 3], ..., 0] = 1.0
  feats[0, 1, ..., 1] = 1.0
  x_dir = np.asarray(scorer.visual_ln(jnp.asarray(feats[0, 0, 0, 0])))
  kernel = np.zeros((24, 12), np.float32)
  kernel[:, 0] = x_dir / (x_dir @ x_dir)  # ln(e_0) -> +axis; ln(e_1) -> -1/23 axis
  scorer.visual_projection.kernel.set_value(jnp.asarray(kernel))
  clip_ids, clip_mask = text_batch(99, 98, [5], 8)
  pooled = np.asarray(scorer.text_model(jnp.asarray(clip_ids), jnp.asarray(clip_mask))[2])[0]
  axis = np.eye(12, dtype=np.float32)[0]
  scorer.text_projection.kernel.set_value(jnp.asarray(np.outer(pooled, axis) / (pooled @ pooled)))
  text = scorer.text_features(jnp.asarray(clip_ids), jnp.asarray(clip_mask))
  np.testing.assert_allclose(np.asarray(text)[0], axis, atol=1e-5)
  probs = np.asarray(scorer(jnp.asarray(feats), text))
  patch_e = np.asarray(scorer.patch_embeddings(jnp.asarray(feats)))
  np.testing.assert_allclose(
    probs,
    ref.relevance(patch_e, np.asarray(text), float(scorer.logit_scale[...])),
    rtol=1e-4,
    atol=1e-30,
  )
  per_frame = probs[0].sum((1, 2))
  assert per_frame[1] < 1e-30
  np.testing.assert_allclose(per_frame[[0, 2, 3]], 1 / 3, rtol=1e-5)


def test_placeholder_count_mismatch_names_both_counts(llava):
  _, path = llava
  ours = PPLLaVA.from_pretrained(path, pooling=PoolingConfig("llava_next_video"))
  ids, video = video_prompt(4, 9)
  ids = np.delete(ids, [5, 6, 7], axis=1)  # three of the 36 video placeholders
  with pytest.raises(ValueError, match="33 placeholder tokens .* but 36 media tokens"):
    ours(jnp.asarray(ids), pixel_values_videos=jnp.asarray(video))


def test_scored_modes_need_a_scorer(llava):
  _, path = llava
  with pytest.raises(ValueError, match="needs the relevance scorer"):
    PPLLaVA.from_pretrained(path, pooling=PoolingConfig("ppllava"))
  with pytest.raises(ValueError, match="pooling mode must be one of"):
    PoolingConfig("mean")


def test_save_load_round_trip_with_scorer_inside(llava, scorer_path, tmp_path):
  from transformers import LlavaNextVideoForConditionalGeneration

  hf, path = llava
  model = PPLLaVA.from_pretrained(path, clip=scorer_path, clip_extend_keep=4)  # 16 -> 52 positions
  assert model.scorer.text_model.embeddings.position_embedding_res[...].shape == (52, 20)
  model.save_pretrained(tmp_path / "saved")
  again = PPLLaVA.from_pretrained(tmp_path / "saved")
  assert again.cfg.scorer == model.cfg.scorer  # saved inside, as PPLLaVA's own checkpoints
  assert_same_state(model, again)
  assert_same_tensors(
    hf.state_dict(),
    LlavaNextVideoForConditionalGeneration.from_pretrained(tmp_path / "saved").state_dict(),
  )


def test_btadapter_tower_from_a_released_style_checkpoint(llava, tmp_path, caplog):
  """A llava checkpoint plus BT-Adapter tensors under the released names loads as a
  BT-Adapter PPLLaVA whose patch features are the (parity-tested) tower's layer -2."""
  import json

  import flax.nnx as nnx
  from safetensors.numpy import load_file, save_file

  from ppllava_jax.convert.btadapter import BTADAPTER_RULES
  from ppllava_jax.convert.loader import hf_tensors
  from ppllava_jax.models import BTAdapterConfig, CLIPVisionBTAdapter

  _, path = llava
  base = PPLLaVA.from_pretrained(path, pooling=PoolingConfig("average"))
  tower = CLIPVisionBTAdapter.from_clip(
    base.vision_tower, BTAdapterConfig(depth=2), rngs=nnx.Rngs(0)
  )
  rng = np.random.default_rng(5)
  for block in tower.vision_model.btadapter_T_layers:  # a trained-looking, non-identity adapter
    block.temporal_fc.kernel.set_value(
      jnp.asarray(rng.standard_normal((24, 24)) * 0.1, jnp.float32)
    )
  tensors = load_file(path / "model.safetensors")
  tensors.update(
    {
      f"vision_tower.{name}": np.asarray(value)
      for name, value in hf_tensors(tower, BTADAPTER_RULES)
      if "btadapter" in name
    }
  )
  (tmp_path / "released").mkdir()
  save_file(tensors, tmp_path / "released" / "model.safetensors", metadata={"format": "pt"})
  (tmp_path / "released" / "config.json").write_text((path / "config.json").read_text())
  with caplog.at_level("WARNING"):
    model = PPLLaVA.from_pretrained(tmp_path / "released", pooling=PoolingConfig("average"))
  assert "BT-Adapter tensors found" in caplog.text and "depth=2" in caplog.text
  assert model.cfg.btadapter == BTAdapterConfig(depth=2)
  video = rng.standard_normal((1, 4, 3, 24, 24)).astype(np.float32)
  got = np.asarray(model.patch_features(jnp.asarray(video)))
  want = np.asarray(tower(jnp.asarray(video))[0][-2])[:, :, 1:].reshape(1, 4, 6, 6, 24)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  plain = np.asarray(base.patch_features(jnp.asarray(video)))
  assert np.abs(got - plain).max() > 1e-3  # the adapter does change what the LLM sees
  ids, _ = video_prompt(4, 2)
  assert np.isfinite(
    np.asarray(model(jnp.asarray(ids), pixel_values_videos=jnp.asarray(video)).logits)
  ).all()
  model.save_pretrained(tmp_path / "saved")  # now config.json records the adapter
  assert (
    json.loads((tmp_path / "saved" / "config.json").read_text())["ppllava_btadapter"]["depth"] == 2
  )
  again = PPLLaVA.from_pretrained(tmp_path / "saved", pooling=PoolingConfig("average"))
  np.testing.assert_array_equal(np.asarray(again.patch_features(jnp.asarray(video))), got)


@pytest.mark.parametrize("mode", ["average", "ppllava"])
def test_mixed_batch_equals_samples_alone(llava, scorer_path, mode):
  """Sample 0 holds a video, sample 1 two anyres images: batched logits equal each
  sample run alone (media owners, merge order and per-sample prompts line up)."""
  _, path = llava
  model = PPLLaVA.from_pretrained(
    path,
    clip=scorer_path if mode == "ppllava" else None,
    clip_extend_keep=None,
    pooling=PoolingConfig(mode),
  )
  rng = np.random.default_rng(6)
  video = rng.standard_normal((1, 4, 3, 24, 24)).astype(np.float32)
  sizes = np.asarray([(30, 50), (50, 20)])
  images = rng.standard_normal((2, 5, 3, 24, 24)).astype(np.float32)
  n_img = [ops.num_image_features(tuple(s), LLAVA_PINPOINTS, 24, 4, pool=3) for s in sizes]
  row0 = [1, 5] + [LLAVA_VIDEO_TOKEN] * 8 + [6, 7]  # (2,3,3) on 4x6x6 frames -> 8 tokens
  row1 = [1, 8] + [LLAVA_IMAGE_TOKEN] * n_img[0] + [9] + [LLAVA_IMAGE_TOKEN] * n_img[1] + [10]
  total = max(len(row0), len(row1))
  ids = np.zeros((2, total), np.int64)
  mask = np.zeros((2, total), np.int64)
  for i, row in enumerate((row0, row1)):
    ids[i, : len(row)], mask[i, : len(row)] = row, 1
  clip_ids, clip_mask = text_batch(99, 98, [6, 4], 8, seed=7)
  batched = np.asarray(
    model(
      jnp.asarray(ids),
      jnp.asarray(mask),
      pixel_values_videos=jnp.asarray(video),
      pixel_values=jnp.asarray(images),
      image_sizes=sizes,
      clip_input_ids=jnp.asarray(clip_ids),
      clip_attention_mask=jnp.asarray(clip_mask),
    ).logits
  )
  alone0 = np.asarray(
    model(
      jnp.asarray(ids[:1, : len(row0)]),
      pixel_values_videos=jnp.asarray(video),
      clip_input_ids=jnp.asarray(clip_ids[:1]),
      clip_attention_mask=jnp.asarray(clip_mask[:1]),
    ).logits
  )
  alone1 = np.asarray(
    model(
      jnp.asarray(ids[1:, : len(row1)]),
      pixel_values=jnp.asarray(images),
      image_sizes=sizes,
      clip_input_ids=jnp.asarray(clip_ids[1:]),
      clip_attention_mask=jnp.asarray(clip_mask[1:]),
    ).logits
  )
  np.testing.assert_allclose(batched[0, : len(row0)], alone0[0], rtol=0, atol=1e-5)
  np.testing.assert_allclose(batched[1, : len(row1)], alone1[0], rtol=0, atol=1e-5)


def test_released_style_folder_infers_its_scorer_and_checks_token_embeddings(
  llava, tmp_path, caplog
):
  """PPLLaVA's own config.json files omit the scorer: it is inferred from the tensors
  (and said so), and a given CLIP is compared, not substituted."""
  import json

  _, path = llava
  clip_hf, clip_path = make_scorer_clip(tmp_path / "clip", openai_like=True)
  model = PPLLaVA.from_pretrained(path, clip=clip_path, clip_extend_keep=20)
  model.save_pretrained(tmp_path / "released")
  config = json.loads((tmp_path / "released" / "config.json").read_text())
  del config["ppllava_scorer"]  # as PPLLaVA's own checkpoints: not recorded
  (tmp_path / "released" / "config.json").write_text(json.dumps(config))
  with caplog.at_level("WARNING"):
    again = PPLLaVA.from_pretrained(tmp_path / "released")
  assert "scorer tensors found but config.json does not describe them" in caplog.text
  assert again.cfg.scorer.text.extend_keep == 20
  assert again.cfg.scorer.text.max_position_embeddings == 4 * 24 - 3 * 20
  clip_ids, clip_mask = text_batch(99, 2, [30, 7], 30)  # past position 20, legacy EOS pooling
  np.testing.assert_array_equal(
    np.asarray(again.scorer.text_features(jnp.asarray(clip_ids), jnp.asarray(clip_mask))),
    np.asarray(model.scorer.text_features(jnp.asarray(clip_ids), jnp.asarray(clip_mask))),
  )
  caplog.clear()
  with caplog.at_level("WARNING"):
    PPLLaVA.from_pretrained(tmp_path / "released", clip=clip_path)
  assert "token embedding equals the given encoder's" in caplog.text
  caplog.clear()
  _, other = make_scorer_clip(tmp_path / "other", seed=9, openai_like=True)
  with caplog.at_level("WARNING"):
    PPLLaVA.from_pretrained(tmp_path / "released", clip=other)
  assert "token embedding differs from the given encoder's" in caplog.text


def test_embed_then_the_llm_is_the_forward(llava, scorer_path):
  """``embed`` gives what the forward feeds the LLM: the text's embeddings with the media
  tokens at their placeholders, and the mask (DPO encodes media once with it)."""
  _, path = llava
  model = PPLLaVA.from_pretrained(path, clip=scorer_path, clip_extend_keep=None)
  ids, video = video_prompt(4, 2, seed=3)
  clip_ids, clip_mask = text_batch(99, 98, [6], 8)
  media = dict(
    pixel_values_videos=jnp.asarray(video),
    clip_input_ids=jnp.asarray(clip_ids),
    clip_attention_mask=jnp.asarray(clip_mask),
  )
  emb_bld, mask_bl = model.embed(jnp.asarray(ids), **media)
  assert emb_bld.shape == (*ids.shape, 32) and mask_bl.dtype == bool and bool(mask_bl.all())
  text_bld = np.asarray(model.language_model.embed(jnp.asarray(np.maximum(ids, 0))))
  media_l = ids[0] == LLAVA_VIDEO_TOKEN
  np.testing.assert_array_equal(np.asarray(emb_bld)[:, ~media_l], text_bld[:, ~media_l])
  text_be = model.scorer.text_features(media["clip_input_ids"], media["clip_attention_mask"])
  np.testing.assert_array_equal(
    np.asarray(emb_bld)[0, media_l], np.asarray(model.encode_videos(jnp.asarray(video), text_be))[0]
  )
  np.testing.assert_array_equal(
    np.asarray(model.language_model(inputs_embeds=emb_bld, attention_mask=mask_bl).logits),
    np.asarray(model(jnp.asarray(ids), **media).logits),
  )


def test_every_pooling_mode_makes_the_tokens_it_counts(llava, scorer_path):
  """Per mode, a video's and an anyres image's tokens number what ``video_tokens`` /
  ``image_tokens`` say (the processor writes that many placeholders)."""
  import dataclasses

  from ppllava_jax.models.ppllava import POOLING_MODES

  _, path = llava
  model = PPLLaVA.from_pretrained(path, clip=scorer_path, clip_extend_keep=None)
  rng = np.random.default_rng(8)
  video = jnp.asarray(rng.standard_normal((1, 4, 3, 24, 24)), jnp.float32)
  tiles = jnp.asarray(rng.standard_normal((1, 5, 3, 24, 24)), jnp.float32)
  clip_ids, clip_mask = text_batch(99, 98, [6], 8)
  text = model.scorer.text_features(jnp.asarray(clip_ids), jnp.asarray(clip_mask))
  cfg = model.cfg
  for mode in POOLING_MODES:
    model.cfg = dataclasses.replace(cfg, pooling=PoolingConfig(mode))
    assert model.encode_videos(video, text).shape[1] == model.cfg.video_tokens(4), mode
    (image,) = model.encode_images(tiles, [(30, 50)], text)
    assert image.shape[0] == model.cfg.image_tokens((30, 50)), mode
