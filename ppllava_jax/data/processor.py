"""Prompts and media -> the arrays ``PPLLaVA`` takes, in batches of few static shapes.

``Processor.encode`` turns one ``Prompt`` (text with one media placeholder per item,
the media, the scorer's text) into token ids and pixels:

- the text is tokenized whole, with the tokenizer's own media token (``<image>``)
  standing for each item, so ids match what the tokenizer gives around its special
  tokens; then the k-th media token is replaced by the k-th item's run of placeholder
  ids: ``PPLLaVAConfig.video_tokens(T)`` video placeholders (-1 for checkpoints without
  a video token) or ``image_tokens(size)`` image placeholders;
- videos: frames resized to the tower's square input, CLIP-normalised (SigLIP towers:
  letterboxed, SigLIP-normalised: the original's two video processors); images:
  anyres tiles (``data.media.preprocess``);
- the scorer's text is tokenized to exactly the scorer's context length (248 CLIP,
  196 SigLIP; SigLIP pools the last position, so it must be padded to that length),
  truncated: the first time with a warning that says by how much, after that counted
  (``scorer_truncated``), so a benchmark of long prompts logs one line, not one per item;
- every id is checked against the table it indexes (``data.text.tokenizer.check_ids``): a
  tokenizer of another model fails the item with a clear error, never NaN logits.

``Processor.collate`` stacks encoded items with left padding (generation needs the
last position real). Shapes are bucketed so a long evaluation compiles a handful of
programs: prompt lengths round up to a multiple of ``length_multiple``, the batch is
filled to ``batch_size`` by repeating its last item (``num_real`` says how many rows
count), anyres images are padded to the most tiles any pinpoint gives, and every video
of a batch must have the same frame count.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np

from ppllava_jax.data.media import preprocess
from ppllava_jax.data.text.tokenizer import check_ids
from ppllava_jax.models.ppllava_config import PPLLaVAConfig
from ppllava_jax.models.siglip import SiglipVisionConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Media:
  kind: Literal["video", "image"]
  data: object  # video: uint8 (T, H, W, 3) frames; image: a PIL image or uint8 array


@dataclasses.dataclass(frozen=True)
class Prompt:
  text: str  # the LLM's text, one ``media_token`` per item of ``media``, in order
  media: tuple[Media, ...] = ()
  scorer_text: str = ""  # the relevance scorer's text (the question; see data.text.templates)


@dataclasses.dataclass(frozen=True)
class Encoded:
  input_ids: np.ndarray  # (L,) int32
  videos: tuple[np.ndarray, ...]  # each (T, 3, S, S) float32
  images: tuple[tuple[np.ndarray, tuple[int, int]], ...]  # (tiles, 3, S, S), (height, width)
  scorer_ids: np.ndarray | None  # (context,) int32, or None without a scorer
  scorer_mask: np.ndarray | None


class Processor:
  def __init__(
    self, cfg: PPLLaVAConfig, tokenizer, scorer_tokenizer=None, media_token: str = "<image>"
  ):
    self.cfg = cfg
    self.tokenizer = tokenizer
    self.scorer_tokenizer = scorer_tokenizer
    self.media_token = media_token
    self.media_id = tokenizer.convert_tokens_to_ids(media_token)
    if self.media_id is None or self.media_id == tokenizer.unk_token_id:
      raise ValueError(
        f"the tokenizer has no {media_token!r} token: add it as a special "
        "token (llava-hf tokenizers have it)"
      )
    if cfg.pooling.scored and scorer_tokenizer is None:
      raise ValueError(
        f"pooling mode {cfg.pooling.mode!r} scores relevance: give "
        "scorer_tokenizer (the CLIP / SigLIP tokenizer)"
      )
    siglip = isinstance(cfg.vision, SiglipVisionConfig)
    self.mean, self.std = (
      (preprocess.SIGLIP_MEAN, preprocess.SIGLIP_STD)
      if siglip
      else (preprocess.CLIP_MEAN, preprocess.CLIP_STD)
    )
    self.letterbox = siglip
    self.max_tiles = 1 + max(h * w for h, w in cfg.grid_pinpoints) // cfg.vision.image_size**2
    self.scorer_truncated = 0  # items whose scorer text was cut to the context

  # ---- one item -----------------------------------------------------------------------

  def encode(self, prompt: Prompt) -> Encoded:
    ids = list(self.tokenizer(prompt.text).input_ids)
    slots = [i for i, t in enumerate(ids) if t == self.media_id]
    if len(slots) != len(prompt.media):
      raise ValueError(
        f"the prompt has {len(slots)} {self.media_token} placeholders but "
        f"{len(prompt.media)} media items"
      )
    videos, images, runs = [], [], []
    for item in prompt.media:
      if item.kind == "video":
        frames = np.asarray(item.data)
        videos.append(
          preprocess.video_pixels(
            frames, self.cfg.vision.image_size, self.mean, self.std, letterbox=self.letterbox
          )
        )
        runs.append([self.cfg.video_token_index] * self.cfg.video_tokens(len(frames)))
      elif item.kind == "image":
        tiles, size = preprocess.llava_next_image_pixels(
          item.data,  # type: ignore[arg-type]  # an image's data: a PIL image or an array
          self.cfg.grid_pinpoints,
          self.cfg.vision.image_size,
          self.mean,
          self.std,
        )
        images.append((tiles, size))
        runs.append([self.cfg.image_token_index] * self.cfg.image_tokens(size))
      else:
        raise ValueError(f"media kind must be 'video' or 'image', got {item.kind!r}")
    for slot, run in zip(reversed(slots), reversed(runs)):  # back to front: slots stay valid
      ids[slot : slot + 1] = run
    check_ids(ids, self.cfg.text.vocab_size, "the prompt's token ids")
    scorer_ids = scorer_mask = None
    if self.scorer_tokenizer is not None:  # scored pooling, or relevance pictures
      scorer_ids, scorer_mask = self._scorer_tokens(prompt.scorer_text)
      # a scorer tokenizer comes with cfg.scorer (data.text.tokenizer.model_tokenizers)
      check_ids(scorer_ids, self.cfg.scorer.text.vocab_size, "the scorer text's token ids")  # type: ignore[union-attr]
    return Encoded(np.asarray(ids, np.int32), tuple(videos), tuple(images), scorer_ids, scorer_mask)

  def _scorer_tokens(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    length = self.cfg.scorer.text.max_position_embeddings  # type: ignore[union-attr]  # as above
    full = len(self.scorer_tokenizer(text).input_ids)
    if full > length:
      if not self.scorer_truncated:
        log.warning(
          "scorer text truncated from %d to %d tokens (the text encoder's context): "
          "%.80r...; further truncations are counted, not logged",
          full,
          length,
          text,
        )
      self.scorer_truncated += 1
    enc = self.scorer_tokenizer(text, truncation=True, max_length=length, padding="max_length")
    return np.asarray(enc.input_ids, np.int32), np.asarray(enc.attention_mask, np.int32)

  # ---- a batch ------------------------------------------------------------------------

  def collate(
    self, items: Sequence[Encoded], batch_size: int | None = None, length_multiple: int = 64
  ) -> dict[str, np.ndarray | int]:
    """Model keyword arguments for ``items`` (plus ``num_real``), shapes bucketed."""
    if not items:
      raise ValueError("collate: no items")
    batch_size = batch_size or len(items)
    if len(items) > batch_size:
      raise ValueError(f"collate: {len(items)} items do not fit batch_size {batch_size}")
    rows = list(items) + [items[-1]] * (batch_size - len(items))
    length = -(-max(len(r.input_ids) for r in rows) // length_multiple) * length_multiple
    ids = np.full((batch_size, length), self.tokenizer.pad_token_id or 0, np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    for i, row in enumerate(rows):
      ids[i, length - len(row.input_ids) :] = row.input_ids
      mask[i, length - len(row.input_ids) :] = 1
    batch: dict[str, np.ndarray | int] = dict(
      input_ids=ids, attention_mask=mask, num_real=len(items)
    )
    videos = [v for r in rows for v in r.videos]
    if videos:
      frames = {len(v) for v in videos}
      if len(frames) > 1:
        raise ValueError(
          f"collate: videos of one batch must have one frame count, got {sorted(frames)}"
        )
      batch["pixel_values_videos"] = np.stack(videos)
    images = [im for r in rows for im in r.images]
    if images:
      s = self.cfg.vision.image_size
      pixels = np.zeros((len(images), self.max_tiles, 3, s, s), np.float32)
      for i, (tiles, _) in enumerate(images):
        pixels[i, : len(tiles)] = tiles
      batch["pixel_values"] = pixels
      batch["image_sizes"] = np.asarray([size for _, size in images], np.int64)
    if self.cfg.pooling.scored:  # then encode gave every row its scorer tokens (__init__)
      batch["clip_input_ids"] = np.stack([r.scorer_ids for r in rows])  # type: ignore[misc]
      batch["clip_attention_mask"] = np.stack([r.scorer_mask for r in rows])  # type: ignore[misc]
    return batch
