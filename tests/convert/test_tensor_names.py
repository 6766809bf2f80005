"""``convert.tensor_names``: any tree shaped like a model's parameters under checkpoint names.

The reference is what ``save_pretrained`` writes (read back with safetensors), and, for
the trainer's partial trees, the checkpoint names of the Vicuna SFT's trainable parts
written out by hand from the original's names (``multi_modal_projector.clip_*`` etc.).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file
from support.hf_fixtures import make_llava_next_video, make_scorer_clip

from ppllava_jax.convert import tensor_names
from ppllava_jax.convert.loader import CheckpointError
from ppllava_jax.models.ppllava import PPLLaVA
from ppllava_jax.train.core.partition import VICUNA_SFT, partition

# VICUNA_SFT's trainable parts, as checkpoint names (the original's module names)
TRAINABLE_NAMES = re.compile(
  r"language_model\..*|image_newline|multi_modal_projector\.linear_[12]\..*"
  r"|multi_modal_projector\.clip_(visual_ln\..*|visual_projection\.weight"
  r"|text_projection\.weight)"
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  root = tmp_path_factory.mktemp("names")
  _, path = make_llava_next_video(root / "llava")
  _, clip = make_scorer_clip(root / "clip")
  model = PPLLaVA.from_pretrained(path, clip=clip, clip_extend_keep=4)  # two position tables
  model.save_pretrained(root / "saved")
  return model, load_file(root / "saved" / "model.safetensors")


def test_the_parameters_get_the_names_and_layouts_save_pretrained_writes(saved):
  model, tensors = saved
  for tree in (nnx.state(model), nnx.to_pure_dict(nnx.state(model))):
    named = tensor_names(model, tree)
    assert named.keys() == tensors.keys()
    for key, want in tensors.items():
      np.testing.assert_array_equal(np.asarray(named[key]), want, err_msg=key)
  # the layouts differ where the rules transpose: a torch (out, in) linear, a conv
  kernel = model.multi_modal_projector.linear_1.kernel[...]
  assert named["multi_modal_projector.linear_1.weight"].shape == kernel.shape[::-1]
  assert named["vision_tower.vision_model.embeddings.patch_embedding.weight"].ndim == 4


def test_a_gradient_of_the_trainable_subset_names_exactly_those_parameters(saved):
  model, tensors = saved
  graphdef, trainable, frozen = partition(model, VICUNA_SFT).split(model)
  ids = jnp.asarray([[3, 7, 11, 5]])

  def loss(params):
    merged = nnx.merge(graphdef, params, frozen)
    logits = merged.language_model(ids).logits
    text = merged.scorer.text_features(ids, jnp.ones_like(ids))
    return jnp.mean(logits**2) + jnp.sum(text**2)

  grads = jax.jit(jax.grad(loss))(trainable)
  want = {k for k in tensors if TRAINABLE_NAMES.fullmatch(k)}
  assert 0 < len(want) < len(tensors)
  for names in (tensor_names(model, grads), tensor_names(graphdef, grads)):
    assert names.keys() == want
    for key in want:
      assert names[key].shape == tensors[key].shape, key
  head = grads["language_model"]["lm_head"]["kernel"][...]
  np.testing.assert_array_equal(tensor_names(model, grads)["language_model.lm_head.weight"], head.T)
  assert float(jnp.abs(head).max()) > 0  # a real gradient, not zeros
  moments = optax.adam(1e-3).init(trainable)[0]  # Adam's first and second moments
  assert tensor_names(model, moments.mu).keys() == tensor_names(model, moments.nu).keys() == want


def test_leaves_without_a_checkpoint_name_are_named_in_one_error(saved):
  model, _ = saved
  graphdef, _ = nnx.split(model)
  bad = {
    "scorer": {"nothing": jnp.zeros(2)},
    "image_newline": jnp.zeros(3),
    "language_model": {"lm_head": {"kernel": jnp.zeros((1, 1))}},
  }
  with pytest.raises(CheckpointError) as err:
    tensor_names(model, bad)
  message = str(err.value)
  assert message.startswith("3 leaves of the tree have no checkpoint tensor name")
  assert "scorer.nothing: not a parameter of the model" in message
  assert "image_newline: shape (3,), the parameter's is (" in message
  assert "language_model.lm_head.kernel: shape (1, 1)" in message
  with pytest.raises(CheckpointError, match="unknown.leaf: no rule of the table names it"):
    tensor_names(graphdef, {"unknown": {"leaf": jnp.zeros(2)}})
