"""Job ids that stay put when the inputs around them change; the open-ended file's checks."""

import json

import pytest

from ppllava_jax.data.text.templates import VICUNA
from ppllava_jax.eval import mcq
from ppllava_jax.eval.jobs import mcq_jobs, video_job
from ppllava_jax.eval.qa import load_qa

ROW = dict(video="a.mp4", question="Q?", candidates=["x", "y"], answer="y")


def _ids(items, tmp_path):
  return [job.id for job in mcq_jobs(items, mcq.OriginalProtocol(), VICUNA, tmp_path, None)]


def test_mvbench_ids_count_within_each_task_file(tmp_path):
  """Seen failing before: a task file sorted first moved object_shuffle/0 to /2."""
  (tmp_path / "object_shuffle.json").write_text(json.dumps([ROW, ROW]))
  alone = _ids(mcq.load_mvbench(tmp_path), tmp_path)
  (tmp_path / "action_count.json").write_text(json.dumps([ROW, ROW]))
  assert alone == ["object_shuffle/0", "object_shuffle/1"]
  assert _ids(mcq.load_mvbench(tmp_path), tmp_path) == [
    "action_count/0",
    "action_count/1",
    "object_shuffle/0",
    "object_shuffle/1",
  ]


def test_videomme_ids_are_question_ids_else_per_video_counts(tmp_path):
  item = mcq.VideoMMEItem("vid", "short", "Q?", ("A. a", "B. b"), "A", question_id="001-1")
  bare = mcq.VideoMMEItem("vid", "short", "Q?", ("A. a", "B. b"), "A")
  other = mcq.VideoMMEItem("other", "long", "Q?", ("A. a", "B. b"), "A")
  assert _ids([item, bare, other, bare], tmp_path) == ["001-1", "vid/1", "other/0", "vid/2"]


def test_one_video_ids_name_the_video_and_the_question():
  ids = {video_job(v, q, VICUNA, None).id for v in ("a.mp4", "b.mp4") for q in ("Q?", "R?")}
  assert len(ids) == 4 and all(i.startswith(("a.mp4/", "b.mp4/")) for i in ids)
  assert video_job("a.mp4", "Q?", VICUNA, None).id == video_job("a.mp4", "Q?", VICUNA, 8).id


def test_load_qa_reads_ids_and_line_numbers(tmp_path):
  path = tmp_path / "qa.jsonl"
  path.write_text(
    json.dumps(dict(id=7, video="a.mp4", question="Q?"))
    + "\n\n"
    + json.dumps(dict(video="b.mp4", question="R?"))
    + "\n"
  )
  assert [(i.id, i.video, i.question) for i in load_qa(path)] == [
    ("7", "a.mp4", "Q?"),
    ("3", "b.mp4", "R?"),
  ]


@pytest.mark.parametrize(
  "lines, message",
  [
    (
      [
        '{"video": "a.mp4", "question": "Q?"',
      ],
      r"qa\.jsonl:1: invalid JSON: ",
    ),
    (['["a.mp4"]'], r"qa\.jsonl:1: expected a JSON object, found an array"),
    (['{"question": "Q?"}'], r"qa\.jsonl:1: field 'video' must be a non-blank string, got None"),
    (['{"video": "a.mp4", "question": 3}'], r"qa\.jsonl:1: field 'question' must be a non-blank"),
    (
      ['{"id": true, "video": "a.mp4", "question": "Q?"}'],
      r"qa\.jsonl:1: field 'id' must be a string or an integer",
    ),
    (
      [
        '{"id": "x", "video": "a.mp4", "question": "Q?"}',
        "",
        '{"id": "x", "video": "b.mp4", "question": "R?"}',
      ],
      r"qa\.jsonl:3: id 'x' is already used on line 1",
    ),
  ],
)
def test_load_qa_errors_name_the_file_and_line(tmp_path, lines, message):
  path = tmp_path / "qa.jsonl"
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=message):
    load_qa(path)
