"""What a training run checks about its data before any weight loads.

A typo in an annotation path or a media root used to surface only after the model had
loaded (minutes for a 7B), or not at all: with every video missing, each sample was
skipped and the run ended "successfully" after 0 updates. ``sft_annotations`` validates
every record (``annotations.load_mixture``) and looks for the media of the first
``MEDIA_PROBES`` records of each corpus: when none of them exists the media root is
wrong, an error naming the corpus, the root and a path looked for; when some are
missing, a warning says how many (the run skips and counts them). Videos read from a
media store (``SampleConfig.media_store``) are looked up there, not on disk: the store's
folder must exist.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ppllava_jax.data.sft.annotations import AnnotationSet, MixtureConfig, Record, load_mixture

log = logging.getLogger(__name__)
MEDIA_PROBES = 16  # records per corpus whose media are looked for


def sft_annotations(mixture: MixtureConfig, media_store: str | None = None) -> AnnotationSet:
  """Every record of ``mixture``, validated, after ``check_media``."""
  aset = load_mixture(mixture)
  check_media(aset, mixture, media_store)
  return aset


def _probe(record: Record) -> str:
  """The path whose existence says the record's media are there."""
  return record.media[0]


def check_media(
  aset: AnnotationSet, mixture: MixtureConfig, media_store: str | None = None
) -> None:
  """Module doc: the media of each corpus's first records exist."""
  if media_store is not None and not Path(media_store).is_dir():
    raise FileNotFoundError(f"SampleConfig.media_store {media_store}: no such folder")
  for c, corpus in enumerate(mixture.corpora):
    rows = np.flatnonzero(aset.corpus == c)
    records = [aset[int(i)] for i in rows[:MEDIA_PROBES]]
    # stored videos are keyed by path in the store, not read from the media root
    records = [
      r
      for r in records
      if r.kind != "text"
      and not (media_store is not None and r.kind == "video" and not r.frame_list)
    ]
    if not records:
      continue
    missing = [_probe(r) for r in records if not Path(_probe(r)).exists()]
    if len(missing) == len(records):
      raise FileNotFoundError(
        f"corpus {corpus.name!r} ({corpus.annotation}): none of the media of its first "
        f"{len(records)} records exist, e.g. {missing[0]}; is media_root "
        f"{corpus.media_root!r} right? (--set data.mixture.corpora.{corpus.name}."
        "media_root=DIR)"
      )
    if missing:
      log.warning(
        "corpus %r: %d of the media of its first %d records are missing (e.g. %s); "
        "such samples are skipped and counted",
        corpus.name,
        len(missing),
        len(records),
        missing[0],
      )
