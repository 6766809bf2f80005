"""Video DPO data: LLaVA-Hound preference rows and one preference sample per row.

The original PPLLaVA trains DPO on LLaVA-Hound's ``sft_dpo_17k.jsonl``
(``ppllava/train/train_dpo.py``, a LLaVA-Hound / trl-0.8-era trainer). What it does, and
where this module differs:

- Rows are JSON lines ``{id, prompt, answer, video, chosen, rejected, chosen_score,
  rejected_score}``; ``video`` is joined to the media root (``os.path.join``: an absolute
  path stays). ``read_preference_rows`` checks every row before training. A malformed
  row (not an object, a key the sample needs missing, a wrong type, an empty ``video``,
  an empty or blank ``chosen`` / ``rejected``, an ``<image>`` in the prompt or a
  completion) is a ``files.DataFileError`` ``path:line: field 'name': problem``.
  ``answer`` and the scores are optional and kept. A row that is well formed but cannot
  teach anything is skipped and counted by reason: chosen == rejected up to surrounding
  whitespace (``"same_completions"``: no gradient, only noise in the metrics), a video
  path that does not exist (``"missing"``). The original found such rows only while
  training and then silently trained on a random other row.
- Prompt (``train_dpo.py:558-561``): ``<video>`` is removed, the rest stripped, and
  ``<image>\\n`` put in front; that stripped question alone is the scorer (CLIP) text
  (``both=False``, unlike the original's SFT, which scores the whole conversation),
  padded / truncated to the text encoder's context as in SFT
  (``PreferenceConfig.scorer_padding``, as SFT's: the original's DPO, CLIP only, pads).
- Template: the script asks for ``vicuna_v1``, which its conversation module does not
  define (it cannot run as released); ``templates.VICUNA_V1`` is LLaVA's
  ``conv_vicuna_v1``, the evident intent: ``{system} USER: <image>\\n{q} ASSISTANT:
  {a}</s>`` with LLaVA's system sentence. The Qwen model uses ChatML (``plain_qwen``, as
  its SFT). The LLaMA BOS is prepended as text, as in SFT.
- Tokenization: each side's whole conversation at once (LLaVA's ``preprocess_v1``; no
  lone ``▁`` after ``ASSISTANT:`` as SFT's pieces have). Labels by LLaVA's length
  arithmetic: the supervised tokens are as many as the completion tokenized alone
  (its round length minus the instruction length), i.e. the completion's own tokens
  and the end marker (``</s>``; ChatML ``<|im_end|>\\n``). Here that is checked rather
  than assumed: the whole text's ids must end with exactly those tokens, and what comes
  before them (the prompt) must be the same for chosen and rejected. Where the
  original's check failed it masked every label and trained on nothing with a printed
  warning; here the sample is skipped, reason ``"labels"``.
- Frames: ``num_frames`` (32) by SFT's training sampling
  (``data.media.frames.load_training_video``): a frame folder (the original's) in natural
  name order, or a video file; seeded by ``(seed, epoch, index)`` like an SFT sample (or
  drawn from ``rng=`` / the builder's ``rng_factory``, as SFT's). Unreadable media skip with
  SFT's reasons (``"missing"``, ``"corrupt"``, ``"empty"``), as does a row longer than
  ``max_length`` (``"too_long"``; the original never truncated either).

The sample (``PreferenceSample``) holds the media once for the pair: the shared prompt
ids (placeholders expanded), then per side only the completion ids, all of them
supervised. ``row("chosen")`` / ``row("rejected")`` give a full (ids, labels) row, so a
batch puts both rows of every pair through the LLM in one forward while the vision
tower and the scorer run once per pair (the original duplicated the pixels and ran the
tower twice).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ppllava_jax.data.batching import IGNORE
from ppllava_jax.data.media import preprocess, video
from ppllava_jax.data.media.frames import load_training_video
from ppllava_jax.data.sft.annotations import MEDIA_TOKEN, READERS
from ppllava_jax.data.sft.samples import (
  SCORER_PADDINGS,
  RngFactory,
  SampleBuilder,
  SampleConfig,
  SkipSample,
  frame_rng,
  media_skip,
)
from ppllava_jax.data.text.templates import TEMPLATES, Turn, render_conversation
from ppllava_jax.files import DataFileError, read_jsonl
from ppllava_jax.models.ppllava_config import PPLLaVAConfig

logger = logging.getLogger(__name__)

VIDEO_TAG = "<video>"  # LLaVA-Hound's placeholder in ``prompt``, removed
SIDES = ("chosen", "rejected")
# read time: "missing", "same_completions"; build time: the rest
SKIP_REASONS = ("missing", "same_completions", "corrupt", "empty", "too_long", "labels")
_REQUIRED = {
  "id": (str, int),
  "prompt": (str,),
  "video": (str,),
  "chosen": (str,),
  "rejected": (str,),
}
_OPTIONAL = {"answer": (str,), "chosen_score": (int, float), "rejected_score": (int, float)}
_KINDS: dict[tuple[type, ...], str] = {
  (str,): "a string",
  (str, int): "a string or an integer",
  (int, float): "a number",
}


@dataclasses.dataclass(frozen=True)
class PreferenceRow:
  """One validated row; ``video`` joined with the media root."""

  id: str | int
  question: str  # the prompt without <video>, stripped: the LLM question and the scorer text
  video: str
  chosen: str
  rejected: str
  answer: str | None = None
  chosen_score: float | None = None
  rejected_score: float | None = None
  file: str = ""
  line: int = 0

  @property
  def source(self) -> str:
    return f"{self.file}:{self.line} (id {self.id!r})"


@dataclasses.dataclass(frozen=True)
class PreferenceRows:
  """The usable rows of one file and, for each row left out, ``(line, reason)``."""

  file: str
  rows: tuple[PreferenceRow, ...]
  skipped: tuple[tuple[int, str], ...]

  @property
  def counts(self) -> dict[str, int]:
    """Skipped rows per reason, in ``SKIP_REASONS`` order, reasons with none left out."""
    reasons = [reason for _, reason in self.skipped]
    return {r: reasons.count(r) for r in SKIP_REASONS if r in reasons}


def _field_error(path, line: int, name: str, problem: str) -> DataFileError:
  return DataFileError(path, f"field {name!r}: {problem}", line)


def _typed(
  raw: Mapping[str, Any], path, line: int, name: str, types: tuple[type, ...], required: bool
):
  value = raw.get(name)
  if value is None:
    if required:
      raise _field_error(path, line, name, "missing")
    return None
  if type(value) not in types:  # exact types: a bool is not a score, a float not an id
    raise _field_error(path, line, name, f"must be {_KINDS[types]}, got {type(value).__name__}")
  return value


def parse_row(
  raw: Mapping[str, Any], path: str | Path, line: int, media_root: str = ""
) -> PreferenceRow:
  """One raw row -> a ``PreferenceRow``, or ``DataFileError`` naming ``path:line`` and
  the field."""
  values = {name: _typed(raw, path, line, name, types, True) for name, types in _REQUIRED.items()}
  values.update(
    {name: _typed(raw, path, line, name, types, False) for name, types in _OPTIONAL.items()}
  )
  if not values["video"]:
    raise _field_error(path, line, "video", "is empty")
  for name in SIDES:  # nothing to prefer: the data is broken, not merely unhelpful
    if not values[name].strip():
      raise _field_error(
        path, line, name, "is empty" if not values[name] else "is blank (whitespace only)"
      )
  for name in ("prompt", *SIDES):
    if MEDIA_TOKEN in values[name]:
      raise _field_error(
        path,
        line,
        name,
        f"holds {MEDIA_TOKEN!r}: the one video placeholder is the prompt's {VIDEO_TAG!r}, or none",
      )
  question = values.pop("prompt").replace(VIDEO_TAG, "").strip()
  values["video"] = os.path.join(media_root, values["video"])
  return PreferenceRow(question=question, file=str(path), line=line, **values)


def quality_problem(row: PreferenceRow, check_media: bool = True) -> str | None:
  """Why a well-formed row is skipped (a ``SKIP_REASONS`` entry), or None."""
  if row.chosen.strip() == row.rejected.strip():
    return "same_completions"
  if check_media and not os.path.exists(row.video):
    return "missing"
  return None


def read_preference_rows(
  path: str | Path, media_root: str = "", *, check_media: bool = True
) -> PreferenceRows:
  """Every row of the JSONL file ``path``, validated (module doc). The first malformed
  row raises ``DataFileError``; data problems are skipped, counted and logged.
  ``check_media``: skip rows whose video path does not exist (one ``stat`` a row)."""
  rows, skipped = [], []
  lines = read_jsonl(path, expect=dict)
  for line, raw in lines:
    row = parse_row(raw, path, line, media_root)
    reason = quality_problem(row, check_media)
    if reason is None:
      rows.append(row)
    else:
      skipped.append((line, reason))
  result = PreferenceRows(str(path), tuple(rows), tuple(skipped))
  if not rows:
    raise DataFileError(
      path, f"no usable preference rows ({len(lines)} read, skipped: {result.counts})"
    )
  if skipped:
    logger.warning(
      "%s: %d of %d preference rows skipped: %s", path, len(skipped), len(lines), result.counts
    )
  return result


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
  template: str = "vicuna_v1"  # the Vicuna model; "plain_qwen" (ChatML) for the Qwen model
  num_frames: int = 32
  reader: str = "auto"  # as CorpusConfig.reader: "auto" (a folder: frames, else PyAV), ...
  max_length: int = 4096  # LLM tokens of the longer row of a pair, media included
  video_backend: str = "pyav"  # or "decord"
  scorer_padding: str = "max_length"  # or "none" (SigLIP scorers): as SampleConfig's

  def __post_init__(self):
    for name, allowed in (
      ("template", tuple(TEMPLATES)),
      ("reader", READERS),
      ("video_backend", video.BACKENDS),
      ("scorer_padding", SCORER_PADDINGS),
    ):
      if getattr(self, name) not in allowed:
        raise ValueError(
          f"PreferenceConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}"
        )
    if self.num_frames < 1 or self.max_length < 1:
      raise ValueError("PreferenceConfig: num_frames and max_length must be >= 1")


@dataclasses.dataclass(frozen=True)
class PreferenceSample:
  """One pair, NumPy only; the media and the prompt once (module doc)."""

  prompt_ids: np.ndarray  # (P,) int32: BOS, template, question, the video's placeholders
  chosen_ids: np.ndarray  # (C,) int32: the chosen completion and the end marker, all supervised
  rejected_ids: np.ndarray  # (R,) int32: the same for the rejected one
  video: np.ndarray  # (T, 3, S, S) float32
  frame_indices: tuple[int, ...]
  media_tokens: int  # the video's placeholders in prompt_ids
  scorer_ids: np.ndarray | None  # (context,) int32: the question, or None without a scorer
  scorer_mask: np.ndarray | None
  scorer_truncated: int = 0  # scorer tokens cut to fit the encoder's context
  prompt_text: str = ""  # the LLM text before the completions (BOS included)
  scorer_text: str = ""
  source: str = ""

  def row(self, side: str) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels) of ``side``'s whole row: the prompt, then its completion;
    labels IGNORE over the prompt."""
    completion = {"chosen": self.chosen_ids, "rejected": self.rejected_ids}[side]
    ignore = np.full(len(self.prompt_ids), IGNORE, np.int32)
    return (np.concatenate([self.prompt_ids, completion]), np.concatenate([ignore, completion]))

  @property
  def length(self) -> int:
    """Tokens of the longer row."""
    return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


class PreferenceBuilder:
  """Rows -> ``PreferenceSample``; picklable (worker processes).

  Text, media geometry, placeholder ids and the scorer come from an SFT
  ``SampleBuilder`` with the same tokenizers and model config, so both kinds of sample
  agree on them; ``rng_factory`` as ``SampleBuilder``'s.
  """

  def __init__(
    self,
    tokenizer,
    model: PPLLaVAConfig,
    scorer_tokenizer=None,
    config: PreferenceConfig = PreferenceConfig(),
    scorer_length: int | None = None,
    rng_factory: RngFactory = frame_rng,
  ):
    self.config = config
    self.sft = SampleBuilder(
      tokenizer,
      model,
      scorer_tokenizer,
      SampleConfig(
        template=config.template,
        tokenization="whole",
        max_length=config.max_length,
        video_backend=config.video_backend,
        scorer_padding=config.scorer_padding,
      ),
      scorer_length=scorer_length,
      rng_factory=rng_factory,
    )

  def _ids(self, text: str) -> list[int]:
    return list(self.sft.tokenizer(text, add_special_tokens=False).input_ids)

  def tokenize(
    self, question: str, completion: str, source: str, side: str
  ) -> tuple[str, list[int], list[int]]:
    """(prompt text, prompt ids, completion ids) of one side, before media expansion."""
    conv = render_conversation(self.sft.template, [Turn(question, completion)])
    bos = self.sft.tokenizer.bos_token or ""
    ids = self._ids(bos + conv.text)
    # LLaVA's arithmetic: the completion is as many tokens as it has alone, then the end marker
    want = self._ids(completion) + self.sft.end_ids
    cut = len(ids) - len(want)
    if cut < 1 or ids[cut:] != want:
      raise SkipSample(
        "labels",
        f"{source}: the {side} completion alone is {want}, the whole text ends {ids[-len(want) :]}",
      )
    return bos + conv.text[: conv.supervised[0][0]], ids[:cut], ids[cut:]

  def __call__(
    self,
    row: PreferenceRow,
    *,
    seed: int = 0,
    epoch: int = 0,
    index: int = 0,
    rng: np.random.Generator | None = None,
  ) -> PreferenceSample:
    """The pair of ``row``; its frames drawn from ``rng`` when given, else from the
    builder's ``rng_factory(seed, epoch, index)``."""
    cfg, sft, model = self.config, self.sft, self.sft.model
    source = row.source
    prompt_text, prompt, chosen = self.tokenize(row.question, row.chosen, source, "chosen")
    _, prompt_rejected, rejected = self.tokenize(row.question, row.rejected, source, "rejected")
    if prompt_rejected != prompt:
      raise SkipSample(
        "labels", f"{source}: the prompt tokenizes differently before the two completions"
      )
    run = model.video_tokens(cfg.num_frames)
    length = len(prompt) - 1 + run + max(len(chosen), len(rejected))
    if length > cfg.max_length:
      raise SkipSample("too_long", f"{source}: {length} tokens, max_length is {cfg.max_length}")
    rng = rng if rng is not None else sft.rng_factory(seed, epoch, index)
    try:
      frames, indices = load_training_video(
        row.video, cfg.num_frames, rng, reader=cfg.reader, backend=cfg.video_backend
      )
    except video.MediaError as err:
      raise media_skip(err, source) from None
    pixels = preprocess.video_pixels(
      frames, model.vision.image_size, sft.mean, sft.std, letterbox=sft.letterbox
    )
    slot = prompt.index(sft.media_id)  # the only one: parse_row keeps <image> out of the text
    prompt[slot : slot + 1] = [model.video_token_index] * run
    scorer_ids = scorer_mask = None
    truncated = 0
    if sft.scorer_tokenizer is not None:
      scorer_ids, scorer_mask, truncated = sft.scorer_tokens(row.question)
    return PreferenceSample(
      np.asarray(prompt, np.int32),
      np.asarray(chosen, np.int32),
      np.asarray(rejected, np.int32),
      pixels,
      tuple(int(i) for i in indices),
      run,
      scorer_ids,
      scorer_mask,
      truncated,
      prompt_text,
      row.question,
      source,
    )
