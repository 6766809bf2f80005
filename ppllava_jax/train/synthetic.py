"""A synthetic video-QA set whose answers can be read from the pixels.

Each video is one coloured shape (a red, green or blue circle or square) moving left,
right, up or down across a grey field (H.264, PyAV); where it runs (its lane, start,
end) and its size are drawn per video, so no held-out video repeats a training one.
Each video is asked three questions, one per ``QUESTIONS`` task: its colour, its shape,
its direction. The set is a function of ``SyntheticConfig`` alone, written once into
``folder`` (an existing complete set is reused):

- ``videos/``: ``{i:04d}.mp4`` (training), ``eval_{i:04d}.mp4`` (held out);
- ``train.json`` / ``eval.json``: one single-turn record per (video, question) in the
  original's ``qa`` format, for training and for the loop's eval loss;
- ``mcq/colour.json``, ``mcq/shape.json``, ``mcq/direction.json``: the held-out
  questions as MVBench task files (``eval.mcq.load_mvbench``; video paths relative to
  ``videos/``), for ``eval.py --mvbench {folder}/mcq --video-root {folder}/videos``.

Decisions:

- Training teaches what evaluation asks. A record's question is the user text the
  original MVBench protocol builds for the same item (``eval.mcq.build_prompt`` with
  ``OriginalProtocol()``: ``Question: ...\\nOptions:\\n(A) ...\\nOnly give the best
  option.``) and its answer is that protocol's prefix plus the right option,
  ``Best option:(B) green``; so the rendered training conversation starts with exactly
  the text of the evaluation prompt (the answer prefix is supervised in training and
  prefilled at evaluation). One question per record, because the evaluation prompt has
  no earlier turns. What differs is the scorer's text, as in the original: the whole
  conversation in training, the question block at evaluation.
- Candidates come in a fixed order per task (the keys of ``COLOURS``, ``SHAPES``,
  ``DIRECTIONS``), so a tiny model trained for minutes can learn them; the right
  letter still changes with the video, and only its pixels tell which.
- Colour, shape and direction cycle through all 24 combinations, each cycle in a new
  random order: a split of a multiple of 24 videos is balanced, so chance is one over
  the candidates (1/3 colour, 1/2 shape, 1/4 direction) and also what always giving
  one answer scores.
- Shapes are large (radius 16-20% of the side: at 126 pixels about three 14-pixel
  patches across) and stay inside the field.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ppllava_jax.data.video import write_video
from ppllava_jax.eval.mcq import LETTERS, MVBenchItem, OriginalProtocol, build_prompt
from ppllava_jax.train.run_config import SyntheticConfig

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}
SHAPES = ("circle", "square")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUND = 96


@dataclasses.dataclass(frozen=True)
class Question:
  task: str  # the MVBench task file's stem
  text: str
  candidates: tuple[str, ...]


QUESTIONS = (Question("colour", "What colour is the shape?", tuple(COLOURS)),
             Question("shape", "Is it a circle or a square?", SHAPES),
             Question("direction", "Which way does it move?", tuple(DIRECTIONS)))


@dataclasses.dataclass(frozen=True)
class Scene:
  """One video: what it shows and where. ``lane``: the fixed coordinate, ``start`` /
  ``end``: the moving one at the first / last frame, ``radius``: half the shape's side;
  all fractions of the field's side."""
  colour: str
  shape: str
  direction: str
  lane: float = 0.5
  start: float = 0.25
  end: float = 0.75
  radius: float = 0.18

  def answer(self, task: str) -> str:
    return {"colour": self.colour, "shape": self.shape, "direction": self.direction}[task]


def frames(colour, shape: str, direction: str, count: int, size: int, *, lane: float = 0.5,
           start: float = 0.25, end: float = 0.75, radius: float = 0.18) -> Iterator[np.ndarray]:
  """The ``count`` (size, size, 3) uint8 frames of one shape of RGB ``colour`` crossing the
  field in ``direction`` (``Scene`` explains the fractions)."""
  yy, xx = np.mgrid[:size, :size]
  dx, dy = DIRECTIONS[direction]
  r = radius * size
  for i in range(count):
    along = start + (end - start) * i / max(1, count - 1)
    forward = along if dx + dy > 0 else 1 - along  # right / down run from 0, left / up from 1
    cx, cy = size * (forward if dx else lane), size * (forward if dy else lane)
    if shape == "circle":
      inside_hw = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 < r * r
    else:
      inside_hw = (np.abs(xx + 0.5 - cx) < r) & (np.abs(yy + 0.5 - cy) < r)
    frame_hwc = np.full((size, size, 3), BACKGROUND, np.uint8)
    frame_hwc[inside_hw] = colour
    yield frame_hwc


def scenes(count: int, seed: int) -> list[Scene]:
  """``count`` scenes: the combinations in shuffled cycles, a random layout each."""
  combos = list(itertools.product(COLOURS, SHAPES, DIRECTIONS))
  rng = np.random.default_rng(seed)
  order = np.concatenate([rng.permutation(len(combos))
                          for _ in range(-(-count // len(combos)))])[:count]
  return [Scene(*combos[k], lane=float(rng.uniform(0.3, 0.7)),
                start=float(rng.uniform(0.2, 0.3)), end=float(rng.uniform(0.7, 0.8)),
                radius=float(rng.uniform(0.16, 0.2))) for k in order]


def mcq_item(question: Question, video: str, answer: str) -> MVBenchItem:
  return MVBenchItem(task=question.task, video=video, question=question.text,
                     candidates=question.candidates, answer=answer)


def qa_turn(item: MVBenchItem) -> dict[str, str]:
  """The training turn for ``item``: the original protocol's question text, and its
  answer prefix followed by the right option (module doc)."""
  prompt = build_prompt(item, OriginalProtocol())
  letter = LETTERS[item.candidates.index(item.answer)]
  return {"q": prompt.question, "a": f"{prompt.answer_prefix}{letter}) {item.answer}"}


def generate(cfg: SyntheticConfig, folder: str | Path) -> Path:
  """Writes (or reuses) the set in ``folder``; returns the training annotation file."""
  folder = Path(folder)
  if cfg.eval_videos:
    _write(folder, "eval", cfg.eval_videos, cfg.seed + 1, cfg)
  return _write(folder, "train", cfg.videos, cfg.seed, cfg)


def _write(folder: Path, split: str, count: int, seed: int, cfg: SyntheticConfig) -> Path:
  annotation = folder / f"{split}.json"
  if annotation.is_file():
    return annotation
  (folder / "videos").mkdir(parents=True, exist_ok=True)
  records, tasks = [], {q.task: [] for q in QUESTIONS}
  for i, scene in enumerate(scenes(count, seed)):
    name = f"{i:04d}.mp4" if split == "train" else f"{split}_{i:04d}.mp4"
    write_video(folder / "videos" / name,
                frames(COLOURS[scene.colour], scene.shape, scene.direction, cfg.frames,
                       cfg.size, lane=scene.lane, start=scene.start, end=scene.end,
                       radius=scene.radius))
    for question in QUESTIONS:
      item = mcq_item(question, name, scene.answer(question.task))
      records.append({"video": name, "QA": [qa_turn(item)]})
      tasks[question.task].append({"video": name, "question": item.question,
                                   "candidates": list(item.candidates), "answer": item.answer})
  if split == "eval":
    (folder / "mcq").mkdir(exist_ok=True)
    for task, items in tasks.items():
      (folder / "mcq" / f"{task}.json").write_text(json.dumps(items, indent=1))
  tmp = annotation.with_suffix(".tmp")
  tmp.write_text(json.dumps(records, indent=1))
  tmp.rename(annotation)  # last: a killed generation is redone
  return annotation
