"""SigLIP parity with transformers' PyTorch SiglipModel on the same saved weights (f32)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from support import numpy_reference as ref
from support.hf_fixtures import assert_same_state, assert_same_tensors, make_siglip, text_batch

from ppllava_jax.convert.loader import CheckpointError
from ppllava_jax.models import SiglipModel
from ppllava_jax.models.siglip import NO_TOKEN

TOL = 1e-4  # float32 max-abs-diff, tiny models


@pytest.fixture(scope="module", params=["a", "b"])
def siglip_pair(request, tmp_path_factory):
  hf, path = make_siglip(request.param, tmp_path_factory.mktemp(f"siglip_{request.param}"))
  return hf, path, SiglipModel.from_pretrained(path)


def max_diff(ours, theirs) -> float:
  return float(np.abs(np.asarray(ours, np.float32) - theirs.detach().numpy()).max())


def pooled(out):
  return getattr(out, "pooler_output", out)


def test_vision_hidden_states_and_image_features(siglip_pair):
  hf, _, ours = siglip_pair
  size = hf.config.vision_config.image_size
  x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
  with torch.no_grad():
    out = hf.vision_model(pixel_values=torch.from_numpy(x), output_hidden_states=True)
  hidden = ours.vision_hidden_states(jnp.asarray(x))
  assert len(hidden) == len(out.hidden_states) == hf.config.vision_config.num_hidden_layers + 1
  for i, (a, b) in enumerate(zip(hidden, out.hidden_states)):
    assert max_diff(a, b) <= TOL, f"hidden state {i}"
  last = ours.vision_model.post_layernorm(hidden[-1])
  assert max_diff(last, out.last_hidden_state) <= TOL
  if hf.config.vision_config.vision_use_head:
    with torch.no_grad():
      feats = pooled(hf.get_image_features(pixel_values=torch.from_numpy(x)))
    assert max_diff(ours.get_image_features(jnp.asarray(x)), feats) <= TOL
  else:
    with pytest.raises(ValueError, match="no pooling head"):
      ours.get_image_features(jnp.asarray(x))


def test_text_features_with_padding(siglip_pair):
  hf, _, ours = siglip_pair
  cfg = hf.config.text_config
  total = min(cfg.max_position_embeddings, 12)
  ids, mask = text_batch(cfg.vocab_size, cfg.eos_token_id, [total, 5, 2], total)
  ids[mask == 0] = cfg.pad_token_id
  tids, tmask = torch.from_numpy(ids), torch.from_numpy(mask)
  with torch.no_grad():
    out = hf.text_model(input_ids=tids, attention_mask=tmask, output_hidden_states=True)
    feats = pooled(hf.get_text_features(input_ids=tids, attention_mask=tmask))
  hidden = ours.text_hidden_states(jnp.asarray(ids), jnp.asarray(mask))
  assert len(hidden) == len(out.hidden_states)
  for i, (a, b) in enumerate(zip(hidden, out.hidden_states)):
    assert max_diff(a, b) <= TOL, f"hidden state {i}"
  # Pooled at the last position, padding included, exactly as transformers does.
  assert max_diff(ours.get_text_features(jnp.asarray(ids), jnp.asarray(mask)), feats) <= TOL


def test_rows_ending_in_no_token_pool_their_text_alone(siglip_pair):
  """The original's unpadded training text in a fixed-shape batch: ids past a row's text
  are ``NO_TOKEN`` (mask 0), and its features are transformers' on that text alone; a
  padded row beside it keeps transformers' padded pooling (the last position)."""
  hf, _, ours = siglip_pair
  cfg = hf.config.text_config
  total = min(cfg.max_position_embeddings, 12)
  lengths = [total, 5, 2]
  ids, mask = text_batch(cfg.vocab_size, cfg.eos_token_id, lengths, total)
  short = np.where(mask == 1, ids, NO_TOKEN)
  short[2] = np.where(mask[2] == 1, ids[2], cfg.pad_token_id)  # row 2: padded
  got = np.asarray(ours.get_text_features(jnp.asarray(short), jnp.asarray(mask)))
  with torch.no_grad():
    for row, n in enumerate(lengths[:2]):
      alone = pooled(hf.get_text_features(input_ids=torch.from_numpy(ids[row : row + 1, :n])))
      assert max_diff(got[row : row + 1], alone) <= 1e-5, f"row {row}"
    padded = torch.from_numpy(short[2:]), torch.from_numpy(mask[2:])
    assert (
      max_diff(got[2:], pooled(hf.get_text_features(input_ids=padded[0], attention_mask=padded[1])))
      <= 1e-5
    )


def test_save_load_round_trip_is_bit_exact_and_loads_in_transformers(siglip_pair, tmp_path):
  from transformers import SiglipModel as HFSiglipModel

  hf, _, ours = siglip_pair
  ours.save_pretrained(tmp_path / "saved")
  assert_same_state(ours, SiglipModel.from_pretrained(tmp_path / "saved"))
  assert_same_tensors(
    hf.state_dict(), HFSiglipModel.from_pretrained(tmp_path / "saved").state_dict()
  )


@pytest.mark.slow
def test_text_context_extension_64_to_196(tmp_path):
  hf, path = make_siglip("a", tmp_path / "ckpt")
  ext = SiglipModel.from_pretrained(path, extend_text=20)
  table = hf.text_model.embeddings.position_embedding.weight.detach().numpy()
  emb = ext.text_model.embeddings
  assert emb.position_embedding_res[...].shape == (196, 40)
  np.testing.assert_allclose(
    np.asarray(emb.position_embedding_res[...]),
    ref.extend_positions_original(table, keep=20),
    atol=1e-6,
  )
  ids, mask = text_batch(99, 98, [196, 30], 196)
  assert np.isfinite(np.asarray(ext.get_text_features(jnp.asarray(ids), jnp.asarray(mask)))).all()
  with pytest.warns(UserWarning, match="200 tokens .* truncated to 196"):
    ext.get_text_features(jnp.asarray(np.ones((1, 200), np.int64)))
  # Bidirectional attention: with 20 or fewer tokens, the extension changes nothing.
  ids, mask = text_batch(99, 98, [20, 20], 20)
  with torch.no_grad():
    want = pooled(hf.get_text_features(input_ids=torch.from_numpy(ids)))
  assert max_diff(ext.get_text_features(jnp.asarray(ids)), want) <= TOL


def test_clip_checkpoint_is_refused(tmp_path):
  from support.hf_fixtures import make_clip

  _, path = make_clip("b", tmp_path / "clip")
  with pytest.raises(CheckpointError, match="model_type is 'clip', expected one of \\['siglip'\\]"):
    SiglipModel.from_pretrained(path)
