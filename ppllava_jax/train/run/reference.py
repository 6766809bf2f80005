"""Reference log-probs computed once and kept on disk (``DPOConfig.precompute_reference``).

Before the first step, one pass over every preference row (file order, frames pinned per
row: ``data.dpo.pairs``) computes the reference's summed completion log-probs of both sides
with the run's starting parameters (``train.dpo.objective.reference_logps``, the function a live
reference runs in the step) and writes ``{workdir}/reference/logps.npz``: the row ids
(JSON, so string and integer ids stay what they were), the chosen and rejected float32
sums, and the fingerprint of what they depend on. Every epoch, and every restart of the
run, reads them back (bit for bit: float32 in, float32 out); the training pipeline puts
each row's pair into ``PairBatch.ref_logps``. No reference weights stay in memory.

The fingerprint: the rows file's SHA-256, the sample and media settings, the data seed
(frame sampling), the model section, ``init_from`` and the compute dtype. A cache whose
fingerprint differs from the run's is an error naming what changed (a stale reference
would be silently wrong): delete the file to recompute. Rows that fail to build (bad
media) are not cached; training skips them too. Ids must be unique (the cache's key).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from ppllava_jax import distributed
from ppllava_jax.data.dpo import pairs
from ppllava_jax.data.dpo.rows import read_preference_rows
from ppllava_jax.data.engine import DataIterator
from ppllava_jax.data.text.tokenizer import check_batch_ids
from ppllava_jax.train.core.state import batch_shardings
from ppllava_jax.train.dpo.objective import reference_logps
from ppllava_jax.train.run import config as rc

log = logging.getLogger(__name__)
CACHE = Path("reference") / "logps.npz"


def fingerprint(cfg: rc.RunConfig) -> dict:
  """What the cached log-probs depend on (module doc), JSON-able."""
  data = cfg.preference
  assert data is not None  # a DPO run's config: RunConfig requires preference with dpo
  digest = hashlib.sha256(Path(data.rows).read_bytes()).hexdigest()
  return json.loads(
    json.dumps(
      {
        "rows_sha256": digest,
        "media_root": data.media_root,
        "sample": dataclasses.asdict(data.sample),
        "seed": data.seed,
        "model": dataclasses.asdict(cfg.model),
        "init_from": cfg.init_from,
        "compute_dtype": cfg.train.compute_dtype,
      }
    )
  )  # as stored: tuples are lists


def _check_unique(rows) -> None:
  seen: dict[str | int, int] = {}  # row id -> its line
  for row in rows:
    if row.id in seen:
      raise ValueError(
        f"{row.file}: id {row.id!r} on lines {seen[row.id]} and {row.line}: the "
        "reference cache is keyed by row id, so ids must be unique"
      )
    seen[row.id] = row.line


def load(path: Path, want: dict) -> dict:
  """The cached table ``id -> (chosen, rejected)``, after checking its fingerprint."""
  with np.load(path) as z:
    have = json.loads(str(z["fingerprint"]))
    if have != want:
      changed = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
      raise ValueError(
        f"{path} holds reference log-probs for another setup ({', '.join(changed)} "
        "changed); delete it to recompute them, or use a new workdir"
      )
    ids = json.loads(str(z["ids"]))
    return {i: (c, r) for i, c, r in zip(ids, z["chosen"].tolist(), z["rejected"].tolist())}


def save(path: Path, table: dict, fp: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  ids = list(table)
  values = np.asarray([table[i] for i in ids], np.float32).reshape(-1, 2)
  tmp = path.with_name(path.name + ".tmp.npz")
  np.savez(
    tmp,
    ids=json.dumps(ids),
    chosen=values[:, 0],
    rejected=values[:, 1],
    fingerprint=json.dumps(fp, sort_keys=True),
  )
  tmp.rename(path)  # last: an interrupted pass is redone


def compute(run, cfg: rc.RunConfig, params, read=None) -> dict:
  """``id -> (chosen, rejected)`` log-probs under ``params`` (module doc), with progress;
  ``read``: the rows, already read (``read_preference_rows``)."""
  assert cfg.preference is not None  # a DPO run's config (as in fingerprint)
  data_cfg = dataclasses.replace(cfg.preference, num_epochs=1, shards=None)
  if read is None:
    read = read_preference_rows(data_cfg.rows, data_cfg.media_root)
  _check_unique(read.rows)
  builder = pairs.make_builder(
    data_cfg,
    read.rows,
    tokenizer=run.tokenizer,
    model=run.model_cfg,
    scorer_tokenizer=run.scorer_tokenizer,
    pin_frames=True,
    shuffle=False,
  )
  data = DataIterator(data_cfg, builder.plan, builder, 0, 1)
  # every process makes the whole table (the same batches, put whole on the mesh)
  fn = jax.jit(
    functools.partial(reference_logps, run.graphdef, cfg.train),
    out_shardings=run.shardings.replicated,
  )
  mesh, table = run.shardings.mesh, {}
  try:
    for batch in tqdm(
      data,
      total=builder.plan.total(),
      desc="reference log-probs",
      dynamic_ncols=True,
      mininterval=1.0,
      disable=not distributed.is_primary(),
    ):
      check_batch_ids(batch, run.model_cfg)
      with jax.set_mesh(mesh):
        logp = np.asarray(
          jax.device_get(
            fn(params, run.frozen, jax.device_put(batch, batch_shardings(batch, mesh)))
          )
        )
      for i, r in enumerate(data.infos[0].records):
        if batch.pair_mask[i]:
          table[read.rows[r].id] = (logp[2 * i], logp[2 * i + 1])
  finally:
    data.close()
  check_finite(table, read.file)
  return table


def check_finite(table: dict, rows_file: str) -> None:
  """Every cached log-prob is finite: a NaN or inf would poison every DPO step of its
  row (and be kept on disk), so the table is refused whole, naming the rows."""
  bad = [row_id for row_id, pair in table.items() if not np.all(np.isfinite(pair))]
  if bad:
    raise ValueError(
      f"the reference log-probs of {len(bad)} of {len(table)} rows of "
      f"{rows_file} are not finite (e.g. row {bad[0]!r}: {table[bad[0]]}); "
      "nothing was cached. A NaN here usually means the starting model "
      "does not fit its tokenizers or its weights are broken"
    )


def reference_table(run, cfg: rc.RunConfig, workdir: Path, initial_params, read=None) -> dict:
  """The run's cached reference log-probs: read from ``workdir``, or computed with
  ``initial_params()`` (called only then) and written first."""
  path, want = Path(workdir) / CACHE, fingerprint(cfg)
  if path.is_file():
    table = load(path, want)
    check_finite(table, str(path))
    if distributed.is_primary():  # every process reads it; one says so
      print(f"reference log-probs of {len(table)} rows read from {path}", flush=True)
    return table
  table = compute(run, cfg, initial_params(), read)
  if distributed.is_primary():
    save(path, table, want)
  distributed.barrier("reference cache")
  if distributed.is_primary():  # the one that wrote it
    print(f"reference log-probs of {len(table)} rows computed and cached in {path}", flush=True)
  return table
