"""The processor: ids and pixels as transformers' LlavaNextProcessor makes them, and
bucketed batches whose logits equal each item run alone."""

import dataclasses
import logging

import jax.numpy as jnp
import numpy as np
import pytest
from support.hf_fixtures import LLAVA_PINPOINTS, make_llava_next_video, make_scorer_clip

from ppllava_jax.data.processor import Media, Processor, Prompt
from ppllava_jax.data.text.tokenizer import char_tokenizer
from ppllava_jax.models.ppllava import PoolingConfig, PPLLaVA

# Characters whose char_tokenizer ids fit the tiny LLM's vocabulary (64; 62 and 63
# are its image and video placeholders): no lower case, no "Y", "Z", no newline.
TEXT = "USER: <image> WHAT IS IT? ASSISTANT:"


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
  return make_llava_next_video(tmp_path_factory.mktemp("llava"))[1]


@pytest.fixture(scope="module")
def scorer_path(tmp_path_factory):
  return make_scorer_clip(tmp_path_factory.mktemp("scorer"))[1]


def image(h, w, seed=0):
  return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


@pytest.mark.parametrize("size", [(30, 50), (50, 20), (24, 24)])
def test_image_prompt_matches_llava_next_processor(llava, size):
  from transformers import LlavaNextProcessor
  from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
  )

  tok = char_tokenizer()
  model_cfg = PPLLaVA.from_pretrained(llava, pooling=PoolingConfig("llava_next_video")).cfg
  # the char tokenizer's text ids, not the tiny LLM's 64: what is compared is the processor
  cfg = dataclasses.replace(
    model_cfg,
    image_token_index=tok.convert_tokens_to_ids("<image>"),
    text=dataclasses.replace(model_cfg.text, vocab_size=len(tok)),
  )
  theirs = LlavaNextProcessor(
    image_processor=LlavaNextImageProcessorPil(
      image_grid_pinpoints=LLAVA_PINPOINTS,
      size={"shortest_edge": 24},
      crop_size={"height": 24, "width": 24},
    ),
    tokenizer=tok,
    patch_size=4,
    vision_feature_select_strategy="default",
    num_additional_image_tokens=1,  # the CLS token, as the hub's llava-hf processors say
    image_token="<image>",
  )
  text = "USER: <image>\nwhat is it? ASSISTANT: "
  want = theirs(images=[image(*size)], text=[text], return_tensors="np")
  enc = Processor(cfg, tok).encode(Prompt(text, (Media("image", image(*size)),)))
  np.testing.assert_array_equal(enc.input_ids, want["input_ids"][0])
  ((tiles, got_size),) = enc.images
  assert got_size == tuple(want["image_sizes"][0])
  assert np.abs(tiles - want["pixel_values"][0, : len(tiles)]).max() <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["average", "ppllava"])
def test_bucketed_batch_equals_items_alone(llava, scorer_path, mode):
  """A video item and an image item, padded to length 16k and filled to 3 rows: the
  real rows' logits equal each item encoded and run alone, unpadded."""
  model = PPLLaVA.from_pretrained(
    llava,
    clip=scorer_path if mode == "ppllava" else None,
    clip_extend_keep=None,
    pooling=PoolingConfig(mode),
  )
  proc = Processor(model.cfg, char_tokenizer(), char_tokenizer() if mode == "ppllava" else None)
  frames = (np.random.default_rng(1).random((4, 30, 40, 3)) * 255).astype(np.uint8)
  prompts = [
    Prompt(TEXT, (Media("video", frames),), "WHAT MOVES"),
    Prompt(TEXT, (Media("image", image(30, 50)),), "A CAT"),
  ]
  encoded = [proc.encode(p) for p in prompts]
  batch = proc.collate(encoded, batch_size=3, length_multiple=16)
  assert batch["input_ids"].shape[0] == 3 and batch["input_ids"].shape[1] % 16 == 0
  assert batch["num_real"] == 2
  inputs = {k: jnp.asarray(v) for k, v in batch.items() if k not in ("num_real", "image_sizes")}
  logits = np.asarray(model(**inputs, image_sizes=batch["image_sizes"]).logits)
  for row, enc in enumerate(encoded):
    alone = proc.collate([enc], length_multiple=1)
    one = {k: jnp.asarray(v) for k, v in alone.items() if k not in ("num_real", "image_sizes")}
    want = np.asarray(model(**one, image_sizes=alone.get("image_sizes")).logits)[0]
    np.testing.assert_allclose(logits[row, -len(want) :], want, rtol=0, atol=1e-5)


def test_video_placeholders_without_a_video_token(llava):
  """LLaVA-NeXT and PPLLaVA's own checkpoints have no video token: videos go in at -1."""
  model = PPLLaVA.from_pretrained(llava, pooling=PoolingConfig("average"))
  frames = (np.random.default_rng(2).random((4, 24, 24, 3)) * 255).astype(np.uint8)
  prompt = Prompt(TEXT, (Media("video", frames),))
  run = lambda b: np.asarray(
    model(
      jnp.asarray(b["input_ids"]),
      jnp.asarray(b["attention_mask"]),
      pixel_values_videos=jnp.asarray(b["pixel_values_videos"]),
    ).logits
  )
  proc = Processor(model.cfg, char_tokenizer())
  want = run(proc.collate([proc.encode(prompt)]))
  model.cfg = dataclasses.replace(model.cfg, video_token_index=-1)
  proc = Processor(model.cfg, char_tokenizer())
  without = proc.collate([proc.encode(prompt)])
  assert (without["input_ids"] == -1).sum() == model.cfg.video_tokens(4) == 8
  np.testing.assert_array_equal(run(without), want)


def test_scorer_text_is_padded_to_the_context_and_truncated_with_a_warning(
  llava, scorer_path, caplog
):
  model_cfg = PPLLaVA.from_pretrained(llava, clip=scorer_path, clip_extend_keep=None).cfg
  proc = Processor(model_cfg, char_tokenizer(), char_tokenizer())
  enc = proc.encode(Prompt("USER: HI", (), "SHORT"))
  assert enc.scorer_ids.shape == (16,) and enc.scorer_mask.sum() == 6  # <s> + 5 characters
  with caplog.at_level(logging.WARNING):
    enc = proc.encode(Prompt("USER: HI", (), "A MUCH LONGER QUESTION THAN SIXTEEN"))
  assert "scorer text truncated from 36 to 16 tokens" in caplog.text
  assert enc.scorer_mask.sum() == 16


def test_bad_inputs_name_the_problem(llava):
  model_cfg = PPLLaVA.from_pretrained(llava, pooling=PoolingConfig("average")).cfg
  proc = Processor(model_cfg, char_tokenizer())
  with pytest.raises(ValueError, match="1 <image> placeholders but 2 media items"):
    proc.encode(Prompt(TEXT, (Media("image", image(24, 24)),) * 2))
  a = proc.encode(Prompt(TEXT, (Media("video", np.zeros((4, 8, 8, 3), np.uint8)),)))
  b = proc.encode(Prompt(TEXT, (Media("video", np.zeros((6, 8, 8, 3), np.uint8)),)))
  with pytest.raises(ValueError, match=r"one frame count, got \[4, 6\]"):
    proc.collate([a, b])
  with pytest.raises(ValueError, match="scores relevance: give scorer_tokenizer"):
    Processor(dataclasses.replace(model_cfg, pooling=PoolingConfig("ppllava")), char_tokenizer())


def test_a_truncated_scorer_text_is_logged_once_and_counted(caplog):
  """A benchmark of long prompts logs one line, not one per item; eval.py prints the count."""
  from support.train_data import tiny_model_config

  tok = char_tokenizer()
  proc = Processor(tiny_model_config(image_token=tok.convert_tokens_to_ids("<image>")), tok, tok)
  with caplog.at_level("WARNING", logger="ppllava_jax.data.processor"):
    for i in range(3):
      enc = proc.encode(Prompt("USER: hi", (), scorer_text=f"question {i} " + "x" * 60))
      assert enc.scorer_mask.sum() == 40  # the tiny scorer's context, full
  assert proc.scorer_truncated == 3
  (record,) = caplog.records
  assert "scorer text truncated from 72 to 40 tokens" in record.getMessage()  # <s> + 71
