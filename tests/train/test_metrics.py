"""metrics.py without a training run: the ticks of loss.png against hand-worked values, the
picture's pixels from synthetic records, and resuming after a torn metrics.jsonl line."""

import json
import logging
import math

import numpy as np
import pytest
from PIL import Image

from ppllava_jax.files import DataFileError
from ppllava_jax.train.run import metrics

# ---- ticks -----------------------------------------------------------------------------


def test_nice_step_is_the_smallest_1_2_5_step_that_fits():
  assert metrics.nice_step(1000, 5) == 200  # 200 per step exactly
  assert metrics.nice_step(990, 5) == 200  # 198 -> 200
  assert metrics.nice_step(1.57, 5) == 0.5  # 0.314 -> 0.5
  assert metrics.nice_step(3, 5) == 1  # 0.6 -> 1
  assert metrics.nice_step(0.9, 5) == pytest.approx(0.2)  # 0.18 -> 0.2


def test_linear_ticks_cover_the_range_with_round_values():
  assert metrics.linear_ticks(10, 1000) == [0, 200, 400, 600, 800, 1000]
  assert metrics.linear_ticks(-0.37, 1.2) == [-0.5, 0, 0.5, 1, 1.5]
  assert metrics.linear_ticks(0.1, 0.7) == [0, 0.2, 0.4, 0.6, 0.8]  # not 0.6000000000000001
  assert metrics.linear_ticks(0, 100) == [0, 20, 40, 60, 80, 100]
  assert metrics.linear_ticks(2, 4, count=6, least=1) == [2, 3, 4]  # whole steps
  with pytest.raises(ValueError, match=r"hi > lo, got \[1, 1\]"):
    metrics.linear_ticks(1, 1)


def test_log_ticks_are_1_2_5_over_a_few_decades():
  # 2.7 decades / 12 = 0.225: 2 and 5 are 0.3 and 0.4 decades from their neighbours, 3 is
  # 0.18 from 2
  assert metrics.log_ticks(0.01, 5) == [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5]


def test_log_ticks_thin_out_to_powers_of_ten_over_many_decades():
  # 24 decades / 12: powers of ten two decades apart, from the lowest
  assert metrics.log_ticks(1e-12, 1e12) == [10.0**e for e in range(-12, 13, 2)]


def test_log_ticks_within_a_decade():
  assert metrics.log_ticks(0.5, 0.9) == [0.5, 0.6, 0.7, 0.8, 0.9]
  # 6 is 0.079 decades from 5 (< 0.975 / 12) and 7 0.058 from 8; the linear ones
  # (0.2, 0.4, 0.6, 0.8) would leave 0.09..0.2 bare
  assert metrics.log_ticks(0.09, 0.85) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.8]
  # 0.8, 0.9, 1 would leave 1..1.5 (0.18 decades) bare; linear ticks at most 0.1
  assert metrics.log_ticks(0.8, 1.5) == [0.8, 1, 1.2, 1.4]
  with pytest.raises(ValueError, match="0 < lo < hi"):
    metrics.log_ticks(0, 1)


def test_value_axis_is_log_for_a_positive_loss_else_linear():
  log = metrics.value_axis([0.01, 5], log=True)
  assert log.log and log.lo < 0.01 and log.hi > 5 and log.ticks[0] == 0.01
  assert log.fraction(math.sqrt(log.lo * log.hi)) == pytest.approx(0.5)  # the middle, in log
  # a value <= 0: no log axis; 5% wider, -0.46..5.26, is 1.14 per step of 5, so steps of 2
  linear = metrics.value_axis([-0.2, 5], log=True)
  assert not linear.log and linear.ticks == (-2, 0, 2, 4, 6) and (linear.lo, linear.hi) == (-2, 6)
  fixed = metrics.value_axis([30, 72], limits=(0, 100))
  assert (fixed.lo, fixed.hi, fixed.ticks) == (0, 100, (0, 20, 40, 60, 80, 100))
  assert metrics.step_axis([7]).ticks == (6, 7, 8)  # a lone step in the middle


# ---- the picture --------------------------------------------------------------------------

TRAINING, HELD_OUT, MCQ = ((31, 119, 180), (255, 127, 14), (44, 160, 44))


def decaying_loss(steps=1000):
  """A loss falling from 5 to 0.01 at a constant rate: 2.7 decades."""
  return [dict(step=s, loss=5 * 0.002 ** (s / steps), lr=1e-3) for s in range(1, steps + 1)]


def pixels(path):
  return np.asarray(Image.open(path).convert("RGB")).astype(int)


def near(image, colour, tolerance=40):
  return np.abs(image - np.array(colour)).sum(-1) < tolerance


def test_the_late_loss_curve_spans_a_visible_height(tmp_path):
  """Seen failing before: on a linear axis the loss after the first 20% of the steps was a
  line 72 px high in a 300 px panel (24%); on a log axis it is 160 px (53%)."""
  image = pixels(metrics.loss_curve(decaying_loss(), tmp_path / "loss.png"))
  assert image.shape == (300, 640, 3)
  rgb = image[30:]  # below the title and legend row
  curve = rgb.max(-1) - rgb.min(-1) > 80  # the only colourful pixels: grid and text are grey
  ys, xs = np.nonzero(curve)
  late = xs >= xs.min() + 0.2 * (xs.max() - xs.min())
  assert ys[late].max() - ys[late].min() > 0.4 * 300


def test_held_out_loss_and_the_mcq_panel_are_drawn(tmp_path):
  records = decaying_loss()
  records += [
    dict(step=s, eval_loss=6 * 0.002 ** (s / 1000), eval_tokens=10) for s in range(100, 1001, 100)
  ]
  records += [
    dict(step=s, mcq_accuracy=a, mcq_items=24)
    for s, a in zip((250, 500, 750, 1000), (30.0, 45.0, 60.0, 72.5))
  ]
  image = pixels(metrics.loss_curve(records, tmp_path / "loss.png"))
  assert image.shape == (600, 640, 3)  # the loss panel, then the accuracy panel
  loss, accuracy = image[30:300], image[330:]
  assert near(loss, HELD_OUT).sum() > 200  # ten markers and the line between
  assert near(loss, TRAINING).sum() > 300 and not near(accuracy, TRAINING).any()
  assert near(accuracy, MCQ).sum() > 100 and not near(loss, MCQ).any()
  # a chance level, when the records hold one, is a line across the accuracy panel only
  chance = pixels(
    metrics.loss_curve(records + [dict(step=1000, mcq_chance=25.0)], tmp_path / "chance.png")
  )
  changed = np.nonzero(np.abs(chance - image).sum(-1) > 60)[0]
  assert changed.size > 300 and changed.min() >= 300


def test_dpo_records_add_the_reward_panels(tmp_path):
  records = [
    {
      "step": s,
      "loss": 0.69 - s / 1000,
      "rewards/margins": (s - 100) / 100,
      "rewards/accuracies": s / 400,
    }
    for s in range(10, 400, 10)
  ]
  image = pixels(metrics.loss_curve(records, tmp_path / "loss.png"))
  assert image.shape == (900, 640, 3)  # loss, margins, accuracies
  assert near(image[330:600], (148, 103, 189)).sum() > 200  # the margins' colour
  assert near(image[630:], (214, 39, 40)).sum() > 200  # the accuracies'


def test_nan_none_and_missing_keys_draw_or_give_none(tmp_path):
  records = [
    dict(step=1, loss=float("nan")),
    dict(step=2, loss=3.0),
    dict(step=3),
    dict(step=4, eval_loss=None),
    dict(step=5, mcq_accuracy=None),
    dict(loss=2.0),
    dict(step=6, loss=float("inf")),
    dict(step=7, loss=2.5, mcq_chance=25.0),
  ]
  path = metrics.loss_curve(records, tmp_path / "loss.png")
  assert Image.open(path).size == (640, 300)  # the loss only: no accuracy to draw
  assert metrics.loss_curve(records[:1] + records[2:5], tmp_path / "none.png") is None
  assert not (tmp_path / "none.png").exists()
  one = metrics.loss_curve([dict(step=3, loss=0.0)], tmp_path / "one.png")  # linear, one point
  assert near(pixels(one), TRAINING).any()


# ---- resuming metrics.jsonl -------------------------------------------------------------


def test_a_torn_last_line_is_cut_and_the_run_resumes(tmp_path, caplog):
  """Seen failing before: the half line a killed run left stopped the next start."""
  whole = [dict(step=2, loss=3.0), dict(step=4, loss=2.0), dict(step=4, eval_loss=2.5)]
  torn = '{"loss": 1.5, "st'
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in whole) + torn)
  with caplog.at_level(logging.WARNING):
    writer = metrics.MetricsWriter(tmp_path, resume_step=4)
  writer.write(dict(step=6, loss=1.4))
  writer.close()
  assert metrics.read_metrics(tmp_path) == whole + [dict(step=6, loss=1.4)]
  assert f"metrics.jsonl: cut off a torn last line ({len(torn)} bytes)" in caplog.text


def test_a_broken_line_before_the_last_is_an_error_naming_it(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(
    '{"step": 2, "loss": 3.0}\n{"step": 4, "lo\n{"step": 6, "loss": 1.0}\n'
  )
  with pytest.raises(DataFileError, match=r"metrics\.jsonl:2: invalid JSON"):
    metrics.MetricsWriter(tmp_path, resume_step=6)
