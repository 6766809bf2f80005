import argparse
import collections
import dataclasses
import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ppllava_jax.config import load_config
from ppllava_jax.data.batching import IGNORE
from ppllava_jax.data.media.video import load_video
from ppllava_jax.data.processor import Media, Processor, Prompt
from ppllava_jax.data.sft.samples import build_sample
from ppllava_jax.data.text.templates import VICUNA
from ppllava_jax.data.text.tokenizer import char_tokenizer
from ppllava_jax.demo import DemoConfig
from ppllava_jax.eval import mcq
from ppllava_jax.eval.heatmap import colorbar, relevance_grid
from ppllava_jax.eval.jobs import mcq_jobs
from ppllava_jax.models.tiny import TinyConfig
from ppllava_jax.train.run import synthetic
from ppllava_jax.train.run.config import SyntheticConfig

ROOT = Path(__file__).resolve().parents[1]
INFERNO_TOP, INFERNO_BOTTOM = (252, 255, 164), (0, 0, 4)


def test_train_cli_without_arguments_prints_usage_and_exits_2():
  done = subprocess.run(
    [sys.executable, str(ROOT / "train.py")], capture_output=True, text=True, cwd=ROOT, check=False
  )
  assert done.returncode == 2
  assert done.stderr.startswith("usage:") and "--config" in done.stderr


def test_train_help_shows_export_and_only_keys_that_exist():
  done = subprocess.run(
    [sys.executable, str(ROOT / "train.py"), "--help"],
    capture_output=True,
    text=True,
    cwd=ROOT,
    check=True,
  )
  assert "train.py export --workdir DIR --out DIR [--step N]" in done.stdout
  from ppllava_jax.config import apply_overrides, load_config
  from ppllava_jax.train.run import config as rc

  cfg = load_config(ROOT / "configs" / "sft_vicuna7b.py", rc.RunConfig)
  keys = re.findall(r"\b((?:steps|train|data|model)[\w.]*)=", done.stdout)
  assert keys and all(
    apply_overrides(cfg, [f"{k}=1e-4" if "lr" in k else f"{k}=7"])
    for k in keys
    if "corpora" not in k
  ), keys


def _is_sentence(text: str) -> bool:
  text = " ".join(text.split())
  return text[:1].isupper() and text.endswith(".")


@pytest.mark.parametrize("script", ["convert.py", "train.py"])
def test_cli_help_is_whole_sentences_and_says_where_output_goes(script):
  parser = runpy.run_path(str(ROOT / script))["build_parser"]()
  helps = [a.help for a in parser._actions if not isinstance(a, argparse._HelpAction)]
  assert helps and all(_is_sentence(h) for h in helps), helps
  assert _is_sentence(parser.description)
  epilog = parser.epilog.split("\n\n")[-1]  # after convert.py's usage lines
  assert _is_sentence(epilog) and "writes" in epilog, epilog


def test_load_config_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="config file not found"):
    load_config(tmp_path / "missing.py")
  (tmp_path / "empty.py").write_text("x = 1\n")
  with pytest.raises(ValueError, match="defines no get_config"):
    load_config(tmp_path / "empty.py")
  (tmp_path / "config.json").write_text("{}")  # not a Python file: no loader claims it
  with pytest.raises(ValueError, match="config.json: a config is a Python file"):
    load_config(tmp_path / "config.json")
  (tmp_path / "wrong.py").write_text("def get_config():\n  return 3\n")
  with pytest.raises(ValueError, match="returned int, expected DemoConfig"):
    load_config(tmp_path / "wrong.py", DemoConfig)
  cfg = load_config(ROOT / "configs" / "demo.py", DemoConfig)
  assert dataclasses.asdict(cfg) == dataclasses.asdict(DemoConfig())


# ---- the synthetic set ----------------------------------------------------------------


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
  """24 held-out videos (one of each combination) and 2 training ones, at 126 pixels."""
  folder = tmp_path_factory.mktemp("synthetic")
  synthetic.generate(SyntheticConfig(videos=2, eval_videos=24, frames=8, size=126), folder)
  return folder


def _seen(frames_thwc):
  """What the pixels show: (colour, shape, direction), read back without the generator."""
  mask_thw = np.abs(frames_thwc.astype(int) - synthetic.BACKGROUND).sum(-1) > 90
  pixels = frames_thwc[mask_thw].astype(float)
  rgb = pixels.mean(0)
  colour = min(synthetic.COLOURS, key=lambda c: np.linalg.norm(rgb - synthetic.COLOURS[c]))
  ys, xs = np.nonzero(mask_thw[0])
  fill = mask_thw[0].sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))  # circle pi/4, square 1
  shape = "square" if fill > 0.9 else "circle"
  (y0, x0), (y1, x1) = (np.argwhere(m).mean(0) for m in (mask_thw[0], mask_thw[-1]))
  dx, dy = x1 - x0, y1 - y0
  direction = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
  return dict(colour=colour, shape=shape, direction=direction)


def test_mcq_files_load_are_balanced_and_each_answer_is_what_the_pixels_show(drawn):
  items = mcq.load_mvbench(drawn / "mcq")
  assert sorted({i.task for i in items}) == ["colour", "direction", "shape"]
  assert len(items) == 3 * 24
  for question in synthetic.QUESTIONS:
    answers = collections.Counter(i.answer for i in items if i.task == question.task)
    # every candidate equally often: chance is 1 / candidates, and so is any constant answer
    assert answers == {c: 24 // len(question.candidates) for c in question.candidates}
  videos = {}
  for item in items:
    if item.video not in videos:
      frames_thwc, _ = load_video(drawn / "videos" / item.video, 8)
      videos[item.video] = _seen(frames_thwc)
    assert videos[item.video][item.task] == item.answer, (item, videos[item.video])
  assert len(videos) == 24  # the held-out videos, none of the training ones
  positions = {(s.lane, s.start) for s in synthetic.scenes(24, 1)}
  assert len(positions) == 24  # each video runs its own path


def test_training_text_is_the_eval_prompt_then_the_answer(drawn):
  """The record of a held-out question, built as training builds it, starts with the
  ids eval.py feeds the model for that question; what follows (supervised) is the
  option the pixels show."""
  tokenizer = char_tokenizer()
  model = TinyConfig(
    frames=4,
    image_size=126,
    patch_size=14,
    vision_width=32,
    vision_layers=1,
    llm_width=64,
    llm_layers=1,
    text_width=32,
    text_layers=1,
  ).model_config(len(tokenizer))
  records = json.loads((drawn / "eval.json").read_text())
  items = mcq.load_mvbench(drawn / "mcq")
  by_question = {(i.video, i.question): i for i in items}
  processor = Processor(model, tokenizer, tokenizer)
  for index, record in enumerate(records[:3]):  # one video's three questions
    sample = build_sample(
      record,
      tokenizer=tokenizer,
      scorer_tokenizer=tokenizer,
      model=model,
      media_root=str(drawn / "videos"),
      num_frames=4,
      index=index,
    )
    question = next(
      i
      for (v, q), i in by_question.items()
      if v == record["video"] and f"Question: {q}\n" in record["QA"][0]["q"]
    )
    job = mcq_jobs([question], mcq.OriginalProtocol(), VICUNA, drawn / "videos", 4)[0]
    frames_thwc, _ = load_video(job.media[0].path, 4)
    eval_ids = processor.encode(
      Prompt(job.text, (Media("video", frames_thwc),), job.scorer_text)
    ).input_ids
    assert job.text.endswith("ASSISTANT: Best option:(")
    assert sample.text.startswith(tokenizer.bos_token + job.text)
    np.testing.assert_array_equal(sample.input_ids[: len(eval_ids)], eval_ids)
    letter = mcq.LETTERS[question.candidates.index(question.answer)]
    supervised = tokenizer.decode(sample.labels[sample.labels != IGNORE])
    assert supervised == f"Best option:({letter}) {question.answer}</s>"


def test_sft_tiny_pools_the_whole_frame():
  """126-pixel frames of 14-pixel patches: the (2, 3, 3) windows tile the 9 x 9 grid, so
  no patch row or column (where a shape may be) is left out of the pooled tokens."""
  from ppllava_jax.ops.geometry import pool_geometry
  from ppllava_jax.train.run.config import RunConfig

  cfg = load_config(ROOT / "configs" / "sft_tiny.py", RunConfig)
  g = cfg.model.tiny.image_size // cfg.model.tiny.patch_size
  out, kernel, _ = pool_geometry((cfg.model.tiny.frames, g, g), kernel=cfg.model.tiny.kernel)
  assert [o * k for o, k in zip(out, kernel)] == [cfg.model.tiny.frames, g, g]


# ---- the heat-map's colour bar --------------------------------------------------------


def test_heatmap_colour_bar_reads_the_maps_range():
  probs = np.linspace(-0.05, 0.2, 2 * 9 * 9).reshape(2, 9, 9)
  bare = relevance_grid(probs, cell=48)
  img = relevance_grid(probs, cell=48, colorbar_label="cosine")
  assert img.height == bare.height and img.width > bare.width
  strip = np.asarray(img)[:, bare.width :]
  # the ramp's first column: brightest at the top (the maximum), darkest at the bottom
  column = strip[14 : 14 + 48, 8]
  assert tuple(column[0]) == INFERNO_TOP and tuple(column[-1]) == INFERNO_BOTTOM
  lum = column.astype(float) @ np.array([0.299, 0.587, 0.114])
  assert (np.diff(lum) <= 1e-9).all()
  bar = colorbar(-0.05, 0.2, 100, "cosine")
  ink = np.asarray(bar)[:, 20:].min(-1) < 128  # the labels right of the ramp
  assert ink[:14].any() and ink[14:30].any() and ink[-15:].any()  # label, max, min


# ---- the demo, end to end -------------------------------------------------------------


def test_demo_trains_evaluates_and_reports_beside_chance(tmp_path):
  """As the README runs it, ``python -m ppllava_jax.demo --config FILE`` (a file that
  imports DemoConfig from ppllava_jax.demo, as configs/demo.py does), a few steps."""
  # enough steps to answer in words: eval.py refuses to score a run of empty answers
  small = dict(steps=30, videos=4, eval_videos=2, eval_batch_size=6, max_new_tokens=3)
  (tmp_path / "small.py").write_text(
    "from ppllava_jax.demo import DemoConfig\n"
    f"def get_config():\n  return DemoConfig(**{small!r})\n"
  )
  out = tmp_path / "out"
  done = subprocess.run(
    [
      sys.executable,
      "-m",
      "ppllava_jax.demo",
      "--config",
      str(tmp_path / "small.py"),
      "--out",
      str(out),
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    check=False,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  printed = done.stdout
  results = json.loads((out / "eval" / "results.json").read_text())
  assert results["items"] == 6 and not results["failed"]
  for task, chance in (("colour", 33.3), ("shape", 50.0), ("direction", 25.0)):
    tally = next(t for t in results["groups"]["task"] if t["name"] == task)
    line = next(x for x in printed.splitlines() if x.strip().startswith(task))
    assert f"{tally['accuracy']:.1f}%" in line and f"{chance:.1f}%" in line, line
  assert "says nothing about real videos or real benchmarks" in printed
  assert f"python train.py --config configs/sft_tiny.py --workdir {out / 'train'}" in printed
  assert f"python eval.py --checkpoint {out / 'model'}" in printed
  assert (out / "train" / "loss.png").is_file() and f"{out / 'train' / 'loss.png'}" in printed
  heatmap = Image.open(out / "relevance.png")
  assert heatmap.width > 4 * 96  # four frames' tiles and the colour bar
  assert sorted(p.name for p in (out / "eval" / "maps").iterdir())[0] == "colour_0.png"
