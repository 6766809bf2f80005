"""Jobs: one prompt with its media each, built from benchmark items, open-ended rows or
one question, with ids that stay the same when the inputs around them change:

- MVBench ``<task>/<index within its task file>`` (another task file in the folder
  does not move them);
- VideoMME its ``question_id`` (else ``<videoID>/<index among that video's questions>``);
- open-ended rows their ``id`` (else the line number);
- one ``--video`` question ``<file name>/<hash of the video's path and the question>``.

An id says which item a record answers; whether the record can be reused is the
fingerprint's business (``eval.fingerprint``).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

from ppllava_jax.data.media.video import VIDEO_EXTENSIONS
from ppllava_jax.data.text.templates import CHATML, VICUNA, ChatTemplate, render_generation_prompt
from ppllava_jax.eval import mcq
from ppllava_jax.eval.fingerprint import digest
from ppllava_jax.eval.qa import QAItem


def chat_template(model_cfg) -> ChatTemplate:
  """The template a model's prompts are rendered with: ChatML for Qwen2, else Vicuna."""
  return CHATML if model_cfg.text.model_type == "qwen2" else VICUNA


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


def _video_path(root: Path, stem: str) -> str:
  """``root/stem.mp4``, else another video extension, else a frame folder ``root/stem``."""
  for ext in (".mp4", *sorted(VIDEO_EXTENSIONS - {".mp4"})):
    if (root / (stem + ext)).exists():
      return str(root / (stem + ext))
  return str(root / stem) if (root / stem).is_dir() else str(root / (stem + ".mp4"))


def _mcq_text(
  item: mcq.Item, protocol: mcq.EvalProtocol, template: ChatTemplate
) -> tuple[str, str]:
  question, prefix, scorer_text = mcq.build_prompt(item, protocol)
  prompt = render_generation_prompt(template, question, prefix, scorer_text=scorer_text)
  return prompt.text, prompt.scorer_text


def mcq_jobs(
  items: Sequence[mcq.Item],
  protocol: mcq.EvalProtocol,
  template: ChatTemplate,
  root: Path,
  frames: int | None,
  subtitle_root: Path | None = None,
) -> list[Job]:
  """One job per item (in ``load_mvbench`` / ``load_videomme`` order); with
  ``subtitle_root``, VideoMME prompts quote ``<videoID>.srt``."""
  seen: collections.Counter[str] = collections.Counter()  # items so far per task / video
  jobs = []
  for item in items:
    text, scorer_text = _mcq_text(item, protocol, template)
    subtitled = None
    if isinstance(item, mcq.MVBenchItem):
      job_id = f"{item.task}/{seen[item.task]}"
      seen[item.task] += 1
      ref = MediaRef("video", str(root / item.video), item.start, item.end)
      n = frames or 32
    else:
      job_id = item.question_id or f"{item.video_id}/{seen[item.video_id]}"
      seen[item.video_id] += 1
      ref = MediaRef("video", _video_path(root, item.video_id))
      n = frames or (32 if item.duration == "short" else 64)
      if subtitle_root is not None and protocol.subtitles:
        subtitled = Subtitled(
          str(subtitle_root / f"{item.video_id}.srt"),
          # mypy cannot type a lambda with a default (item=item binds this item)
          lambda lines, item=item: _mcq_text(  # type: ignore[misc]
            dataclasses.replace(item, subtitles=lines), protocol, template
          ),
        )
    jobs.append(Job(job_id, text, scorer_text, (ref,), n, item.question, subtitled))
  return jobs


def qa_jobs(
  items: Sequence[QAItem], template: ChatTemplate, root: Path, frames: int | None
) -> list[Job]:
  jobs = []
  for item in items:
    prompt = render_generation_prompt(template, item.question)
    jobs.append(
      Job(
        item.id,
        prompt.text,
        prompt.scorer_text,
        (MediaRef("video", str(root / item.video)),),
        frames or 32,
        item.question,
      )
    )
  return jobs


def video_job(path: str, question: str, template: ChatTemplate, frames: int | None) -> Job:
  key = digest([str(Path(path).resolve()), question])[:12]
  prompt = render_generation_prompt(template, question)
  return Job(
    f"{Path(path).name}/{key}",
    prompt.text,
    prompt.scorer_text,
    (MediaRef("video", path),),
    frames or 32,
    question,
  )
