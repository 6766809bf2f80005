"""One SFT training sample, built as the original PPLLaVA builds it
(``Interleave_sft_dataset.__getitem__``, ``interleave_sft_dataset.py:147-228``).

``build_sample(record, tokenizer=..., scorer_tokenizer=..., model=..., media_root=...,
seed=..., index=...)`` (or a reusable ``SampleBuilder``) turns one annotation record
into NumPy arrays: LLM ids with every media placeholder expanded, labels, attention
mask, the scorer's ids and mask, the media pixels and the sampled frame indices.

Text (``data.text.templates``): ``plain_v1`` (Vicuna) or ``plain_qwen`` (ChatML); the first
turn's ``i`` is the system text; ``<image>\\n`` is prefixed to the first question, or
each ``<image>`` already there becomes ``<image>\\n`` (one per picture for multi-image).
The tokenizer's BOS, when it has one (LLaMA; Qwen has none), is prepended as text.

Tokenization, ``SampleConfig.tokenization``:

- ``"pieces"`` (default, the original): the text is cut just after every assistant tag
  (``"ASSISTANT: "`` / ``"<|im_start|>assistant\\n"``), each piece is tokenized alone
  with ``add_special_tokens=False`` and the ids concatenated. With a LLaMA
  (SentencePiece) tokenizer every piece start gets a dummy-prefix space, so each answer
  is read as ``... ▁ASSISTANT: ▁ ▁The ...``: a lone ``▁`` (the tag's own space) before
  the answer's first word. The released models were trained on these ids.
- ``"whole"``: the full text tokenized at once (``... ▁ASSISTANT: ▁The ...``).

Labels: each answer and its end marker (``</s>``; ChatML ``<|im_end|>`` and the ``\\n``
after it) keep their ids; everything else, media placeholders included, is -100. The
mask is built per turn from the character spans of the rendered conversation (a token
is supervised when its characters overlap an answer span) and then checked: with
``"pieces"`` every turn must have exactly as many supervised tokens as the answer span
tokenized alone (the original's length arithmetic, :184-193), with ``"whole"`` every
turn's supervised tokens must end with the end marker's ids. A failed check skips the
sample (``SkipSample``, reason ``"labels"``).

Difference from the original: it finds the turns by ``str.split`` on the assistant
role, so an answer that itself contains ``"ASSISTANT: "`` (or the ChatML tag) splits
there too: its labels shift, the ``assert`` fails and the sample is silently replaced
by a random other one. Here the pieces are cut only at the real role tags (the spans
come from building the text), so such an answer is tokenized and supervised whole; a
record without such an answer gets the original's ids and labels exactly.

Scorer text: the whole rendered conversation without BOS (questions, answers, role
strings, ``<image>``, end markers), tokenized to the text encoder's context
(``model.scorer.text.max_position_embeddings``: 248 CLIP, 196 SigLIP) with a mask; a
longer text is truncated (its end token kept) and ``Sample.scorer_truncated`` says by how
many tokens (the original truncated silently). ``SampleConfig.scorer_padding``:

- ``"max_length"`` (default): padded to the context, as evaluation pads it (the original's
  ``padding="max_length"``, and its CLIP training text). CLIP pools the end token under a
  causal mask, so padding never changes its features.
- ``"none"``: the text alone, as the original trains the Qwen model (its SigLIP text is
  tokenized with ``max_length=196`` only, which truncates and does not pad, and each
  sample's text goes through the tower by itself). SigLIP pools the *last position*, so
  the two forms differ: padded, a padding position attending to the text is pooled;
  alone, the text's end token. The row is ``siglip.NO_TOKEN`` (-1) past the text's end,
  mask 0, which the SigLIP tower reads as a shorter input (the original's pooled
  features). A SigLIP scorer only: set it for Qwen SFT (``configs/sft_qwen7b.py``), and
  evaluate padded, as the original does.

Media (``seed``, ``epoch`` and ``index`` seed ``np.random.default_rng([seed, epoch,
index])``, so a sample is the same on every host and after a resume; ``rng=`` or a
builder's ``rng_factory`` replace that generator, e.g. to draw the frames another
implementation drew from the same generator):

- video: ``num_frames`` frames by the original's training sampling
  (``video.random_indices``: one random frame of each equal segment, its last frame
  excluded), from a file (PyAV, or decord), a frame folder (natural name order), a
  ``{:06d}.jpg`` folder numbered from 1 when the record has ``total_frames`` (a missing
  file falls back to the next number, as the original), or a list of frame files;
  squashed to the tower's square (SigLIP towers: letterboxed), ``video_tokens(T)``
  placeholders (``model.video_token_index``; -1 for checkpoints without one);
- image: LLaVA-NeXT anyres tiles, ``image_tokens((h, w))`` placeholders;
- multi-image (up to ``max_pictures``): the pictures read in sorted path order (the
  original's frame reader sorts the list it is given, ``picture_order="sorted"``;
  ``"listed"`` keeps the record's order), each squashed to the square like a video
  frame, no anyres; per picture ``picture_tokens(model)`` placeholders: the (1, 3, 3)
  image kernel on one frame, (24/3)^2 = 64 for a 24-grid, no newline. The model pools
  the pictures of one item like the frames of one video (one relevance softmax) with
  the image kernel and gives the k-th ``<image>`` the k-th picture's tokens.

Length: ``max_length`` bounds the LLM tokens of a sample (media included). A longer
sample is skipped (``SkipSample``, reason ``"too_long"``, naming the sample and both
lengths) or, with ``overflow="truncate"``, cut to ``max_length`` when the cut keeps
every media placeholder and at least one supervised token (``Sample.truncated``).

With ``SampleConfig.media_store`` (a store built by ``data.sft.store``) video frames come
from the store instead of the video: the same draw over the video's frame count, each
index taken to the nearest stored frame (equal to decoding when the store holds every
frame of the video; ``data.sft.store`` says how the kept frames are chosen). A video is looked
up by its path relative to the corpus's media root; one not in the store is a
``"missing"`` skip naming the video and the store. Videos given as lists of frame files
are read from their files as before (they are decoded pictures already).

Bad media (missing, corrupt, no frames) raise ``SkipSample`` with the reason
``"missing"``, ``"corrupt"`` or ``"empty"``; the pipeline counts skips and stops when
they pass a configured fraction (the original silently trained on a random other
sample instead).
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ppllava_jax import ops
from ppllava_jax.data.batching import IGNORE
from ppllava_jax.data.media import preprocess, video
from ppllava_jax.data.media.frames import NOT_STORED, load_rgb, load_training_video, open_image
from ppllava_jax.data.sft.annotations import CorpusConfig, Record, parse_record
from ppllava_jax.data.text.templates import TEMPLATES, ChatTemplate, render_conversation
from ppllava_jax.models.ppllava_config import PPLLaVAConfig
from ppllava_jax.models.scorer import SiglipScorerConfig
from ppllava_jax.models.siglip import NO_TOKEN, SiglipVisionConfig

TOKENIZATIONS = ("pieces", "whole")
OVERFLOWS = ("drop", "truncate")
PICTURE_ORDERS = ("sorted", "listed")
SCORER_PADDINGS = ("max_length", "none")
SKIP_REASONS = ("missing", "corrupt", "empty", "too_long", "too_many_pictures", "labels")


class SkipSample(Exception):
  """A sample that cannot be trained on: ``reason`` (one of ``SKIP_REASONS``), ``detail``."""

  def __init__(self, reason: str, detail: str):
    super().__init__(reason, detail)
    self.reason, self.detail = reason, detail

  def __str__(self) -> str:
    return f"{self.reason}: {self.detail}"


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  template: str = "plain_v1"  # or "plain_qwen"
  tokenization: str = "pieces"  # "pieces" (the original's) | "whole"
  max_length: int = 4096  # LLM tokens of one sample, media placeholders included
  overflow: str = "drop"  # "drop" (skip, counted) | "truncate"
  picture_order: str = "sorted"  # multi-image / frame lists: "sorted" (original) | "listed"
  max_pictures: int = 16  # more pictures than this: skipped ("too_many_pictures")
  video_backend: str = "pyav"  # or "decord" (what the original used)
  folder_fps: float = video.DEFAULT_FOLDER_FPS
  media_store: str | None = None  # a data.sft.store folder: video frames from it, not decoded
  # the scorer text: "max_length" (padded, as evaluation) | "none" (alone: the original's
  # Qwen SFT; SigLIP scorers only). Module doc.
  scorer_padding: str = "max_length"

  def __post_init__(self):
    checks = (
      ("template", self.template, tuple(TEMPLATES)),
      ("tokenization", self.tokenization, TOKENIZATIONS),
      ("overflow", self.overflow, OVERFLOWS),
      ("picture_order", self.picture_order, PICTURE_ORDERS),
      ("video_backend", self.video_backend, video.BACKENDS),
      ("scorer_padding", self.scorer_padding, SCORER_PADDINGS),
    )
    for name, value, allowed in checks:
      if value not in allowed:
        raise ValueError(f"SampleConfig.{name} must be one of {allowed}, got {value!r}")
    if self.max_length < 1 or self.max_pictures < 1:
      raise ValueError("SampleConfig: max_length and max_pictures must be >= 1")


@dataclasses.dataclass
class Sample:
  """One training sample, NumPy only (see the module doc)."""

  input_ids: np.ndarray  # (L,) int32, media placeholders expanded
  labels: np.ndarray  # (L,) int32, IGNORE (-100) where not supervised
  attention_mask: np.ndarray  # (L,) int32 ones
  scorer_ids: np.ndarray | None  # (C,) int32 (NO_TOKEN past the text unpadded), or None
  scorer_mask: np.ndarray | None  # (C,) int32
  kind: str  # "text" | "image" | "video" | "multi-image"
  video: np.ndarray | None = None  # (T, 3, S, S) float32
  frame_indices: tuple[int, ...] = ()  # video: 0-based frames read; multi-image: pictures read
  image: np.ndarray | None = None  # (1 + R*C, 3, S, S) float32 anyres tiles
  image_size: tuple[int, int] | None = None  # (height, width)
  pictures: np.ndarray | None = None  # (N, 3, S, S) float32
  media_tokens: tuple[int, ...] = ()  # placeholders per media item, in text order
  text: str = ""  # the LLM text (BOS included)
  scorer_text: str = ""
  scorer_truncated: int = 0  # scorer tokens cut to fit the encoder's context
  truncated: int = 0  # LLM tokens cut (overflow="truncate")
  source: str = ""  # where it came from, for messages

  @property
  def length(self) -> int:
    return len(self.input_ids)


def picture_tokens(model: PPLLaVAConfig) -> int:
  """LLM tokens of one multi-image picture: one frame pooled by the image tiles' windows
  ((g/3)^2 = 64 for a 24-grid), or g^2 in the modes that leave tiles unpooled."""
  g = model.vision.grid
  pool, _ = model.image_packing()
  out, _, _ = ops.pool_geometry((1, g, g), kernel=(1, pool, pool))
  return int(np.prod(out))


def frame_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  """The default generator of a sample's media draws: a function of (seed, epoch, index)
  alone, so a sample is the same on every host, in every worker and after a resume."""
  return np.random.default_rng([seed, epoch, index])


RngFactory = Callable[[int, int, int], np.random.Generator]  # (seed, epoch, index) -> generator


def _siglip_scorer(model: PPLLaVAConfig) -> bool:
  """Whether ``model``'s scorer is SigLIP (that of its config, else its vision tower's kind:
  a scorer given at load time matches the tower)."""
  if model.scorer is not None:
    return isinstance(model.scorer, SiglipScorerConfig)
  return isinstance(model.vision, SiglipVisionConfig)


def _classify(err: video.MediaError) -> str:
  reason = err.reason
  if "no such file" in reason or NOT_STORED in reason:
    return "missing"
  if "no decodable" in reason or "no frame images" in reason or "hold no frame" in reason:
    return "empty"
  return "corrupt"


def media_skip(err: video.MediaError, source: str) -> SkipSample:
  """The skip (``"missing"``, ``"corrupt"`` or ``"empty"``) of media that failed to load."""
  return SkipSample(_classify(err), f"{source}: {err}")


class SampleBuilder:
  """``build_sample`` with its tokenizers and configs bound; picklable (worker processes).

  ``model`` fixes the geometry: the tower's square, the pinpoints, the pooling mode
  (placeholder counts), the placeholder ids and the scorer's context length.

  Each thread tokenizes with its own copies of the tokenizers: a fast tokenizer's padding
  and truncation are state that every call sets, so two threads sharing one (the
  loader's threads, an evaluation on the main thread; the scorer's tokenizer may be
  the LLM's) would pad each other's texts.

  ``rng_factory(seed, epoch, index)`` makes each sample's generator (default
  ``frame_rng``); it travels to worker processes, so give a module-level function or a
  ``functools.partial`` of one.
  """

  def __init__(
    self,
    tokenizer,
    model: PPLLaVAConfig,
    scorer_tokenizer=None,
    config: SampleConfig = SampleConfig(),
    media_token: str = "<image>",
    scorer_length: int | None = None,
    rng_factory: RngFactory = frame_rng,
  ):
    self._shared = (tokenizer, scorer_tokenizer)
    self._local = threading.local()
    self.model, self.config, self.rng_factory = model, config, rng_factory
    self.template: ChatTemplate = TEMPLATES[config.template]
    self.media_token = media_token
    self.media_id = tokenizer.convert_tokens_to_ids(media_token)
    if self.media_id is None or self.media_id == tokenizer.unk_token_id:
      raise ValueError(f"the tokenizer has no {media_token!r} token: add it as a special token")
    if model.pooling.scored and scorer_tokenizer is None:
      raise ValueError(
        f"pooling mode {model.pooling.mode!r} scores relevance: give "
        "scorer_tokenizer (the CLIP / SigLIP tokenizer)"
      )
    if scorer_length is None and model.scorer is not None:
      scorer_length = model.scorer.text.max_position_embeddings
    if scorer_tokenizer is not None and scorer_length is None:
      raise ValueError("give scorer_length: the model config has no scorer")
    if config.scorer_padding == "none" and not _siglip_scorer(model):
      raise ValueError(
        "SampleConfig.scorer_padding='none' is a SigLIP scorer's form (SigLIP "
        "pools the last position); this model's scorer is CLIP, which pools its "
        "end token, so padding changes nothing: keep 'max_length'"
      )
    self.scorer_length = scorer_length
    siglip = isinstance(model.vision, SiglipVisionConfig)
    self.mean, self.std = (
      (preprocess.SIGLIP_MEAN, preprocess.SIGLIP_STD)
      if siglip
      else (preprocess.CLIP_MEAN, preprocess.CLIP_STD)
    )
    self.letterbox = siglip
    self.picture_tokens = picture_tokens(model)
    self.store = None
    if config.media_store is not None:
      from ppllava_jax.data.sft.store import MediaStore

      self.store = MediaStore(config.media_store)
      self.store.check_geometry(model.vision.image_size, self.letterbox)
    end = tokenizer(self.template.assistant_end, add_special_tokens=False).input_ids
    self.end_ids = list(end)

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_local"}

  def __setstate__(self, state):
    self.__dict__.update(state, _local=threading.local())

  @property
  def tokenizer(self):
    return self._own()[0]

  @property
  def scorer_tokenizer(self):
    return self._own()[1]

  def _own(self):
    """This thread's copies of (tokenizer, scorer tokenizer), one object if they are one."""
    if not hasattr(self._local, "tokenizers"):
      self._local.tokenizers = copy.deepcopy(self._shared)  # the memo keeps one object one
    return self._local.tokenizers

  # ---- text ---------------------------------------------------------------------------

  def _tokens(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc.input_ids), [tuple(o) for o in enc.offset_mapping]

  def _count(self, text: str) -> int:
    return len(self.tokenizer(text, add_special_tokens=False).input_ids)

  def tokenize(self, record: Record, source: str = "") -> tuple[str, str, list[int], list[int]]:
    """(LLM text, scorer text, ids, labels) before media expansion; see the module doc."""
    conv = render_conversation(
      self.template, record.turns, record.system, media=record.kind != "text"
    )
    bos = self.tokenizer.bos_token or ""
    text, shift = bos + conv.text, len(bos)
    spans = [(s + shift, e + shift) for s, e in conv.supervised]
    cuts = [0] + [b + shift for b in conv.breaks[: len(spans)]] + [len(text)]
    if self.config.tokenization == "pieces":
      pieces = [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    else:
      pieces = [(0, len(text))]
    ids: list[int] = []
    turn_of: list[int] = []  # per token: the turn it supervises, or -1
    for a, b in pieces:
      piece_ids, offsets = self._tokens(text[a:b])
      ids += piece_ids
      for lo, hi in offsets:
        lo, hi = lo + a, hi + a
        turn = -1
        for k, (s, e) in enumerate(spans):
          if (lo < e and hi > s) if hi > lo else s <= lo < e:
            turn = k
            break
        turn_of.append(turn)
    labels = [t if k >= 0 else IGNORE for t, k in zip(ids, turn_of)]
    self._check_labels(text, spans, ids, turn_of, source)
    return text, conv.scorer_text, ids, labels

  def _check_labels(self, text, spans, ids, turn_of, source) -> None:
    for k, (s, e) in enumerate(spans):
      mine = [t for t, j in zip(ids, turn_of) if j == k]
      if self.config.tokenization == "pieces":
        want = self._count(text[s:e])
        ok, what = len(mine) == want, f"{len(mine)} supervised tokens, the answer alone has {want}"
      else:
        n = len(self.end_ids)
        ok = mine[-n:] == self.end_ids
        what = f"supervised tokens end {mine[-n:]}, not the end marker {self.end_ids}"
      if not ok:
        raise SkipSample("labels", f"{source}: turn {k}: {what}")

  def scorer_tokens(self, text: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids, mask, tokens cut) of ``text`` at exactly the scorer's context length: padded,
    or with ``scorer_padding="none"`` the text alone and ``NO_TOKEN`` after it."""
    # set whenever there is a scorer tokenizer (__init__ refuses one without)
    length: int = self.scorer_length  # type: ignore[assignment]
    full = len(self.scorer_tokenizer(text, verbose=False).input_ids)
    if self.config.scorer_padding == "none":
      ids = self.scorer_tokenizer(text, truncation=True, max_length=length).input_ids
      ids_c = np.full(length, NO_TOKEN, np.int32)
      ids_c[: len(ids)] = ids
      return ids_c, (ids_c != NO_TOKEN).astype(np.int32), max(0, full - length)
    enc = self.scorer_tokenizer(text, truncation=True, max_length=length, padding="max_length")
    return (
      np.asarray(enc.input_ids, np.int32),
      np.asarray(enc.attention_mask, np.int32),
      max(0, full - length),
    )

  # ---- media --------------------------------------------------------------------------

  def _video(self, record: Record, corpus: CorpusConfig, rng) -> tuple[np.ndarray, tuple[int, ...]]:
    cfg, t = self.config, corpus.num_frames
    if record.frame_list:
      files = sorted(record.media) if cfg.picture_order == "sorted" else list(record.media)
      indices = video.random_indices(t, 0, len(files), rng)
      frames = {i: np.asarray(load_rgb(files[i])) for i in dict.fromkeys(indices)}
      if len({f.shape for f in frames.values()}) > 1:
        raise video.MediaError(files[0], "frames of the list differ in size")
      return np.stack([frames[i] for i in indices]), tuple(indices)
    if self.store is not None:
      return self.store.training_frames(record.media[0], corpus.media_root, t, rng)
    return load_training_video(
      record.media[0],
      t,
      rng,
      reader=corpus.reader,
      backend=cfg.video_backend,
      folder_fps=cfg.folder_fps,
      total_frames=record.total_frames,
    )

  # ---- the sample ---------------------------------------------------------------------

  def __call__(
    self,
    record: Record,
    *,
    corpus: CorpusConfig | None = None,
    seed: int = 0,
    epoch: int = 0,
    index: int = 0,
    source: str | None = None,
    rng: np.random.Generator | None = None,
  ) -> Sample:
    """The sample of ``record``; its media draws come from ``rng`` when given, else from
    ``rng_factory(seed, epoch, index)``."""
    corpus = corpus or CorpusConfig("sample", "")
    source = source or f"corpus {corpus.name!r} ({corpus.annotation}) record {record.source}"
    cfg = self.config
    rng = rng if rng is not None else self.rng_factory(seed, epoch, index)
    text, scorer_text, ids, labels = self.tokenize(record, source)
    runs, image = self._media_runs(record, corpus, source)
    slots = [i for i, t in enumerate(ids) if t == self.media_id]
    if len(slots) != len(runs):  # validation makes this unreachable for validated records
      raise ValueError(
        f"{source}: {len(slots)} {self.media_token} tokens for {len(runs)} media items"
      )
    length = len(ids) + sum(runs) - len(runs)
    truncated = 0
    if length > cfg.max_length:
      last_media = (slots[-1] + sum(runs) - len(runs) + 1) if runs else 0
      if cfg.overflow == "drop" or last_media > cfg.max_length:
        raise SkipSample("too_long", f"{source}: {length} tokens, max_length is {cfg.max_length}")
      truncated = length - cfg.max_length
    # media, only now that the sample is known to fit
    sample = Sample(
      np.zeros(0, np.int32),
      np.zeros(0, np.int32),
      np.zeros(0, np.int32),
      None,
      None,
      record.kind,
      text=text,
      scorer_text=scorer_text,
      source=source,
      media_tokens=tuple(runs),
    )
    try:
      self._load_media(sample, record, corpus, rng, image)
    except video.MediaError as err:
      raise media_skip(err, source) from None
    ids, labels = self._expand(ids, labels, slots, runs, record.kind)
    if truncated:
      ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
      if all(t == IGNORE for t in labels):
        raise SkipSample(
          "too_long",
          f"{source}: {length} tokens, and cutting to max_length "
          f"{cfg.max_length} leaves no supervised token",
        )
    sample.input_ids = np.asarray(ids, np.int32)
    sample.labels = np.asarray(labels, np.int32)
    sample.attention_mask = np.ones(len(ids), np.int32)
    sample.truncated = truncated
    if self.scorer_tokenizer is not None:
      sample.scorer_ids, sample.scorer_mask, sample.scorer_truncated = self.scorer_tokens(
        scorer_text
      )
    return sample

  def _media_runs(self, record: Record, corpus: CorpusConfig, source: str):
    """(the LLM tokens each media item of ``record`` takes, the opened image or None): what
    decides the length, read before any pixel is decoded."""
    model, kind = self.model, record.kind
    if kind == "image":
      try:
        image = open_image(record.media[0])
      except video.MediaError as err:
        raise media_skip(err, source) from None
      return [model.image_tokens((image.height, image.width))], image
    if kind == "video":
      return [model.video_tokens(corpus.num_frames)], None
    if kind == "multi-image":
      if len(record.media) > self.config.max_pictures:
        raise SkipSample(
          "too_many_pictures",
          f"{source}: {len(record.media)} pictures, max_pictures is {self.config.max_pictures}",
        )
      return [self.picture_tokens] * len(record.media), None
    return [], None

  def _load_media(self, sample: Sample, record: Record, corpus: CorpusConfig, rng, image) -> None:
    """``sample``'s pixels (and frame or picture order) from ``record``'s media."""
    cfg, model = self.config, self.model
    mean, std, s = self.mean, self.std, model.vision.image_size
    if record.kind == "image":
      sample.image, sample.image_size = preprocess.llava_next_image_pixels(
        load_rgb(record.media[0], image), model.grid_pinpoints, s, mean, std
      )
    elif record.kind == "video":
      frames, indices = self._video(record, corpus, rng)
      sample.video = preprocess.video_pixels(frames, s, mean, std, letterbox=self.letterbox)
      sample.frame_indices = tuple(int(i) for i in indices)
    elif record.kind == "multi-image":
      order = (
        sorted(range(len(record.media)), key=lambda i: record.media[i])
        if cfg.picture_order == "sorted"
        else list(range(len(record.media)))
      )
      pictures = [load_rgb(record.media[i]) for i in order]
      sample.pictures = preprocess.video_pixels(pictures, s, mean, std, letterbox=self.letterbox)
      sample.frame_indices = tuple(order)

  def _expand(
    self, ids: list[int], labels: list[int], slots: list[int], runs: list[int], kind: str
  ) -> tuple[list[int], list[int]]:
    """Each media token at ``slots`` replaced by its run of placeholders, unsupervised."""
    placeholder = self.model.video_token_index if kind == "video" else self.model.image_token_index
    for slot, run in zip(reversed(slots), reversed(runs)):  # back to front: slots stay valid
      ids[slot : slot + 1] = [placeholder] * run
      labels[slot : slot + 1] = [IGNORE] * run
    return ids, labels


def build_sample(
  record: Mapping[str, Any] | Record,
  *,
  tokenizer,
  model: PPLLaVAConfig,
  scorer_tokenizer=None,
  media_root: str = "",
  seed: int = 0,
  index: int = 0,
  epoch: int = 0,
  format: str = "qa",
  kind: str = "auto",
  reader: str = "auto",
  num_frames: int = 32,
  config: SampleConfig = SampleConfig(),
  rng: np.random.Generator | None = None,
) -> Sample:
  """One training sample from one annotation record (module doc).

  ``record``: a raw annotation (``format="qa"``, the original's, or ``"llava"``; checked
  by ``annotations.parse_record``, paths joined with ``media_root``) or a ``Record``.
  ``tokenizer``: the LLM's, with ``<image>`` as a special token; ``scorer_tokenizer``:
  the CLIP / SigLIP one (needed by the scored pooling modes). ``model`` fixes the
  geometry and placeholder ids. ``seed``, ``epoch``, ``index`` seed the frame sampling
  (``frame_rng``), or ``rng`` draws the frames (and advances).
  Returns a ``Sample``; raises ``SkipSample`` for a sample the pipeline would skip
  (bad media, too long, too many pictures) and ``AnnotationError`` for a malformed record.
  """
  corpus = CorpusConfig("sample", "<record>", media_root, kind, format, reader, num_frames)
  if not isinstance(record, Record):
    record = parse_record(record, corpus, "<record>", index)
  builder = SampleBuilder(tokenizer, model, scorer_tokenizer, config)
  return builder(
    record, corpus=corpus, seed=seed, epoch=epoch, index=index, source=f"record {index}", rng=rng
  )


def text_pads(samples: SampleBuilder) -> tuple[int, int, int]:
  """(the LLM's pad id, the scorer's text length (0: no scorer), its pad id) that
  collation fills rows with."""
  tok, scorer = samples.tokenizer, samples.scorer_tokenizer
  pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
  if scorer is None:
    return pad_id, 0, 0
  # with a scorer tokenizer, scorer_length is set (SampleBuilder.__init__)
  return pad_id, samples.scorer_length, scorer.pad_token_id or 0  # type: ignore[return-value]
