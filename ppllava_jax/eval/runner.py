"""Batched, resumable generation over a list of jobs: the loop behind ``eval.py``.

Each ``Job`` is one prompt with its media files. ``run``:

- appends one JSON line per finished job to ``out_path`` as it goes (``{"id", "status":
  "ok", "prediction", "prompt"}``, or ``"status": "failed"`` with the ``error``: a missing,
  corrupt or empty video fails that job only, with its reason, and the run goes on).
  A rerun reads the file back and skips every job already answered; failed ones are
  tried again. The last line of an id wins.
- reads media on a background thread, one batch ahead, while the model generates
  (a VideoMME prompt with subtitles is completed there, quoting the lines shown at
  the frames actually sampled: ``data.subtitles``);
- batches jobs of equal frame count, pads them into the processor's shape buckets and
  runs ``model.generate`` (one jitted program per bucket; each new one is logged, with
  the running count, so a long evaluation shows it compiles a handful of times);
- shows a progress bar with items/s;
- with ``visualize``, writes one PNG per video job: the sampled frames under the
  relevance map (cosines, ``PPLLaVA.relevance_maps``), titled with the question.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from ppllava_jax.data import subtitles
from ppllava_jax.data.processor import Media, Processor, Prompt
from ppllava_jax.data.video import MediaError, load_video
from ppllava_jax.eval.heatmap import relevance_grid
from ppllava_jax.models import generate as generation
from ppllava_jax.models.pure import pure

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MediaRef:
  kind: str  # "video" (a file or a folder of frames) or "image"
  path: str
  start_sec: float | None = None  # bounds within a video (MVBench)
  end_sec: float | None = None


@dataclasses.dataclass(frozen=True)
class Subtitled:
  """A prompt that quotes the subtitles shown at the sampled frames (VideoMME)."""
  path: str  # the video's .srt; a missing file means "no subtitles"
  render: Callable[[tuple[str, ...] | None], tuple[str, str]]  # lines -> (text, scorer_text)


@dataclasses.dataclass(frozen=True)
class Job:
  id: str
  text: str  # the LLM prompt, rendered by a template, one placeholder per media item
  scorer_text: str = ""
  media: tuple[MediaRef, ...] = ()
  frames: int = 32  # frames sampled per video
  title: str = ""  # for pictures: the question
  subtitled: Subtitled | None = None  # rebuilds text / scorer_text once frames are sampled


@dataclasses.dataclass(frozen=True)
class RunConfig:
  batch_size: int = 4
  max_new_tokens: int = 200
  length_multiple: int = 64  # prompt lengths round up to this (shape buckets)
  visualize: Path | None = None
  video_backend: str = "pyav"  # data.video.load_video's decoder: "pyav" or "decord"


def read_records(out_path: Path) -> dict[str, dict]:
  """The JSON lines of a previous run, by id (the last line of an id wins)."""
  records: dict[str, dict] = {}
  if out_path.exists():
    for number, line in enumerate(out_path.read_text().splitlines(), 1):
      if line.strip():
        try:
          record = json.loads(line)
        except json.JSONDecodeError as err:  # a run killed mid-write leaves a torn last line
          log.warning("%s:%d: skipped an unreadable line (%s)", out_path, number, err)
          continue
        records[str(record["id"])] = record
  return records


def _load(job: Job, read_video: Callable) -> tuple[Prompt, list[np.ndarray]]:
  """The job's prompt with decoded media, and its videos' frames (for pictures)."""
  media, videos = [], []
  text, scorer_text = job.text, job.scorer_text
  for ref in job.media:
    if ref.kind == "video":
      frames, info = read_video(ref.path, job.frames, start_sec=ref.start_sec,
                                end_sec=ref.end_sec)
      media.append(Media("video", frames))
      videos.append(frames)
      if job.subtitled is not None:
        srt = Path(job.subtitled.path)
        lines = (subtitles.lines_at_frames(subtitles.read_srt(srt), info.indices, info.fps)
                 if srt.exists() else None)
        text, scorer_text = job.subtitled.render(lines)
    elif ref.kind == "image":
      try:
        with Image.open(ref.path) as image:
          media.append(Media("image", image.convert("RGB")))
      except (OSError, UnidentifiedImageError) as err:
        raise MediaError(ref.path, f"cannot read the image ({err})") from err
    else:
      raise MediaError(ref.path, f"unknown media kind {ref.kind!r}")
  return Prompt(text, tuple(media), scorer_text), videos


def _batches(jobs: Sequence[Job], size: int) -> Iterator[list[Job]]:
  """Jobs of one frame count together, in order of first appearance."""
  by_frames: dict[int, list[Job]] = {}
  for job in jobs:
    by_frames.setdefault(job.frames, []).append(job)
  for group in by_frames.values():
    for start in range(0, len(group), size):
      yield group[start:start + size]


def _picture_name(job_id: str) -> str:
  return re.sub(r"[^\w.-]+", "_", job_id) + ".png"


def run(model, processor: Processor, jobs: Sequence[Job], out_path: str | Path,
        cfg: RunConfig = RunConfig()) -> dict[str, dict]:
  """Answers every job not answered in ``out_path`` yet; returns all records by id."""
  out_path = Path(out_path)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  records = read_records(out_path)
  pending = [job for job in jobs if records.get(job.id, {}).get("status") != "ok"]
  if len(pending) < len(jobs):
    log.info("%s: %d of %d jobs already answered, skipped", out_path, len(jobs) - len(pending),
             len(jobs))
  relevance = None
  if cfg.visualize is not None:
    if getattr(model, "scorer", None) is None or processor.scorer_tokenizer is None:
      log.warning("--visualize needs the relevance scorer and its tokenizer (a checkpoint "
                  "with one, or --clip; --scorer-tokenizer); no pictures will be written")
    else:
      cfg.visualize.mkdir(parents=True, exist_ok=True)
      fn, state = pure(model, "relevance_maps")
      relevance = (jax.jit(fn), state)
  # A run shorter than one batch needs no filler rows (a single video: batch 1).
  cfg = dataclasses.replace(cfg, batch_size=max(1, min(cfg.batch_size, len(pending))))
  batches = list(_batches(pending, cfg.batch_size))
  compiled = generation.compilations()
  with open(out_path, "a") as out, tqdm(total=len(pending), unit="item", desc="eval") as bar:
    for batch, loaded in _prefetched(batches, cfg.video_backend):
      good = []
      for job, (result, error) in zip(batch, loaded):
        if error is None:
          encoded, error = _try(processor.encode, result[0])
        if error is None:
          good.append((job, encoded, result))
        else:
          _write(out, records, dict(id=job.id, status="failed", error=error))
      if good:
        texts = _generate(model, processor, [e for _, e, _ in good], cfg)
        if generation.compilations() > compiled:
          compiled = generation.compilations()
          log.info("compiled generation program #%d (batch %d x frames %d)", compiled,
                   cfg.batch_size, batch[0].frames)
        for (job, encoded, (prompt, videos)), text in zip(good, texts):
          _write(out, records, dict(id=job.id, status="ok", prediction=text, prompt=prompt.text))
          if relevance is not None and videos:
            _picture(relevance, job, encoded, videos[0], cfg.visualize)
      bar.update(len(batch))
  return records


def _prefetched(batches: list[list[Job]], video_backend: str
                ) -> Iterator[tuple[list[Job], list]]:
  """Each batch with its loaded media; the next batch loads on a thread meanwhile.

  The last few decoded videos are kept: VideoMME asks three questions of each video,
  and its jobs come in order, so each video is decoded once, not three times.
  """
  read_video = functools.lru_cache(maxsize=2)(functools.partial(load_video,
                                                                backend=video_backend))
  load = lambda batch: [_try(_load, job, read_video) for job in batch]
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    ahead = pool.submit(load, batches[0]) if batches else None
    for i, batch in enumerate(batches):
      loaded = ahead.result()
      ahead = pool.submit(load, batches[i + 1]) if i + 1 < len(batches) else None
      yield batch, loaded


def _try(fn, *args):
  """(fn(*args), None), or (None, "Error: reason") for what bad media and text raise."""
  try:
    return fn(*args), None
  except (MediaError, ValueError, OSError) as err:
    return None, f"{type(err).__name__}: {err}"


def _write(out, records: dict, record: dict) -> None:
  out.write(json.dumps(record) + "\n")
  out.flush()  # a killed run keeps every finished answer
  records[record["id"]] = record


def _generate(model, processor: Processor, encoded: list, cfg: RunConfig) -> list[str]:
  batch = processor.collate(encoded, cfg.batch_size, cfg.length_multiple)
  arrays = {k: jnp.asarray(v) for k, v in batch.items() if k not in ("num_real", "image_sizes")}
  ids = model.generate(**arrays, image_sizes=batch.get("image_sizes"),
                       max_new_tokens=cfg.max_new_tokens,
                       pad_token_id=processor.tokenizer.pad_token_id)
  new = np.asarray(ids)[:batch["num_real"], batch["input_ids"].shape[1]:]
  return [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


def _picture(relevance, job: Job, encoded, frames_thwc: np.ndarray, folder: Path) -> None:
  fn, state = relevance
  cos_vtgg = fn(state, jnp.asarray(encoded.videos[0][None]),
                       jnp.asarray(encoded.scorer_ids[None]),
                       jnp.asarray(encoded.scorer_mask[None]))
  picture = relevance_grid(np.asarray(cos_vtgg)[0], frames_thwc,
                           title=(job.title or job.scorer_text)[:120])
  picture.save(folder / _picture_name(job.id))
