"""SFT samples as the original builds them, against hand-derived token lists.

The LLaMA tokenizer is a real sentencepiece model loaded as transformers loads llava-hf's
Vicuna (``support.tokenizers.llama_sp_tokenizer``, ``legacy=True``): every text segment
(a piece's start, or what follows a special token) starts with the dummy-prefix ``▁``,
so the expected lists are sentencepiece's own pieces of each segment (checked against
the model in ``test_expected_pieces_are_sentencepiece_pieces_of_each_segment``). A
newline is ``<0x0A>`` and a word after it has no ``▁`` (``Des cribe``). The tiny model: a
4-frame video is 8 tokens, a multi-image picture 4, an anyres image ``4 + h*w + h``.
"""

import concurrent.futures
import functools
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from support.tokenizers import clip_tokenizer, llama_sp_tokenizer, qwen_tokenizer
from support.train_data import tiny_model_config, write_image, write_numbered_frames, write_video
from transformers import AutoTokenizer

from ppllava_jax.data.batching import IGNORE
from ppllava_jax.data.media import preprocess
from ppllava_jax.data.media.frames import load_numbered_frames
from ppllava_jax.data.media.video import random_indices
from ppllava_jax.data.sft.annotations import CorpusConfig, parse_record
from ppllava_jax.data.sft.samples import SampleBuilder, SampleConfig, SkipSample, build_sample

V = "<video>"  # one video placeholder (id -1) in the expected lists
SYSTEM_VIDEO = {
  "video": "v.mp4",
  "QA": [
    {"i": "You are a helpful assistant.", "q": "Describe the video.", "a": "A man walks a dog."},
    {"q": "What color is the ball?", "a": "The ball is red."},
  ],
}
# '<s>You are a helpful assistant. USER: <image>\nDescribe the video. ASSISTANT: A man walks
# a dog.</s>USER: What color is the ball? ASSISTANT: The ball is red.</s>', cut after each
# "ASSISTANT: ": the piece ends in a lone "▁", the answer piece starts with a dummy prefix
PROMPT_0 = [
  "<s>",
  "▁You",
  "▁are",
  "▁a",
  "▁helpful",
  "▁assistant",
  ".",
  "▁USER",
  ":",
  "▁",
  *[V] * 8,
  "▁",
  "<0x0A>",
  "Des",
  "cribe",
  "▁the",
  "▁video",
  ".",
  "▁ASSISTANT",
  ":",
  "▁",
]
ANSWER_0 = ["▁A", "▁man", "▁walks", "▁a", "▁dog", ".", "</s>"]
PROMPT_1 = ["▁USER", ":", "▁What", "▁color", "▁is", "▁the", "▁ball", "?", "▁ASSISTANT", ":", "▁"]
ANSWER_1 = ["▁The", "▁ball", "▁is", "▁red", ".", "</s>"]
PICTURES = [
  "<s>",
  "▁USER",
  ":",
  "▁",
  *["<image>"] * 4,
  "▁",
  "<0x0A>",
  *["<image>"] * 4,
  "▁",
  "<0x0A>",
  "C",
  "omp",
  "are",
  "▁the",
  "▁two",
  "▁pictures",
  ".",
  "▁ASSISTANT",
  ":",
  "▁",
  "▁The",
  "▁first",
  "▁is",
  "▁darker",
  ".",
  "</s>",
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
  root = tmp_path_factory.mktemp("tokenizers")
  return tuple(
    AutoTokenizer.from_pretrained(build(root / build.__name__))
    for build in (llama_sp_tokenizer, qwen_tokenizer, clip_tokenizer)
  )


def test_expected_pieces_are_sentencepiece_pieces_of_each_segment(tokenizers):
  """The lists above, derived from the model alone: each segment's pieces, concatenated
  with the special tokens and placeholders between the segments."""
  sp = spm.SentencePieceProcessor(
    model_file=str(Path(tokenizers[0].name_or_path) / "tokenizer.model")
  )
  enc = sp.encode_as_pieces
  assert PROMPT_0 == [
    "<s>",
    *enc("You are a helpful assistant. USER: "),
    *[V] * 8,
    *enc("\nDescribe the video. ASSISTANT: "),
  ]
  assert ANSWER_0 == [*enc("A man walks a dog."), "</s>"]
  assert PROMPT_1 == enc("USER: What color is the ball? ASSISTANT: ")
  assert ANSWER_1 == [*enc("The ball is red."), "</s>"]
  assert PICTURES == [
    "<s>",
    *enc("USER: "),
    *["<image>"] * 4,
    *enc("\n"),
    *["<image>"] * 4,
    *enc("\nCompare the two pictures. ASSISTANT: "),
    *enc("The first is darker."),
    "</s>",
  ]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
  root = tmp_path_factory.mktemp("media")
  write_video(root / "v.mp4", num_frames=12)  # frame i is grey 20 * i
  write_image(root / "a.jpg", (30, 50), 128)
  write_image(root / "b.jpg", (40, 20), 30)
  write_numbered_frames(root / "frames", 10)  # 000001.jpg .. 000010.jpg, grey 10 * (n - 1)
  (root / "empty").mkdir()
  (root / "bad.mp4").write_bytes(b"not a video at all")
  (root / "bad.jpg").write_bytes(b"not an image")
  return root


def ids_of(tok, tokens):
  return [-1 if t == V else tok.convert_tokens_to_ids(t) for t in tokens]


def build(tok, clip, record, media, template="plain_v1", **kw):
  cfg = tiny_model_config(tok.convert_tokens_to_ids("<image>"))
  options = {k: kw.pop(k) for k in list(kw) if k in SampleConfig.__dataclass_fields__}
  return build_sample(
    record,
    tokenizer=tok,
    scorer_tokenizer=clip,
    model=cfg,
    media_root=str(media),
    num_frames=4,
    config=SampleConfig(template=template, **options),
    **kw,
  )


def supervised(tok, sample):
  return tok.convert_ids_to_tokens([int(t) for t in sample.labels if t != IGNORE])


def before_answers(tok, sample):
  """The token just before each answer's first supervised token."""
  labels = sample.labels.tolist()
  starts = [i for i in range(1, len(labels)) if labels[i] != IGNORE and labels[i - 1] == IGNORE]
  return tok.convert_ids_to_tokens([int(sample.input_ids[i - 1]) for i in starts])


def test_vicuna_pieces_multi_turn_system_video(tokenizers, media):
  tok, _, clip = tokenizers
  s = build(tok, clip, SYSTEM_VIDEO, media, seed=7, index=3)
  expected = PROMPT_0 + ANSWER_0 + PROMPT_1 + ANSWER_1
  assert s.input_ids.tolist() == ids_of(tok, expected)
  labels = (
    [IGNORE] * len(PROMPT_0)
    + ids_of(tok, ANSWER_0)
    + [IGNORE] * len(PROMPT_1)
    + ids_of(tok, ANSWER_1)
  )
  assert s.labels.tolist() == labels
  assert before_answers(tok, s) == ["▁", "▁"]  # the lone "▁" the released models saw
  assert s.attention_mask.tolist() == [1] * len(expected)
  assert s.text.startswith("<s>You are a helpful assistant. USER: <image>\nDescribe")
  # frames: the original's random sampling seeded by (seed, epoch, index), 12 frames
  want = random_indices(4, 0, 12, np.random.default_rng([7, 0, 3]))
  assert s.frame_indices == tuple(want)
  assert all(lo <= i < lo + 2 for i, lo in zip(want, (0, 3, 6, 9)))  # segment's last left out
  grey = (s.video[:, 0] * preprocess.CLIP_STD[0] + preprocess.CLIP_MEAN[0]) * 255
  np.testing.assert_allclose(grey.mean(axis=(1, 2)), [20 * i for i in want], atol=1.5)
  assert s.video.shape == (4, 3, 24, 24) and s.media_tokens == (8,)


def test_vicuna_whole_text_has_no_lone_prefix(tokenizers, media):
  tok, _, clip = tokenizers
  s = build(tok, clip, SYSTEM_VIDEO, media, tokenization="whole")
  expected = PROMPT_0[:-1] + ANSWER_0 + PROMPT_1[:-1] + ANSWER_1
  assert s.input_ids.tolist() == ids_of(tok, expected)
  assert supervised(tok, s) == ANSWER_0 + ANSWER_1
  assert before_answers(tok, s) == [":", ":"]


def test_scorer_text_is_the_conversation_without_bos_truncated_and_counted(tokenizers, media):
  tok, _, clip = tokenizers
  s = build(tok, clip, SYSTEM_VIDEO, media)
  text = (
    "You are a helpful assistant. USER: <image>\nDescribe the video. ASSISTANT: A man "
    "walks a dog.</s>USER: What color is the ball? ASSISTANT: The ball is red.</s>"
  )
  assert s.scorer_text == text and s.text == "<s>" + text
  full = clip(text).input_ids
  assert len(full) > 40  # the tiny scorer's context
  assert s.scorer_truncated == len(full) - 40
  assert s.scorer_ids.tolist() == full[:39] + [1]  # cut, then the end token
  assert s.scorer_mask.tolist() == [1] * 40
  short = build(tok, clip, {"video": "v.mp4", "QA": [{"q": "A", "a": "Yes"}]}, media)
  n = len(clip(short.scorer_text).input_ids)
  assert short.scorer_truncated == 0 and short.scorer_mask.tolist() == [1] * n + [0] * (40 - n)


def test_qwen_chatml_system_image_labels_keep_the_newline(tokenizers, media):
  _, qwen, clip = tokenizers
  record = {
    "image": "a.jpg",
    "QA": [{"i": "Answer briefly.", "q": "What color is the ball?", "a": "The ball is red."}],
  }
  s = build(qwen, clip, record, media, template="plain_qwen")
  assert s.text == (
    "Answer briefly.<|im_end|>\n<|im_start|>user\n<image>\nWhat color is the "
    "ball?<|im_end|>\n<|im_start|>assistant\nThe ball is red.<|im_end|>\n"
  )
  # 30 x 50 on pinpoint 48 x 48: a 4 x 4 pooled grid, rows 1-2 kept: 4 + 2*4 + 2 tokens
  assert s.media_tokens == (14,) and s.image.shape == (5, 3, 24, 24) and s.image_size == (30, 50)
  img = "<image>"
  prompt = [
    "Answer",
    "Ġbriefly",
    ".",
    "<|im_end|>",
    "Ċ",
    "<|im_start|>",
    "user",
    "Ċ",
    *[img] * 14,
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
  answer = ["The", "Ġball", "Ġis", "Ġred", ".", "<|im_end|>", "Ċ"]
  assert qwen.convert_ids_to_tokens(s.input_ids.tolist()) == prompt + answer
  assert s.labels.tolist() == [IGNORE] * len(prompt) + qwen.convert_tokens_to_ids(answer)
  assert s.scorer_text == s.text  # Qwen has no BOS


def test_multi_image_pictures_sorted_as_the_original(tokenizers, media):
  tok, _, clip = tokenizers
  record = {
    "multi-image": ["b.jpg", "a.jpg"],
    "QA": [{"q": "<image><image>Compare the two pictures.", "a": "The first is darker."}],
  }
  s = build(tok, clip, record, media)
  assert tok.convert_ids_to_tokens(s.input_ids.tolist()) == PICTURES
  assert s.media_tokens == (4, 4) and s.pictures.shape == (2, 3, 24, 24)
  grey = (s.pictures[:, 0] * preprocess.CLIP_STD[0] + preprocess.CLIP_MEAN[0]) * 255
  assert s.frame_indices == (1, 0)  # a.jpg (grey 128) first: the reader sorts the paths
  np.testing.assert_allclose(grey.mean(axis=(1, 2)), [128, 30], atol=1.5)
  listed = build(tok, clip, record, media, picture_order="listed")
  assert listed.frame_indices == (0, 1)
  np.testing.assert_array_equal(listed.pictures[0], s.pictures[1])


def test_an_answer_holding_role_strings_is_supervised_whole(tokenizers, media):
  tok, _, clip = tokenizers
  record = {
    "video": "v.mp4",
    "QA": [
      {"q": "What color is the ball?", "a": "Yes USER: no"},
      {"q": "A", "a": "Yes ASSISTANT: then it says"},
    ],
  }
  s = build(tok, clip, record, media)
  # the original splits at the inner "ASSISTANT: " and cuts turn 0 at the inner "USER: "
  assert supervised(tok, s) == [
    "▁Yes",
    "▁USER",
    ":",
    "▁no",
    "</s>",
    "▁Yes",
    "▁ASSISTANT",
    ":",
    "▁then",
    "▁it",
    "▁says",
    "</s>",
  ]
  assert s.input_ids.tolist().count(tok.convert_tokens_to_ids("▁ASSISTANT")) == 3


def test_text_only_llava_record(tokenizers, media):
  tok, _, clip = tokenizers
  record = {
    "id": "x",
    "conversations": [
      {"from": "human", "value": "What color is the ball?"},
      {"from": "gpt", "value": "The ball is red."},
    ],
  }
  s = build(tok, clip, record, media, format="llava")
  assert s.kind == "text" and s.media_tokens == ()
  assert s.text == "<s>USER: What color is the ball? ASSISTANT: The ball is red.</s>"
  assert supervised(tok, s) == ANSWER_1


def test_over_long_samples_are_dropped_or_truncated_never_cut_silently(tokenizers, media):
  tok, _, clip = tokenizers
  n = len(PROMPT_0 + ANSWER_0 + PROMPT_1 + ANSWER_1)
  with pytest.raises(SkipSample) as err:
    build(tok, clip, SYSTEM_VIDEO, media, max_length=n - 1, index=5)
  assert err.value.reason == "too_long"
  assert f"record 5: {n} tokens, max_length is {n - 1}" in str(err.value)
  s = build(tok, clip, SYSTEM_VIDEO, media, max_length=n - 3, overflow="truncate")
  full = build(tok, clip, SYSTEM_VIDEO, media)
  assert s.truncated == 3 and s.input_ids.tolist() == full.input_ids.tolist()[: n - 3]
  assert s.labels.tolist() == full.labels.tolist()[: n - 3]
  with pytest.raises(SkipSample, match="too_long"):  # the cut would fall in the video's tokens
    build(tok, clip, SYSTEM_VIDEO, media, max_length=12, overflow="truncate")


def test_numbered_frame_folder_and_seeding(tokenizers, media):
  tok, _, clip = tokenizers
  record = {"video": "frames", "total_frames": 10, "QA": [{"q": "A", "a": "Yes"}]}
  s = build(tok, clip, record, media, seed=3, epoch=2, index=11)
  want = random_indices(4, 0, 10, np.random.default_rng([3, 2, 11]))
  assert s.frame_indices == tuple(want)
  grey = (s.video[:, 0] * preprocess.CLIP_STD[0] + preprocess.CLIP_MEAN[0]) * 255
  np.testing.assert_allclose(grey.mean(axis=(1, 2)), [10 * i for i in want], atol=2)  # file i+1
  again = build(tok, clip, record, media, seed=3, epoch=2, index=11)
  np.testing.assert_array_equal(again.video, s.video)
  draws = {
    build(tok, clip, record, media, seed=3, epoch=e, index=11).frame_indices for e in range(6)
  }
  assert len(draws) > 1  # another epoch, other frames


def test_numbered_frames_fall_back_to_the_next_file_as_the_original(media, tmp_path):
  folder = write_numbered_frames(tmp_path / "f", 6)
  (folder / "000003.jpg").unlink()  # frame 2: read from 000004.jpg
  frames, indices = load_numbered_frames(folder, 6, 6, np.random.default_rng(0))
  assert indices == (0, 1, 2, 3, 4, 5)  # one-frame segments: every frame, in order
  np.testing.assert_allclose(frames[..., 0].mean(axis=(1, 2)), [0, 10, 30, 30, 40, 50], atol=2)


@pytest.mark.parametrize(
  "record, reason",
  [
    ({"video": "nothing.mp4"}, "missing"),
    ({"video": "bad.mp4"}, "corrupt"),
    ({"video": "empty"}, "empty"),
    ({"image": "bad.jpg"}, "corrupt"),
    ({"image": "nothing.jpg"}, "missing"),
    ({"multi-image": ["a.jpg", "gone.jpg"]}, "missing"),
  ],
)
def test_bad_media_is_a_skip_with_its_reason(tokenizers, media, record, reason):
  tok, _, clip = tokenizers
  record = {
    **record,
    "QA": [{"q": "<image>" * len(record.get("multi-image", [])) + "A", "a": "Yes"}],
  }
  with pytest.raises(SkipSample) as err:
    build(tok, clip, record, media)
  assert err.value.reason == reason


def test_threads_tokenize_with_their_own_tokenizers(tokenizers, media):
  """One Qwen tokenizer as the LLM's and the scorer's (the scorer's calls pad to its
  context, the LLM's do not): samples built on four threads at once equal those built
  one by one, and each thread holds its own copy (one object for both roles)."""
  _, qwen, _ = tokenizers
  cfg = tiny_model_config(qwen.convert_tokens_to_ids("<image>"))
  builder = SampleBuilder(qwen, cfg, qwen, SampleConfig(template="plain_qwen"))
  records = [
    parse_record(
      {
        "id": str(i),
        "conversations": [
          {"from": "human", "value": "What color is the ball? " * (1 + i % 5)},
          {"from": "gpt", "value": f"The ball is red {i}."},
        ],
      },
      CorpusConfig("c", "a.json", str(media), format="llava"),
    )
    for i in range(40)
  ]
  build_all = lambda: [builder(r, seed=0, index=i) for i, r in enumerate(records)]
  want = build_all()
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    got = list(pool.map(lambda ir: builder(ir[1], seed=0, index=ir[0]), enumerate(records)))
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.scorer_ids, b.scorer_ids)
  mine = builder.tokenizer
  theirs = concurrent.futures.ThreadPoolExecutor(1).submit(lambda: builder.tokenizer).result()
  assert mine is not theirs and mine is not qwen and builder.scorer_tokenizer is mine


def pcg(base: int, seed: int, epoch: int, index: int) -> np.random.Generator:
  """Another implementation's generator: PCG64 keyed by (base, seed, epoch, index)."""
  return np.random.Generator(np.random.PCG64([base, seed, epoch, index]))


# 12 frames in 4 segments: linspace(0, 12, 5) = 0 3 6 9 12, one draw from each
# range(lo, hi - 1) (the segment's last frame left out): uniform over [lo, hi - 1)
SEGMENT_LOW, SEGMENT_HIGH = [0, 3, 6, 9], [2, 5, 8, 11]


def test_a_given_generator_draws_the_frames(tokenizers, media):
  """``rng=`` (or a builder's ``rng_factory``) replaces the (seed, epoch, index) generator:
  the frames are the original's rule applied to that generator's draws."""
  tok, _, clip = tokenizers
  record = {"video": "v.mp4", "QA": [{"q": "A", "a": "Yes"}]}
  want = pcg(5, 0, 0, 0).integers(SEGMENT_LOW, SEGMENT_HIGH).tolist()
  s = build(tok, clip, record, media, seed=7, index=3, rng=pcg(5, 0, 0, 0))
  assert s.frame_indices == tuple(want)
  grey = (s.video[:, 0] * preprocess.CLIP_STD[0] + preprocess.CLIP_MEAN[0]) * 255
  np.testing.assert_allclose(grey.mean(axis=(1, 2)), [20 * i for i in want], atol=1.5)
  builder = SampleBuilder(
    tok,
    tiny_model_config(tok.convert_tokens_to_ids("<image>")),
    clip,
    rng_factory=functools.partial(pcg, 5),
  )
  corpus = CorpusConfig("c", "a.json", str(media), num_frames=4)
  for seed, epoch, index in ((1, 2, 3), (1, 2, 4)):
    got = builder(parse_record(record, corpus), corpus=corpus, seed=seed, epoch=epoch, index=index)
    want = pcg(5, seed, epoch, index).integers(SEGMENT_LOW, SEGMENT_HIGH).tolist()
    assert got.frame_indices == tuple(want)
