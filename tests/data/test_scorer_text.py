"""The scorer text's two forms (``SampleConfig.scorer_padding``) against transformers' SigLIP.

The original trains the Qwen model with each sample's SigLIP text alone
(``interleave_sft_dataset.py``: ``max_length=196`` only, which transformers reads as
truncation without padding; the collator keeps the texts as a list and
``llava_interleave.py`` runs the scorer per sample, ``clip_ids[index].unsqueeze(0)``), so
SiglipTextModel pools each text's last real token. Evaluation pads to ``max_length``
(with the mask), and SigLIP then pools the last, padding, position. Here a fixed-shape
batch carries the first form as ``NO_TOKEN`` ids past the text; its features must equal
transformers run on each text alone, the padded form's transformers run padded.

The scorer is a tiny random SigLIP saved by transformers (64 text positions, vocabulary
99), its tokenizer the tiny SigLIP sentencepiece of ``support.tokenizers`` (``</s>`` = 1 is
EOS and pad); the LLM side is Qwen2's tokenizer with the ChatML template, as the Qwen recipe.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from support.hf_fixtures import make_siglip
from support.tokenizers import qwen_tokenizer, siglip_tokenizer
from support.train_data import PINPOINTS, tiny_model_config, write_numbered_frames
from transformers import AutoTokenizer

from ppllava_jax.data.dpo.rows import PreferenceBuilder, PreferenceConfig, parse_row
from ppllava_jax.data.sft.samples import SampleBuilder, SampleConfig, build_sample
from ppllava_jax.models.llm import DecoderConfig
from ppllava_jax.models.ppllava_config import PPLLaVAConfig
from ppllava_jax.models.scorer import SiglipRelevanceScorer
from ppllava_jax.models.siglip import NO_TOKEN, SiglipModel

EOS = PAD = 1  # SigLIP's </s>
CONTEXT = 64  # the tiny SigLIP's text positions (196 for the extended so400m)
TOL = 1e-5


def conversation(*turns: tuple[str, str]) -> dict:
  return {
    "conversations": [
      {"from": f, "value": v} for q, a in turns for f, v in (("human", q), ("gpt", a))
    ]
  }


SHORT = conversation(("Yes?", "No."))
MEDIUM = conversation(("What color is the ball?", "The ball is red."))
LONG = conversation(
  (
    "What does the red circle do in the video?",
    "The blue square falls from the top to the bottom.",
  ),
  ("What color is the ball?", "The ball is red."),
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("scorer_text")
  hf, path = make_siglip("a", root / "siglip")
  scorer = SiglipRelevanceScorer.from_siglip(SiglipModel.from_pretrained(path))
  qwen = AutoTokenizer.from_pretrained(qwen_tokenizer(root / "qwen"))
  sig = AutoTokenizer.from_pretrained(siglip_tokenizer(root / "siglip_tok"))
  model = PPLLaVAConfig(
    vision=scorer.cfg.vision,
    text=DecoderConfig(
      vocab_size=1000,
      hidden_size=16,
      intermediate_size=32,
      num_hidden_layers=1,
      num_attention_heads=2,
      num_key_value_heads=1,
      head_dim=8,
      max_position_embeddings=512,
      eos_token_id=(2,),
      pad_token_id=0,
    ),
    image_token_index=qwen.convert_tokens_to_ids("<image>"),
    video_token_index=-1,
    grid_pinpoints=PINPOINTS,
    scorer=scorer.cfg,
    model_type="llava_onevision",
  )
  assert model.scorer.text.max_position_embeddings == CONTEXT
  return dict(root=root, hf=hf, scorer=scorer, qwen=qwen, sig=sig, model=model)


def sample(setup, record, padding):
  return build_sample(
    record,
    tokenizer=setup["qwen"],
    scorer_tokenizer=setup["sig"],
    model=setup["model"],
    format="llava",
    config=SampleConfig(template="plain_qwen", scorer_padding=padding),
  )


def test_each_form_gives_the_ids_and_mask_the_rule_says(setup):
  sig = setup["sig"]
  short = {p: sample(setup, SHORT, p) for p in ("none", "max_length")}
  text = "<|im_start|>user\nYes?<|im_end|>\n<|im_start|>assistant\nNo.<|im_end|>\n"
  assert short["none"].scorer_text == short["max_length"].scorer_text == text
  alone = sig(text).input_ids  # the original's training call: no padding, no mask
  n = len(alone)
  assert alone[-1] == EOS and n < CONTEXT
  # the text alone, then no token (mask 0); padded: the pad token (mask 0)
  assert short["none"].scorer_ids.tolist() == alone + [NO_TOKEN] * (CONTEXT - n)
  assert short["max_length"].scorer_ids.tolist() == alone + [PAD] * (CONTEXT - n)
  for s in short.values():
    assert s.scorer_mask.tolist() == [1] * n + [0] * (CONTEXT - n) and s.scorer_truncated == 0
  # longer than the context: cut to it, its end token kept; nothing to pad, one form
  full = sig(sample(setup, LONG, "none").scorer_text).input_ids
  assert len(full) > CONTEXT
  for padding in ("none", "max_length"):
    s = sample(setup, LONG, padding)
    assert s.scorer_ids.tolist() == full[: CONTEXT - 1] + [EOS]
    assert s.scorer_mask.tolist() == [1] * CONTEXT and s.scorer_truncated == len(full) - CONTEXT


def test_features_equal_transformers_on_each_text_alone_or_padded(setup):
  hf, scorer = setup["hf"], setup["scorer"]
  records = (SHORT, MEDIUM, LONG)
  features = {}
  for padding in ("none", "max_length"):
    rows = [sample(setup, r, padding) for r in records]
    ids = np.stack([s.scorer_ids for s in rows])  # the batch copies each row (data.sft.batches)
    mask = np.stack([s.scorer_mask for s in rows])
    features[padding] = np.asarray(scorer.text_features(jnp.asarray(ids), jnp.asarray(mask)))
    with torch.no_grad():
      for i, s in enumerate(rows):
        n = int(s.scorer_mask.sum())
        if padding == "none":  # one sample a forward, its own length, no mask
          out = hf.text_model(input_ids=torch.from_numpy(s.scorer_ids[None, :n]).long())
        else:
          out = hf.text_model(
            input_ids=torch.from_numpy(s.scorer_ids[None]).long(),
            attention_mask=torch.from_numpy(s.scorer_mask[None]).long(),
          )
        np.testing.assert_allclose(
          features[padding][i],
          out.pooler_output[0].numpy(),
          rtol=0,
          atol=TOL,
          err_msg=f"{padding} row {i}",
        )
  gap = np.abs(features["none"] - features["max_length"]).max(axis=1)
  assert gap[0] > 1e-3 and gap[1] > 1e-3  # padding changes what SigLIP pools
  assert gap[2] == 0  # a text that fills the context has no padding to differ by


def test_the_unpadded_form_is_for_siglip_scorers_and_reaches_preference_pairs(setup):
  with pytest.raises(ValueError, match="scorer_padding must be one of"):
    SampleConfig(scorer_padding="longest")
  clip_model = tiny_model_config(setup["qwen"].convert_tokens_to_ids("<image>"))
  with pytest.raises(ValueError, match="scorer_padding='none' is a SigLIP scorer's form"):
    SampleBuilder(setup["qwen"], clip_model, setup["sig"], SampleConfig(scorer_padding="none"))
  frames = write_numbered_frames(setup["root"] / "frames", 10)
  row = parse_row(
    {
      "id": "v1",
      "prompt": "<video>\nWhat color is the ball?",
      "video": str(frames),
      "chosen": "The ball is red.",
      "rejected": "A man walks a dog.",
    },
    "rows.jsonl",
    1,
  )
  pair = PreferenceBuilder(
    setup["qwen"],
    setup["model"],
    setup["sig"],
    PreferenceConfig(template="plain_qwen", num_frames=4, scorer_padding="none"),
  )(row)
  alone = setup["sig"]("What color is the ball?").input_ids
  assert pair.scorer_ids.tolist() == alone + [NO_TOKEN] * (CONTEXT - len(alone))
  assert pair.scorer_mask.tolist() == [1] * len(alone) + [0] * (CONTEXT - len(alone))
