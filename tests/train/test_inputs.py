"""train.core.inputs.embed_batch: a mixed fixed-shape batch equals each sample through the
inference path alone (``PPLLaVA.embed``), so padding, slots and gathers change nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from support.train_data import tiny_model_config

from ppllava_jax.data.batching import IGNORE
from ppllava_jax.data.sft.batches import BatchConfig, collate
from ppllava_jax.data.sft.samples import Sample
from ppllava_jax.models.ppllava import PPLLaVA
from ppllava_jax.train.core.inputs import embed_batch

IMG = 7
SCORER = 40


def sample(kind, rng, cfg, frames=4, size=None, pictures=0):
  media = {
    "video": cfg.video_tokens(frames),
    "text": 0,
    "image": cfg.image_tokens(size) if size else 0,
    "multi-image": 4 * pictures,
  }[kind]
  ids = np.concatenate(
    [[1, 11], np.full(media, -1 if kind == "video" else IMG), rng.integers(10, 90, 6)]
  ).astype(np.int32)
  scorer = np.concatenate([rng.integers(3, 500, 9), np.ones(SCORER - 9)]).astype(np.int32)
  s = Sample(
    ids,
    np.where(np.arange(len(ids)) >= len(ids) - 3, ids, IGNORE).astype(np.int32),
    np.ones(len(ids), np.int32),
    scorer,
    (np.arange(SCORER) < 9).astype(np.int32),
    kind,
  )
  pixels = lambda n: rng.normal(size=(n, 3, 24, 24)).astype(np.float32)
  if kind == "video":
    s.video = pixels(frames)
  elif kind == "image":
    s.image, s.image_size = pixels(1 + int(np.prod(_grid(cfg, size)))), size
  elif kind == "multi-image":
    s.pictures = pixels(pictures)
  return s


def _grid(cfg, size):
  from ppllava_jax import ops

  return ops.anyres_grid_shape(size, cfg.grid_pinpoints, cfg.vision.image_size)


@pytest.mark.parametrize("mode", ["ppllava", "average"])
def test_mixed_batch_rows_equal_each_sample_alone(mode):
  cfg = tiny_model_config(IMG, scorer_context=SCORER, mode=mode)
  model = PPLLaVA(cfg, rngs=nnx.Rngs(0))
  # exp(0) = 1: flat relevance, so the frames padding a video would take a real share
  # of the softmax if the mask let them (the random scorer's default is peaked on a patch)
  model.scorer.logit_scale.set_value(jnp.zeros(()))
  rng = np.random.default_rng(0)
  samples = [
    sample("video", rng, cfg, frames=4),
    sample("image", rng, cfg, size=(30, 50)),
    None,
    sample("multi-image", rng, cfg, pictures=2),
    sample("text", rng, cfg),
    sample("video", rng, cfg, frames=6),
  ]
  layout = BatchConfig(
    batch_size=6,
    seq_buckets=(32, 64),
    video_slots=3,
    image_slots=2,
    multi_image_slots=2,
    num_frames=6,
    max_pictures=3,
  )
  batch = collate(samples, cfg, layout, pad_id=0, scorer_length=SCORER)
  got = np.asarray(jax.jit(embed_batch)(model, jax.tree.map(jnp.asarray, batch)))
  for row, s in enumerate(samples):
    if s is None:
      continue
    ids, n = s.input_ids[None], s.length
    kwargs = dict(clip_input_ids=s.scorer_ids[None], clip_attention_mask=s.scorer_mask[None])
    if s.kind == "video":  # the 4-frame video sits in a 6-frame slot, masked
      want, _ = model.embed(ids, pixel_values_videos=s.video[None], **kwargs)
    elif s.kind == "image":
      want, _ = model.embed(ids, pixel_values=s.image[None], image_sizes=[s.image_size], **kwargs)
    elif s.kind == "multi-image":  # pooled as one item of its pictures, image kernel
      want = np.array(model.language_model.embed(jnp.maximum(ids, 0)))
      text = model.scorer.text_features(s.scorer_ids[None], s.scorer_mask[None])
      pooled = model.pool(model.patch_features(s.pictures[None]), text, cfg.pooling.image_kernel)
      want[ids == IMG] = np.asarray(pooled).reshape(-1, cfg.text.hidden_size)
    else:
      want = model.language_model.embed(ids)
    np.testing.assert_allclose(
      got[row, :n], np.asarray(want)[0], rtol=1e-5, atol=1e-5, err_msg=f"row {row}: {s.kind}"
    )
