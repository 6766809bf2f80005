"""The batch engine every workflow's data runs on (SFT's ``data.sft.pipeline``, DPO's
``data.dpo.pairs``): a plan of batches over epochs, a step's shards as a Grain source,
and the resumable iterator that joins them and counts what was skipped.

1. ``BatchPlan``: each epoch's record order and batch cuts (a function the workflow
   gives: ``data.sft.pipeline.mixture_epoch``, ``data.dpo.pairs.pair_epoch``), so batch
   ``g`` of the global sequence is the same on every host.
2. One train step takes ``D = shards`` planned batches (the step's *shards*; default:
   one per data block), the global batch ``c .. c + D - 1`` from the cursor ``c``. Data
   block ``p`` of ``P`` (the processes, or groups of processes that hold the same batch
   rows: ``train.run.global_batch.data_blocks``) builds shards ``p*D/P .. (p+1)*D/P - 1``
   of every step: ``StepSource``, a ``grain.MapDataset`` over its shards, mapped by the
   workflow's builder (a ``grain.transforms.Map`` from a ``Step`` to ``(batch,
   BatchInfo)``), run in ``num_workers`` spawned worker processes (``data.workers``)
   that keep ``worker_buffer_size`` batches ready. Map-only, so the stream is the same
   for any number of workers (0 runs in-process).
3. ``DataIterator`` joins a step's shards (``batching.concat_rows``), yields them and
   counts: skipped samples by reason with a warning naming each, truncated scorer texts
   and sequences. When more than ``max_skip_fraction`` of the block's samples seen
   (after ``skip_check_after``) were skipped it raises ``DataError`` (the trainer fetches
   through ``train.run.global_batch.agreed_next``, so every process then raises with it).

So the global batches are a function of the config alone: a run of 2 processes and one
of 1 process with ``shards=2`` train on the same arrays, and a checkpoint moves between
them exactly. With ``shards=None`` the global batch follows the data-block count.

A skipped sample leaves its row empty rather than pulling in another sample, so a
batch's rows stay a function of the plan. Every process steps the same number of times:
past the end of the last epoch a process gets all-empty batches until the others are
done.

Checkpointing: ``DataIterator.get_state()`` is ``{"next_batch": c, ...}``, the global
batch cursor (plus counters), independent of the number of processes and workers:
``set_state(s)`` (or the workflow's ``make_*_iterator(..., state=s)``) continues the
exact stream, also on another process count. The counters are the saving process's
(process 0's): each process counts what its block read, and after a resume every process
counts on from process 0's (so ``max_skip_fraction`` is checked per block; the loop's
``skipped_samples`` metric is the blocks' counts since its previous record, summed).
``stats.batches`` counts steps read (``__next__`` calls), the cursor planned batches
(``shards`` a step). The state is a small JSON-able dict, an Orbax ``JsonSave`` item.

Several hosts: the sequence bucket may differ between hosts for one step;
``train.run.global_batch`` pads every host to the largest before
``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable, Iterator

import grain
import numpy as np

from ppllava_jax.data import workers
from ppllava_jax.data.batching import concat_rows

log = logging.getLogger(__name__)


STATE_VERSION = 1

_ENDLESS = 1 << 40  # steps of a pipeline without an epoch limit


class DataError(ValueError):
  """The data cannot go on: too many skipped samples, or a state that does not fit (a
  problem of the data, so the CLIs print it as a one-line error)."""


def check_shards(cfg) -> None:
  if cfg.shards is not None and cfg.shards < 1:
    raise ValueError(f"{type(cfg).__name__}.shards must be >= 1 or None, got {cfg.shards}")


class BatchPlan:
  """The global sequence of batches: batch ``g`` -> (epoch, record indices, positions).

  ``cut(e)`` gives epoch ``e``'s (record order, batch end offsets): ``mixture_epoch`` for
  SFT, ``data.dpo.pairs.pair_epoch`` for DPO. Each epoch is computed once (about a second per
  million records) and kept; epochs are planned in turn as the cursor reaches them.
  ``cut`` must pickle (grain workers plan for themselves).
  """

  def __init__(self, cut: Callable[[int], tuple[np.ndarray, list[int]]], num_epochs: int | None):
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
      raise ValueError(
        f"{shards} shards per step do not split over {blocks} data blocks "
        "(processes): set the data config's shards to a multiple of them"
      )
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
    return dict(
      samples=self.samples,
      skipped=dict(self.skipped),
      scorer_truncated=self.scorer_truncated,
      truncated=self.truncated,
      batches=self.batches,
      last_skip=self.last_skip,
    )

  @classmethod
  def from_dict(cls, d: dict) -> DataStats:
    return cls(
      d.get("samples", 0),
      collections.Counter(d.get("skipped", {})),
      d.get("scorer_truncated", 0),
      d.get("truncated", 0),
      d.get("batches", 0),
      d.get("last_skip", ""),
    )


class DataIterator(Iterator):
  """Data block ``block``'s slice of every step's global batch (module doc), with counters
  and a checkpointable cursor. ``builder`` maps a ``Step`` to (batch, ``BatchInfo``):
  ``data.sft.pipeline.BatchBuilder`` (SFT ``TrainBatch``es) or
  ``data.dpo.pairs.PairBatchBuilder`` (DPO); ``config`` gives the seed, the shards, the
  worker and skip settings (a ``data.sft.pipeline.DataConfig`` or a
  ``data.dpo.pairs.PreferenceDataConfig``)."""

  def __init__(
    self,
    config,
    plan: BatchPlan,
    builder: grain.transforms.Map,
    block: int,
    blocks: int,
    state: dict | None = None,
  ):
    self.config, self.plan, self.builder = config, plan, builder
    self.block, self.blocks = block, blocks
    self.shards = config.shards or blocks
    self.infos: list[BatchInfo] = []  # the last step's shards
    self._it = None
    self.set_state(state or {"next_batch": 0})

  def _start(self, cursor: int) -> None:
    self.close()
    workers.mark_flags_parsed()
    cfg = self.config
    source = StepSource(self.plan, cursor, self.block, self.blocks, self.shards)
    ds = grain.MapDataset.source(source).map(self.builder)
    ds = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=cfg.threads, prefetch_buffer_size=cfg.worker_buffer_size)
    )
    if cfg.num_workers > 0:
      ds = ds.mp_prefetch(
        grain.MultiprocessingOptions(
          num_workers=cfg.num_workers, per_worker_buffer_size=cfg.worker_buffer_size
        ),
        worker_init_fn=functools.partial(workers.worker_start, os.getpid()),
      )
    self._it = iter(ds)
    self._cursor = cursor

  def __next__(self):
    if self._it is None:
      raise StopIteration
    try:
      built = [next(self._it) for _ in range(self.shards // self.blocks)]
    except StopIteration:  # a step's shards end together (StepSource's length)
      self.close()  # frees the workers and their shared memory now
      raise
    workers.unlink_received(built)
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
    if (
      stats.samples >= cfg.skip_check_after
      and stats.skipped_total > cfg.max_skip_fraction * stats.samples
    ):
      raise DataError(
        f"{stats.skipped_total} of {stats.samples} samples skipped "
        f"({stats.skipped_total / stats.samples:.1%}), more than max_skip_fraction="
        f"{cfg.max_skip_fraction:g}: {dict(stats.skipped)}; the last: {stats.last_skip}"
      )
    return concat_rows([batch for batch, _ in built], self.builder.pad_id)

  def get_state(self) -> dict:
    """The global batch cursor and this process's counters (JSON-able)."""
    return {
      "version": STATE_VERSION,
      "next_batch": self._cursor,
      "seed": self.config.seed,
      "stats": self.stats.as_dict(),
    }

  def set_state(self, state: dict) -> None:
    if state.get("version", STATE_VERSION) != STATE_VERSION:
      raise DataError(f"data state version {state.get('version')} is not {STATE_VERSION}")
    if "seed" in state and state["seed"] != self.config.seed:
      raise DataError(
        f"the data state was saved with seed {state['seed']}, the config has "
        f"{self.config.seed}: the stream would not continue"
      )
    self.stats = DataStats.from_dict(state.get("stats", {}))
    self._start(int(state["next_batch"]))

  def close(self) -> None:
    it, self._it = self._it, None
    if it is not None and hasattr(it, "close"):
      it.close()  # stops the workers, unlinking what they had sent
      workers.finish_unlinks()

  def __del__(self):
    try:
      self.close()
    except Exception:
      pass
