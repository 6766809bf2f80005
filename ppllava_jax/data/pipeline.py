"""The SFT input pipeline on Grain: validated records -> planned batches -> ``TrainBatch``es.

``make_train_iterator(config, tokenizer=..., model=..., scorer_tokenizer=...)``:

1. ``annotations.load_mixture`` validates every record of every corpus (an error names
   the file, record and field) into an ``AnnotationSet``, the random-access source.
2. Every epoch has its own seeded order of the mixture (``annotations.epoch_order``, a
   function of (seed, epoch)), cut into batches by ``batch.plan_batches`` from the
   record kinds alone. Batch ``g`` of that global sequence is the same on every host.
3. One train step takes ``D = shards`` planned batches (the step's *shards*, of
   ``batch_size`` rows each; default: one per data block), the global batch ``c .. c +
   D - 1`` from the cursor ``c``. Data block ``p`` of ``P`` (the processes, or groups of
   processes that hold the same batch rows: ``train.global_batch.data_blocks``) builds
   shards ``p·D/P .. (p+1)·D/P - 1`` of every step: a ``grain.MapDataset`` over its
   shards, mapped by ``BatchBuilder`` (read the records, decode and sample the media
   with per-sample seeds ``[seed, epoch, position]``, preprocess, tokenize, collate into
   the bucketed ``TrainBatch``), run in ``num_workers`` spawned worker processes
   (``mp_prefetch``) that keep ``worker_buffer_size`` batches ready. Map-only, so the
   stream is the same for any number of workers (0 runs in-process).
4. ``DataIterator`` joins a step's shards (``batch.as_shard``, ``batch.concat_rows``: row
   references offset, so the block's rows are its slice of the global batch), yields
   them and counts: skipped samples by reason (bad media, too long, too many pictures,
   labels) with a warning naming each, truncated scorer texts and sequences. When more
   than ``max_skip_fraction`` of the block's samples seen (after ``skip_check_after``)
   were skipped it raises ``DataError`` (the trainer fetches through
   ``train.global_batch.agreed_next``, so every process then raises with it).

So the global batches are a function of the config alone: a run of 2 processes and one
of 1 process with ``shards=2`` train on the same arrays, and a checkpoint moves between
them exactly. With ``shards=None`` the global batch follows the data-block count (the
processes, fewer when a ``tensor`` axis crosses hosts).

A skipped sample leaves its row empty (``row_mask`` False) rather than pulling in
another sample, so a batch's rows stay a function of the plan. Every process steps
the same number of times: past the end of the last epoch a process gets all-empty
batches until the others are done.

Checkpointing: ``DataIterator.get_state()`` is ``{"next_batch": c, ...}``, the global
batch cursor (plus counters), independent of the number of processes and workers:
``make_train_iterator(..., state=s)`` or ``set_state(s)`` continues the exact stream,
also on another process count. The counters are the saving process's (process 0's):
each process counts what its block read, and after a resume every process counts on
from process 0's (so ``max_skip_fraction`` is checked per block, from those; the loop's
``skipped_samples`` metric is the blocks' counts since its previous record, summed, which
does not depend on them). ``stats.batches`` counts steps read (``__next__`` calls), the
cursor planned batches (``shards`` a step). The state is a small JSON-able dict, for an
Orbax ``JsonSave`` item next to the model.

Several hosts: the sequence bucket may differ between hosts for one step;
``train.global_batch`` pads every host to the largest before
``jax.make_array_from_process_local_data``.

Grain's workers are spawned processes: absl flags are marked parsed here (grain reads
them), and a script that starts the pipeline needs an ``if __name__ == "__main__"``
guard. The parent decides when they stop (``DataIterator.close``, in the trainer's
``finally``), so each worker first (``worker_start``) ignores SIGINT and SIGTERM, which a
terminal's Ctrl-C or Slurm sends to every process of the group: no worker tracebacks,
no batch cut off half sent, no worker gone while the parent still reads. A worker also
ends as soon as its parent does, SIGKILL included (``end_with``), so no worker outlives
a killed run; with them gone, multiprocessing's resource tracker frees what they held in
shared memory and ends too. Only a signal that comes while a worker is still starting
(importing, before ``worker_start`` runs) can print its traceback. The shared memory a batch
arrives in is unlinked on arrival, and ``close`` waits for grain's own unlinks, so a
stopped run leaves none for the tracker to warn about.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator

import grain
import jax
import numpy as np
from grain.multiprocessing import SharedMemoryArray

from ppllava_jax.data import annotations
from ppllava_jax.data.annotations import AnnotationSet, MixtureConfig
from ppllava_jax.data.batch import (BatchConfig, Geometry, TrainBatch, as_shard, collate,
                                    concat_rows, plan_batches)
from ppllava_jax.data.sft import RngFactory, SampleBuilder, SampleConfig, SkipSample, frame_rng
from ppllava_jax.models.ppllava_config import PPLLaVAConfig

log = logging.getLogger(__name__)
STATE_VERSION = 1
_ENDLESS = 1 << 40  # steps of a pipeline without an epoch limit


class DataError(ValueError):
  """The data cannot go on: too many skipped samples, or a state that does not fit (a
  problem of the data, so the CLIs print it as a one-line error)."""


def check_shards(cfg) -> None:
  if cfg.shards is not None and cfg.shards < 1:
    raise ValueError(f"{type(cfg).__name__}.shards must be >= 1 or None, got {cfg.shards}")


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
      raise ValueError(f"SampleConfig.max_length {self.sample.max_length} exceeds the largest "
                       f"bucket {self.batch.seq_buckets[-1]}")
    if self.sample.max_pictures > self.batch.max_pictures:
      raise ValueError("SampleConfig.max_pictures exceeds BatchConfig.max_pictures")
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ValueError(f"num_epochs must be >= 1 or None, got {self.num_epochs}")


def mixture_epoch(aset: AnnotationSet, mixture: MixtureConfig, batch: BatchConfig, seed: int,
                  epoch: int) -> tuple[np.ndarray, list[int]]:
  """(record order, batch end offsets) of one SFT epoch: the mixture's seeded order, cut
  by ``plan_batches`` from the record kinds alone."""
  order = annotations.epoch_order(aset, mixture, seed, epoch)
  return order, plan_batches(aset.kinds[order], batch)


class BatchPlan:
  """The global sequence of batches: batch ``g`` -> (epoch, record indices, positions).

  ``cut(e)`` gives epoch ``e``'s (record order, batch end offsets): ``mixture_epoch`` for
  SFT, ``data.pairs.pair_epoch`` for DPO. Each epoch is computed once (about a second per
  million records) and kept; epochs are planned in turn as the cursor reaches them.
  ``cut`` must pickle (grain workers plan for themselves).
  """

  def __init__(self, cut: Callable[[int], tuple[np.ndarray, list[int]]],
               num_epochs: int | None):
    self.cut, self.num_epochs = cut, num_epochs
    self._counts: dict[int, int] = {}
    self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None

  def __getstate__(self):  # workers plan for themselves
    return {**self.__dict__, "_epoch": None}

  def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
    """(record order, batch start offsets + the end) of epoch ``e``."""
    if self._epoch is None or self._epoch[0] != e:
      order, ends = self.cut(e)
      self._epoch = (e, order, np.asarray([0] + list(ends), np.int64))
      self._counts[e] = len(ends)
    return self._epoch[1], self._epoch[2]

  def count(self, e: int) -> int:
    if e not in self._counts:
      self.epoch(e)
    return self._counts[e]

  def total(self) -> int | None:
    if self.num_epochs is None:
      return None
    return sum(self.count(e) for e in range(self.num_epochs))

  def locate(self, g: int) -> tuple[int, int] | None:
    """(epoch, batch within it) of global batch ``g``; None past the last epoch."""
    e = 0
    while self.num_epochs is None or e < self.num_epochs:
      n = self.count(e)
      if g < n:
        return e, g
      g -= n
      e += 1
    return None

  def members(self, g: int) -> tuple[int, np.ndarray, np.ndarray]:
    """(epoch, record indices, positions in the epoch) of global batch ``g``; an empty
    batch past the end."""
    where = self.locate(g)
    if where is None:
      return -1, np.zeros(0, np.int64), np.zeros(0, np.int64)
    e, j = where
    order, starts = self.epoch(e)
    positions = np.arange(starts[j], starts[j + 1])
    return e, order[positions], positions


@dataclasses.dataclass(frozen=True)
class Step:
  """One shard a data block builds: planned batch ``index``, shard ``shard`` of
  ``shards`` in its step's global batch."""

  index: int
  shard: int = 0
  shards: int = 1


class StepSource:
  """grain random-access source of one data block's shards from a cursor: ``local`` per
  step, ``shards`` in a step's global batch (module doc)."""

  def __init__(self, plan: BatchPlan, cursor: int, block: int, blocks: int, shards: int):
    if shards % blocks:
      raise ValueError(f"{shards} shards per step do not split over {blocks} data blocks "
                       "(processes): set the data config's shards to a multiple of them")
    self.cursor, self.shards, self.local = cursor, shards, shards // blocks
    self.first = block * self.local
    total = plan.total()
    steps = None if total is None else max(0, math.ceil((total - cursor) / shards))
    self.length = _ENDLESS if steps is None else steps * self.local

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, i: int) -> Step:
    step, j = divmod(int(i), self.local)
    shard = self.first + j
    return Step(self.cursor + step * self.shards + shard, shard, self.shards)


@dataclasses.dataclass
class BatchInfo:
  """Host-side facts about one batch, beside (never inside) the arrays."""

  index: int  # global batch
  epoch: int
  records: tuple[int, ...]  # record indices in the AnnotationSet, one per row
  skipped: tuple[tuple[str, str], ...]  # (reason, detail) per skipped sample
  scorer_truncated: int  # samples whose scorer text was cut
  truncated: tuple[str, ...]  # samples cut to max_length (overflow="truncate"), named


def text_pads(samples: SampleBuilder) -> tuple[int, int, int]:
  """(the LLM's pad id, the scorer's text length (0: no scorer), its pad id) that
  collation fills rows with."""
  tok, scorer = samples.tokenizer, samples.scorer_tokenizer
  pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
  if scorer is None:
    return pad_id, 0, 0
  return pad_id, samples.scorer_length, scorer.pad_token_id or 0


class BatchBuilder(grain.transforms.Map):
  """grain map: a ``Step`` -> (``TrainBatch`` of NumPy arrays, ``BatchInfo``)."""

  def __init__(self, plan: BatchPlan, aset: AnnotationSet, samples: SampleBuilder,
               model: PPLLaVAConfig, batch: BatchConfig, seed: int):
    self.plan, self.aset, self.samples = plan, aset, samples
    self.model, self.batch, self.seed = model, batch, seed
    self.picture_tokens = Geometry.of(model, batch).picture_tokens  # fails on a bad layout
    self.pad_id, self.scorer_length, self.scorer_pad = text_pads(samples)

  def map(self, step: Step):
    epoch, records, positions = self.plan.members(step.index)
    aset = self.aset
    rows, skipped = [], []
    for r, pos in zip(records.tolist(), positions.tolist()):
      source = aset.describe(r)
      try:
        rows.append(self.samples(aset[r], corpus=aset.corpus_of(r), seed=self.seed,
                                 epoch=epoch, index=pos, source=source))
      except SkipSample as skip:
        rows.append(None)
        skipped.append((skip.reason, skip.detail))
    batch = as_shard(collate(rows, self.model, self.batch, self.pad_id, self.scorer_length,
                             self.scorer_pad), step.shard, step.shards, self.picture_tokens)
    real = [x for x in rows if x is not None]
    info = BatchInfo(step.index, epoch, tuple(records.tolist()), tuple(skipped),
                     sum(x.scorer_truncated > 0 for x in real),
                     tuple(f"{x.source}: {x.truncated} tokens cut" for x in real if x.truncated))
    return batch, info


@dataclasses.dataclass
class DataStats:
  samples: int = 0  # samples attempted (empty padding rows excluded)
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  scorer_truncated: int = 0
  truncated: int = 0
  batches: int = 0  # steps read (one a __next__); the cursor counts planned batches
  last_skip: str = ""

  @property
  def skipped_total(self) -> int:
    return sum(self.skipped.values())

  def as_dict(self) -> dict:
    return dict(samples=self.samples, skipped=dict(self.skipped),
                scorer_truncated=self.scorer_truncated, truncated=self.truncated,
                batches=self.batches, last_skip=self.last_skip)

  @classmethod
  def from_dict(cls, d: dict) -> "DataStats":
    return cls(d.get("samples", 0), collections.Counter(d.get("skipped", {})),
               d.get("scorer_truncated", 0), d.get("truncated", 0), d.get("batches", 0),
               d.get("last_skip", ""))


def worker_start(parent: int, index: int, count: int) -> None:
  """grain's ``worker_init_fn``, run first in each worker process of ``parent`` (module
  doc): stop signals are the parent's to act on, and the worker ends with the parent."""
  del index, count
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, signal.SIG_IGN)
  end_with(parent)


def end_with(parent: int) -> None:
  """Ends this process as soon as its parent process ``parent`` ends, by a watching thread.

  Not ``prctl(PR_SET_PDEATHSIG)``: its "parent" is the thread that started the process,
  here one of grain's threads, which can end while the parent process lives on."""
  try:
    pidfd = os.pidfd_open(parent)  # readable once the process has ended (Linux >= 5.3)
  except (AttributeError, OSError):  # no pidfds, or the parent is gone already: poll
    pidfd = None
  if os.getppid() != parent:  # it ended before we watched (this process was re-parented)
    os._exit(1)
  threading.Thread(target=_exit_after, args=(parent, pidfd), daemon=True,
                   name="ppllava-parent-watch").start()


def _exit_after(parent: int, pidfd: int | None) -> None:
  if pidfd is not None:
    poll = select.poll()
    poll.register(pidfd, select.POLLIN)
    poll.poll()
  else:
    while os.getppid() == parent:
      time.sleep(0.5)
  os._exit(1)  # no clean-up: the parent is gone, nobody reads what this process holds


def _unlink_received(tree) -> None:
  """Removes the names of the shared memory blocks that ``tree`` arrived in from the
  workers, now rather than when its arrays are freed: the arrays stay mapped, and a run
  that stops leaves no name behind whatever still holds a batch (grain unlinks on a
  background thread, which an exit can cut short: the resource tracker's "leaked
  shared_memory" warnings)."""
  for leaf in jax.tree_util.tree_leaves(tree):
    if isinstance(leaf, SharedMemoryArray) and leaf._unlink_on_del:
      leaf.shm.unlink()
      leaf._unlink_on_del = False  # what grain's deleter reads: close only


def _finish_unlinks() -> None:
  """Waits for the unlinks grain queued on its deleter thread so far (the batches in its
  buffers, dropped by ``close``), for the reason ``_unlink_received`` gives."""
  pool = SharedMemoryArray._del_thread_pool  # grain 0.2: one thread, in order
  if pool is not None:
    try:
      pool.apply(lambda: None)  # runs after every unlink queued before it
    except ValueError:  # the pool was stopped (interpreter exit): nothing to wait for
      pass


def _mark_flags_parsed() -> None:
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class DataIterator(Iterator[TrainBatch]):
  """Data block ``block``'s slice of every step's global batch (module doc), with counters
  and a checkpointable cursor. ``builder`` maps a ``Step`` to (batch, ``BatchInfo``):
  ``BatchBuilder`` (SFT ``TrainBatch``es) or ``data.pairs.PairBatchBuilder`` (DPO);
  ``config`` gives the seed, the shards, the worker and skip settings (a ``DataConfig``
  or a ``data.pairs.PreferenceDataConfig``)."""

  def __init__(self, config: DataConfig, plan: BatchPlan, builder: grain.transforms.Map,
               block: int, blocks: int, state: dict | None = None):
    self.config, self.plan, self.builder = config, plan, builder
    self.block, self.blocks = block, blocks
    self.shards = config.shards or blocks
    self.infos: list[BatchInfo] = []  # the last step's shards
    self._it = None
    self.set_state(state or {"next_batch": 0})

  def _start(self, cursor: int) -> None:
    self.close()
    _mark_flags_parsed()
    cfg = self.config
    source = StepSource(self.plan, cursor, self.block, self.blocks, self.shards)
    ds = grain.MapDataset.source(source).map(self.builder)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.threads,
                                              prefetch_buffer_size=cfg.worker_buffer_size))
    if cfg.num_workers > 0:
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=cfg.num_workers, per_worker_buffer_size=cfg.worker_buffer_size),
          worker_init_fn=functools.partial(worker_start, os.getpid()))
    self._it = iter(ds)
    self._cursor = cursor

  def __next__(self) -> TrainBatch:
    if self._it is None:
      raise StopIteration
    try:
      built = [next(self._it) for _ in range(self.shards // self.blocks)]
    except StopIteration:  # a step's shards end together (StepSource's length)
      self.close()  # frees the workers and their shared memory now
      raise
    _unlink_received(built)
    self._cursor += self.shards
    self.infos = [info for _, info in built]
    stats, cfg = self.stats, self.config
    stats.batches += 1
    for info in self.infos:
      stats.samples += len(info.records)
      stats.scorer_truncated += info.scorer_truncated
      stats.truncated += len(info.truncated)
      for detail in info.truncated:
        log.warning("truncated sample: %s", detail)
      for reason, detail in info.skipped:
        stats.skipped[reason] += 1
        stats.last_skip = detail
        log.warning("skipped sample (%s): %s", reason, detail)
    if (stats.samples >= cfg.skip_check_after
        and stats.skipped_total > cfg.max_skip_fraction * stats.samples):
      raise DataError(
          f"{stats.skipped_total} of {stats.samples} samples skipped "
          f"({stats.skipped_total / stats.samples:.1%}), more than max_skip_fraction="
          f"{cfg.max_skip_fraction:g}: {dict(stats.skipped)}; the last: {stats.last_skip}")
    return concat_rows([batch for batch, _ in built], self.builder.pad_id)

  def get_state(self) -> dict:
    """The global batch cursor and this process's counters (JSON-able)."""
    return {"version": STATE_VERSION, "next_batch": self._cursor, "seed": self.config.seed,
            "stats": self.stats.as_dict()}

  def set_state(self, state: dict) -> None:
    if state.get("version", STATE_VERSION) != STATE_VERSION:
      raise DataError(f"data state version {state.get('version')} is not {STATE_VERSION}")
    if "seed" in state and state["seed"] != self.config.seed:
      raise DataError(f"the data state was saved with seed {state['seed']}, the config has "
                      f"{self.config.seed}: the stream would not continue")
    self.stats = DataStats.from_dict(state.get("stats", {}))
    self._start(int(state["next_batch"]))

  def close(self) -> None:
    it, self._it = self._it, None
    if it is not None and hasattr(it, "close"):
      it.close()  # stops the workers, unlinking what they had sent
      _finish_unlinks()

  def __del__(self):
    try:
      self.close()
    except Exception:  # noqa: BLE001 (interpreter shutdown)
      pass


def make_train_iterator(config: DataConfig, *, tokenizer, model: PPLLaVAConfig,
                        scorer_tokenizer=None, state: dict | None = None,
                        block: int | None = None, blocks: int | None = None,
                        annotation_set: AnnotationSet | None = None,
                        rng_factory: RngFactory = frame_rng) -> DataIterator:
  """Data block ``block`` of ``blocks``' training batches (module doc). The default, this
  process of all processes, is right only when every process is its own data block (no
  ``tensor`` axis across hosts); the trainer passes ``train.global_batch.data_blocks``'
  values. Validates every annotation first (``AnnotationError``), unless
  ``annotation_set`` is given already loaded; ``rng_factory`` as ``SampleBuilder``'s."""
  if block is None or blocks is None:
    import jax
    block, blocks = jax.process_index(), jax.process_count()
  aset = annotation_set if annotation_set is not None else annotations.load_mixture(config.mixture)
  log.info("training data: %r", aset)
  video = annotations.KIND_CODES["video"]
  for c, corpus in enumerate(config.mixture.corpora):
    if corpus.num_frames > config.batch.num_frames and np.any(
        (aset.corpus == c) & (aset.kinds == video)):
      raise ValueError(f"corpus {corpus.name!r} samples {corpus.num_frames} frames but "
                       f"BatchConfig.num_frames is {config.batch.num_frames}")
  plan = BatchPlan(functools.partial(mixture_epoch, aset, config.mixture, config.batch,
                                     config.seed), config.num_epochs)
  samples = SampleBuilder(tokenizer, model, scorer_tokenizer, config.sample,
                          rng_factory=rng_factory)
  builder = BatchBuilder(plan, aset, samples, model, config.batch, config.seed)
  return DataIterator(config, plan, builder, block, blocks, state)
