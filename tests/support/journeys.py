"""Tiny stand-ins for what the shipped recipes start from and read, so a journey test runs
``configs/*.py`` as a user would, with only hub ids, data paths and sizes swapped by
``--set``.

- ``vicuna_start``: a llava-hf LLaVA-NeXT-Video folder (CLIP tower, LLaMA LLM, llava-hf's
  sentencepiece Vicuna tokenizer with ``<image>``) and a CLIP folder (the scorer; CLIP's
  BPE tokenizer), as ``configs/sft_vicuna7b.py`` names llava-v1.6-vicuna-7b-hf and
  clip-vit-large-patch14-336.
- ``qwen_start``: a llava-hf LLaVA-OneVision folder (SigLIP tower, Qwen2 LLM, Qwen2's BPE
  tokenizer with ChatML and ``<image>``) and a SigLIP folder (sentencepiece tokenizer), as
  ``configs/sft_qwen7b.py`` names llava-onevision-qwen2-7b-si-hf and siglip-so400m.
- ``sft_data``: videos and images with annotation files in the original's ``qa`` format,
  and multiple-choice task files about the videos; ``preference_data``: LLaVA-Hound rows
  over frame folders (``train.run.synthetic``).
- ``recipe_overrides``: the ``--set`` items that point a recipe at them and shrink its
  batch to this CPU.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from transformers import AutoTokenizer

from support.hf_fixtures import (
  make_llava_next_video,
  make_llava_onevision,
  make_scorer_clip,
  make_scorer_siglip,
)
from support.tokenizers import clip_tokenizer, llama_sp_tokenizer, qwen_tokenizer, siglip_tokenizer
from support.train_data import write_image, write_video

FRAMES = 4


@dataclasses.dataclass(frozen=True)
class Start:
  checkpoint: Path
  clip: Path


def vicuna_start(root: Path) -> Start:
  llava, clip = root / "llava-v1.6-vicuna", root / "clip"
  tokenizer = AutoTokenizer.from_pretrained(llama_sp_tokenizer(llava))
  image = tokenizer.convert_tokens_to_ids("<image>")  # then <pad>; <video> gets the next id
  make_llava_next_video(llava, vocab_size=image + 3, image_token=image, video_token=image + 2)
  clip_tokenizer(clip)  # start, end = 0, 1 (also pad), 518 ids
  make_scorer_clip(
    clip, openai_like=True, vocab_size=518, bos_token_id=0, eos_token_id=1, pad_token_id=1
  )
  return Start(llava, clip)


def qwen_start(root: Path) -> Start:
  onevision, siglip = root / "llava-onevision-qwen2", root / "siglip"
  tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer(onevision))
  image = tokenizer.convert_tokens_to_ids("<image>")  # the last id; <video> gets the next
  make_llava_onevision(onevision, vocab_size=image + 2, image_token=image, video_token=image + 1)
  siglip_tokenizer(siglip)  # pad, eos = 0, 1; 99 ids
  make_scorer_siglip(
    siglip, google_like=True, vocab_size=99, pad_token_id=0, eos_token_id=1, bos_token_id=98
  )
  return Start(onevision, siglip)


SHADES = ("dark", "light")


def sft_data(root: Path, videos: int = 4, images: int = 2) -> dict[str, Path]:
  """``videos.json`` over ``videos/`` (grey clips, a question about how dark each is),
  ``images.json`` over ``images/``, and ``mcq/shade.json``, the same question as a
  multiple-choice task."""
  (root / "videos").mkdir(parents=True)
  (root / "images").mkdir()
  (root / "mcq").mkdir()
  records, items = [], []
  question = "Is the video dark or light?"
  for i in range(videos):
    shade = SHADES[2 * i // videos]
    write_video(root / "videos" / f"{i}.mp4", num_frames=8, size=(32, 32), step=30 * i)
    records.append({"video": f"{i}.mp4", "QA": [{"q": question, "a": f"It is {shade}."}]})
    items.append(
      {"video": f"{i}.mp4", "question": question, "candidates": list(SHADES), "answer": shade}
    )
  pictures = [
    {"image": f"{i}.png", "QA": [{"q": "What is in the picture?", "a": "A grey square."}]}
    for i in range(images)
  ]
  for i in range(images):
    write_image(root / "images" / f"{i}.png", size=(30, 50), value=60 + 100 * i)
  paths = dict(
    videos=root / "videos",
    images=root / "images",
    mcq=root / "mcq",
    video_annotation=root / "videos.json",
    image_annotation=root / "images.json",
  )
  paths["video_annotation"].write_text(json.dumps(records))
  paths["image_annotation"].write_text(json.dumps(pictures))
  (root / "mcq" / "shade.json").write_text(json.dumps(items))
  return paths


def preference_data(root: Path, videos: int = 4) -> dict[str, Path]:
  """LLaVA-Hound rows (one pair per video) over frame folders, and their held-out
  multiple-choice tasks (``train.run.synthetic.generate_preference``)."""
  from ppllava_jax.train.run import synthetic
  from ppllava_jax.train.run.config import SyntheticConfig

  synthetic.generate_preference(
    SyntheticConfig(kind="preference", videos=videos, eval_videos=2, frames=8, size=32), root
  )
  return dict(
    rows=root / "preference.jsonl", media_root=root, mcq=root / "mcq", videos=root / "videos"
  )


# What shrinks a 7B recipe's batch to this CPU; the model's own shapes come from the folders.
_SMALL = ("steps=2", "log_every=1", "checkpoint_every=1", "keep=2")
_SFT_BATCH = (
  "data.batch.batch_size=2",
  "data.batch.video_slots=2",
  "data.batch.num_frames=4",
  "data.batch.seq_buckets=(256,)",
  "data.sample.max_length=256",
  "data.num_workers=0",
  "data.num_epochs=None",
)


def recipe_overrides(
  recipe: str, start: Start | None = None, data: dict | None = None
) -> list[str]:
  """The ``--set`` items that run ``configs/{recipe}.py`` on the tiny folders."""
  if recipe == "sft_vicuna7b":
    return [
      *_SMALL,
      *_SFT_BATCH,
      f"model.checkpoint={start.checkpoint}",
      f"model.clip={start.clip}",
      "model.btadapter={'depth': 2, 'max_T': 8}",
      "data.batch.image_slots=1",
      f"data.mixture.corpora.images.annotation={data['image_annotation']}",
      f"data.mixture.corpora.images.media_root={data['images']}",
      f"data.mixture.corpora.videos.annotation={data['video_annotation']}",
      f"data.mixture.corpora.videos.media_root={data['videos']}",
      f"data.mixture.corpora.videos.num_frames={FRAMES}",
    ]
  if recipe == "sft_qwen7b":
    return [
      *_SMALL,
      *_SFT_BATCH,
      f"model.checkpoint={start.checkpoint}",
      f"model.clip={start.clip}",
      f"data.mixture.corpora.llava_hound.annotation={data['video_annotation']}",
      f"data.mixture.corpora.llava_hound.media_root={data['videos']}",
      f"data.mixture.corpora.llava_hound.num_frames={FRAMES}",
    ]
  if recipe == "dpo_vicuna7b":
    return [
      *_SMALL,
      "preference.batch_size=2",
      "preference.seq_buckets=(256,)",
      "preference.sample.max_length=256",
      f"preference.sample.num_frames={FRAMES}",
      "preference.num_workers=0",
      "preference.num_epochs=None",
      f"preference.rows={data['rows']}",
      f"preference.media_root={data['media_root']}",
    ]
  raise ValueError(recipe)
