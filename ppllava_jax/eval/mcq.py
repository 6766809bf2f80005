"""Multiple-choice video benchmarks (MVBench, VideoMME): items, prompts and scorers.

A protocol is a prompt builder, an answer prefix and a scorer, reproduced exactly,
quirks included, because each changes published numbers:

``OriginalProtocol``: PPLLaVA's scripts (farewellthree/PPLLaVA, commit d5766c8).

- MVBench (``test/mvbench/utils.py``: ``qa_template``, ``infer_mvbench_llava``,
  ``check_ans``; prompts from ``mv_bench_infer_mp.py``): ``Question: {q}\\nOptions:\\n(A)
  ...`` (right-stripped), then ``\\nOnly give the best option.``; the answer is prefilled
  ``Best option:(``. The released script passes ``--system_llm``, a ``store_false``
  flag, so the system sentence is *off* by default here too (``mvbench_system``); when
  on it is prepended to the question text, not put in a system slot. The reply is the
  decoded dialogue split on the prefix, item ``[1]`` (so text after a repeated prefix is
  lost), stripped, with ``(`` put back. ``check_ans`` tests whether the reply's first
  word, lower-cased and without periods, is a substring of ``(x)`` (or contains it):
  ``(`` alone, i.e. an empty reply, is right for every item. The ground truth is the
  *last* candidate equal to the answer. Accuracy pools all items.
- VideoMME (``test/video_mme/utils.py``, ``videomme_infer.py``, ``eval_result.py``):
  ``{system}\\n{question}\\n{options}``, the options printed as the text of the NumPy
  array pandas gives (``numpy_array_text``), subtitles (lines joined by spaces) put
  before as ``This video's subtitles are listed below: {subs} \\n`` when non-empty;
  answer prefix ``The best answer is:``. ``extract_characters_regex`` deletes a list
  of phrases and takes the first capital A-D anywhere; a reply with none is left out of
  the denominator. Two entries of the phrase list are fused by missing commas, so
  ``Best option:`` is never deleted and its ``B`` is read.

``LmmsEvalProtocol``: EvolvingLMMs-Lab/lmms-eval.

- MVBench (``tasks/mvbench/utils.py``, prompt since af395ae1, scorer since 1d3f34ab,
  unchanged at 75571cfe): ``Question:{q}\\nOption:\\n(A) ...\\nOnly give the best
  option.\\n``, no prefix. ``mcq_acc`` reads ``X. ...`` or else the first lone letter
  A-E after punctuation clean-up, case-insensitively, so the article "a" reads as A;
  ground truth is the *first* matching candidate; a reply equal to ``""`` is left out.
  lmms-eval's group score (v0.2 evaluator, 1d3f34ab) is the mean of task scores
  weighted by task size, empty replies included in the sizes; later versions report
  none for this group, and with MVBench's 200 items per task it is the plain mean.
- VideoMME (``tasks/videomme/utils.py`` and its yaml): ``{instruction}\\n{question}\\n
  {options one per line}\\n{post_prompt}`` (post prompt of the ``default`` model
  kwargs unless given), or with subtitles ``This video's subtitles are listed below:
  \\n{lines joined by newlines, or "No subtitles available"}\\n...\\nThe best answer
  is:``. Every item counts. ``videomme_extractor="2024"``: the regex extractor used
  from 494db6a6 (2024-06-11) until 9ca4445d, with the same fused phrases (so
  ``Best option:`` is kept, and ``Answer: B`` reads as A from "Answer").
  ``"2026"``: ``extract_mcq_answer`` (``_task_utils/mcq_extract.py`` at 75571cfe),
  used from 9ca4445d (2026-04-11): format-ranked capitals only, lower case ignored.

Scorer text (the relevance scorer's text input): the question and its options, as the
original passes it (``processor(prompt, question, video)``): no system sentence,
instruction, subtitles or prefix. lmms-eval has no such input; there it is the same
block in lmms-eval's own option format.

Predictions are the decoded continuation after the prompt, special tokens skipped
(for lmms-eval: as its model wrappers return it, most of them stripped). Reported next
to each score: ``empty`` (the text the scorer reads is blank after stripping),
``unparseable`` (not empty, and no single option read; for ``check_ans``: the reply is
accepted for several options or none) and ``counted`` (in the denominator). Accuracies
are percentages, ``None`` when nothing counts.
"""

from __future__ import annotations

import dataclasses
import json
import re
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

LETTERS = string.ascii_uppercase
DURATIONS = ("short", "medium", "long")

MVBENCH_SYSTEM = (
    "Carefully watch the video and pay attention to the cause and sequence of events, the "
    "detail and movement of objects, and the action and pose of persons. Based on your "
    "observations, select the best option that accurately addresses the question.\n")
VIDEOMME_INSTRUCTION = (
    "Select the best answer to the following multiple-choice question based on the video "
    "and the subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")
LMMS_VIDEOMME_POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
LMMS_VIDEOMME_POST_PROMPT_LLAVA_VID = "The best answer is:"


class McqDataError(ValueError):
  """A benchmark file that cannot be read as items; the message names file, item, field."""


@dataclasses.dataclass(frozen=True)
class MVBenchItem:
  task: str
  video: str  # relative to the task's video folder
  question: str
  candidates: tuple[str, ...]
  answer: str  # the text of one candidate
  # Clip bounds in seconds; the original reads them only for its "bound" tasks
  # (action sequence/prediction/localization, object interaction, episodic reasoning).
  start: float | None = None
  end: float | None = None


@dataclasses.dataclass(frozen=True)
class VideoMMEItem:
  video_id: str  # ``videoID``: the video file's stem
  duration: str  # short | medium | long
  question: str
  options: tuple[str, ...]  # "A. ...", as in the dataset
  answer: str  # a letter
  question_id: str | None = None
  task_type: str | None = None
  domain: str | None = None
  sub_category: str | None = None
  # Subtitle lines picked for the sampled frames, in order (each protocol joins them its
  # way); None: the video has no subtitle file.
  subtitles: tuple[str, ...] | None = None


Item = MVBenchItem | VideoMMEItem


# ---------------------------------------------------------------------------------------
# Loading


def _records(path: Path) -> Iterator[tuple[str, Any]]:
  """(where, record) for a JSON list, JSON Lines or Parquet file."""
  try:
    if path.suffix == ".jsonl":
      lines = path.read_text(encoding="utf-8").splitlines()
      for number, line in enumerate(lines, 1):
        if line.strip():
          try:
            yield f"line {number}", json.loads(line)
          except json.JSONDecodeError as err:
            raise McqDataError(f"{path}: line {number}: not JSON ({err})") from None
    elif path.suffix == ".json":
      try:
        data = json.loads(path.read_text(encoding="utf-8"))
      except json.JSONDecodeError as err:
        raise McqDataError(f"{path}: not JSON ({err})") from None
      if not isinstance(data, list):
        raise McqDataError(f"{path}: expected a JSON list of items, got {type(data).__name__}")
      yield from ((f"item {i}", record) for i, record in enumerate(data))
    elif path.suffix == ".parquet":
      try:
        import pyarrow.parquet as pq  # installed with tensorflow-datasets; only needed here
      except ImportError:
        raise McqDataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
      yield from ((f"item {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist()))
    else:
      raise McqDataError(f"{path}: unknown format {path.suffix!r}; expected .json, .jsonl "
                         "or .parquet")
  except OSError as err:
    raise McqDataError(f"{path}: cannot be read ({err})") from None


class _Fields:
  """Typed access to one record's fields, errors naming the file, item and field."""

  def __init__(self, path: Path, where: str, record: Any):
    if not isinstance(record, Mapping):
      raise McqDataError(f"{path}: {where}: expected an object, got {type(record).__name__}")
    self.path, self.where, self.record = path, where, record

  def error(self, name: str, problem: str) -> McqDataError:
    return McqDataError(f"{self.path}: {self.where}: field {name!r} {problem}")

  def get(self, name: str, kind: type | tuple[type, ...], required: bool = True) -> Any:
    value = self.record.get(name)
    if value is None:
      if required:
        raise self.error(name, "is missing")
      return None
    if not isinstance(value, kind) or isinstance(value, bool):
      names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
      raise self.error(name, f"must be {names}, got {type(value).__name__} {value!r:.60}")
    return value

  def strings(self, name: str, required: bool = True) -> tuple[str, ...] | None:
    value = self.get(name, (list, tuple), required)
    if value is None:
      return None
    if not all(isinstance(v, str) for v in value):
      raise self.error(name, "must be a list of strings")
    return tuple(value)

  def options(self, name: str) -> tuple[str, ...]:
    value = self.strings(name)
    if not 1 <= len(value) <= len(LETTERS):
      raise self.error(name, f"must hold 1 to {len(LETTERS)} options, got {len(value)}")
    return value


def load_mvbench(path: str | Path, task: str | None = None) -> list[MVBenchItem]:
  """One MVBench task file (a JSON list of ``{video, question, candidates, answer}``),
  or every ``*.json`` of a folder; the task name is the file's stem unless given."""
  path = Path(path)
  if path.is_dir():
    files = sorted(path.glob("*.json"))
    if not files:
      raise McqDataError(f"{path}: no *.json task files")
    return [item for file in files for item in load_mvbench(file, task)]
  items = []
  for where, record in _records(path):
    fields = _Fields(path, where, record)
    candidates, answer = fields.options("candidates"), fields.get("answer", str)
    if answer not in candidates:
      raise fields.error("answer", f"{answer!r:.60} is not one of the candidates")
    items.append(MVBenchItem(
        task=task or path.stem, video=fields.get("video", str),
        question=fields.get("question", str), candidates=candidates, answer=answer,
        start=fields.get("start", (int, float), required=False),
        end=fields.get("end", (int, float), required=False)))
  return items


def load_videomme(path: str | Path) -> list[VideoMMEItem]:
  """VideoMME question rows (``videoID, duration, question, options, answer`` and
  optionally ``question_id, task_type, domain, sub_category, subtitles``) from JSON,
  JSON Lines or the official Parquet file (needs pyarrow)."""
  path = Path(path)
  items = []
  for where, record in _records(path):
    fields = _Fields(path, where, record)
    duration, options = fields.get("duration", str), fields.options("options")
    if duration not in DURATIONS:
      raise fields.error("duration", f"must be one of {DURATIONS}, got {duration!r}")
    answer = fields.get("answer", str)
    if answer not in LETTERS[:len(options)]:
      raise fields.error("answer", f"must be a letter A-{LETTERS[len(options) - 1]}, "
                         f"got {answer!r:.60}")
    subtitles = record.get("subtitles")
    items.append(VideoMMEItem(
        video_id=fields.get("videoID", str), duration=duration,
        question=fields.get("question", str), options=options, answer=answer,
        question_id=fields.get("question_id", str, required=False),
        task_type=fields.get("task_type", str, required=False),
        domain=fields.get("domain", str, required=False),
        sub_category=fields.get("sub_category", str, required=False),
        subtitles=(subtitles,) if isinstance(subtitles, str)
        else fields.strings("subtitles", required=False)))
  return items


# ---------------------------------------------------------------------------------------
# Protocols and prompts


@dataclasses.dataclass(frozen=True)
class OriginalProtocol:
  mvbench_system: bool = False  # the released script turns it off (see module docstring)
  subtitles: bool = False  # VideoMME with subtitles (``--use_subtitles``)

  name: ClassVar[str] = "original"
  max_new_tokens: ClassVar[int] = 200  # greedy, both scripts


@dataclasses.dataclass(frozen=True)
class LmmsEvalProtocol:
  videomme_extractor: Literal["2024", "2026"] = "2024"
  videomme_post_prompt: str = LMMS_VIDEOMME_POST_PROMPT  # without subtitles only
  subtitles: bool = False  # the ``videomme_w_subtitle`` task

  name: ClassVar[str] = "lmms_eval"
  max_new_tokens: ClassVar[int] = 16  # greedy, both task yamls

  def __post_init__(self):
    if self.videomme_extractor not in _EXTRACTORS:
      raise ValueError(f"videomme_extractor must be one of {sorted(_EXTRACTORS)}, "
                       f"got {self.videomme_extractor!r}")


EvalProtocol = OriginalProtocol | LmmsEvalProtocol


class McqPrompt(NamedTuple):
  """What the runner needs for one item; a tuple, so it unpacks."""

  question: str  # the user turn's text, before the chat template wraps it
  answer_prefix: str  # prefilled after the assistant tag
  scorer_text: str  # the relevance scorer's text input


def numpy_array_text(strings: Sequence[str], line_width: int = 75) -> str:
  """``str(numpy.array(strings))`` for a 1-D string array (<= 1000 items, default print
  options), as the original prints VideoMME options.

  NumPy writes each element's ``repr`` separated by spaces inside brackets and wraps
  before an element that would pass ``line_width - 1`` columns (one kept for ``]``),
  unless the line holds no element yet; continuation lines are indented by one space.
  """
  lines, line = [], " "
  for index, word in enumerate(repr(s) for s in strings):
    if index:
      line += " "
    if len(line) + len(word) > line_width - 1 and len(line) > 1:
      lines.append(line.rstrip())
      line = " "
    line += word
  lines.append(line)
  return "[" + "\n".join(lines)[1:] + "]"


def _lettered(candidates: Sequence[str]) -> str:
  return "".join(f"({LETTERS[i]}) {c}\n" for i, c in enumerate(candidates))


def build_prompt(item: Item, protocol: EvalProtocol) -> McqPrompt:
  """The question text, answer prefix and scorer text ``protocol`` gives ``item``."""
  original = isinstance(protocol, OriginalProtocol)
  if isinstance(item, MVBenchItem):
    if original:
      block = f"Question: {item.question}\nOptions:\n{_lettered(item.candidates)}".rstrip()
      system = MVBENCH_SYSTEM if protocol.mvbench_system else ""
      return McqPrompt(f"{system}{block}\nOnly give the best option.", "Best option:(", block)
    block = f"Question:{item.question}\nOption:\n{_lettered(item.candidates)}"
    return McqPrompt(block + "Only give the best option.\n", "", block.rstrip())
  if original:
    block = f"{item.question}\n{numpy_array_text(item.options)}"
    subtitles = " ".join(item.subtitles or ()) if protocol.subtitles else ""
    head = f"This video's subtitles are listed below: {subtitles} \n" if subtitles else ""
    return McqPrompt(f"{head}{VIDEOMME_INSTRUCTION}\n{block}", "The best answer is:", block)
  block = item.question + "\n" + "\n".join(item.options)
  if not protocol.subtitles:
    return McqPrompt(f"{VIDEOMME_INSTRUCTION}\n{block}\n{protocol.videomme_post_prompt}", "",
                     block)
  subtitles = ("No subtitles available" if item.subtitles is None
               else "\n".join(item.subtitles))
  return McqPrompt(f"This video's subtitles are listed below: \n{subtitles}\n"
                   f"{VIDEOMME_INSTRUCTION}\n{block}\nThe best answer is:", "", block)


# ---------------------------------------------------------------------------------------
# Answer readers


def _original_reply(prompt: McqPrompt, generation: str) -> str:
  """The original decodes the whole dialogue, keeps piece ``[1]`` of a split on the
  answer prefix and strips it; the role tags between hold no prefix, so the question
  and the generation around the prefix decide it."""
  dialogue = prompt.question + prompt.answer_prefix + generation
  return dialogue.split(prompt.answer_prefix)[1].strip()


def check_ans(pred: str, gt_letter: str) -> bool:
  """Original MVBench ``check_ans`` against ground truth ``({gt_letter}) ...``: only the
  first space-separated words count."""
  pred_option = pred.lower().split(" ")[0]
  gt_option = f"({gt_letter.lower()})"
  return pred_option.replace(".", "") in gt_option or gt_option in pred_option


_LMMS_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">",
               "<", "@", "`", ",", "?", "!")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: a lookahead, not the intended lookbehind
_NUMBER_COMMA = re.compile(r"(\d)(\,)(\d)")
_LETTER_DOT = re.compile(r"^([A-E])\.\s*(.+)$", re.IGNORECASE)
_LONE_LETTER = re.compile(r"\b([A-E])\b", re.IGNORECASE)


def lmms_mcq_read(text: str) -> str:
  """lmms-eval ``mcq_acc``'s ``process``: an upper-case letter A-E, else the cleaned text."""
  match = _LETTER_DOT.match(text.strip())
  if match:
    return match.group(1).upper()
  cleaned = text.replace("\n", " ").replace("\t", " ").strip()
  number_comma = _NUMBER_COMMA.search(cleaned) is not None
  punct_free = cleaned
  for p in _LMMS_PUNCT:  # the test reads the input, the replacement the running output
    deleted = p + " " in cleaned or " " + p in cleaned or number_comma
    punct_free = punct_free.replace(p, "" if deleted else " ")
  # lmms-eval passes re.UNICODE (= 32) where sub() takes its count: at most 32 periods go.
  punct_free = _PERIOD.sub("", punct_free, count=int(re.UNICODE))
  cleaned = punct_free.strip("'").strip('"').strip(")").strip("(").strip().lower()
  match = _LONE_LETTER.search(cleaned)
  return match.group(1).upper() if match else cleaned


# Adjacent string literals fused in both sources (missing commas): "Best option:" and
# "The correct option is" are never deleted on their own.
_LMMS_2024_PHRASES = ("The best answer is", "The correct answer is", "The answer is",
                      "The answer", "The best option isThe correct option is",
                      "Best answer:Best option:")
_ORIGINAL_PHRASES = _LMMS_2024_PHRASES + ("Answer:", "Option:", "The correct answer",
                                          "The correct option")


def _phrase_regex_reader(phrases: tuple[str, ...]) -> Callable[[str], str]:
  """``extract_characters_regex``: delete the phrases, then the first capital A-D.

  (Its "more than 10 words and no A-D" test returns "" only where the search below
  does too, so it is left out.)
  """
  def read(text: str) -> str:
    text = text.strip()
    for phrase in phrases:
      text = text.replace(phrase, "")
    match = re.search("[ABCD]", text)
    return match[0] if match else ""
  return read


_ANSWER_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is",
    "the best answer is", "best answer is", "the correct option is", "correct option is",
    "the best option is", "best option is", "the choice is", "choice is",
    "the correct choice is", "correct choice is", "i choose", "i select", "i pick",
    "my answer is", "my choice is",
    "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは")
# Candidate kinds by rank; among one kind the rightmost position wins.
_FORMATS = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4,
            "right_paren": 3, "space": 2, "fallback": 0}


def lmms_mcq_extract(response: str, choices: str = "ABCD") -> str:
  """lmms-eval ``extract_mcq_answer`` (mcq_extract.py at 75571cfe): the best-ranked
  capital choice letter, or ""."""
  if not response.strip():
    return ""
  text = response.strip()
  for char in ",.!?;:'\"":
    text = text.strip(char)
  text = f" {text} "
  found: list[tuple[int, int, str]] = []  # (rank, position, letter)
  for kind, pattern in (("parentheses", "({})"), ("period", "{}."), ("colon", "{}:"),
                        ("right_paren", "{})"), ("space", "{} ")):
    found += [(_FORMATS[kind], text.rfind(pattern.format(c)), c)
              for c in choices if pattern.format(c) in text]
  lower = text.lower()
  for phrase in _ANSWER_PHRASES:
    at = lower.find(phrase)
    if at != -1:
      after = at + len(phrase)
      found += [(_FORMATS["phrase"], text.find(c, after), c)
                for c in choices if text.find(c, after) != -1]
  bare = text.strip()
  found += [(_FORMATS["start"], 0, c) for c in choices
            if bare.startswith(c) and (len(bare) == 1 or not bare[1].isalpha())]
  found += [(_FORMATS["end"], len(text) - 1, c) for c in choices
            if bare.endswith(c) and (len(bare) == 1 or not bare[-2].isalpha())]
  if not found:
    found = [(_FORMATS["fallback"], text.rfind(c), c) for c in choices if c in text]
  # Equal (rank, position) always means the same letter, so max() matches lmms-eval's
  # stable sort.
  return max(found, key=lambda f: f[:2])[2] if found else ""


_EXTRACTORS: dict[str, Callable[[str], str]] = {
    "2024": _phrase_regex_reader(_LMMS_2024_PHRASES), "2026": lmms_mcq_extract}
original_videomme_read = _phrase_regex_reader(_ORIGINAL_PHRASES)


# ---------------------------------------------------------------------------------------
# Scoring


@dataclasses.dataclass(frozen=True)
class Outcome:
  reply: str  # the text the scorer reads
  letter: str | None  # the one option it reads, if any
  empty: bool
  counted: bool
  correct: bool


@dataclasses.dataclass(frozen=True)
class Tally:
  name: str
  accuracy: float | None  # percent, by the protocol's rule
  correct: int
  counted: int
  total: int
  empty: int
  unparseable: int


@dataclasses.dataclass(frozen=True)
class ScoreReport:
  benchmark: str
  protocol: EvalProtocol
  overall: Tally
  groups: dict[str, tuple[Tally, ...]]  # "task" (MVBench); "duration", "task_type"
  outcomes: tuple[Outcome, ...]  # one per item, in order

  def to_dict(self) -> dict[str, Any]:
    return {"benchmark": self.benchmark,
            "protocol": {"name": self.protocol.name, **dataclasses.asdict(self.protocol)},
            "overall": dataclasses.asdict(self.overall),
            "groups": {k: [dataclasses.asdict(t) for t in v] for k, v in self.groups.items()},
            "outcomes": [dataclasses.asdict(o) for o in self.outcomes]}

  def table(self) -> str:
    options = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.protocol).items())
    rows = [(kind, t) for kind, tallies in self.groups.items() for t in tallies]
    rows.append(("overall", self.overall))
    width = max(len(t.name) for _, t in rows)
    header = (f"{'group':<9} {'name':<{width}} {'acc %':>6} {'correct':>7} {'counted':>7} "
              f"{'total':>6} {'empty':>6} {'unparseable':>11}")
    lines = [f"{self.benchmark}, protocol {self.protocol.name} ({options})", header]
    for kind, t in rows:
      accuracy = "-" if t.accuracy is None else f"{t.accuracy:.2f}"
      lines.append(f"{kind:<9} {t.name:<{width}} {accuracy:>6} {t.correct:>7} {t.counted:>7} "
                   f"{t.total:>6} {t.empty:>6} {t.unparseable:>11}")
    return "\n".join(lines)


def _letter_of(candidates: Sequence[str], answer: str, last: bool) -> str:
  indices = [i for i, c in enumerate(candidates) if c == answer]
  return LETTERS[indices[-1] if last else indices[0]]


def _outcome(item: Item, generation: str, protocol: EvalProtocol) -> Outcome:
  prompt = build_prompt(item, protocol)
  if isinstance(item, MVBenchItem):
    letters = LETTERS[:len(item.candidates)]
    if isinstance(protocol, OriginalProtocol):
      cut = _original_reply(prompt, generation)
      reply = "(" + cut  # the script's return prompt
      accepted = [c for c in letters if check_ans(reply, c)]
      truth = _letter_of(item.candidates, item.answer, last=True)
      return Outcome(reply, accepted[0] if len(accepted) == 1 else None, not cut, True,
                     check_ans(reply, truth))
    read = lmms_mcq_read(generation)
    truth = lmms_mcq_read(_letter_of(item.candidates, item.answer, last=False))
    letter = read.upper() if len(read) == 1 and read.upper() in letters else None
    return Outcome(generation, letter, not generation.strip(), generation != "", read == truth)
  if isinstance(protocol, OriginalProtocol):
    reply = _original_reply(prompt, generation)
    letter = original_videomme_read(reply) or None
    return Outcome(reply, letter, not reply, letter is not None, letter == item.answer)
  letter = _EXTRACTORS[protocol.videomme_extractor](generation) or None
  return Outcome(generation, letter, not generation.strip(), True, letter == item.answer)


def _tally(name: str, outcomes: Sequence[Outcome]) -> Tally:
  correct = sum(o.correct and o.counted for o in outcomes)
  counted = sum(o.counted for o in outcomes)
  return Tally(name=name, accuracy=100 * correct / counted if counted else None,
               correct=correct, counted=counted, total=len(outcomes),
               empty=sum(o.empty for o in outcomes),
               unparseable=sum(not o.empty and o.letter is None for o in outcomes))


def _grouped(keys: Sequence[str | None], outcomes: Sequence[Outcome]) -> tuple[Tally, ...]:
  """Tallies per key in order of first appearance; None keys are left out."""
  members: dict[str, list[Outcome]] = {}
  for key, outcome in zip(keys, outcomes):
    if key is not None:
      members.setdefault(key, []).append(outcome)
  return tuple(_tally(key, group) for key, group in members.items())


def score(items: Sequence[Item], predictions: Sequence[str],
          protocol: EvalProtocol) -> ScoreReport:
  """Scores ``predictions`` (decoded continuations, one per item) as ``protocol`` does."""
  if len(items) != len(predictions):
    raise ValueError(f"score: {len(items)} items but {len(predictions)} predictions")
  if not items:
    raise ValueError("score: no items")
  kinds = {type(item) for item in items}
  if len(kinds) != 1:
    raise ValueError("score: items mix MVBench and VideoMME")
  outcomes = tuple(_outcome(item, p, protocol) for item, p in zip(items, predictions))
  overall = _tally("all", outcomes)
  if kinds == {MVBenchItem}:
    tasks = _grouped([item.task for item in items], outcomes)
    if isinstance(protocol, LmmsEvalProtocol):  # group score: size-weighted task mean
      weighted = sum((t.accuracy or 0.0) * t.total for t in tasks) / len(items)
      overall = dataclasses.replace(overall, accuracy=weighted)
    return ScoreReport("MVBench", protocol, overall, {"task": tasks}, outcomes)
  groups = {"duration": _grouped([item.duration for item in items], outcomes)}
  if any(item.task_type is not None for item in items):
    groups["task_type"] = _grouped([item.task_type for item in items], outcomes)
  return ScoreReport("VideoMME", protocol, overall, groups, outcomes)
