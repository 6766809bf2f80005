"""Synthetic video sets whose answers can be read from the pixels: QA and preference.

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

The preference (DPO) set, ``generate_preference``, draws the same training scenes (the
same ``SyntheticConfig`` gives the same videos as the QA set) into ``folder``:

- ``frames/{i:04d}/``: each training video as a folder of ``000001.jpg``, ... (Pillow,
  quality 95), the form of the original's DPO videos (LLaVA-Hound's frame folders), so
  the DPO run reads them as it reads the real data. Chroma is kept whole (4:4:4):
  Pillow's default 4:2:0 rounds a small square's corners (at 56 pixels its box fill
  falls to 0.86, a circle's reaches 0.85), blurring the shape the answer depends on;
- ``preference.jsonl``: one LLaVA-Hound row per video (``data.dpo.rows``): the fixed
  ``PREFERENCE_PROMPT``, chosen ``describe(scene)`` ("A red circle moves left."),
  rejected ``wrong_description(scene, i)``;
- with ``eval_videos``, the QA set's held-out videos, ``mcq/`` and ``eval.json``
  (the same files), for an MCQ evaluation during DPO.

Decisions:

- The rejected sentence is the chosen one with exactly one attribute wrong: the two
  differ in one word, the same question asks for both, and only the pixels tell which
  word is right.
- Balanced like the QA set: the chosen sentences describe its balanced scenes, the
  wrong attribute cycles colour / shape / direction with the row's index (each wrong in
  a third of the rows), and the wrong value cycles over the attribute's other
  candidates, so no attribute or word marks a side (in expectation: the scenes' shuffle
  leaves small sets a little uneven).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from ppllava_jax.data.media.video import write_video
from ppllava_jax.eval.mcq import LETTERS, MVBenchItem, OriginalProtocol, build_prompt
from ppllava_jax.train.run.config import SyntheticConfig

PREFERENCE_QUESTION = "Describe the shape in the video and how it moves."
PREFERENCE_PROMPT = f"<video>\n{PREFERENCE_QUESTION}"  # LLaVA-Hound's placeholder first
SCORES = {"chosen": 5.0, "rejected": 1.0}  # LLaVA-Hound's scale; kept, not used by DPO

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}
SHAPES = ("circle", "square")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUND = 96


@dataclasses.dataclass(frozen=True)
class Question:
  task: str  # the MVBench task file's stem
  text: str
  candidates: tuple[str, ...]


QUESTIONS = (
  Question("colour", "What colour is the shape?", tuple(COLOURS)),
  Question("shape", "Is it a circle or a square?", SHAPES),
  Question("direction", "Which way does it move?", tuple(DIRECTIONS)),
)


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

  def draw(self, count: int, size: int) -> Iterator[np.ndarray]:
    """This scene's ``frames``."""
    return frames(
      COLOURS[self.colour],
      self.shape,
      self.direction,
      count,
      size,
      lane=self.lane,
      start=self.start,
      end=self.end,
      radius=self.radius,
    )


def frames(
  colour,
  shape: str,
  direction: str,
  count: int,
  size: int,
  *,
  lane: float = 0.5,
  start: float = 0.25,
  end: float = 0.75,
  radius: float = 0.18,
) -> Iterator[np.ndarray]:
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
  order = np.concatenate([rng.permutation(len(combos)) for _ in range(-(-count // len(combos)))])[
    :count
  ]
  return [
    Scene(  # type: ignore[misc]  # combos[k] (k from numpy) is a (colour, shape, direction)
      *combos[k],
      lane=float(rng.uniform(0.3, 0.7)),
      start=float(rng.uniform(0.2, 0.3)),
      end=float(rng.uniform(0.7, 0.8)),
      radius=float(rng.uniform(0.16, 0.2)),
    )
    for k in order
  ]


def mcq_item(question: Question, video: str, answer: str) -> MVBenchItem:
  return MVBenchItem(
    task=question.task,
    video=video,
    question=question.text,
    candidates=question.candidates,
    answer=answer,
  )


def qa_turn(item: MVBenchItem) -> dict[str, str]:
  """The training turn for ``item``: the original protocol's question text, and its
  answer prefix followed by the right option (module doc)."""
  prompt = build_prompt(item, OriginalProtocol())
  letter = LETTERS[item.candidates.index(item.answer)]
  return {"q": prompt.question, "a": f"{prompt.answer_prefix}{letter}) {item.answer}"}


def describe(scene: Scene) -> str:
  """The sentence that is right for ``scene``'s pixels."""
  return f"A {scene.colour} {scene.shape} moves {scene.direction}."


def wrong_scene(scene: Scene, i: int) -> Scene:
  """``scene`` with one attribute wrong: ``QUESTIONS[i % 3]``'s, set to another of its
  candidates, cycling with ``i // 3`` (module doc)."""
  question = QUESTIONS[i % len(QUESTIONS)]
  others = [c for c in question.candidates if c != scene.answer(question.task)]
  # question.task names one of Scene's str fields
  return dataclasses.replace(scene, **{question.task: others[i // len(QUESTIONS) % len(others)]})  # type: ignore[arg-type]


def wrong_description(scene: Scene, i: int) -> str:
  return describe(wrong_scene(scene, i))


def preference_row(scene: Scene, i: int) -> dict:
  """Training video ``i``'s LLaVA-Hound row; its video path relative to the set's folder."""
  chosen = describe(scene)
  return {
    "id": f"synthetic_{i:04d}",
    "prompt": PREFERENCE_PROMPT,
    "answer": chosen,
    "video": f"frames/{i:04d}",
    "chosen": chosen,
    "rejected": wrong_description(scene, i),
    "chosen_score": SCORES["chosen"],
    "rejected_score": SCORES["rejected"],
  }


def generate(cfg: SyntheticConfig, folder: str | Path) -> Path:
  """Writes (or reuses) the QA set in ``folder``; returns the training annotation file."""
  folder = Path(folder)
  _write_eval(folder, cfg)
  return _write(folder, "train", cfg.videos, cfg.seed, cfg)


def generate_preference(cfg: SyntheticConfig, folder: str | Path) -> Path:
  """Writes (or reuses) the preference set in ``folder`` (module doc); returns
  ``preference.jsonl``, whose video paths are relative to ``folder`` (the media root)."""
  folder = Path(folder)
  _write_eval(folder, cfg)
  path = folder / "preference.jsonl"
  if path.is_file():
    return path
  rows = []
  for i, scene in enumerate(scenes(cfg.videos, cfg.seed)):
    video = folder / "frames" / f"{i:04d}"
    video.mkdir(parents=True, exist_ok=True)
    for n, frame_hwc in enumerate(scene.draw(cfg.frames, cfg.size), 1):
      Image.fromarray(frame_hwc).save(video / f"{n:06d}.jpg", quality=95, subsampling=0)
    rows.append(preference_row(scene, i))
  return _replace(path, "".join(json.dumps(row) + "\n" for row in rows))


def _write_eval(folder: Path, cfg: SyntheticConfig) -> None:
  """The held-out videos, ``mcq/`` and ``eval.json``, shared by both sets."""
  if cfg.eval_videos:
    _write(folder, "eval", cfg.eval_videos, cfg.seed + 1, cfg)


def _replace(path: Path, text: str) -> Path:
  """Writes ``path`` whole or not at all; the last step of a generation, so a killed one
  leaves no ``path`` and is redone."""
  tmp = path.with_suffix(".tmp")
  tmp.write_text(text)
  tmp.rename(path)
  return path


def _write(folder: Path, split: str, count: int, seed: int, cfg: SyntheticConfig) -> Path:
  annotation = folder / f"{split}.json"
  if annotation.is_file():
    return annotation
  (folder / "videos").mkdir(parents=True, exist_ok=True)
  tasks: dict[str, list[dict[str, object]]]
  records, tasks = [], {q.task: [] for q in QUESTIONS}
  for i, scene in enumerate(scenes(count, seed)):
    name = f"{i:04d}.mp4" if split == "train" else f"{split}_{i:04d}.mp4"
    write_video(folder / "videos" / name, scene.draw(cfg.frames, cfg.size))
    for question in QUESTIONS:
      item = mcq_item(question, name, scene.answer(question.task))
      records.append({"video": name, "QA": [qa_turn(item)]})
      tasks[question.task].append(
        {
          "video": name,
          "question": item.question,
          "candidates": list(item.candidates),
          "answer": item.answer,
        }
      )
  if split == "eval":
    (folder / "mcq").mkdir(exist_ok=True)
    for task, items in tasks.items():
      (folder / "mcq" / f"{task}.json").write_text(json.dumps(items, indent=1))
  return _replace(annotation, json.dumps(records, indent=1))
