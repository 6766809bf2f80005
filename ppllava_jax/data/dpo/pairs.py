"""The DPO input pipeline: preference rows -> planned batches of pairs -> ``PairBatch``es.

``make_preference_iterator(config, tokenizer=..., model=..., scorer_tokenizer=...)`` runs
on the batch engine SFT shares (``data.engine``: the global batch plan, one process's
steps from a cursor, Grain workers, the ``DataIterator`` with its counters and
checkpointable state), with rows in place of annotation records:

1. ``data.dpo.rows.read_preference_rows`` validates the JSONL file (an empty completion is
   an error naming the line); rows that cannot teach (equal completions, a missing video)
   are left out and counted (the data state's ``stats.skipped`` starts with those counts).
2. Epoch ``e`` is a seeded permutation of the rows (``pair_epoch``, a function of
   (seed, e)) cut into batches of ``batch_size`` pairs.
3. ``PairBatchBuilder`` builds each pair (``preference.PreferenceBuilder``: 32 frames by
   SFT's training sampling, seeded by (seed, epoch, position), or from the generator an
   ``rng_factory`` makes of them) and collates them
   (``collate_pairs``). A pair that fails to build (bad media, too long, labels) leaves
   its pair empty (``pair_mask`` False) and is counted by reason, as in SFT.

Frames pinned per row (``pin_frames``, what a cached reference needs): the sampling seed
is (seed, 0, row) in every epoch, so each row shows the same frames whenever it comes,
and the reference log-probs computed once for it stay those of its batch.

Layout of one ``PairBatch`` (B pairs, 2B rows of L tokens). Rows are interleaved: row
``2i`` is pair ``i``'s chosen completion, row ``2i + 1`` its rejected one. Sharded over
the batch axis, a device then holds both rows of each of its pairs and their video (trl
concatenates all chosen rows before all rejected ones, which would put a pair's rows on
different devices).

- text, right-padded as ``TrainBatch``: ``input_ids``, ``attention_mask``,
  ``position_ids``, ``labels`` (2B, L): the shared prompt (labels IGNORE, the video's
  placeholders expanded) then the side's completion and end marker (supervised);
- ``pair_mask`` (B,): the real pairs (which rows they are is a host fact,
  ``BatchInfo.records``);
- the media once per pair: ``scorer_ids`` / ``scorer_mask`` (B, C) (the question),
  ``videos`` (B, T, 3, S, S), ``video_frame_mask`` (B, T), ``video_token_mask``
  (B, video_tokens(T)): a video's tokens serve both of its rows (``train.core.inputs``);
- ``ref_logps`` (2B,) float32: the reference's summed completion log-probs per row, from
  the cache of ``train.run.reference`` (zeros when the reference runs live).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import flax.struct
import grain
import jax
import numpy as np

from ppllava_jax.data import engine
from ppllava_jax.data.batching import IGNORE, PIXEL_DTYPES, check_batching, seq_bucket, shape_key
from ppllava_jax.data.dpo.rows import (
  PreferenceBuilder,
  PreferenceConfig,
  PreferenceRow,
  PreferenceRows,
  PreferenceSample,
  read_preference_rows,
)
from ppllava_jax.data.sft.samples import RngFactory, SkipSample, frame_rng, text_pads
from ppllava_jax.models.ppllava_config import PPLLaVAConfig


@dataclasses.dataclass(frozen=True)
class PreferenceDataConfig:
  """rows: a LLaVA-Hound JSONL file; media_root: what its ``video`` paths are relative to;
  batch_size: pairs per shard (2 x batch_size LLM rows; a step's global batch is ``shards``
  of them, one per data block by default); the rest as ``DataConfig``."""

  rows: str
  media_root: str = ""
  sample: PreferenceConfig = PreferenceConfig()
  batch_size: int = 2
  seq_buckets: tuple[int, ...] = (1024, 2048, 4096)
  pixel_dtype: str = "float32"
  seed: int = 42
  num_epochs: int | None = 1  # None: endless
  num_workers: int = 2
  worker_buffer_size: int = 2
  threads: int = 1
  max_skip_fraction: float = 0.01
  skip_check_after: int = 200
  shards: int | None = None  # planned batches of pairs per step (data.sft.pipeline)

  def __post_init__(self):
    engine.check_shards(self)
    if not self.rows:
      raise ValueError("PreferenceDataConfig.rows: give the preference JSONL file")
    check_batching(self)
    if self.sample.max_length > self.seq_buckets[-1]:
      raise ValueError(
        f"PreferenceConfig.max_length {self.sample.max_length} exceeds the "
        f"largest bucket {self.seq_buckets[-1]}"
      )
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ValueError(f"num_epochs must be >= 1 or None, got {self.num_epochs}")

  def bucket(self, length: int) -> int:
    return seq_bucket(self.seq_buckets, length, "PreferenceConfig.max_length")


@flax.struct.dataclass
class PairBatch:
  """B preference pairs as 2B interleaved LLM rows and B videos (module doc)."""

  input_ids: jax.Array | np.ndarray  # (2B, L) int32
  attention_mask: jax.Array | np.ndarray  # (2B, L) int32
  position_ids: jax.Array | np.ndarray  # (2B, L) int32
  labels: jax.Array | np.ndarray  # (2B, L) int32, IGNORE unsupervised
  pair_mask: jax.Array | np.ndarray  # (B,) bool
  scorer_ids: jax.Array | np.ndarray  # (B, C) int32
  scorer_mask: jax.Array | np.ndarray  # (B, C) int32
  videos: jax.Array | np.ndarray  # (B, T, 3, S, S)
  video_frame_mask: jax.Array | np.ndarray  # (B, T) bool
  video_token_mask: jax.Array | np.ndarray  # (B, video_tokens(T)) bool
  ref_logps: jax.Array | np.ndarray  # (2B,) float32

  @property
  def sample_mask(self):
    """The real samples (pairs): what the loop counts."""
    return self.pair_mask

  shape_key = shape_key


def collate_pairs(
  samples: Sequence[PreferenceSample | None],
  model: PPLLaVAConfig,
  config: PreferenceDataConfig,
  ref_logps: Sequence[tuple[float, float]] | None = None,
  pad_id: int = 0,
  scorer_length: int = 0,
  scorer_pad_id: int = 0,
) -> PairBatch:
  """``samples`` (None: an empty pair) -> one ``PairBatch`` of ``config.batch_size`` pairs,
  ``ref_logps`` (chosen, rejected) per sample where the reference is cached."""
  b, t = config.batch_size, config.sample.num_frames
  if len(samples) > b:
    raise ValueError(f"collate_pairs: {len(samples)} pairs for batch_size {b}")
  length = config.bucket(max([x.length for x in samples if x is not None], default=1))
  size = model.vision.image_size
  ids = np.full((2 * b, length), pad_id, np.int32)
  mask = np.zeros((2 * b, length), np.int32)
  labels = np.full((2 * b, length), IGNORE, np.int32)
  pair_mask = np.zeros(b, bool)
  scorer_ids = np.full((b, scorer_length), scorer_pad_id, np.int32)
  scorer_mask = np.zeros((b, scorer_length), np.int32)
  videos = np.zeros((b, t, 3, size, size), PIXEL_DTYPES[config.pixel_dtype])
  frame_mask = np.zeros((b, t), bool)
  token_mask = np.zeros((b, model.video_tokens(t)), bool)
  refs = np.zeros(2 * b, np.float32)
  for i, x in enumerate(samples):
    if x is None:
      continue
    for j, side in enumerate(("chosen", "rejected")):
      row_ids, row_labels = x.row(side)
      n = len(row_ids)
      ids[2 * i + j, :n], mask[2 * i + j, :n], labels[2 * i + j, :n] = row_ids, 1, row_labels
    pair_mask[i] = True
    if scorer_length and x.scorer_ids is not None:
      scorer_ids[i], scorer_mask[i] = x.scorer_ids, x.scorer_mask  # type: ignore[assignment]  # both set
    frames = len(x.video)
    if frames > t:
      raise ValueError(
        f"collate_pairs: {x.source}: {frames} frames, the batch holds "
        f"PreferenceConfig.num_frames={t}"
      )
    videos[i, :frames], frame_mask[i, :frames] = x.video, True
    token_mask[i, : model.video_tokens(frames)] = True
    if ref_logps is not None:
      refs[2 * i : 2 * i + 2] = ref_logps[i]
  positions = np.where(mask > 0, np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return PairBatch(
    ids,
    mask,
    positions,
    labels,
    pair_mask,
    scorer_ids,
    scorer_mask,
    videos,
    frame_mask,
    token_mask,
    refs,
  )


def pair_epoch(
  rows: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True
) -> tuple[np.ndarray, list[int]]:
  """(row order, batch end offsets) of one DPO epoch: a seeded permutation (or the file's
  order) in batches of ``batch_size`` pairs, the last one short."""
  order = np.random.default_rng([seed, epoch]).permutation(rows) if shuffle else np.arange(rows)
  return order, list(range(batch_size, rows, batch_size)) + [rows]


class MissingReference(ValueError):
  """A row has no cached reference log-probs."""


class PairBatchBuilder(grain.transforms.Map):
  """grain map: a ``engine.Step`` -> (``PairBatch`` of NumPy arrays, ``BatchInfo``).

  ``reference``: row id -> (chosen, rejected) reference log-probs (``train.run.reference``),
  or None for a live reference; ``pin_frames``: sample each row's frames with the seed
  (seed, 0, row) in every epoch (module doc)."""

  def __init__(
    self,
    plan: engine.BatchPlan,
    rows: Sequence[PreferenceRow],
    samples: PreferenceBuilder,
    model: PPLLaVAConfig,
    config: PreferenceDataConfig,
    reference: Mapping | None = None,
    pin_frames: bool = False,
  ):
    self.plan, self.rows, self.samples, self.model, self.config = plan, rows, samples, model, config
    self.reference, self.pin_frames = reference, pin_frames
    self.pad_id, self.scorer_length, self.scorer_pad = text_pads(samples.sft)

  def build(self, row: int, epoch: int, position: int) -> PreferenceSample:
    """Pair ``row`` as the ``position``-th of ``epoch`` (or pinned); ``SkipSample`` if bad."""
    seed_epoch, seed_index = (0, row) if self.pin_frames else (epoch, position)
    return self.samples(self.rows[row], seed=self.config.seed, epoch=seed_epoch, index=seed_index)

  def collate(self, samples, refs=None) -> PairBatch:
    return collate_pairs(
      samples, self.model, self.config, refs, self.pad_id, self.scorer_length, self.scorer_pad
    )

  def _reference(self, row: PreferenceRow) -> tuple[float, float]:
    try:
      return self.reference[row.id]  # type: ignore[index]  # called only with a reference
    except KeyError:
      raise MissingReference(
        f"{row.source}: no cached reference log-probs for this row; the "
        "cache was computed for other rows (delete it to recompute)"
      ) from None

  def map(self, step: engine.Step):
    epoch, records, positions = self.plan.members(step.index)
    pairs: list[PreferenceSample | None]  # None: skipped
    refs: list[tuple[float, float] | None]
    pairs, refs, skipped = [], [], []
    for r, pos in zip(records.tolist(), positions.tolist()):
      try:
        pairs.append(self.build(r, epoch, pos))
        refs.append(self._reference(self.rows[r]) if self.reference is not None else None)
      except SkipSample as skip:
        pairs.append(None)
        refs.append((0.0, 0.0))
        skipped.append((skip.reason, skip.detail))
    batch = self.collate(pairs, refs if self.reference is not None else None)
    real = [x for x in pairs if x is not None]
    info = engine.BatchInfo(
      step.index,
      epoch,
      tuple(records.tolist()),
      tuple(skipped),
      sum(x.scorer_truncated > 0 for x in real),
      (),
    )
    return batch, info


def make_preference_iterator(
  config: PreferenceDataConfig,
  *,
  tokenizer,
  model: PPLLaVAConfig,
  scorer_tokenizer=None,
  state: dict | None = None,
  reference: Mapping | None = None,
  pin_frames: bool = False,
  block: int | None = None,
  blocks: int | None = None,
  rng_factory: RngFactory = frame_rng,
  read: PreferenceRows | None = None,
) -> engine.DataIterator:
  """Data block ``block`` of ``blocks``' ``PairBatch``es (``data.sft.pipeline``); ``reference``
  and ``pin_frames`` as ``PairBatchBuilder``, ``rng_factory`` as ``PreferenceBuilder``'s.
  The default, this process of all processes, is right only when every process is its own
  data block (no ``tensor`` axis across hosts); the trainer passes
  ``train.run.global_batch.data_blocks``' values. ``read``: the rows, already read."""
  if block is None or blocks is None:
    block, blocks = jax.process_index(), jax.process_count()
  if read is None:
    read = read_preference_rows(config.rows, config.media_root)
  builder = make_builder(
    config,
    read.rows,
    tokenizer=tokenizer,
    model=model,
    scorer_tokenizer=scorer_tokenizer,
    reference=reference,
    pin_frames=pin_frames,
    rng_factory=rng_factory,
  )
  if state is None:  # the rows left out when reading count as skipped from the start
    state = {"next_batch": 0, "stats": {"skipped": read.counts, "samples": len(read.skipped)}}
  return engine.DataIterator(config, builder.plan, builder, block, blocks, state)


def make_builder(
  config: PreferenceDataConfig,
  rows: Sequence[PreferenceRow],
  *,
  tokenizer,
  model: PPLLaVAConfig,
  scorer_tokenizer=None,
  reference: Mapping | None = None,
  pin_frames: bool = False,
  shuffle: bool = True,
  rng_factory: RngFactory = frame_rng,
) -> PairBatchBuilder:
  """The builder (and its plan: ``config.num_epochs`` epochs, shuffled or in file order)
  over validated ``rows``; ``rng_factory(seed, epoch, position)`` makes each pair's frame
  generator (with ``pin_frames``, ``(seed, 0, row)``)."""
  plan = engine.BatchPlan(
    functools.partial(pair_epoch, len(rows), config.batch_size, config.seed, shuffle=shuffle),
    config.num_epochs,
  )
  samples = PreferenceBuilder(
    tokenizer, model, scorer_tokenizer, config.sample, rng_factory=rng_factory
  )
  return PairBatchBuilder(plan, tuple(rows), samples, model, config, reference, pin_frames)
