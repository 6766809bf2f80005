"""LLaVA-Hound preference rows and DPO samples, against hand-derived token lists.

Tokenizers are the real tiny ones of ``support.tokenizers`` (a legacy sentencepiece
LLaMA, as llava-hf's Vicuna; Qwen2's byte-level BPE). The whole conversation is one
tokenizer call (the original's DPO), so after ``ASSISTANT:`` the answer's first word
carries its own ``▁`` and no lone ``▁`` comes between. The lists are written out from
the template text; only LLaVA's system sentence, whose words the tiny vocabulary lacks,
is taken from the sentencepiece model itself (``SYSTEM_USER``), and every list is
checked against sentencepiece's pieces of its segment in the first test. The tiny
model: a 4-frame video is 8 placeholder tokens (id -1).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from support.tokenizers import clip_tokenizer, llama_sp_tokenizer, qwen_tokenizer
from support.train_data import tiny_model_config, write_numbered_frames, write_video
from transformers import AutoTokenizer

from ppllava_jax.data.batching import IGNORE
from ppllava_jax.data.dpo.rows import (
  PreferenceBuilder,
  PreferenceConfig,
  parse_row,
  read_preference_rows,
)
from ppllava_jax.data.media import preprocess
from ppllava_jax.data.media.video import random_indices
from ppllava_jax.data.sft.samples import SkipSample
from ppllava_jax.data.text.templates import VICUNA_V1, Turn, render_conversation
from ppllava_jax.files import DataFileError

SYSTEM = (
  "A chat between a curious user and an artificial intelligence assistant. The "
  "assistant gives helpful, detailed, and polite answers to the user's questions."
)
V = "<video>"  # one video placeholder (id -1) in the expected lists
ROW = {
  "id": "v1",
  "prompt": "<video>\nWhat color is the ball?",
  "answer": "The ball is red.",
  "video": "v.mp4",
  "chosen": "The ball is red.",
  "rejected": "A man walks a dog.",
  "chosen_score": 5,
  "rejected_score": 2.5,
}
# '<s>{SYSTEM} USER: <image>\nWhat color is the ball? ASSISTANT: The ball is red.</s>'
QUESTION = ["▁", "<0x0A>", "What", "▁color", "▁is", "▁the", "▁ball", "?", "▁ASSISTANT", ":"]
CHOSEN = ["▁The", "▁ball", "▁is", "▁red", ".", "</s>"]
REJECTED = ["▁A", "▁man", "▁walks", "▁a", "▁dog", ".", "</s>"]
# '<|im_start|>user\n<image>\nWhat color is the ball?<|im_end|>\n<|im_start|>assistant\n...'
QWEN_PROMPT = [
  "<|im_start|>",
  "user",
  "Ċ",
  *[V] * 8,
  "Ċ",
  "What",
  "Ġcolor",
  "Ġis",
  "Ġthe",
  "Ġball",
  "?",
  "<|im_end|>",
  "Ċ",
  "<|im_start|>",
  "assistant",
  "Ċ",
]
QWEN_CHOSEN = ["The", "Ġball", "Ġis", "Ġred", ".", "<|im_end|>", "Ċ"]
QWEN_REJECTED = ["A", "Ġman", "Ġwalks", "Ġa", "Ġdog", ".", "<|im_end|>", "Ċ"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
  root = tmp_path_factory.mktemp("tokenizers")
  return tuple(
    AutoTokenizer.from_pretrained(build(root / build.__name__))
    for build in (llama_sp_tokenizer, qwen_tokenizer, clip_tokenizer)
  )


@pytest.fixture(scope="module")
def pieces(tokenizers):
  model = Path(tokenizers[0].name_or_path) / "tokenizer.model"
  return spm.SentencePieceProcessor(model_file=str(model)).encode_as_pieces


@pytest.fixture(scope="module")
def media(tmp_path_factory):
  root = tmp_path_factory.mktemp("media")
  write_video(root / "v.mp4", num_frames=12)  # frame i is grey 20 * i
  write_numbered_frames(root / "frames", 10)  # 000001.jpg .. 000010.jpg, grey 10 * (n - 1)
  (root / "empty").mkdir()
  (root / "bad.mp4").write_bytes(b"not a video at all")
  return root


def test_expected_lists_are_sentencepiece_pieces_of_each_segment(pieces):
  """A segment is the text before or after a special token; each gets a dummy prefix."""
  assert QUESTION + CHOSEN[:-1] == pieces("\nWhat color is the ball? ASSISTANT: The ball is red.")
  assert REJECTED[:-1] == pieces("A man walks a dog.")
  assert pieces(SYSTEM + " USER: ")[-3:] == ["▁USER", ":", "▁"]


def test_vicuna_v1_is_llavas_conversation():
  text = render_conversation(VICUNA_V1, [Turn("<image>\nWhat?", "Red.")]).text
  assert text == SYSTEM + " USER: <image>\nWhat? ASSISTANT: Red.</s>"


def ids_of(tok, tokens):
  return [-1 if t == V else tok.convert_tokens_to_ids(t) for t in tokens]


def make_builder(tok, clip, template="vicuna_v1", **config):
  model = tiny_model_config(tok.convert_tokens_to_ids("<image>"))
  return PreferenceBuilder(
    tok, model, clip, PreferenceConfig(template=template, num_frames=4, **config)
  )


def make_row(media, line=1, **fields):
  return parse_row({**ROW, **fields}, "rows.jsonl", line, str(media))


def test_vicuna_pair_shares_the_prompt_and_the_video(tokenizers, pieces, media):
  tok, _, clip = tokenizers
  s = make_builder(tok, clip)(make_row(media), seed=7, epoch=1, index=3)
  prompt = ["<s>", *pieces(SYSTEM + " USER: "), *[V] * 8, *QUESTION]
  assert s.prompt_ids.tolist() == ids_of(tok, prompt)
  assert s.chosen_ids.tolist() == ids_of(tok, CHOSEN)
  assert s.rejected_ids.tolist() == ids_of(tok, REJECTED)
  ids, labels = s.row("rejected")
  assert ids.tolist() == ids_of(tok, prompt + REJECTED)
  assert labels.tolist() == [IGNORE] * len(prompt) + ids_of(tok, REJECTED)
  assert s.length == len(prompt) + len(REJECTED) and s.media_tokens == 8
  assert s.prompt_text == "<s>" + SYSTEM + " USER: <image>\nWhat color is the ball? ASSISTANT: "
  # frames: SFT's random sampling seeded by (seed, epoch, index), once for the pair
  want = random_indices(4, 0, 12, np.random.default_rng([7, 1, 3]))
  assert s.frame_indices == tuple(want) and s.video.shape == (4, 3, 24, 24)
  grey = (s.video[:, 0] * preprocess.CLIP_STD[0] + preprocess.CLIP_MEAN[0]) * 255
  np.testing.assert_allclose(grey.mean(axis=(1, 2)), [20 * i for i in want], atol=1.5)


def test_scorer_text_is_the_question_alone(tokenizers, media):
  tok, _, clip = tokenizers
  s = make_builder(tok, clip)(make_row(media, prompt="What color is the ball?\n<video>"))
  assert s.scorer_text == "What color is the ball?"
  want = clip("What color is the ball?").input_ids
  assert s.scorer_ids.tolist() == want + [1] * (40 - len(want))  # padded with the end token
  assert s.scorer_mask.tolist() == [1] * len(want) + [0] * (40 - len(want))
  assert s.scorer_truncated == 0


def llava_v1_labels(tok, question, answer):
  """The original's ``preprocess_v1`` for one round, written from its code: the ids of
  the whole conversation, and as labels everything after ``1 + instruction_len``."""
  conversation = f"{SYSTEM} USER: <image>\n{question} ASSISTANT: {answer}</s>"
  ids = tok(conversation).input_ids
  rou = conversation.split("</s>")[0]
  instruction = rou.split(" ASSISTANT: ")[0] + " ASSISTANT: "
  round_len, instruction_len = len(tok(rou).input_ids), len(tok(instruction).input_ids) - 2
  assert 1 + round_len == len(ids)  # the original's total-length check
  return ids, [IGNORE] * (1 + instruction_len) + ids[1 + instruction_len :]


@pytest.mark.parametrize("answer", ["The ball is red.", "3 pm"])
def test_labels_are_llavas_length_arithmetic(tokenizers, media, answer):
  """Also for an answer starting with a digit: its ``▁`` is a token of its own, and
  supervised, as in the original."""
  tok, _, clip = tokenizers
  s = make_builder(tok, clip)(make_row(media, chosen=answer))
  ids, labels = s.row("chosen")
  want_ids, want_labels = llava_v1_labels(tok, "What color is the ball?", answer)
  slot = want_ids.index(tok.convert_tokens_to_ids("<image>"))
  expand = lambda x, fill: x[:slot] + [fill] * 8 + x[slot + 1 :]
  assert ids.tolist() == expand(want_ids, -1)
  assert labels.tolist() == expand(want_labels, IGNORE)
  if answer == "3 pm":
    assert tok.convert_ids_to_tokens(s.chosen_ids.tolist()) == ["▁", "3", "▁pm", "</s>"]


def test_an_answer_holding_role_strings_is_supervised_whole(tokenizers, pieces, media):
  """The original's ``preprocess_v1`` splits such a conversation at the inner role
  strings, fails its length check and masks every label."""
  tok, _, clip = tokenizers
  s = make_builder(tok, clip)(make_row(media, chosen="Yes USER: no ASSISTANT: then"))
  assert tok.convert_ids_to_tokens(s.chosen_ids.tolist()) == [
    *pieces("Yes USER: no ASSISTANT: then"),
    "</s>",
  ]
  assert tok.convert_ids_to_tokens(s.chosen_ids.tolist()) == [
    "▁Yes",
    "▁USER",
    ":",
    "▁no",
    "▁ASSISTANT",
    ":",
    "▁then",
    "</s>",
  ]


def test_qwen_chatml_pair(tokenizers, media):
  _, qwen, clip = tokenizers
  s = make_builder(qwen, clip, template="plain_qwen")(make_row(media))
  assert s.prompt_ids.tolist() == ids_of(qwen, QWEN_PROMPT)
  assert s.chosen_ids.tolist() == ids_of(qwen, QWEN_CHOSEN)
  assert s.rejected_ids.tolist() == ids_of(qwen, QWEN_REJECTED)
  assert (
    s.prompt_text == "<|im_start|>user\n<image>\nWhat color is the ball?<|im_end|>\n"
    "<|im_start|>assistant\n"
  )


def test_frame_folder_in_name_order_seeded(tokenizers, media):
  tok, _, clip = tokenizers
  build = make_builder(tok, clip)
  s = build(make_row(media, video="frames"), seed=3, epoch=2, index=11)
  want = random_indices(4, 0, 10, np.random.default_rng([3, 2, 11]))
  assert s.frame_indices == tuple(want)
  grey = (s.video[:, 0] * preprocess.CLIP_STD[0] + preprocess.CLIP_MEAN[0]) * 255
  np.testing.assert_allclose(grey.mean(axis=(1, 2)), [10 * i for i in want], atol=2)
  draws = {
    build(make_row(media, video="frames"), seed=3, epoch=e, index=11).frame_indices
    for e in range(6)
  }
  assert len(draws) > 1


def test_a_given_generator_draws_the_frames(tokenizers, media):
  """``rng=`` replaces the (seed, epoch, index) generator: 10 frames in 4 segments,
  linspace(0, 10, 5) = 0 2 5 7 10, one draw from each range(lo, hi - 1)."""
  tok, _, clip = tokenizers
  generator = lambda: np.random.Generator(np.random.PCG64(2024))
  want = generator().integers([0, 2, 5, 7], [1, 4, 6, 9]).tolist()
  s = make_builder(tok, clip)(make_row(media, video="frames"), seed=3, rng=generator())
  assert s.frame_indices == tuple(want)
  grey = (s.video[:, 0] * preprocess.CLIP_STD[0] + preprocess.CLIP_MEAN[0]) * 255
  np.testing.assert_allclose(grey.mean(axis=(1, 2)), [10 * i for i in want], atol=2)


def write_lines(path: Path, lines) -> Path:
  path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
  return path


def test_reading_skips_and_counts_rows_that_cannot_teach(media, tmp_path, caplog):
  absolute = str(media / "frames")
  path = write_lines(
    tmp_path / "rows.jsonl",
    [
      ROW,
      "",  # a blank line is no row
      {**ROW, "rejected": " The ball is red. "},  # 3: the same answer
      {**ROW, "video": "gone.mp4"},  # 4
      {**ROW, "id": 5, "video": absolute, "chosen_score": None},
    ],
  )
  with caplog.at_level(logging.WARNING):
    rows = read_preference_rows(path, str(media))
  assert [r.line for r in rows.rows] == [1, 5]
  assert rows.skipped == ((3, "same_completions"), (4, "missing"))
  assert rows.counts == {"missing": 1, "same_completions": 1}
  assert "2 of 4 preference rows skipped" in caplog.text
  first, last = rows.rows
  assert first.question == "What color is the ball?" and first.video == str(media / "v.mp4")
  assert (first.chosen_score, first.rejected_score, first.answer) == (5, 2.5, "The ball is red.")
  assert last.video == absolute and last.chosen_score is None and last.id == 5
  assert last.source == f"{path}:5 (id 5)"
  unchecked = read_preference_rows(path, str(media), check_media=False)
  assert [r.line for r in unchecked.rows] == [1, 4, 5]


@pytest.mark.parametrize(
  "line, problem",
  [
    ({**ROW, "chosen": 3}, "field 'chosen': must be a string, got int"),
    ({k: v for k, v in ROW.items() if k != "rejected"}, "field 'rejected': missing"),
    ({**ROW, "id": 1.5}, "field 'id': must be a string or an integer, got float"),
    ({**ROW, "rejected_score": "low"}, "field 'rejected_score': must be a number, got str"),
    ({**ROW, "chosen_score": True}, "field 'chosen_score': must be a number, got bool"),
    ({**ROW, "video": ""}, "field 'video': is empty"),
    ({**ROW, "chosen": ""}, "field 'chosen': is empty"),  # nothing to prefer: an error
    ({**ROW, "rejected": "  \n"}, "field 'rejected': is blank"),
    ({**ROW, "prompt": "<image>\nWhat?"}, "field 'prompt': holds '<image>'"),
    ({**ROW, "rejected": "See <image>"}, "field 'rejected': holds '<image>'"),
    ([ROW], "expected a JSON object, found an array"),
    ('{"id": "v2", "prompt": ', "invalid JSON"),
  ],
)
def test_malformed_rows_name_file_line_and_field(media, tmp_path, line, problem):
  path = write_lines(tmp_path / "rows.jsonl", [ROW, line])
  with pytest.raises(DataFileError) as err:
    read_preference_rows(path, str(media))
  assert str(err.value).startswith(f"{path}:2: {problem}")


def test_a_file_without_usable_rows_is_an_error(media, tmp_path):
  path = write_lines(
    tmp_path / "rows.jsonl", [{**ROW, "rejected": ROW["chosen"]}, {**ROW, "video": "x"}]
  )
  with pytest.raises(DataFileError, match=r"rows.jsonl: no usable preference rows \(2 read"):
    read_preference_rows(path, str(media))


@pytest.mark.parametrize(
  "fields, reason",
  [
    (dict(video="bad.mp4"), "corrupt"),
    (dict(video="empty"), "empty"),
    (dict(video="gone.mp4"), "missing"),  # deleted after reading
    # a leading space: the whole text has ": ▁ ▁The", so the prompts of the two sides differ
    (dict(chosen=" The ball is red."), "labels"),
  ],
)
def test_samples_that_cannot_be_built_are_skips_with_a_reason(tokenizers, media, fields, reason):
  tok, _, clip = tokenizers
  with pytest.raises(SkipSample) as err:
    make_builder(tok, clip)(make_row(media, line=4, **fields))
  assert err.value.reason == reason
  assert "rows.jsonl:4 (id 'v1')" in err.value.detail


def test_max_length_bounds_the_longer_row(tokenizers, media):
  tok, _, clip = tokenizers
  n = make_builder(tok, clip)(make_row(media)).length
  assert make_builder(tok, clip, max_length=n)(make_row(media)).length == n
  with pytest.raises(SkipSample) as err:
    make_builder(tok, clip, max_length=n - 1)(make_row(media))
  assert err.value.reason == "too_long" and f"{n} tokens, max_length is {n - 1}" in err.value.detail
