"""CLIP parity with transformers' PyTorch CLIPModel on the same saved weights (f32)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from support import numpy_reference as ref
from support.hf_fixtures import (
  assert_same_state,
  assert_same_tensors,
  make_clip,
  rewrite_checkpoint,
  text_batch,
)

from ppllava_jax.convert.loader import CheckpointError
from ppllava_jax.models import CLIPModel

TOL = 1e-4  # float32 max-abs-diff, tiny models


@pytest.fixture(scope="module", params=["a", "b"])
def clip_pair(request, tmp_path_factory):
  hf, path = make_clip(request.param, tmp_path_factory.mktemp(f"clip_{request.param}"))
  return hf, path, CLIPModel.from_pretrained(path)


def pixels(hf, batch=2, seed=0):
  size = hf.config.vision_config.image_size
  return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def max_diff(ours, theirs) -> float:
  return float(np.abs(np.asarray(ours, np.float32) - theirs.detach().numpy()).max())


def test_vision_hidden_states_and_image_features(clip_pair):
  hf, _, ours = clip_pair
  x = pixels(hf)
  with torch.no_grad():
    out = hf.vision_model(pixel_values=torch.from_numpy(x), output_hidden_states=True)
    feats = hf.get_image_features(pixel_values=torch.from_numpy(x))
  hidden = ours.vision_hidden_states(jnp.asarray(x))
  assert len(hidden) == len(out.hidden_states) == hf.config.vision_config.num_hidden_layers + 1
  for i, (a, b) in enumerate(zip(hidden, out.hidden_states)):
    assert max_diff(a, b) <= TOL, f"hidden state {i}"
  feats = getattr(feats, "pooler_output", feats)
  assert max_diff(ours.get_image_features(jnp.asarray(x)), feats) <= TOL


def test_text_features_with_padding(clip_pair):
  hf, _, ours = clip_pair
  cfg = hf.config.text_config
  total = min(cfg.max_position_embeddings, 12)
  ids, mask = text_batch(cfg.vocab_size, cfg.eos_token_id, [total, 5, 2], total)
  with torch.no_grad():
    out = hf.text_model(
      input_ids=torch.from_numpy(ids),
      attention_mask=torch.from_numpy(mask),
      output_hidden_states=True,
    )
    feats = hf.get_text_features(
      input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
    )
  hidden = ours.text_hidden_states(jnp.asarray(ids), jnp.asarray(mask))
  assert len(hidden) == len(out.hidden_states)
  for i, (a, b) in enumerate(zip(hidden, out.hidden_states)):
    real = mask.astype(bool)  # padded positions are never read downstream
    assert np.abs(np.asarray(a) - b.numpy())[real].max() <= TOL, f"hidden state {i}"
  feats = getattr(feats, "pooler_output", feats)
  assert max_diff(ours.get_text_features(jnp.asarray(ids), jnp.asarray(mask)), feats) <= TOL


def test_save_load_round_trip_is_bit_exact_and_loads_in_transformers(clip_pair, tmp_path):
  from transformers import CLIPModel as HFCLIPModel

  hf, _, ours = clip_pair
  ours.save_pretrained(tmp_path / "saved")
  assert_same_state(ours, CLIPModel.from_pretrained(tmp_path / "saved"))
  back = HFCLIPModel.from_pretrained(tmp_path / "saved").state_dict()
  assert list(back) == list(hf.state_dict())
  assert_same_tensors(hf.state_dict(), back)


def test_bf16_kept_unless_asked(clip_pair, tmp_path):
  hf, path, _ = clip_pair
  hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
  hf.to(torch.float32)
  bf16 = CLIPModel.from_pretrained(tmp_path / "bf16")
  assert bf16.visual_projection.kernel[...].dtype == jnp.bfloat16
  as_f32 = CLIPModel.from_pretrained(tmp_path / "bf16", dtype=jnp.float32)
  assert as_f32.visual_projection.kernel[...].dtype == jnp.float32


# ---- extended text context (PPLLaVA, reference section 3) ----------------------------


@pytest.fixture(scope="module")
def clip_a(tmp_path_factory):
  return make_clip("a", tmp_path_factory.mktemp("clip_ext"))


def test_extended_text_tables_and_short_inputs(clip_a):
  hf, path = clip_a
  ext = CLIPModel.from_pretrained(path, extend_text=20)
  table = hf.text_model.embeddings.position_embedding.weight.detach().numpy()
  want = ref.extend_positions_original(table, keep=20)
  emb = ext.text_model.embeddings
  assert emb.position_embedding[...].shape == (248, 40)
  np.testing.assert_allclose(np.asarray(emb.position_embedding[...]), want, atol=1e-6)
  np.testing.assert_allclose(np.asarray(emb.position_embedding_res[...]), want, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(emb.position_embedding[:20]), table[:20])
  # Inputs that stay below position 20 see exactly CLIP's positions.
  ids, mask = text_batch(99, 98, [20, 7], 20)
  with torch.no_grad():
    want = hf.get_text_features(
      input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
    )
  want = getattr(want, "pooler_output", want)
  assert max_diff(ext.get_text_features(jnp.asarray(ids), jnp.asarray(mask)), want) <= TOL


def test_extended_text_runs_248_and_warns_past_it(clip_a, tmp_path):
  _, path = clip_a
  ext = CLIPModel.from_pretrained(path, extend_text=20)
  ids, mask = text_batch(99, 98, [248, 100], 248)
  feats = ext.get_text_features(jnp.asarray(ids), jnp.asarray(mask))
  assert feats.shape == (2, 24) and np.isfinite(np.asarray(feats)).all()
  long_ids, long_mask = text_batch(99, 98, [300, 100], 300)
  with pytest.warns(UserWarning, match="300 tokens .* truncated to 248"):
    long_feats = ext.get_text_features(jnp.asarray(long_ids), jnp.asarray(long_mask))
  cut = long_ids[:, :248].copy()
  cut[0, -1] = 98  # the truncated row ends in EOS, as a tokenizer truncating at 248 gives
  np.testing.assert_allclose(
    np.asarray(long_feats),
    np.asarray(ext.get_text_features(jnp.asarray(cut), jnp.asarray(long_mask[:, :248]))),
    atol=1e-6,
  )
  # The extended layout round-trips through save/load with its keep.
  ext.save_pretrained(tmp_path / "ext")
  again = CLIPModel.from_pretrained(tmp_path / "ext")
  assert again.cfg.text.extend_keep == 20 and again.cfg.text.max_position_embeddings == 248
  np.testing.assert_array_equal(
    np.asarray(again.text_model.embeddings.position_embedding_res[...]),
    np.asarray(ext.text_model.embeddings.position_embedding_res[...]),
  )


# ---- bad checkpoints ------------------------------------------------------------------


def test_missing_key_is_named(clip_a, tmp_path):
  _, path = clip_a
  bad = rewrite_checkpoint(
    path, tmp_path / "bad", lambda t: t.pop("vision_model.post_layernorm.bias")
  )
  with pytest.raises(
    CheckpointError, match=r"missing .*: 1\n\s+vision_model\.post_layernorm\.bias"
  ):
    CLIPModel.from_pretrained(bad)


def test_wrong_shape_and_unexpected_key_are_named(clip_a, tmp_path):
  _, path = clip_a

  def edit(t):
    t["text_projection.weight"] = np.zeros((24, 41), np.float32)
    t["vision_model.extra_head.weight"] = np.zeros((2,), np.float32)

  bad = rewrite_checkpoint(path, tmp_path / "bad", edit)
  with pytest.raises(CheckpointError) as err:
    CLIPModel.from_pretrained(bad)
  msg = str(err.value)
  assert (
    "text_projection.weight: checkpoint (24, 41) -> (41, 24), model text_projection.kernel "
    "expects (40, 24)" in msg
  )
  assert "unexpected" in msg and "vision_model.extra_head.weight" in msg


def test_wrong_model_type_and_missing_files(clip_a, tmp_path):
  _, path = clip_a
  (tmp_path / "sig").mkdir()
  cfg = json.loads((path / "config.json").read_text())
  cfg["model_type"] = "siglip"
  (tmp_path / "sig" / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match="model_type is 'siglip', expected one of \\['clip'\\]"):
    CLIPModel.from_pretrained(tmp_path / "sig")
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="no config.json"):
    CLIPModel.from_pretrained(tmp_path / "empty")
  with pytest.raises(CheckpointError, match="checkpoint folder not found"):
    CLIPModel.from_pretrained(tmp_path / "nowhere")
  cfg["model_type"] = "clip"
  (tmp_path / "sig" / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
    CLIPModel.from_pretrained(tmp_path / "sig")


def test_pixel_values_must_be_nchw(clip_pair):
  hf, _, ours = clip_pair
  x = pixels(hf).transpose(0, 2, 3, 1)
  with pytest.raises(ValueError, match="pixel_values must be \\(B, 3, .*NCHW"):
    ours.get_image_features(jnp.asarray(x))


def test_pure_jit_equals_eager_and_bf16_is_close(clip_pair):
  import jax

  from ppllava_jax.models.pure import pure

  hf, _, ours = clip_pair
  x = jnp.asarray(pixels(hf))
  fn, state = pure(ours, "get_image_features")
  eager = np.asarray(ours.get_image_features(x))
  np.testing.assert_allclose(np.asarray(jax.jit(fn)(state, x)), eager, rtol=0, atol=1e-5)
  bf16_state = jax.tree.map(lambda a: a.astype(jnp.bfloat16), state)
  got = np.asarray(jax.jit(fn)(bf16_state, x.astype(jnp.bfloat16)), np.float32)
  # bf16 weights and activations (f32 norms and softmax): ~2^-8 relative per op.
  assert np.abs(got - eager).max() <= 0.05 * np.abs(eager).max()


def test_sharded_checkpoint_loads_and_a_missing_shard_is_named(clip_a, tmp_path):
  hf, _ = clip_a
  hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
  shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
  assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
  ours = CLIPModel.from_pretrained(tmp_path / "sharded")
  np.testing.assert_array_equal(
    np.asarray(ours.text_projection.kernel[...]), hf.text_projection.weight.detach().numpy().T
  )
  shards[-1].unlink()
  with pytest.raises(
    CheckpointError, match=f"names shards that are not there: .*{shards[-1].name}"
  ):
    CLIPModel.from_pretrained(tmp_path / "sharded")
