"""lmms-eval MVBench's aggregation: a task with nothing counted scores 0, not "none"."""

import pytest

from ppllava_jax.eval.mcq import (
  LmmsEvalProtocol,
  MVBenchItem,
  OriginalProtocol,
  VideoMMEItem,
  score,
)

ITEM = MVBenchItem("action_count", "v.mp4", "How many?", ("one", "two"), "two")
OTHER = MVBenchItem("state_change", "w.mp4", "Q?", ("x", "y"), "y")


def test_lmms_mvbench_task_with_nothing_counted_scores_zero():
  """``mvbench_aggregate_results``: ``... if total_answered > 0 else 0``. Seen failing
  before: the task's accuracy was None (``null`` in results.json)."""
  report = score([ITEM, ITEM, OTHER], ["", "", "B"], LmmsEvalProtocol())
  (empty, answered) = report.groups["task"]
  assert (empty.name, empty.accuracy, empty.counted) == ("action_count", 0.0, 0)
  assert answered.accuracy == pytest.approx(100.0)
  assert report.overall.accuracy == pytest.approx(100 / 3)
  assert ["task", "action_count", "0.00"] in [l.split()[:3] for l in report.table().splitlines()]


def test_the_original_protocol_keeps_none_where_nothing_counts():
  """The original's VideoMME leaves unparseable replies out; with none left there is no
  score, and its table prints "-"."""
  item = VideoMMEItem("v", "short", "Q?", ("A. a", "B. b"), "A")
  assert score([item], ["no idea"], OriginalProtocol()).overall.accuracy is None
