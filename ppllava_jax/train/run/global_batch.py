"""Global batches on several processes: who loads which rows, and the global arrays.

The batch rule (``models.sharding.LOGICAL_RULES``: rows over ``data`` x ``fsdp``) splits a
step's rows into as many equal slices as those axes have devices. A *data block* is the
run of slices one process's devices hold; processes whose devices hold the same rows
(a ``tensor`` axis across hosts) form one block and load the same data. ``data_blocks``
finds this process's block from the mesh alone, so the data pipeline
(``data.sft.pipeline``: block ``b`` builds shards ``b·D/P ..``) and the arrays agree without
any communication.

``to_global`` turns this process's slice of a step (NumPy, from the pipeline) into
global ``jax.Array``s on the mesh, as the jitted step's ``batch_shardings`` place them:
the text is first padded to the longest bucket any process has (one all-gather of an
int), then every field the batch rule shards is ``jax.make_array_from_process_local_data``
of the local rows; a field it replicates (an index table such as ``image_gather``, or a
dimension the batch devices do not divide) is all-gathered, joined in block order, and
placed whole. On one process the NumPy batch is returned as it is (the step puts it).

``agreed_next`` fetches a step's slice so that every process takes the same turn: a
process whose data ran out or failed while the others went on into ``to_global``'s
all-gathers would leave them waiting there for ever. So each fetch's outcome (a batch,
the end, an error) is all-gathered, and every process stops, or raises, together (a
gather of its own, before ``to_global``'s: an ended or failed fetch has no batch to pad).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ppllava_jax.data.batching import pad_batch
from ppllava_jax.data.engine import DataError
from ppllava_jax.models.sharding import LOGICAL_RULES, Rules
from ppllava_jax.train.core.state import batch_axes, batch_devices, batch_shardings

T = TypeVar("T")
_GOT, _ENDED, _FAILED = 0, 1, 2  # agreed_next's outcomes


@dataclasses.dataclass(frozen=True)
class DataBlocks:
  """This process's data block (module doc), the block count, and per block the first
  process that holds it (whose rows an all-gather takes)."""

  block: int
  blocks: int
  owners: tuple[int, ...]


def data_blocks(mesh: Mesh, rules: Rules = LOGICAL_RULES) -> DataBlocks:
  """The data blocks of ``mesh`` under the batch rule (module doc). A process whose
  devices hold rows that are not one contiguous run of the same length as every other
  process's is an error: its rows could not be one slice of the pipeline's."""
  slices = batch_devices(mesh.shape, rules)
  sharding = NamedSharding(mesh, PartitionSpec(batch_axes(rules)))
  rows: dict[int, set[int]] = {}
  for device, index in sharding.devices_indices_map((slices,)).items():
    # jax.Device: the stubs leave its type unresolved (Device?), without process_index
    rows.setdefault(device.process_index, set()).add(index[0].start or 0)  # type: ignore[attr-defined]
  runs = {p: (min(r), len(r)) for p, r in rows.items()}
  width = {n for _, n in runs.values()}
  if len(width) != 1 or any(
    sorted(rows[p]) != list(range(lo, lo + n)) for p, (lo, n) in runs.items()
  ):
    raise ValueError(
      f"the mesh {dict(mesh.shape)} gives processes rows {rows} of the batch "
      "axes: each process must hold one contiguous run of the same length "
      "(order the devices by process)"
    )
  (n,) = width
  owners: dict[int, int] = {}
  for p in sorted(runs):
    owners.setdefault(runs[p][0] // n, p)
  return DataBlocks(
    runs[jax.process_index()][0] // n, slices // n, tuple(owners[b] for b in range(slices // n))
  )


def to_global(batch, mesh: Mesh, blocks: DataBlocks, micro: bool = False, pad_id: int = 0):
  """This process's slice of a step -> the step's global batch (module doc). ``micro``:
  fields carry a leading micro-batch axis (gradient accumulation), rows on axis 1."""
  if jax.process_count() == 1:
    return batch
  lengths = multihost_utils.process_allgather(np.int32(batch.input_ids.shape[-1]))
  batch = pad_batch(batch, int(np.max(lengths)), pad_id)
  axis = 1 if micro else 0
  local = {f.name: np.asarray(getattr(batch, f.name)) for f in dataclasses.fields(batch)}

  def grown(x):
    shape = list(x.shape)
    if len(shape) > axis:
      shape[axis] *= blocks.blocks
    return jax.ShapeDtypeStruct(tuple(shape), x.dtype)

  shapes = {name: grown(x) for name, x in local.items()}
  shardings = batch_shardings(batch.replace(**shapes), mesh, micro)
  whole = [name for name in local if getattr(shardings, name).is_fully_replicated]
  gathered = multihost_utils.process_allgather({n: local[n] for n in whole}) if whole else {}
  out = {}
  for name, x in local.items():
    sharding, shape = getattr(shardings, name), shapes[name].shape
    if name in gathered:  # (processes, ...) -> the blocks' rows in order
      x = (
        np.concatenate([gathered[name][p] for p in blocks.owners], axis=axis)
        if len(x.shape) > axis
        else x
      )
    out[name] = jax.make_array_from_process_local_data(sharding, x, shape)
  return batch.replace(**out)


def agreed_next(fetch: Callable[[], T]) -> T | None:
  """``fetch()`` (this process's slice of the next step), or None when the data ran out
  (``StopIteration``), agreed by every process (module doc): None everywhere when any
  process's ran out; when any process's fetch raised, that process raises its own error
  and the others a ``DataError`` naming it. One all-gather of an int on several
  processes; on one, ``fetch()``'s own errors as they are."""
  if jax.process_count() == 1:
    try:
      return fetch()
    except StopIteration:
      return None
  batch, error = None, None
  try:
    batch, outcome = fetch(), _GOT
  except StopIteration:
    outcome = _ENDED
  except Exception as err:
    outcome, error = _FAILED, err
  outcomes = multihost_utils.process_allgather(np.int32(outcome))
  if error is not None:
    raise error
  failed = [p for p, o in enumerate(outcomes.tolist()) if o == _FAILED]
  if failed:
    raise DataError(
      f"process {failed[0]} failed to load its data (see its log); every process stops with it"
    )
  return None if _ENDED in outcomes.tolist() else batch
