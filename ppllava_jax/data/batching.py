"""What every fixed-shape batch type shares (``data.sft.batches.TrainBatch``,
``data.dpo.pairs.PairBatch``): the label that is not supervised, the pixel dtypes, the
config checks and sequence buckets, the shape key a jitted step compiles for, and
padding, joining and emptying batches on the host."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import ml_dtypes
import numpy as np

IGNORE = -100  # a label that is not supervised (transformers' ignore_index)

PIXEL_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def check_batching(cfg) -> None:
  """The checks every batch config shares (``BatchConfig``, ``data.dpo.pairs.
  PreferenceDataConfig``): a positive batch size, increasing positive sequence buckets, a
  known pixel dtype."""
  owner = type(cfg).__name__
  if cfg.batch_size < 1 or not cfg.seq_buckets or min(cfg.seq_buckets) < 1:
    raise ValueError(
      f"{owner}: batch_size and seq_buckets must be positive, got "
      f"{cfg.batch_size}, {cfg.seq_buckets}"
    )
  if tuple(sorted(set(cfg.seq_buckets))) != tuple(cfg.seq_buckets):
    raise ValueError(f"{owner}.seq_buckets must be increasing, got {cfg.seq_buckets}")
  if cfg.pixel_dtype not in PIXEL_DTYPES:
    raise ValueError(f"{owner}.pixel_dtype must be one of {tuple(PIXEL_DTYPES)}")


def seq_bucket(buckets: Sequence[int], length: int, limit: str) -> int:
  """The smallest of ``buckets`` that holds ``length`` tokens; ``limit``: the setting that
  keeps samples within the largest."""
  for b in buckets:
    if length <= b:
      return b
  raise ValueError(
    f"a sample of {length} tokens exceeds the largest bucket {buckets[-1]}: keep {limit} <= it"
  )


def shape_key(batch) -> tuple:
  """The shapes and dtypes of every field of a batch: what a jitted step compiles for."""
  return tuple(
    (k, tuple(v.shape), str(v.dtype)) for k, v in sorted(dataclasses.asdict(batch).items())
  )


_TEXT_PADS = {"attention_mask": 0, "position_ids": 0, "labels": IGNORE, "loss_mask": False}


def pad_batch(batch, length: int, pad_id: int = 0):
  """``batch`` (a ``TrainBatch`` or a ``data.dpo.pairs.PairBatch``, micro-batches stacked or
  not) right-padded to ``length`` tokens: on several hosts, every host pads to the
  largest bucket any host has for the step (``train.run.global_batch``), so the global arrays
  agree in shape; gradient accumulation pads its micro-batches to one length."""
  have = batch.input_ids.shape[-1]
  if length < have:
    raise ValueError(f"pad_batch: cannot shrink {have} tokens to {length}")
  if length == have:
    return batch
  extra = ((0, 0),) * (batch.input_ids.ndim - 1) + ((0, length - have),)
  pads = dict(_TEXT_PADS, input_ids=pad_id)
  return batch.replace(
    **{
      name: np.pad(np.asarray(getattr(batch, name)), extra, constant_values=value)
      for name, value in pads.items()
      if hasattr(batch, name)
    }
  )


def join_batches(batches, pad_id: int = 0, stack: bool = False):
  """Batches of one layout -> one, the text padded to the longest (``pad_batch``), every
  field concatenated on its leading axis, or under ``stack`` stacked on a new one."""
  length = max(b.input_ids.shape[1] for b in batches)
  padded = [pad_batch(b, length, pad_id) for b in batches]
  join = np.stack if stack else np.concatenate
  return jax.tree.map(lambda *xs: join([np.asarray(x) for x in xs]), *padded)


def concat_rows(batches, pad_id: int = 0):
  """Batches of one layout (``as_shard``-ed ``TrainBatch``es, or ``PairBatch``es, whose pairs
  need no offsets) -> one, every field joined on its leading axis, the text padded to the
  longest."""
  return batches[0] if len(batches) == 1 else join_batches(batches, pad_id)


def empty_like(batch):
  """A batch of ``batch``'s shapes with nothing in it: every mask False, no label
  supervised (what fills an update's micro-batches when the data ends inside it)."""

  def clear(name, x):
    if name == "labels":
      return np.full_like(np.asarray(x), IGNORE)
    return np.zeros_like(np.asarray(x)) if name.endswith("mask") else np.asarray(x)

  return batch.replace(
    **{f.name: clear(f.name, getattr(batch, f.name)) for f in dataclasses.fields(batch)}
  )
