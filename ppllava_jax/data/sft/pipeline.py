"""SFT's input pipeline on the batch engine (``data.engine``): validated records ->
planned batches -> ``TrainBatch``es.

``make_train_iterator(config, tokenizer=..., model=..., scorer_tokenizer=...)``:

1. ``annotations.load_mixture`` validates every record of every corpus (an error names
   the file, record and field) into an ``AnnotationSet``, the random-access source.
2. Every epoch has its own seeded order of the mixture (``annotations.epoch_order``, a
   function of (seed, epoch)), cut into batches by ``batches.plan_batches`` from the
   record kinds alone (``mixture_epoch``).
3. ``BatchBuilder`` maps a step's shard: read the records, decode and sample the media
   with per-sample seeds ``[seed, epoch, position]``, preprocess, tokenize, collate into
   the bucketed ``TrainBatch``, with the shard's row references offset
   (``batches.as_shard``) so that the engine's join gives the block's slice of the
   global batch. The engine runs it in worker processes, joins, counts and resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import grain
import numpy as np

from ppllava_jax.data.engine import BatchInfo, BatchPlan, DataIterator, Step, check_shards
from ppllava_jax.data.sft.annotations import (
  KIND_CODES,
  AnnotationSet,
  MixtureConfig,
  epoch_order,
  load_mixture,
)
from ppllava_jax.data.sft.batches import BatchConfig, Geometry, as_shard, collate, plan_batches
from ppllava_jax.data.sft.samples import (
  RngFactory,
  Sample,
  SampleBuilder,
  SampleConfig,
  SkipSample,
  frame_rng,
  text_pads,
)
from ppllava_jax.models.ppllava_config import PPLLaVAConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  mixture: MixtureConfig
  sample: SampleConfig = SampleConfig()
  batch: BatchConfig = BatchConfig()
  seed: int = 42
  num_epochs: int | None = 1  # None: endless
  num_workers: int = 2  # decoding processes; 0: in the calling process
  worker_buffer_size: int = 2  # batches each worker keeps ready
  threads: int = 1  # per worker (or in-process) threads building batches
  max_skip_fraction: float = 0.01
  skip_check_after: int = 200  # samples seen before the fraction is enforced
  shards: int | None = None  # planned batches per step (module doc); None: one per data block

  def __post_init__(self):
    check_shards(self)
    if self.sample.max_length > self.batch.seq_buckets[-1]:
      raise ValueError(
        f"SampleConfig.max_length {self.sample.max_length} exceeds the largest "
        f"bucket {self.batch.seq_buckets[-1]}"
      )
    if self.sample.max_pictures > self.batch.max_pictures:
      raise ValueError("SampleConfig.max_pictures exceeds BatchConfig.max_pictures")
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ValueError(f"num_epochs must be >= 1 or None, got {self.num_epochs}")


def mixture_epoch(
  aset: AnnotationSet, mixture: MixtureConfig, batch: BatchConfig, seed: int, epoch: int
) -> tuple[np.ndarray, list[int]]:
  """(record order, batch end offsets) of one SFT epoch: the mixture's seeded order, cut
  by ``plan_batches`` from the record kinds alone."""
  order = epoch_order(aset, mixture, seed, epoch)
  return order, plan_batches(aset.kinds[order], batch)


class BatchBuilder(grain.transforms.Map):
  """grain map: a ``Step`` -> (``TrainBatch`` of NumPy arrays, ``BatchInfo``)."""

  def __init__(
    self,
    plan: BatchPlan,
    aset: AnnotationSet,
    samples: SampleBuilder,
    model: PPLLaVAConfig,
    batch: BatchConfig,
    seed: int,
  ):
    self.plan, self.aset, self.samples = plan, aset, samples
    self.model, self.batch, self.seed = model, batch, seed
    self.picture_tokens = Geometry.of(model, batch).picture_tokens  # fails on a bad layout
    self.pad_id, self.scorer_length, self.scorer_pad = text_pads(samples)

  def map(self, step: Step):
    epoch, records, positions = self.plan.members(step.index)
    aset = self.aset
    rows: list[Sample | None]  # None: skipped
    rows, skipped = [], []
    for r, pos in zip(records.tolist(), positions.tolist()):
      source = aset.describe(r)
      try:
        rows.append(
          self.samples(
            aset[r], corpus=aset.corpus_of(r), seed=self.seed, epoch=epoch, index=pos, source=source
          )
        )
      except SkipSample as skip:
        rows.append(None)
        skipped.append((skip.reason, skip.detail))
    batch = as_shard(
      collate(rows, self.model, self.batch, self.pad_id, self.scorer_length, self.scorer_pad),
      step.shard,
      step.shards,
      self.picture_tokens,
    )
    real = [x for x in rows if x is not None]
    info = BatchInfo(
      step.index,
      epoch,
      tuple(records.tolist()),
      tuple(skipped),
      sum(x.scorer_truncated > 0 for x in real),
      tuple(f"{x.source}: {x.truncated} tokens cut" for x in real if x.truncated),
    )
    return batch, info


def make_train_iterator(
  config: DataConfig,
  *,
  tokenizer,
  model: PPLLaVAConfig,
  scorer_tokenizer=None,
  state: dict | None = None,
  block: int | None = None,
  blocks: int | None = None,
  annotation_set: AnnotationSet | None = None,
  rng_factory: RngFactory = frame_rng,
) -> DataIterator:
  """Data block ``block`` of ``blocks``' training batches (module doc). The default, this
  process of all processes, is right only when every process is its own data block (no
  ``tensor`` axis across hosts); the trainer passes ``train.run.global_batch.data_blocks``'
  values. Validates every annotation first (``AnnotationError``), unless
  ``annotation_set`` is given already loaded; ``rng_factory`` as ``SampleBuilder``'s."""
  if block is None or blocks is None:
    import jax

    block, blocks = jax.process_index(), jax.process_count()
  aset = annotation_set if annotation_set is not None else load_mixture(config.mixture)
  log.info("training data: %r", aset)
  video = KIND_CODES["video"]
  for c, corpus in enumerate(config.mixture.corpora):
    if corpus.num_frames > config.batch.num_frames and np.any(
      (aset.corpus == c) & (aset.kinds == video)
    ):
      raise ValueError(
        f"corpus {corpus.name!r} samples {corpus.num_frames} frames but "
        f"BatchConfig.num_frames is {config.batch.num_frames}"
      )
  plan = BatchPlan(
    functools.partial(mixture_epoch, aset, config.mixture, config.batch, config.seed),
    config.num_epochs,
  )
  samples = SampleBuilder(
    tokenizer, model, scorer_tokenizer, config.sample, rng_factory=rng_factory
  )
  builder = BatchBuilder(plan, aset, samples, model, config.batch, config.seed)
  return DataIterator(config, plan, builder, block, blocks, state)
