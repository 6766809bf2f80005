"""train.align.losses against NumPy written from the two papers' equations and against
transformers' own losses (CLIPModel / SiglipModel with return_loss=True) on the same
embeddings."""

import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

from ppllava_jax.train.align.losses import clip_loss, retrieval_at_1, siglip_loss

TOL = 1e-5


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def numpy_clip(image, text, scale):
  """InfoNCE, CLIP eq.: mean_i of (CE of image i over texts + CE of text i over images) / 2."""
  logits = np.exp(scale) * _unit(image) @ _unit(text).T
  n = len(logits)
  i2t = [np.log(np.exp(logits[i]).sum()) - logits[i, i] for i in range(n)]
  t2i = [np.log(np.exp(logits[:, i]).sum()) - logits[i, i] for i in range(n)]
  return float(np.mean([(a + b) / 2 for a, b in zip(i2t, t2i)]))


def numpy_siglip(image, text, scale, bias):
  """SigLIP eq. 1: -1/|B| sum_i sum_j log sigmoid(z_ij (t x_i . y_j + b))."""
  logits = np.exp(scale) * _unit(image) @ _unit(text).T + bias
  n = len(logits)
  z = 2 * np.eye(n) - 1
  return float(-np.sum(np.log(1 / (1 + np.exp(-z * logits)))) / n)


@pytest.fixture
def pairs(rng):
  return rng.normal(size=(6, 8)).astype(np.float32), rng.normal(size=(6, 8)).astype(np.float32)


def test_losses_equal_the_equations_and_padded_rows_change_nothing(pairs):
  image, text = pairs
  assert float(clip_loss(image, text, np.float32(1.5))) == pytest.approx(
    numpy_clip(image, text, 1.5), rel=TOL
  )
  assert float(siglip_loss(image, text, np.float32(1.5), np.float32(-2.0))) == pytest.approx(
    numpy_siglip(image, text, 1.5, -2.0), rel=TOL
  )
  # rows 1 and 4 padding (garbage embeddings): the loss of the other four alone
  mask = np.array([1, 0, 1, 1, 0, 1], bool)
  real = mask.nonzero()[0]
  assert float(clip_loss(image, text, np.float32(1.5), mask)) == pytest.approx(
    numpy_clip(image[real], text[real], 1.5), rel=TOL
  )
  assert float(siglip_loss(image, text, np.float32(1.5), np.float32(-2.0), mask)) == pytest.approx(
    numpy_siglip(image[real], text[real], 1.5, -2.0), rel=TOL
  )


def test_gradients_are_finite_with_padding(pairs):
  import jax

  image, text = pairs
  mask = np.array([1, 0, 1, 1, 0, 1], bool)
  for loss in (
    lambda i, t: clip_loss(i, t, 1.5, mask),
    lambda i, t: siglip_loss(i, t, 1.5, -2.0, mask),
  ):
    g_image, g_text = jax.grad(loss, argnums=(0, 1))(image, text)
    assert np.isfinite(g_image).all() and np.isfinite(g_text).all()
    assert not g_image[~mask].any() and not g_text[~mask].any()  # padding gets no gradient


def _tiny(config_cls, model_cls, **extra):
  text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1,
              vocab_size=99, max_position_embeddings=16)  # fmt: skip
  vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1,
                image_size=30, patch_size=10)  # fmt: skip
  torch.manual_seed(0)
  return model_cls(config_cls(text_config=text, vision_config=vision, **extra)).eval()


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_losses_equal_transformers_on_its_own_embeddings(family):
  if family == "clip":
    model = _tiny(CLIPConfig, CLIPModel, projection_dim=16)
  else:
    model = _tiny(SiglipConfig, SiglipModel)
  ids = torch.randint(0, 99, (5, 7), generator=torch.Generator().manual_seed(1))
  pixels = torch.randn(5, 3, 30, 30, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    out = model(input_ids=ids, pixel_values=pixels, return_loss=True)
  image, text = out.image_embeds.numpy(), out.text_embeds.numpy()
  scale = model.logit_scale.detach().numpy()
  if family == "clip":
    ours = clip_loss(image, text, scale)
  else:
    ours = siglip_loss(image, text, scale, model.logit_bias.detach().numpy())
  assert float(ours) == pytest.approx(float(out.loss), rel=TOL)


def test_retrieval_counts_the_rows_whose_nearest_is_their_own():
  eye = np.eye(4, dtype=np.float32)
  text = eye.copy()
  text[2] = eye[3] + 0.1 * eye[2]  # cos with images 2 and 3: 0.0995 and 0.995
  got = retrieval_at_1(eye, text)
  # text 2's nearest image is 3 (wrong); every image's nearest text is its own: image 2
  # meets only text 2 (0.0995, the rest 0), image 3 prefers text 3 (1) to text 2 (0.995)
  assert float(got["text_to_image"]) == pytest.approx(3 / 4)
  assert float(got["image_to_text"]) == pytest.approx(1.0)
  # with row 3 padding, text 2's nearest real image is its own
  got = retrieval_at_1(eye, text, np.array([1, 1, 1, 0], bool))
  assert float(got["text_to_image"]) == pytest.approx(1.0)
