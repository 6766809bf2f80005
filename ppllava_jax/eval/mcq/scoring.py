"""Scoring: one reading rule per (benchmark, protocol) cell, then tallies per group.

Predictions are the decoded continuation after the prompt, special tokens skipped (for
lmms-eval: as its model wrappers return it, most of them stripped). Reported next to
each score: ``empty`` (the text the scorer reads is blank after stripping),
``unparseable`` (not empty, and no single option read; for ``check_ans``: the reply is
accepted for several options or none) and ``counted`` (in the denominator).
Accuracies are percentages; ``None`` when nothing counts, except where lmms-eval's
MVBench aggregation reports 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from ppllava_jax.eval.mcq.items import LETTERS, Item, MVBenchItem, VideoMMEItem
from ppllava_jax.eval.mcq.prompts import build_prompt
from ppllava_jax.eval.mcq.protocols import EvalProtocol, LmmsEvalProtocol, OriginalProtocol
from ppllava_jax.eval.mcq.readers import (
  LMMS_VIDEOMME_EXTRACTORS,
  check_ans,
  lmms_mcq_read,
  original_reply,
  original_videomme_read,
)


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


Groups = dict[str, tuple[Tally, ...]]  # "task" (MVBench); "duration", "task_type" (VideoMME)


@dataclasses.dataclass(frozen=True)
class ScoreReport:
  benchmark: str
  protocol: EvalProtocol
  overall: Tally
  groups: Groups
  outcomes: tuple[Outcome, ...]  # one per item, in order

  def to_dict(self) -> dict[str, Any]:
    return {
      "benchmark": self.benchmark,
      "protocol": {"name": self.protocol.name, **dataclasses.asdict(self.protocol)},
      "overall": dataclasses.asdict(self.overall),
      "groups": {k: [dataclasses.asdict(t) for t in v] for k, v in self.groups.items()},
      "outcomes": [dataclasses.asdict(o) for o in self.outcomes],
    }

  def table(self) -> str:
    options = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.protocol).items())
    rows = [(kind, t) for kind, tallies in self.groups.items() for t in tallies]
    rows.append(("overall", self.overall))
    width = max(len(t.name) for _, t in rows)
    header = (
      f"{'group':<9} {'name':<{width}} {'acc %':>6} {'correct':>7} {'counted':>7} "
      f"{'total':>6} {'empty':>6} {'unparseable':>11}"
    )
    lines = [f"{self.benchmark}, protocol {self.protocol.name} ({options})", header]
    for kind, t in rows:
      accuracy = "-" if t.accuracy is None else f"{t.accuracy:.2f}"
      lines.append(
        f"{kind:<9} {t.name:<{width}} {accuracy:>6} {t.correct:>7} {t.counted:>7} "
        f"{t.total:>6} {t.empty:>6} {t.unparseable:>11}"
      )
    return "\n".join(lines)


def _letter_of(candidates: Sequence[str], answer: str, last: bool) -> str:
  indices = [i for i, c in enumerate(candidates) if c == answer]
  return LETTERS[indices[-1] if last else indices[0]]


# --- reading one reply, per cell -------------------------------------------------------


def original_mvbench(item: MVBenchItem, generation: str, protocol: OriginalProtocol) -> Outcome:
  """``infer_mvbench_llava`` and ``check_ans``: the reply is cut out of the dialogue
  (``readers.original_reply``) with ``(`` put back, the script's return prompt; so an
  empty reply, ``(``, is right for every item. The ground truth is the *last* candidate
  equal to the answer. Every item counts."""
  prompt = build_prompt(item, protocol)
  cut = original_reply(prompt.question, prompt.answer_prefix, generation)
  reply = "(" + cut
  accepted = [c for c in LETTERS[: len(item.candidates)] if check_ans(reply, c)]
  truth = _letter_of(item.candidates, item.answer, last=True)
  return Outcome(
    reply, accepted[0] if len(accepted) == 1 else None, not cut, True, check_ans(reply, truth)
  )


def lmms_mvbench(item: MVBenchItem, generation: str, protocol: LmmsEvalProtocol) -> Outcome:
  """``mvbench_process_results`` (scorer since 1d3f34ab, unchanged at 75571cfe):
  ``mcq_acc`` compares the reply and the ground-truth letter, both read by
  ``lmms_mcq_read``; the ground truth is the *first* matching candidate; a reply equal
  to ``""`` is left out of the denominator (a blank one is not)."""
  read = lmms_mcq_read(generation)
  truth = lmms_mcq_read(_letter_of(item.candidates, item.answer, last=False))
  letters = LETTERS[: len(item.candidates)]
  letter = read.upper() if len(read) == 1 and read.upper() in letters else None
  return Outcome(generation, letter, not generation.strip(), generation != "", read == truth)


def original_videomme(item: VideoMMEItem, generation: str, protocol: OriginalProtocol) -> Outcome:
  """``eval_result.py``: the reply cut out of the dialogue as for MVBench, read by
  ``extract_characters_regex`` (``readers.original_videomme_read``: ``Best option:`` is
  never deleted, so its "B" is read); a reply with no A-D is left out of the
  denominator."""
  prompt = build_prompt(item, protocol)
  reply = original_reply(prompt.question, prompt.answer_prefix, generation)
  letter = original_videomme_read(reply) or None
  return Outcome(reply, letter, not reply, letter is not None, letter == item.answer)


def lmms_videomme(item: VideoMMEItem, generation: str, protocol: LmmsEvalProtocol) -> Outcome:
  """``videomme_process_results``: the reply read by the chosen extractor
  (``readers.LMMS_VIDEOMME_EXTRACTORS``); every item counts."""
  letter = LMMS_VIDEOMME_EXTRACTORS[protocol.videomme_extractor](generation) or None
  return Outcome(generation, letter, not generation.strip(), True, letter == item.answer)


# --- tallies ---------------------------------------------------------------------------


def _tally(name: str, outcomes: Sequence[Outcome]) -> Tally:
  correct = sum(o.correct and o.counted for o in outcomes)
  counted = sum(o.counted for o in outcomes)
  return Tally(
    name=name,
    accuracy=100 * correct / counted if counted else None,
    correct=correct,
    counted=counted,
    total=len(outcomes),
    empty=sum(o.empty for o in outcomes),
    unparseable=sum(not o.empty and o.letter is None for o in outcomes),
  )


def _grouped(keys: Sequence[str | None], outcomes: Sequence[Outcome]) -> tuple[Tally, ...]:
  """Tallies per key in order of first appearance; None keys are left out."""
  members: dict[str, list[Outcome]] = {}
  for key, outcome in zip(keys, outcomes):
    if key is not None:
      members.setdefault(key, []).append(outcome)
  return tuple(_tally(key, group) for key, group in members.items())


def _mvbench_summary(
  items: Sequence[MVBenchItem], outcomes: Sequence[Outcome]
) -> tuple[Tally, Groups]:
  """Per task, and all items pooled (the original's overall accuracy)."""
  return _tally("all", outcomes), {"task": _grouped([item.task for item in items], outcomes)}


def _lmms_mvbench_summary(
  items: Sequence[MVBenchItem], outcomes: Sequence[Outcome]
) -> tuple[Tally, Groups]:
  """``mvbench_aggregate_results`` scores a task with nothing counted 0, not "none".
  The group score (v0.2 evaluator, 1d3f34ab) is the mean of task scores weighted by task
  size, empty replies included in the sizes; later versions report none for this group,
  and with MVBench's 200 items per task it is the plain mean."""
  tasks = tuple(
    dataclasses.replace(t, accuracy=t.accuracy or 0.0)
    for t in _grouped([item.task for item in items], outcomes)
  )
  # accuracy is set (not None) above
  weighted = sum(t.accuracy * t.total for t in tasks) / len(items)  # type: ignore[operator,misc]
  return dataclasses.replace(_tally("all", outcomes), accuracy=weighted), {"task": tasks}


def _videomme_summary(
  items: Sequence[VideoMMEItem], outcomes: Sequence[Outcome]
) -> tuple[Tally, Groups]:
  """Per duration, per task type when the items name one, and all items pooled."""
  groups = {"duration": _grouped([item.duration for item in items], outcomes)}
  if any(item.task_type is not None for item in items):
    groups["task_type"] = _grouped([item.task_type for item in items], outcomes)
  return _tally("all", outcomes), groups


class _Cell(NamedTuple):
  benchmark: str
  # each takes the item and protocol types of its _CELLS key: Any, as no one type says so
  outcome: Callable[[Any, str, Any], Outcome]
  summary: Callable[[Sequence[Any], Sequence[Outcome]], tuple[Tally, Groups]]


_CELLS: dict[tuple[type, type], _Cell] = {
  (MVBenchItem, OriginalProtocol): _Cell("MVBench", original_mvbench, _mvbench_summary),
  (MVBenchItem, LmmsEvalProtocol): _Cell("MVBench", lmms_mvbench, _lmms_mvbench_summary),
  (VideoMMEItem, OriginalProtocol): _Cell("VideoMME", original_videomme, _videomme_summary),
  (VideoMMEItem, LmmsEvalProtocol): _Cell("VideoMME", lmms_videomme, _videomme_summary),
}


def score(items: Sequence[Item], predictions: Sequence[str], protocol: EvalProtocol) -> ScoreReport:
  """Scores ``predictions`` (decoded continuations, one per item) as ``protocol`` does."""
  if len(items) != len(predictions):
    raise ValueError(f"score: {len(items)} items but {len(predictions)} predictions")
  if not items:
    raise ValueError("score: no items")
  kinds = {type(item) for item in items}
  if len(kinds) != 1:
    raise ValueError("score: items mix MVBench and VideoMME")
  cell = _CELLS[kinds.pop(), type(protocol)]
  outcomes = tuple(cell.outcome(item, p, protocol) for item, p in zip(items, predictions))
  overall, groups = cell.summary(items, outcomes)
  return ScoreReport(cell.benchmark, protocol, overall, groups, outcomes)
