"""What produced an answer, as one short hash: a saved answer is reused only by a job
whose fingerprint is the same.

A job's fingerprint covers its prompt text and scorer text, each media file (absolute
path, size and modification time, the clip bounds), the frame count and the subtitle
file, plus the run's settings (``GenerationSettings.settings``): the model (``model_key``: the
checkpoint, scorer, tokenizer folders' files, the pooling mode, the dtype), the
generation settings (``max_new_tokens``; decoding is greedy), the video decoder and the
JAX backend. The sampled frame indices are known only after decoding, so the
fingerprint takes what decides them (the file, the bounds, the frame count) and the
record stores the indices. Batch size and shape buckets are left out: padding is masked,
so they do not change what is generated.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
  from ppllava_jax.eval.jobs import Job


def digest(value: Any) -> str:
  """A short, stable hash of a JSON-able value (dict key order does not matter)."""
  text = json.dumps(value, sort_keys=True, ensure_ascii=False)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_identity(path: str | Path) -> list:
  """[absolute path, size, mtime in ns]; size and mtime None when nothing is there."""
  path = Path(path).resolve()
  try:
    stat = os.stat(path)
  except OSError:
    return [str(path), None, None]
  return [str(path), stat.st_size, stat.st_mtime_ns]


def folder_identity(path: str | Path | None) -> list | None:
  """The identities of a folder's files (a checkpoint, a tokenizer); for what is not a
  local folder (a hub id), its name."""
  if path is None:
    return None
  path = Path(path)
  if not path.is_dir():
    return [str(path)]
  return [file_identity(p) for p in sorted(path.iterdir()) if p.is_file()]


def model_key(
  checkpoint: str,
  clip: str | None,
  tokenizer: str,
  scorer_tokenizer: str | None,
  pooling: str,
  dtype: str | None,
) -> str:
  """What builds the model and its tokenizers, as ``eval.py`` loads them."""
  return digest(
    dict(
      checkpoint=folder_identity(checkpoint),
      clip=folder_identity(clip),
      tokenizer=folder_identity(tokenizer),
      scorer_tokenizer=folder_identity(scorer_tokenizer),
      pooling=pooling,
      dtype=dtype,
    )
  )


def job_fingerprint(job: Job, settings: Mapping[str, Any]) -> str:
  media = [[ref.kind, file_identity(ref.path), ref.start_sec, ref.end_sec] for ref in job.media]
  return digest(
    dict(
      settings,
      prompt=job.text,
      scorer=job.scorer_text,
      media=media,
      frames=job.frames,
      subtitles=file_identity(job.subtitled.path) if job.subtitled else None,
    )
  )
