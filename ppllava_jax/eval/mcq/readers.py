"""Answer readers: the functions each protocol's scorer reads a reply with, copied in
behaviour from their sources, quirks included (notes on each)."""

from __future__ import annotations

import re
from collections.abc import Callable


def original_reply(question: str, answer_prefix: str, generation: str) -> str:
  """The original decodes the whole dialogue, keeps piece ``[1]`` of a split on the
  answer prefix and strips it; the role tags between hold no prefix, so the question
  and the generation around the prefix decide it. Text after a repeated prefix is lost."""
  dialogue = question + answer_prefix + generation
  return dialogue.split(answer_prefix)[1].strip()


def check_ans(pred: str, gt_letter: str) -> bool:
  """Original MVBench ``check_ans`` against ground truth ``({gt_letter}) ...``: only the
  first space-separated words count. The reply's first word, lower-cased and without
  periods, right when it is a substring of ``(x)`` (or contains it): ``(`` alone, an
  empty reply after the return prompt, is right for every item."""
  pred_option = pred.lower().split(" ")[0]
  gt_option = f"({gt_letter.lower()})"
  return pred_option.replace(".", "") in gt_option or gt_option in pred_option


_LMMS_PUNCT = (
  ";",
  "/",
  "[",
  "]",
  '"',
  "{",
  "}",
  "(",
  ")",
  "=",
  "+",
  "\\",
  "_",
  "-",
  ">",
  "<",
  "@",
  "`",
  ",",
  "?",
  "!",
)
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: a lookahead, not the intended lookbehind
_NUMBER_COMMA = re.compile(r"(\d)(\,)(\d)")
_LETTER_DOT = re.compile(r"^([A-E])\.\s*(.+)$", re.IGNORECASE)
_LONE_LETTER = re.compile(r"\b([A-E])\b", re.IGNORECASE)


def lmms_mcq_read(text: str) -> str:
  """lmms-eval ``mcq_acc``'s ``process``: an upper-case letter A-E, else the cleaned text.

  ``X. ...`` reads as X; otherwise the first lone letter A-E after punctuation
  clean-up, case-insensitively, so the article "a" reads as A.
  """
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
_LMMS_2024_PHRASES = (
  "The best answer is",
  "The correct answer is",
  "The answer is",
  "The answer",
  "The best option isThe correct option is",
  "Best answer:Best option:",
)
_ORIGINAL_PHRASES = _LMMS_2024_PHRASES + (
  "Answer:",
  "Option:",
  "The correct answer",
  "The correct option",
)


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
  "the answer is",
  "answer is",
  "the correct answer is",
  "correct answer is",
  "the best answer is",
  "best answer is",
  "the correct option is",
  "correct option is",
  "the best option is",
  "best option is",
  "the choice is",
  "choice is",
  "the correct choice is",
  "correct choice is",
  "i choose",
  "i select",
  "i pick",
  "my answer is",
  "my choice is",
  "옵션",
  "정답은",
  "답은",
  "답:",
  "答案是",
  "答案为",
  "选",
  "答えは",
)
# Candidate kinds by rank; among one kind the rightmost position wins.
_FORMATS = {
  "start": 10,
  "end": 9,
  "phrase": 7,
  "parentheses": 6,
  "period": 5,
  "colon": 4,
  "right_paren": 3,
  "space": 2,
  "fallback": 0,
}


def lmms_mcq_extract(response: str, choices: str = "ABCD") -> str:
  """lmms-eval ``extract_mcq_answer`` (mcq_extract.py at 75571cfe): the best-ranked
  capital choice letter, or ""; lower case is never read."""
  if not response.strip():
    return ""
  text = response.strip()
  for char in ",.!?;:'\"":
    text = text.strip(char)
  text = f" {text} "
  found: list[tuple[int, int, str]] = []  # (rank, position, letter)
  for kind, pattern in (
    ("parentheses", "({})"),
    ("period", "{}."),
    ("colon", "{}:"),
    ("right_paren", "{})"),
    ("space", "{} "),
  ):
    found += [
      (_FORMATS[kind], text.rfind(pattern.format(c)), c)
      for c in choices
      if pattern.format(c) in text
    ]
  lower = text.lower()
  for phrase in _ANSWER_PHRASES:
    at = lower.find(phrase)
    if at != -1:
      after = at + len(phrase)
      found += [
        (_FORMATS["phrase"], text.find(c, after), c) for c in choices if text.find(c, after) != -1
      ]
  bare = text.strip()
  found += [
    (_FORMATS["start"], 0, c)
    for c in choices
    if bare.startswith(c) and (len(bare) == 1 or not bare[1].isalpha())
  ]
  found += [
    (_FORMATS["end"], len(text) - 1, c)
    for c in choices
    if bare.endswith(c) and (len(bare) == 1 or not bare[-2].isalpha())
  ]
  if not found:
    found = [(_FORMATS["fallback"], text.rfind(c), c) for c in choices if c in text]
  # Equal (rank, position) always means the same letter, so max() matches lmms-eval's
  # stable sort.
  return max(found, key=lambda f: f[:2])[2] if found else ""


# lmms-eval's VideoMME extractors by the years they were used: "2024", the regex one
# from 494db6a6 (2024-06-11) until 9ca4445d, with the same fused phrases as the
# original (so ``Best option:`` is kept, and ``Answer: B`` reads as A from "Answer");
# "2026", ``extract_mcq_answer`` (``_task_utils/mcq_extract.py``), from 9ca4445d
# (2026-04-11).
LMMS_VIDEOMME_EXTRACTORS: dict[str, Callable[[str], str]] = {
  "2024": _phrase_regex_reader(_LMMS_2024_PHRASES),
  "2026": lmms_mcq_extract,
}
# The original's ``eval_result.py``: "Answer:" is deleted, "Best option:" is not.
original_videomme_read = _phrase_regex_reader(_ORIGINAL_PHRASES)
