"""The synthetic preference (DPO) set: rows the reader takes whole, frame folders whose
pixels the chosen sentence describes and the rejected one gets wrong in one word."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ppllava_jax.data.dpo.rows import PreferenceBuilder, PreferenceConfig, read_preference_rows
from ppllava_jax.data.text.tokenizer import char_tokenizer
from ppllava_jax.eval import mcq
from ppllava_jax.models.tiny import TinyConfig
from ppllava_jax.train.run import synthetic
from ppllava_jax.train.run.config import SyntheticConfig

CFG = SyntheticConfig(videos=6, eval_videos=2, frames=4, size=56, seed=3)
ATTRIBUTES = tuple(q.task for q in synthetic.QUESTIONS)  # colour, shape, direction


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
  folder = tmp_path_factory.mktemp("preference")
  return folder, synthetic.generate_preference(CFG, folder)


def seen(frames_thwc) -> dict[str, str]:
  """What the pixels show, read without the generator: the shape is the pixels far from
  the background; its mean colour, its box's fill (circle pi/4, square 1; averaged over
  the frames, as a small circle's pixels vary), its drift."""
  mask_thw = np.abs(frames_thwc.astype(int) - synthetic.BACKGROUND).sum(-1) > 90
  rgb = frames_thwc[mask_thw].astype(float).mean(0)
  colour = min(synthetic.COLOURS, key=lambda c: np.linalg.norm(rgb - synthetic.COLOURS[c]))
  boxes = [np.nonzero(mask_hw) for mask_hw in mask_thw]
  fill = np.mean(
    [m.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1)) for m, (ys, xs) in zip(mask_thw, boxes)]
  )
  (y0, x0), (y1, x1) = (np.argwhere(m).mean(0) for m in (mask_thw[0], mask_thw[-1]))
  dx, dy = x1 - x0, y1 - y0
  direction = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
  return dict(colour=colour, shape="square" if fill > 0.9 else "circle", direction=direction)


def words(sentence: str) -> dict[str, str]:
  """The attributes a ``describe`` sentence names ("A red circle moves left.")."""
  _, colour, shape, _, direction = sentence.rstrip(".").split()
  return dict(colour=colour, shape=shape, direction=direction)


def test_describe_and_one_wrong_attribute_per_index():
  scene = synthetic.Scene("red", "circle", "left")
  assert synthetic.describe(scene) == "A red circle moves left."
  wrong = [synthetic.wrong_description(scene, i) for i in range(6)]
  assert wrong == [
    "A green circle moves left.",
    "A red square moves left.",
    "A red circle moves right.",
    "A blue circle moves left.",
    "A red square moves left.",
    "A red circle moves up.",
  ]


def test_rows_read_whole_and_describe_the_pixels(drawn):
  folder, path = drawn
  rows = read_preference_rows(path, media_root=str(folder))
  assert rows.skipped == () and len(rows.rows) == CFG.videos
  wrong_attributes = []
  for i, row in enumerate(rows.rows):
    files = sorted((folder / "frames" / f"{i:04d}").iterdir())
    assert [f.name for f in files] == [f"{n:06d}.jpg" for n in range(1, CFG.frames + 1)]
    assert row.video == str(folder / "frames" / f"{i:04d}")
    frames_thwc = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    assert frames_thwc.shape == (CFG.frames, CFG.size, CFG.size, 3)
    truth, chosen, rejected = seen(frames_thwc), words(row.chosen), words(row.rejected)
    assert chosen == truth, (row, truth)
    differ = [a for a in ATTRIBUTES if rejected[a] != truth[a]]
    assert len(differ) == 1, row
    wrong_attributes.append(differ[0])
    assert (row.id, row.question) == (f"synthetic_{i:04d}", synthetic.PREFERENCE_QUESTION)
    assert (row.answer, row.chosen_score, row.rejected_score) == (row.chosen, 5.0, 1.0)
  assert wrong_attributes == [ATTRIBUTES[i % 3] for i in range(CFG.videos)]
  raw = [json.loads(line) for line in path.read_text().splitlines()]
  assert all(r["prompt"].startswith("<video>\n") for r in raw)
  assert all(type(r["chosen_score"]) is float for r in raw)


def test_held_out_mcq_set_is_the_qa_sets(drawn, tmp_path):
  folder, _ = drawn
  items = mcq.load_mvbench(folder / "mcq")
  assert len(items) == 3 * CFG.eval_videos
  assert all((folder / "videos" / i.video).is_file() for i in items)
  assert (folder / "eval.json").is_file() and not (folder / "train.json").exists()
  synthetic.generate(CFG, tmp_path)
  for name in ("eval.json", *(f"mcq/{a}.json" for a in ATTRIBUTES)):
    assert (folder / name).read_text() == (tmp_path / name).read_text()


def test_regeneration_reuses_the_files(drawn):
  folder, path = drawn
  files = [path, folder / "eval.json", *sorted((folder / "frames").rglob("*.jpg"))]
  before = [f.stat().st_mtime_ns for f in files]
  assert synthetic.generate_preference(CFG, folder) == path
  assert [f.stat().st_mtime_ns for f in files] == before


def test_an_unfinished_generation_is_redone(tmp_path):
  cfg = SyntheticConfig(videos=2, frames=2, size=32)
  path = synthetic.generate_preference(cfg, tmp_path)
  text = path.read_text()
  path.unlink()  # as if killed before the rename
  (tmp_path / "frames" / "0001" / "000002.jpg").unlink()
  assert synthetic.generate_preference(cfg, tmp_path).read_text() == text
  assert (tmp_path / "frames" / "0001" / "000002.jpg").is_file()
  assert not (tmp_path / "videos").exists()  # no held-out set asked for


@pytest.mark.parametrize("template", ["vicuna_v1", "plain_v1"])
def test_a_dpo_sample_builds_from_the_first_row(drawn, template):
  folder, path = drawn
  tokenizer = char_tokenizer()
  model = TinyConfig(
    frames=4,
    image_size=56,
    patch_size=14,
    vision_width=32,
    vision_layers=1,
    llm_width=64,
    llm_layers=1,
    text_width=32,
    text_layers=1,
  ).model_config(len(tokenizer))
  build = PreferenceBuilder(
    tokenizer, model, tokenizer, PreferenceConfig(template=template, num_frames=CFG.frames)
  )
  row = read_preference_rows(path, media_root=str(folder)).rows[0]
  sample = build(row)
  assert sample.video.shape == (CFG.frames, 3, 56, 56)
  assert tokenizer.decode(sample.chosen_ids) == row.chosen + "</s>"
  assert tokenizer.decode(sample.rejected_ids) == row.rejected + "</s>"
