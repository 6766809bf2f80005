"""MVBench / VideoMME protocols against strings and verdicts read off their sources.

Citations: orig = farewellthree/PPLLaVA d5766c8 (mvb = ppllava/test/mvbench/, vmme =
ppllava/test/video_mme/); lmms = EvolvingLMMs-Lab/lmms-eval (tasks/mvbench/utils.py,
tasks/videomme/utils.py and yaml files; commits named in ppllava_jax/eval/mcq.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ppllava_jax.data.text.templates import CHATML, VICUNA, render_generation_prompt
from ppllava_jax.eval.mcq import (
  LMMS_VIDEOMME_POST_PROMPT_LLAVA_VID,
  LmmsEvalProtocol,
  McqDataError,
  MVBenchItem,
  OriginalProtocol,
  VideoMMEItem,
  build_prompt,
  check_ans,
  lmms_mcq_extract,
  lmms_mcq_read,
  load_mvbench,
  load_videomme,
  numpy_array_text,
  score,
)
from ppllava_jax.files import DataFileError

INSTRUCTION = (
  "Select the best answer to the following multiple-choice question based on the "
  "video and the subtitles. Respond with only the letter (A, B, C, or D) of the "
  "correct option."
)  # orig vmme/videomme_infer.py:107 = lmms option_prompt

MVB = MVBenchItem(
  task="action_count",
  video="v.mp4",
  question="How many jumps?",
  candidates=("one", "two", "three"),
  answer="two",
)
VMME = VideoMMEItem(
  video_id="fFjv93ACGo8",
  duration="short",
  question="What is the man holding?",
  options=("A. A red umbrella.", "B. A book.", "C. A phone.", "D. Nothing."),
  answer="B",
  task_type="Object Recognition",
  subtitles=("Hello there.", "Bye."),
)
ORIGINAL, LMMS = OriginalProtocol(), LmmsEvalProtocol()


# --- prompts ---------------------------------------------------------------------------


def test_mvbench_original_prompt():
  # orig mvb/utils.py:57-66 qa_template (rstrip drops the last "\n"); :106 question +
  # question_prompt "\nOnly give the best option." (mv_bench_infer_mp.py:115);
  # answer_prompt "Best option:(" (:116); the processor gets data_sample['question'].
  block = "Question: How many jumps?\nOptions:\n(A) one\n(B) two\n(C) three"
  assert build_prompt(MVB, ORIGINAL) == (
    block + "\nOnly give the best option.",
    "Best option:(",
    block,
  )
  # mv_bench_infer_mp.py:114 system, prepended when --system_llm is *not* passed.
  with_system = build_prompt(MVB, OriginalProtocol(mvbench_system=True)).question
  assert with_system == (
    "Carefully watch the video and pay attention to the cause and sequence of events, the "
    "detail and movement of objects, and the action and pose of persons. Based on your "
    "observations, select the best option that accurately addresses the question.\n"
    + block
    + "\nOnly give the best option."
  )
  question, prefix, _ = build_prompt(MVB, ORIGINAL)
  assert render_generation_prompt(VICUNA, question, prefix).text == (
    "USER: <image>\n" + block + "\nOnly give the best option. ASSISTANT: Best option:("
  )


def test_mvbench_lmms_prompt():
  # lmms mvbench_doc_to_text: "Question:" + q + "\nOption:\n" + "(X) c\n"... + post_prompt,
  # post_prompt "Only give the best option.\n" in all 20 task yamls.
  question, prefix, scorer = build_prompt(MVB, LMMS)
  assert question == (
    "Question:How many jumps?\nOption:\n(A) one\n(B) two\n(C) three\nOnly give the best option.\n"
  )
  assert prefix == ""
  assert scorer == "Question:How many jumps?\nOption:\n(A) one\n(B) two\n(C) three"


def test_videomme_original_prompt():
  # orig vmme/utils.py:81-83 question + "\n" + str(options ndarray); videomme_infer.py
  # answer_prompt "The best answer is:"; vmme/utils.py:113 system + "\n" + question.
  block = (
    "What is the man holding?\n['A. A red umbrella.' 'B. A book.' 'C. A phone.' 'D. Nothing.']"
  )
  assert build_prompt(VMME, ORIGINAL) == (INSTRUCTION + "\n" + block, "The best answer is:", block)
  # vmme/utils.py:111 subtitles joined by " " (:74), then " \n".
  subbed = build_prompt(VMME, OriginalProtocol(subtitles=True))
  assert subbed.question == (
    "This video's subtitles are listed below: Hello there. Bye. \n" + INSTRUCTION + "\n" + block
  )
  assert subbed.scorer_text == block
  # `if data_sample['subtitles']`: no lines (or no file) falls back to the plain form.
  for lines in ((), None):
    bare = VideoMMEItem(**{**VMME.__dict__, "subtitles": lines})
    assert build_prompt(bare, OriginalProtocol(subtitles=True)).question == (
      INSTRUCTION + "\n" + block
    )


def test_videomme_lmms_prompts():
  options = "A. A red umbrella.\nB. A book.\nC. A phone.\nD. Nothing."
  block = "What is the man holding?\n" + options
  # lmms videomme_doc_to_text, post_prompt of the "default" kwargs in videomme.yaml.
  assert build_prompt(VMME, LMMS) == (
    INSTRUCTION + "\n" + block + "\n\nAnswer with the option's letter from the given "
    "choices directly.",
    "",
    block,
  )
  llava_vid = LmmsEvalProtocol(videomme_post_prompt=LMMS_VIDEOMME_POST_PROMPT_LLAVA_VID)
  assert build_prompt(VMME, llava_vid).question == (
    INSTRUCTION + "\n" + block + "\nThe best answer is:"
  )
  # lmms videomme_doc_to_text_subtitle: lines joined by "\n", fixed final prompt.
  subbed = LmmsEvalProtocol(subtitles=True)
  assert build_prompt(VMME, subbed).question == (
    "This video's subtitles are listed below: \nHello there.\nBye.\n"
    + INSTRUCTION
    + "\n"
    + block
    + "\nThe best answer is:"
  )
  no_file = VideoMMEItem(**{**VMME.__dict__, "subtitles": None})
  assert build_prompt(no_file, subbed).question.startswith(
    "This video's subtitles are listed below: \nNo subtitles available\n" + INSTRUCTION
  )


def test_chatml_wraps_the_same_question():
  question, prefix, _ = build_prompt(VMME, ORIGINAL)
  assert render_generation_prompt(CHATML, question, prefix).text == (
    "<|im_start|>user\n<image>\n"
    + question
    + "<|im_end|>\n<|im_start|>assistant\nThe best answer is:"
  )


# --- the NumPy array text --------------------------------------------------------------

OPTION_LISTS = [
  ["A. Yes.", "B. No."],
  list(VMME.options),
  [
    "A. The man in the blue jacket walks toward the red car parked by the old station.",
    "B. He's running",
    "C. \"quoted\" and 'single'",
    "D. x",
  ],
  ["A. " + "y" * 90, "B. short", "C. " + "z" * 70, "D. w"],
  ["A. Über straße — 東京", "B. tab\there", "C. back\\slash", "D. new\nline"],
  ["A. " + "word " * 14, "B. " + "word " * 14, "C. " + "word " * 14, "D. end"],
]


@pytest.mark.parametrize("options", OPTION_LISTS)
def test_numpy_array_text_matches_numpy(options):
  # pandas.read_parquet gives object arrays; numpy.array(list) gives a '<U' array.
  assert numpy_array_text(options) == str(np.array(options, dtype=object))
  assert numpy_array_text(options) == str(np.array(options))


@settings(max_examples=150, deadline=None)
@given(
  st.lists(st.text(max_size=90).filter(lambda s: not s.endswith("\x00")), min_size=1, max_size=6)
)
def test_numpy_array_text_matches_numpy_on_random_lists(options):
  assert numpy_array_text(options) == str(np.array(options, dtype=object))
  assert numpy_array_text(options) == str(np.array(options))


# --- readers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
  "pred, letter, expected",
  [
    ("(B) two", "B", True),
    ("(B) two", "A", False),
    ("(", "A", True),  # an empty reply after the "(" return prompt: a substring of all
    ("(a", "A", True),
    ("(A.", "A", True),  # periods dropped
    ("(A)\nbecause", "A", True),  # only spaces split words; "(a)" is inside
    ("(AB)", "A", False),
  ],
)
def test_check_ans(pred, letter, expected):
  # orig mvb/utils.py:140 check_ans with gt "(X) text".
  assert check_ans(pred, letter) is expected


@pytest.mark.parametrize(
  "text, expected",
  [
    ("B", "B"),
    ("b. two", "B"),
    ("(C) three", "C"),
    ("a man jumps", "A"),  # the article reads as option A
    ("I think it is two", "i think it is two"),  # no lone letter: the cleaned text
    ("", ""),
  ],
)
def test_lmms_mcq_read(text, expected):
  assert lmms_mcq_read(text) == expected


@pytest.mark.parametrize(
  "text, expected",
  [
    ("(B)", "B"),
    ("The answer is (C).", "C"),
    ("Best option: C", "C"),
    ("Answer: C", "C"),
    ("A man runs", "A"),  # "start": a capital followed by a non-letter
    ("the answer is c", ""),
    ("(b)", ""),  # lower case is never read
    ("", ""),
    ("I think B, final answer: D", "D"),
  ],
)
def test_lmms_mcq_extract_2026(text, expected):
  assert lmms_mcq_extract(text) == expected


# --- scoring quirks --------------------------------------------------------------------


def test_original_mvbench_counts_empty_replies_correct():
  preds = ["B) two", "", "A) one", "Best option:(A)", "AB"]
  report = score([MVB] * 5, preds, ORIGINAL)
  assert [o.reply for o in report.outcomes] == ["(B) two", "(", "(A) one", "(", "(AB"]
  assert [o.correct for o in report.outcomes] == [True, True, False, True, False]
  # A repeated prefix cuts the reply to "" (split(answer_prompt)[1], mvb/utils.py:122).
  assert [o.empty for o in report.outcomes] == [False, True, False, True, False]
  t = report.overall
  assert (t.correct, t.counted, t.total, t.empty, t.unparseable) == (3, 5, 5, 2, 1)
  assert t.accuracy == pytest.approx(60.0)


def test_ground_truth_letter_with_duplicate_candidates():
  # orig qa_template keeps the *last* equal candidate; lmms breaks at the first.
  item = MVBenchItem("t", "v", "Same?", ("yes", "no", "yes"), "yes")
  assert score([item], ["C) yes"], ORIGINAL).overall.correct == 1
  assert score([item], ["A) yes"], ORIGINAL).overall.correct == 0
  assert score([item], ["A"], LMMS).overall.correct == 1
  assert score([item], ["C"], LMMS).overall.correct == 0


def test_lmms_mvbench_reads_articles_and_skips_empty():
  preds = ["a man jumps", "", " ", "B. two", "(b)"]
  report = score([MVB] * 5, preds, LMMS)
  assert [o.letter for o in report.outcomes] == ["A", None, None, "B", "B"]
  assert [o.counted for o in report.outcomes] == [True, False, True, True, True]
  t = report.overall
  assert (t.correct, t.counted, t.empty, t.unparseable) == (2, 4, 2, 0)


def test_lmms_mvbench_overall_is_the_size_weighted_task_mean():
  other = MVBenchItem("state_change", "w.mp4", "Q?", ("x", "y"), "y")
  items = [MVB, MVB] + [other] * 4
  preds = ["B", "A", "", "B", "B", "B"]  # task 1: 1/2; task 2: 3/3 with one empty
  report = score(items, preds, LMMS)
  assert [t.accuracy for t in report.groups["task"]] == [pytest.approx(50.0), 100.0]
  assert report.overall.accuracy == pytest.approx((50 * 2 + 100 * 4) / 6)  # not 4/5
  assert score(items, preds, ORIGINAL).overall.accuracy == pytest.approx(100 * 5 / 6)


def test_videomme_scorers_differ_on_the_same_replies():
  preds = [" B", "Best option: C", "Answer: C", "I am not sure", "C"]
  items = [VMME] * 5
  # orig eval_result.py: "Answer:" is deleted, "Best option:" is not (fused with
  # "Best answer:"), and a reply without A-D leaves the denominator (:176).
  orig = score(items, preds, ORIGINAL)
  assert [o.letter for o in orig.outcomes] == ["B", "B", "C", None, "C"]
  assert (orig.overall.correct, orig.overall.counted, orig.overall.unparseable) == (2, 4, 1)
  # lmms 2024 regex: no "Answer:" in its list, so "Answer" gives A; every item counts.
  old = score(items, preds, LMMS)
  assert [o.letter for o in old.outcomes] == ["B", "B", "A", None, "C"]
  assert (old.overall.correct, old.overall.counted) == (2, 5)
  new = score(items, preds, LmmsEvalProtocol(videomme_extractor="2026"))
  assert [o.letter for o in new.outcomes] == ["B", "C", "C", None, "C"]
  assert (new.overall.correct, new.overall.counted) == (1, 5)


def test_original_videomme_reply_is_cut_at_a_repeated_prefix():
  report = score([VMME], ["B The best answer is: C"], ORIGINAL)
  assert report.outcomes[0].reply == "B"


def test_videomme_groups_and_report_forms():
  long_item = VideoMMEItem(**{**VMME.__dict__, "duration": "long", "task_type": "OCR Problems"})
  report = score([VMME, long_item, long_item], ["B", "A", "xyz"], ORIGINAL)
  assert [(t.name, t.correct, t.counted, t.total) for t in report.groups["duration"]] == [
    ("short", 1, 1, 1),
    ("long", 0, 1, 2),
  ]
  assert [t.name for t in report.groups["task_type"]] == ["Object Recognition", "OCR Problems"]
  data = json.loads(json.dumps(report.to_dict()))
  assert data["protocol"] == {"name": "original", "mvbench_system": False, "subtitles": False}
  assert data["overall"]["accuracy"] == pytest.approx(50.0)
  table = report.table()
  assert "VideoMME, protocol original" in table
  assert any(line.split()[:3] == ["duration", "long", "0.00"] for line in table.splitlines())
  assert table.splitlines()[-1].split() == ["overall", "all", "50.00", "1", "2", "3", "0", "1"]


def test_score_validates_its_inputs():
  with pytest.raises(ValueError, match="2 items but 1 predictions"):
    score([MVB, MVB], ["A"], ORIGINAL)
  with pytest.raises(ValueError, match="mix"):
    score([MVB, VMME], ["A", "B"], ORIGINAL)
  with pytest.raises(ValueError, match="videomme_extractor"):
    LmmsEvalProtocol(videomme_extractor="2025")


# --- loaders ---------------------------------------------------------------------------


def test_load_mvbench_file_and_folder(tmp_path):
  rows = [
    {
      "video": "a.mp4",
      "question": "Q?",
      "candidates": ["x", "y"],
      "answer": "y",
      "start": 1.5,
      "end": 4,
    }
  ]
  (tmp_path / "action_sequence.json").write_text(json.dumps(rows))
  (tmp_path / "state_change.json").write_text(json.dumps(rows * 2))
  items = load_mvbench(tmp_path)
  assert [i.task for i in items] == ["action_sequence", "state_change", "state_change"]
  assert items[0] == MVBenchItem("action_sequence", "a.mp4", "Q?", ("x", "y"), "y", 1.5, 4)
  assert load_mvbench(tmp_path / "state_change.json", task="Renamed")[0].task == "Renamed"


@pytest.mark.parametrize(
  "row, message",
  [
    ({"video": "a", "question": "Q", "answer": "x"}, r"item 1: field 'candidates' is missing"),
    (
      {"video": "a", "question": "Q", "candidates": "xy", "answer": "x"},
      r"item 1: field 'candidates' must be list or tuple, got str",
    ),
    (
      {"video": "a", "question": "Q", "candidates": ["x", 2], "answer": "x"},
      r"item 1: field 'candidates' must be a list of strings",
    ),
    (
      {"video": "a", "question": "Q", "candidates": ["x"], "answer": "z"},
      r"item 1: field 'answer' 'z' is not one of the candidates",
    ),
    (
      {"video": "a", "question": "Q", "candidates": ["x"], "answer": "x", "start": "0"},
      r"item 1: field 'start' must be int or float",
    ),
  ],
)
def test_load_mvbench_errors_name_file_item_and_field(tmp_path, row, message):
  good = {"video": "a", "question": "Q", "candidates": ["x"], "answer": "x"}
  path = tmp_path / "task.json"
  path.write_text(json.dumps([good, row]))
  with pytest.raises(McqDataError, match=rf"task\.json: {message}"):
    load_mvbench(path)


def _videomme_row(**changes):
  row = {
    "videoID": "fFjv93ACGo8",
    "duration": "short",
    "question": "What?",
    "options": ["A. a", "B. b", "C. c", "D. d"],
    "answer": "B",
    "question_id": "001-1",
    "task_type": "Counting Problem",
    "domain": "Knowledge",
    "sub_category": "Law",
  }
  return {**row, **changes}


def test_load_videomme_json_and_jsonl(tmp_path):
  rows = [_videomme_row(), _videomme_row(duration="long", subtitles=["hi", "bye"])]
  (tmp_path / "q.json").write_text(json.dumps(rows))
  (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
  items = load_videomme(tmp_path / "q.json")
  assert items == load_videomme(tmp_path / "q.jsonl")
  assert items[0].options == ("A. a", "B. b", "C. c", "D. d") and items[0].subtitles is None
  assert items[1].subtitles == ("hi", "bye")
  (tmp_path / "s.json").write_text(json.dumps([_videomme_row(subtitles="one text")]))
  assert load_videomme(tmp_path / "s.json")[0].subtitles == ("one text",)


def test_load_videomme_parquet(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  rows = [_videomme_row(), _videomme_row(answer="D")]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test-00000-of-00001.parquet")
  items = load_videomme(tmp_path / "test-00000-of-00001.parquet")
  assert [i.answer for i in items] == ["B", "D"] and items[0].task_type == "Counting Problem"


@pytest.mark.parametrize(
  "row, message",
  [
    (_videomme_row(duration="tiny"), r"item 0: field 'duration' must be one of"),
    (_videomme_row(answer="E"), r"item 0: field 'answer' must be a letter A-D, got 'E'"),
    (
      {k: v for k, v in _videomme_row().items() if k != "videoID"},
      r"item 0: field 'videoID' is missing",
    ),
    (_videomme_row(options=[]), r"item 0: field 'options' must hold 1 to 26 options, got 0"),
  ],
)
def test_load_videomme_errors(tmp_path, row, message):
  path = tmp_path / "v.json"
  path.write_text(json.dumps([row]))
  with pytest.raises(McqDataError, match=rf"v\.json: {message}"):
    load_videomme(path)


def test_loader_file_level_errors(tmp_path):
  (tmp_path / "bad.jsonl").write_text(json.dumps(_videomme_row()) + "\n{oops\n")
  with pytest.raises(DataFileError, match=r"bad\.jsonl:2: invalid JSON"):
    load_videomme(tmp_path / "bad.jsonl")
  (tmp_path / "obj.json").write_text("{}")
  with pytest.raises(DataFileError, match=r"obj\.json: expected a JSON array, found an object"):
    load_videomme(tmp_path / "obj.json")
  with pytest.raises(McqDataError, match=r"unknown format '\.csv'"):
    load_videomme(tmp_path / "x.csv")
  with pytest.raises(DataFileError, match=r"missing\.json: cannot be read: No such file"):
    load_mvbench(tmp_path / "missing.json")
