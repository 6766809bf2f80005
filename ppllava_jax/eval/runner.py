"""Batched, resumable generation over a list of jobs: the loop behind ``eval.py``.

``run``:

- appends one record per finished job to ``out_path`` as it goes (``eval.records``): a
  missing, corrupt or empty video, or a prompt longer than the LLM's context, fails
  that job only, with its reason, and the run goes on;
- reuses a saved answer only for a job with the same id *and* fingerprint
  (``eval.fingerprint``: prompt, media files, frame count, model, settings); every other
  job is generated, failed ones again, and the result counts what was reused and redone;
- reads media on a background thread, one batch ahead, while the model generates
  (a VideoMME prompt with subtitles is completed there, quoting the lines shown at
  the frames actually sampled: ``data.media.subtitles``);
- batches jobs of equal frame count, pads them into the processor's shape buckets and
  runs ``model.generate`` (one jitted program per bucket; each new one is logged, with
  the running count, so a long evaluation shows it compiles a handful of times);
- shows a progress bar with items/s;
- with ``visualize``, writes one PNG per video job: the sampled frames under the
  relevance map (cosines, ``PPLLaVA.relevance_maps``), titled with the question;
- on several processes (``ppllava_jax.distributed``), splits the batches among them and
  merges their answers into ``out_path`` (below).
- calls ``check_stop`` after reading each batch's media and after saving its answers,
  the points where it can stop losing nothing: ``eval.py`` passes
  ``signals.Signals.check``, which raises once SIGINT or SIGTERM came.

Several processes: every process runs ``run`` with the same jobs and its own replica of
the model on its own devices, and they share the folder of ``out_path`` (a filesystem
every host mounts). Process 0 first appends what a killed multi-process run left in
parts (``<out_path>.part-<i>-of-<n>``) to ``out_path``; then every process reads
``out_path``, so all of them know the same pending jobs, and makes the same batches
(frame groups, batch size capped at the pending count) as one process would. Batch k
goes to process ``k % n`` (whole batches: every answer comes from the same padded batch
as on one process; round robin: VideoMME's 32- and 64-frame groups spread over the
processes), which appends its records to its part. After a barrier every process reads
every part (each returns every job's record), and process 0 appends them to ``out_path``
in batch order (one process's write order: the same records in the same order) and
removes the parts. A restart re-reads everything, so the split of what is left is again
the same on every process, whatever the process count; the processes check that they
agree on the jobs and the saved answers (same inputs, same files on every host) before
splitting.

Prompt length: the prompt's tokens (placeholders expanded) plus ``max_new_tokens`` must
fit the LLM's ``max_position_embeddings``. It is known only once the media are read
(frames, subtitles, image tiles decide it), so a prompt that does not fit fails its
own job; ``max_new_tokens`` alone not fitting fails the run before anything is read.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import glob
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from ppllava_jax import distributed
from ppllava_jax.data.media import subtitles
from ppllava_jax.data.media.video import MediaError, load_video
from ppllava_jax.data.processor import Encoded, Media, Processor, Prompt
from ppllava_jax.eval import mcq
from ppllava_jax.eval import records as saved
from ppllava_jax.eval.fingerprint import digest, job_fingerprint
from ppllava_jax.eval.heatmap import relevance_grid
from ppllava_jax.eval.jobs import Job
from ppllava_jax.models import generate as generation
from ppllava_jax.models.pure import pure

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
  """How eval.py answers its jobs (not what it asks, which is the ``Job``)."""

  batch_size: int = 4
  max_new_tokens: int = 200
  length_multiple: int = 64  # prompt lengths round up to this (shape buckets)
  visualize: Path | None = None
  video_backend: str = "pyav"  # data.media.video.load_video's decoder: "pyav" or "decord"
  model_key: str = ""  # what built the model (fingerprint.model_key)

  @property
  def settings(self) -> dict[str, Any]:
    """What, besides the job, decides its answer: part of every fingerprint."""
    return dict(
      model=self.model_key,
      max_new_tokens=self.max_new_tokens,
      video_backend=self.video_backend,
      backend=jax.default_backend(),
    )


@dataclasses.dataclass(frozen=True)
class RunResult:
  records: dict[str, dict]  # by job id: the reused or the new record of each job
  reused: int  # saved answers with the job's fingerprint
  redone: int  # jobs whose saved records had failed or came from other settings
  path: Path

  def summary(self) -> str:
    new = len(self.records) - self.reused - self.redone
    return (
      f"{self.reused} answers reused, {self.redone} redone (failed before, or made "
      f"under other settings), {new} new: {self.path}"
    )


class _Loaded(NamedTuple):
  prompt: Prompt
  videos: list[np.ndarray]  # each video's frames, for pictures
  frame_indices: list[list[int]]  # each video's sampled frame indices, for the record


def _load(job: Job, read_video: Callable) -> _Loaded:
  """The job's prompt with decoded media."""
  media, videos, indices = [], [], []
  text, scorer_text = job.text, job.scorer_text
  for ref in job.media:
    if ref.kind == "video":
      frames, info = read_video(ref.path, job.frames, start_sec=ref.start_sec, end_sec=ref.end_sec)
      media.append(Media("video", frames))
      videos.append(frames)
      indices.append([int(i) for i in info.indices])
      if job.subtitled is not None:
        srt = Path(job.subtitled.path)
        lines = (
          subtitles.lines_at_frames(subtitles.read_srt(srt), info.indices, info.fps)
          if srt.exists()
          else None
        )
        text, scorer_text = job.subtitled.render(lines)
    elif ref.kind == "image":
      try:
        with Image.open(ref.path) as image:
          media.append(Media("image", image.convert("RGB")))
      except (OSError, UnidentifiedImageError) as err:
        raise MediaError(ref.path, f"cannot read the image ({err})") from err
    else:
      raise MediaError(ref.path, f"unknown media kind {ref.kind!r}")
  return _Loaded(Prompt(text, tuple(media), scorer_text), videos, indices)


def _encode(processor: Processor, prompt: Prompt, max_new_tokens: int, context: int) -> Encoded:
  encoded = processor.encode(prompt)
  if len(encoded.input_ids) + max_new_tokens > context:
    raise ValueError(
      f"the prompt has {len(encoded.input_ids)} tokens, and with "
      f"{max_new_tokens} new tokens needs {len(encoded.input_ids) + max_new_tokens}"
      f" positions; the LLM's context is {context} (max_position_embeddings)"
    )
  return encoded


def _batches(jobs: Sequence[Job], size: int) -> Iterator[list[Job]]:
  """Jobs of one frame count together, in order of first appearance."""
  by_frames: dict[int, list[Job]] = {}
  for job in jobs:
    by_frames.setdefault(job.frames, []).append(job)
  for group in by_frames.values():
    for start in range(0, len(group), size):
      yield group[start : start + size]


def _picture_name(job_id: str) -> str:
  return re.sub(r"[^\w.-]+", "_", job_id) + ".png"


def process_output(out_path: str | Path) -> Path:
  """Where this process appends its records: ``out_path`` itself on one process, else its
  part ``<out_path>.part-<i>-of-<n>`` (module doc)."""
  out_path = Path(out_path)
  if jax.process_count() == 1:
    return out_path
  return out_path.with_name(f"{out_path.name}.part-{jax.process_index()}-of-{jax.process_count()}")


def _parts(out_path: Path) -> list[Path]:
  return sorted(out_path.parent.glob(glob.escape(out_path.name) + ".part-*-of-*"))


def _merge_parts(out_path: Path, order: Callable[[dict], int] | None = None) -> None:
  """Appends the records of ``out_path``'s parts to it (part by part, stably sorted by
  ``order`` when given), then removes the parts."""
  parts = _parts(out_path)
  if not parts:
    return
  merged = [r for part in parts for r in saved.read_records(part)]
  with saved.open_for_append(out_path) as out:
    for record in sorted(merged, key=order) if order else merged:
      saved.append(out, record)
  for part in parts:
    part.unlink()


def _check_agreement(jobs: Sequence[Job], fingerprints: dict, pending: Sequence[Job]) -> None:
  """Every process must split the same pending jobs, or the merged file mixes two runs."""
  mine = np.frombuffer(
    bytes.fromhex(digest([[j.id, fingerprints[j.id]] for j in jobs] + [j.id for j in pending])),
    np.uint8,
  )
  everyone = multihost_utils.process_allgather(mine)
  if not (everyone == mine).all():
    raise ValueError(
      "the processes disagree on the jobs or on the answers saved in the "
      "--out folder: every host needs the same command, inputs and files "
      "(the same paths, sizes and modification times)"
    )


def run(
  model,
  processor: Processor,
  jobs: Sequence[Job],
  out_path: str | Path,
  cfg: GenerationSettings = GenerationSettings(),
  check_stop: Callable[[], None] = lambda: None,
) -> RunResult:
  """Answers every job without a reusable answer in ``out_path``; returns a record per job
  (on every process, when several share the jobs: module doc). ``check_stop`` raises to
  stop between batches (module doc)."""
  out_path = Path(out_path)
  _check_jobs(model, jobs, cfg)
  processes, primary = jax.process_count(), distributed.is_primary()
  if primary:
    _merge_parts(out_path)  # a killed multi-process run's answers
  distributed.barrier("eval: leftover parts merged")
  fingerprints = {job.id: job_fingerprint(job, cfg.settings) for job in jobs}
  records, pending, redone = _reusable(jobs, fingerprints, out_path)
  reused = len(records)
  if processes > 1:
    _check_agreement(jobs, fingerprints, pending)
  relevance = _relevance(model, processor, cfg.visualize)
  # A run shorter than one batch needs no filler rows (a single video: batch 1).
  cfg = dataclasses.replace(cfg, batch_size=max(1, min(cfg.batch_size, len(pending))))
  batches = list(_batches(pending, cfg.batch_size))
  _answer(
    model,
    processor,
    batches[jax.process_index() :: processes],
    cfg,
    fingerprints,
    records,
    out_path,
    relevance,
    check_stop,
  )
  if processes > 1:
    _gather(records, pending, batches, out_path)
  return RunResult(records, reused, redone, out_path)


def _check_jobs(model, jobs: Sequence[Job], cfg: GenerationSettings) -> None:
  duplicates = [i for i, n in collections.Counter(job.id for job in jobs).items() if n > 1]
  if duplicates:
    raise ValueError(f"job ids must be unique; repeated: {duplicates[:5]}")
  context = model.cfg.text.max_position_embeddings
  if cfg.max_new_tokens >= context:
    raise ValueError(
      f"max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in the "
      f"LLM's context of {context} positions (max_position_embeddings)"
    )


def _reusable(
  jobs: Sequence[Job], fingerprints: dict[str, str], out_path: Path
) -> tuple[dict[str, dict], list[Job], int]:
  """(the saved answers made for these very jobs and settings, by job id; the jobs left to
  answer; how many of those had a record, failed or made under other settings)."""
  previous = saved.read_records(out_path)
  answers = {
    (str(r.get("id")), r.get("fingerprint")): r for r in previous if r.get("status") == "ok"
  }
  records = {
    job.id: answers[job.id, fingerprints[job.id]]
    for job in jobs
    if (job.id, fingerprints[job.id]) in answers
  }
  pending = [job for job in jobs if job.id not in records]
  before = {str(r.get("id")) for r in previous}
  return records, pending, sum(job.id in before for job in pending)


def _relevance(model, processor: Processor, folder: Path | None):
  """(jitted relevance maps, model state) for ``--visualize``, or None."""
  if folder is None:
    return None
  if getattr(model, "scorer", None) is None or processor.scorer_tokenizer is None:
    log.warning(
      "--visualize needs the relevance scorer and its tokenizer (a checkpoint "
      "with one, or --clip; --scorer-tokenizer); no pictures will be written"
    )
    return None
  folder.mkdir(parents=True, exist_ok=True)
  fn, state = pure(model, "relevance_maps")
  return jax.jit(fn), state


def _answer(
  model,
  processor: Processor,
  mine: list[list[Job]],
  cfg: GenerationSettings,
  fingerprints: dict[str, str],
  records: dict[str, dict],
  out_path: Path,
  relevance,
  check_stop: Callable[[], None],
) -> None:
  """Answers this process's batches, appending each record to its output as it comes."""
  context = model.cfg.text.max_position_embeddings
  compiled = generation.compilations()
  with (
    saved.open_for_append(process_output(out_path)) as out,
    tqdm(
      total=sum(map(len, mine)), unit="item", desc="eval", disable=not distributed.is_primary()
    ) as bar,
  ):

    def write(job: Job, **fields) -> None:
      records[job.id] = dict(id=job.id, fingerprint=fingerprints[job.id], **fields)
      saved.append(out, records[job.id])

    for batch, loaded in _prefetched(mine, cfg.video_backend):
      check_stop()  # before generating: a signal while the media were read
      good = []
      for job, (item, error) in zip(batch, loaded):
        if error is None:
          encoded, error = _try(_encode, processor, item.prompt, cfg.max_new_tokens, context)
        if error is None:
          good.append((job, encoded, item))
        else:
          write(job, status="failed", error=error)
      if good:
        texts = _generate(model, processor, [e for _, e, _ in good], cfg)
        if generation.compilations() > compiled:
          compiled = generation.compilations()
          log.info(
            "compiled generation program #%d (batch %d x frames %d)",
            compiled,
            cfg.batch_size,
            batch[0].frames,
          )
        for (job, encoded, item), text in zip(good, texts):
          write(
            job,
            status="ok",
            prediction=text,
            prompt=item.prompt.text,
            frame_indices=item.frame_indices,
          )
          if relevance is not None and item.videos:  # then cfg.visualize is set (_relevance)
            _picture(relevance, job, encoded, item.videos[0], cfg.visualize)  # type: ignore[arg-type]
      bar.update(len(batch))
      check_stop()  # the batch's answers are saved


def _gather(
  records: dict[str, dict], pending: Sequence[Job], batches: list[list[Job]], out_path: Path
) -> None:
  """Every process's new records into ``records``; process 0 merges the parts in job
  order."""
  distributed.barrier("eval: answered")
  records.update((r["id"], r) for part in _parts(out_path) for r in saved.read_records(part))
  distributed.barrier("eval: parts read")
  missing = [job.id for job in pending if job.id not in records]
  if missing:
    raise ValueError(
      f"the records of {len(missing)} jobs other processes ran (e.g. {missing[0]})"
      f" are not in {out_path.parent}: --out must be a folder every host mounts"
    )
  if distributed.is_primary():
    batch_of = {job.id: k for k, batch in enumerate(batches) for job in batch}
    _merge_parts(out_path, order=lambda r: batch_of[r["id"]])


def _prefetched(batches: list[list[Job]], video_backend: str) -> Iterator[tuple[list[Job], list]]:
  """Each batch with its loaded media; the next batch loads on a thread meanwhile.

  The last few decoded videos are kept: VideoMME asks three questions of each video,
  and its jobs come in order, so each video is decoded once, not three times.
  """
  # video_backend: a config string, which load_video checks
  read_video = functools.lru_cache(maxsize=2)(functools.partial(load_video, backend=video_backend))  # type: ignore[arg-type]
  load = lambda batch: [_try(_load, job, read_video) for job in batch]
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    ahead = pool.submit(load, batches[0]) if batches else None
    for i, batch in enumerate(batches):
      assert ahead is not None  # submitted for each batch before its turn
      loaded = ahead.result()
      ahead = pool.submit(load, batches[i + 1]) if i + 1 < len(batches) else None
      yield batch, loaded


def _try(fn, *args):
  """(fn(*args), None), or (None, "Error: reason") for what bad media and text raise."""
  try:
    return fn(*args), None
  except (MediaError, ValueError, OSError) as err:
    return None, f"{type(err).__name__}: {err}"


def _generate(model, processor: Processor, encoded: list, cfg: GenerationSettings) -> list[str]:
  batch = processor.collate(encoded, cfg.batch_size, cfg.length_multiple)
  arrays = {k: jnp.asarray(v) for k, v in batch.items() if k not in ("num_real", "image_sizes")}
  ids = model.generate(
    **arrays,
    image_sizes=batch.get("image_sizes"),
    max_new_tokens=cfg.max_new_tokens,
    pad_token_id=processor.tokenizer.pad_token_id,
  )
  # collate's num_real is an int, its input_ids an array
  new = np.asarray(ids)[: batch["num_real"], batch["input_ids"].shape[1] :]  # type: ignore[index,union-attr]
  return [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


def _picture(relevance, job: Job, encoded, frames_thwc: np.ndarray, folder: Path) -> None:
  fn, state = relevance
  cos_btgg = fn(
    state,
    jnp.asarray(encoded.videos[0][None]),
    jnp.asarray(encoded.scorer_ids[None]),
    jnp.asarray(encoded.scorer_mask[None]),
  )
  picture = relevance_grid(
    np.asarray(cos_btgg)[0],
    frames_thwc,
    title=(job.title or job.scorer_text)[:120],
    colorbar_label="cosine to the question",
  )
  picture.save(folder / _picture_name(job.id))


def failures(jobs: Sequence[Job], result: RunResult) -> dict[str, str]:
  """Job id -> error, for the jobs that got no answer."""
  return {
    j.id: result.records[j.id]["error"] for j in jobs if result.records[j.id]["status"] != "ok"
  }


def score_answers(
  items: Sequence[mcq.Item], jobs: Sequence[Job], result: RunResult, protocol: mcq.EvalProtocol
) -> mcq.ScoreReport | None:
  """The answered items (``items[i]`` asked by ``jobs[i]``) scored by ``protocol``; the
  failed ones are left out. None when no item got an answer."""
  ok = [(item, job) for item, job in zip(items, jobs) if result.records[job.id]["status"] == "ok"]
  if not ok:
    return None
  return mcq.score(
    [i for i, _ in ok], [result.records[j.id]["prediction"] for _, j in ok], protocol
  )
