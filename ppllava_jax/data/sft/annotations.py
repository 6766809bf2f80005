"""Training annotations: the two record formats, their validation, and the data mixture.

Formats (one corpus = one annotation file, JSON list or JSONL, plus a media root):

- ``"qa"``, the original PPLLaVA's (``interleave_sft_dataset.py``):
  ``{"video" | "image" | "multi-image": path | [paths], "QA": [{"i"?, "q", "a"}, ...],
  "total_frames"?}``. The corpus says which media key its records carry (``kind``), as
  the original's ``media_type``; ``kind="auto"`` takes the one key present. A video
  given as a list of paths is a list of frame files (the original's ``rawframe``
  reader); ``total_frames`` means a frame folder of ``{:06d}.jpg`` files numbered from 1.
  A non-empty ``"i"`` of the first turn is the system text, as in ``process_qa``.
- ``"llava"``, LLaVA-1.5 / LLaVA-Interleave / LLaVA-Video: ``{"id"?, "image" | "video"?,
  "conversations": [{"from": "human" | "gpt", "value"}, ...]}``; an optional leading
  ``"system"`` turn is the system text; ``image`` may be a list (multi-image, or one
  picture); no media key is a text-only record.

Every record is checked before training starts (``load_mixture``); the first problem
raises ``AnnotationError`` naming the file, the record index and the field (a file that
is missing or not JSON: ``files.DataFileError``, naming the file and line). Checked:
the types, a non-empty conversation, alternating roles, answers that are not empty or
blank (the original trained such a turn on its end marker alone), a positive
``total_frames``, and that the conversation has exactly one ``<image>`` per media item
once the original's rule has put the first one in (``templates.with_media``: prefixed
to the first question, or each ``<image>`` of the first question gets a newline); an
answer must hold none. The original found the other problems only when the model failed
on them and then silently trained on a random other sample instead.

Validated records are stored column-wise (``AnnotationSet``: kinds, corpus ids and one
bytes blob of ``marshal``-encoded tuples), so that a million of them pickle to a worker process in
well under a second; ``aset[i]`` decodes one ``Record``.

Mixture (``MixtureConfig``): corpora are concatenated, each repeated ``repeat`` times,
as the original's ``read_anno`` (its ``repeat: True`` is ``repeat=2``); every epoch is
that list in a new seeded order (``epoch_order``). With ``weight`` set on the corpora,
an epoch instead draws ``epoch_size`` samples, corpus ``c`` contributing
``round(epoch_size * w_c / sum(w))`` (largest remainders, so they add up), each corpus
read without replacement in its own per-epoch order and cycled when it is too small.
"""

from __future__ import annotations

import dataclasses
import gc
import marshal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from ppllava_jax.data.text.templates import Turn
from ppllava_jax.files import read_json, read_jsonl

FORMATS = ("qa", "llava")
KINDS = ("text", "image", "video", "multi-image")  # KIND_CODES index
KIND_CODES = {k: i for i, k in enumerate(KINDS)}
READERS = ("auto", "pyav", "decord", "frames")
MEDIA_TOKEN = "<image>"


class AnnotationError(ValueError):
  """A malformed annotation: ``<file>: record <index>: field <field>: <problem>``."""

  def __init__(self, file: str | Path, index: int | None, field: str | None, problem: str):
    self.file, self.index, self.field, self.problem = str(file), index, field, problem
    where = [self.file]
    if index is not None:
      where.append(f"record {index}")
    if field is not None:
      where.append(f"field {field!r}")
    super().__init__(": ".join(where + [problem]))

  def __reduce__(self):  # picklable across worker processes
    return AnnotationError, (self.file, self.index, self.field, self.problem)


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
  """One corpus of the mixture (an entry of the original's ``available_corpus``)."""

  name: str
  annotation: str  # a JSON list or a JSONL file
  media_root: str = ""  # joined before each media path, as os.path.join (absolute paths stay)
  kind: str = "auto"  # "video" | "image" | "multi-image" | "auto" (from each record's keys)
  format: str = "qa"  # "qa" (the original's) | "llava"
  reader: str = "auto"  # videos: "auto" (a folder: frames, else PyAV), "pyav", "decord", "frames"
  num_frames: int = 32  # frames sampled per video
  repeat: int = 1  # the list is repeated this many times per epoch (original: True -> 2)
  weight: float | None = None  # sampling weight; set on every corpus or on none

  def __post_init__(self):
    if self.format not in FORMATS:
      raise ValueError(
        f"corpus {self.name!r}: format must be one of {FORMATS}, got {self.format!r}"
      )
    if self.kind not in ("auto", *KINDS[1:]):
      raise ValueError(
        f"corpus {self.name!r}: kind must be 'auto' or one of {KINDS[1:]}, got {self.kind!r}"
      )
    if self.reader not in READERS:
      raise ValueError(
        f"corpus {self.name!r}: reader must be one of {READERS}, got {self.reader!r}"
      )
    if self.num_frames < 1 or self.repeat < 1:
      raise ValueError(
        f"corpus {self.name!r}: num_frames and repeat must be >= 1, got "
        f"{self.num_frames} and {self.repeat}"
      )
    if self.weight is not None and not self.weight > 0:
      raise ValueError(f"corpus {self.name!r}: weight must be > 0, got {self.weight}")


@dataclasses.dataclass(frozen=True)
class MixtureConfig:
  corpora: tuple[CorpusConfig, ...]
  epoch_size: int | None = None  # with weights: samples per epoch (default: sum of sizes x repeat)

  def __post_init__(self):
    if not self.corpora:
      raise ValueError("MixtureConfig: no corpora")
    names = [c.name for c in self.corpora]
    if len(set(names)) != len(names):
      raise ValueError(f"MixtureConfig: corpus names must be unique, got {names}")
    weighted = {c.weight is not None for c in self.corpora}
    if len(weighted) > 1:
      raise ValueError("MixtureConfig: give a weight to every corpus or to none")

  @property
  def weighted(self) -> bool:
    return self.corpora[0].weight is not None


@dataclasses.dataclass(frozen=True)
class Record:
  """One validated training conversation, media paths already joined with the root."""

  kind: str  # one of KINDS
  media: tuple[str, ...]  # video: one path (or the frame files); image: one; multi-image: N
  turns: tuple[Turn, ...]
  system: str = ""
  total_frames: int | None = None  # a {:06d}.jpg frame folder of this many frames
  corpus: int = 0  # index into the mixture's corpora
  source: int = 0  # record index in its annotation file
  frame_list: bool = False  # a video given as a list of frame files


# ---- parsing one record ---------------------------------------------------------------
# The validator runs over every record before training (a million in a few seconds), so
# it works on plain tuples; ``Record`` objects are made only when a sample is read.


def _fail(file, index, field, problem) -> NoReturn:
  raise AnnotationError(file, index, field, problem)


def _type(value) -> str:
  return type(value).__name__


def _blank(text: str) -> bool:
  return not text or text.isspace()  # isspace stops at the first other character


def _check_answer(text: str, file, index, field) -> None:
  if _blank(text):
    _fail(file, index, field, "is empty" if not text else "is blank (whitespace only)")


def _paths(value, kind: str, file, index, field) -> tuple[tuple[str, ...], bool]:
  """(paths, given as a list)."""
  if type(value) is str:
    if not value:
      _fail(file, index, field, "is empty")
    if kind == "multi-image":
      _fail(file, index, field, "a multi-image record needs a list of paths")
    return (value,), False
  if isinstance(value, list):
    if not value:
      _fail(file, index, field, "is an empty list")
    for j, p in enumerate(value):
      if type(p) is not str or not p:
        _fail(file, index, f"{field}[{j}]", "must be a non-empty string")
    if kind == "image" and len(value) != 1:
      _fail(file, index, field, f"an image record needs one path, got {len(value)}")
    return tuple(value), True
  _fail(file, index, field, f"must be a path or a list of paths, got {_type(value)}")


def _qa_turns(record, file, index) -> tuple[tuple[tuple[str, str], ...], str]:
  qa = record.get("QA")
  if type(qa) is not list or not qa:
    _fail(file, index, "QA", "must be a non-empty list of {q, a} objects")
  try:  # the common case in one pass; any doubt goes to the checks below
    turns = tuple((t["q"], t["a"]) for t in qa)
    ok = all(
      type(q) is str and type(a) is str and a and not a.isspace()  # not _blank, inlined
      for q, a in turns
    ) and all(type(t.get("i", "")) is str for t in qa)
  except (TypeError, KeyError, AttributeError):
    ok = False
  if not ok:
    for j, t in enumerate(qa):
      if type(t) is not dict:
        _fail(file, index, f"QA[{j}]", "must be an object with 'q' and 'a'")
      for f in ("q", "a"):
        if type(t.get(f)) is not str:
          _fail(
            file,
            index,
            f"QA[{j}].{f}",
            "missing" if t.get(f) is None else f"must be a string, got {_type(t.get(f))}",
          )
      if t.get("i") is not None and type(t["i"]) is not str:
        _fail(file, index, f"QA[{j}].i", f"must be a string, got {_type(t['i'])}")
      _check_answer(t["a"], file, index, f"QA[{j}].a")
  return turns, qa[0].get("i") or ""


def _llava_turns(record, file, index) -> tuple[tuple[tuple[str, str], ...], str]:
  conv = record.get("conversations")
  if type(conv) is not list or not conv:
    _fail(file, index, "conversations", "must be a non-empty list of {from, value} objects")
  system, start = "", 0
  if type(conv[0]) is dict and conv[0].get("from") == "system":
    system, start = conv[0].get("value"), 1  # type: ignore[assignment]  # a str: checked below
  if (len(conv) - start) % 2 or len(conv) == start:
    _fail(
      file,
      index,
      "conversations",
      f"needs human/gpt pairs, got {len(conv) - start} turns after the system text",
    )
  body = conv[start:]
  try:  # the common case in one pass; any doubt goes to the checks below
    ok = (
      all(t["from"] == "human" for t in body[0::2])
      and all(t["from"] == "gpt" for t in body[1::2])
      and all(type(t["value"]) is str for t in conv)
      and all(t["value"] and not t["value"].isspace() for t in body[1::2])
    )
  except (TypeError, KeyError):
    ok = False
  if not ok:
    for j, t in enumerate(conv):
      if type(t) is not dict or type(t.get("value")) is not str:
        _fail(
          file, index, f"conversations[{j}]", "must be an object with 'from' and a string 'value'"
        )
      want = "system" if j < start else ("human", "gpt")[(j - start) % 2]
      if t.get("from") != want:
        _fail(file, index, f"conversations[{j}].from", f"expected {want!r}, got {t.get('from')!r}")
      if want == "gpt":
        _check_answer(t["value"], file, index, f"conversations[{j}].value")
  return tuple((q["value"], a["value"]) for q, a in zip(body[::2], body[1::2])), system


def _media_key(record, corpus: CorpusConfig, keys: Sequence[str], file, index) -> str | None:
  if corpus.kind != "auto":
    key = "image" if corpus.format == "llava" and corpus.kind == "multi-image" else corpus.kind
    if key not in record:
      _fail(file, index, key, f"missing (corpus {corpus.name!r} holds {corpus.kind} records)")
    return key
  present = [k for k in keys if k in record]
  if len(present) > 1:
    _fail(file, index, present[1], f"a record holds one media key, got {present}")
  return present[0] if present else None


def _validate(record, corpus: CorpusConfig, file, index: int, root: str) -> tuple:
  """A raw record -> ``(kind, paths, turns, system, total_frames, source, frame_list)``."""
  if type(record) is not dict:
    if not isinstance(record, Mapping):
      _fail(file, index, None, f"must be an object, got {_type(record)}")
    record = dict(record)
  if corpus.format == "qa":
    key = _media_key(record, corpus, ("video", "image", "multi-image"), file, index)
    if key is None:
      _fail(file, index, "video", "missing: a qa record holds 'video', 'image' or 'multi-image'")
    turns, system = _qa_turns(record, file, index)
    kind, field = key, "QA"
  else:
    turns, system = _llava_turns(record, file, index)
    key = _media_key(record, corpus, ("video", "image"), file, index)
    kind, field = "text" if key is None else key, "conversations"
  paths: tuple[str, ...]
  paths, frame_list = (), False
  if key is not None:
    declared = (
      corpus.kind
      if corpus.kind != "auto"
      else ("any" if corpus.format == "llava" and key == "image" else kind)
    )
    paths, listed = _paths(record[key], declared, file, index, key)
    if corpus.kind != "auto":
      kind = corpus.kind
    elif corpus.format == "llava" and key == "image":
      kind = "multi-image" if len(paths) > 1 else "image"
    frame_list = kind == "video" and listed
    if root:
      paths = tuple(p if p.startswith("/") else root + p for p in paths)
  total = record.get("total_frames")
  if total is not None and (type(total) is not int or total < 1):
    _fail(file, index, "total_frames", f"must be a positive integer, got {total!r}")
  # exactly one <image> per media item once the first question has its placeholder
  count = 0
  for j, (q, a) in enumerate(turns):
    if MEDIA_TOKEN in a:
      _fail(file, index, f"{field}[{j}]", f"an answer holds {MEDIA_TOKEN!r}")
    count += q.count(MEDIA_TOKEN)
  if kind != "text" and MEDIA_TOKEN not in turns[0][0]:
    count += 1  # with_media prefixes one
  items = 0 if kind == "text" else (len(paths) if kind == "multi-image" else 1)
  if count != items:
    _fail(
      file,
      index,
      field,
      f"the conversation has {count} {MEDIA_TOKEN} placeholders for {items} {kind} item(s)",
    )
  return (kind, paths, turns, system, total if kind == "video" else None, index, frame_list)


def _root(corpus: CorpusConfig) -> str:
  root = corpus.media_root
  return root if not root or root.endswith("/") else root + "/"


def _record(t: tuple, corpus_index: int) -> Record:
  kind, paths, turns, system, total, source, frame_list = t
  return Record(
    kind,
    tuple(paths),
    tuple(Turn(q, a) for q, a in turns),
    system,
    total,
    corpus_index,
    source,
    frame_list,
  )


def parse_record(
  record: Any,
  corpus: CorpusConfig,
  file: str | Path = "<record>",
  index: int = 0,
  corpus_index: int = 0,
) -> Record:
  """One raw annotation -> a ``Record``, or ``AnnotationError`` (see the module doc)."""
  return _record(_validate(record, corpus, file, index, _root(corpus)), corpus_index)


# ---- files and the column store -------------------------------------------------------


def read_annotation_file(path: str | Path) -> list[Any]:
  """The raw records of a JSON list or a JSONL file (``.jsonl`` / ``.ndjson``). A file that
  cannot be read as such is a ``files.DataFileError`` (``path:line: problem``)."""
  if Path(path).suffix.lower() in (".jsonl", ".ndjson"):
    return [record for _, record in read_jsonl(path)]
  return read_json(path, expect=list)


class AnnotationSet:
  """Validated records, column-wise (module doc); a grain random-access source.

  ``kinds`` (uint8 codes of ``KINDS``), ``num_media`` (pictures of a multi-image record,
  else 0 or 1) and ``corpus`` (index into ``corpora``) are NumPy arrays; each record's
  text and paths are one ``marshal`` entry of ``blob``.
  """

  def __init__(
    self, corpora: Sequence[CorpusConfig], kinds, num_media, corpus, blob: bytes, offsets
  ):
    self.corpora = tuple(corpora)
    self.kinds = np.asarray(kinds, np.uint8)
    self.num_media = np.asarray(num_media, np.int32)
    self.corpus = np.asarray(corpus, np.int16)
    self.blob = bytes(blob)
    self.offsets = np.asarray(offsets, np.int64)

  @classmethod
  def from_tuples(
    cls, corpora: Sequence[CorpusConfig], rows: Sequence[tuple[int, tuple]]
  ) -> AnnotationSet:
    """From ``(corpus index, _validate's tuple)`` rows."""
    parts = [marshal.dumps(t) for _, t in rows]
    offsets = np.zeros(len(parts) + 1, np.int64)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    kinds = [KIND_CODES[t[0]] for _, t in rows]
    media = [len(t[1]) if t[0] == "multi-image" else int(t[0] != "text") for _, t in rows]
    return cls(corpora, kinds, media, [c for c, _ in rows], b"".join(parts), offsets)

  def __len__(self) -> int:
    return len(self.kinds)

  def __getitem__(self, i: int) -> Record:
    i = int(i)
    return _record(
      marshal.loads(self.blob[self.offsets[i] : self.offsets[i + 1]]), int(self.corpus[i])
    )

  def corpus_of(self, i: int) -> CorpusConfig:
    return self.corpora[self.corpus[i]]

  def describe(self, i: int) -> str:
    """``corpus '<name>' (<file>) record <n>``: where a sample came from, for messages."""
    c = self.corpus_of(i)
    return f"corpus {c.name!r} ({c.annotation}) record {self[i].source}"

  def __repr__(self) -> str:
    counts = {k: int((self.kinds == c).sum()) for k, c in KIND_CODES.items()}
    return f"AnnotationSet({len(self)} records, {counts}, corpora={[c.name for c in self.corpora]})"


def _corpus_rows(corpus: CorpusConfig, c: int) -> list[tuple[int, tuple]]:
  root, file = _root(corpus), corpus.annotation
  rows = [
    (c, _validate(raw, corpus, file, i, root)) for i, raw in enumerate(read_annotation_file(file))
  ]
  if not rows:
    raise AnnotationError(file, None, None, "holds no records")
  return rows


def load_corpus(corpus: CorpusConfig, corpus_index: int = 0) -> list[Record]:
  """Every record of one corpus, validated (``AnnotationError`` on the first bad one)."""
  return [_record(t, corpus_index) for _, t in _corpus_rows(corpus, corpus_index)]


def load_mixture(mixture: MixtureConfig) -> AnnotationSet:
  """All corpora of ``mixture``, validated, in one ``AnnotationSet`` (corpus order)."""
  enabled = gc.isenabled()
  gc.disable()  # millions of new small objects, no cycles: the collector would only re-scan them
  try:
    rows: list[tuple[int, tuple]] = []
    for c, corpus in enumerate(mixture.corpora):
      rows += _corpus_rows(corpus, c)
    return AnnotationSet.from_tuples(mixture.corpora, rows)
  finally:
    if enabled:
      gc.enable()


# ---- epochs ---------------------------------------------------------------------------


def _apportion(total: int, weights: Sequence[float]) -> list[int]:
  """Integers proportional to ``weights`` summing to ``total`` (largest remainders)."""
  w = np.asarray(weights, np.float64)
  exact = total * w / w.sum()
  counts = np.floor(exact).astype(np.int64)
  for i in np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]:
    counts[i] += 1
  return counts.tolist()


def epoch_size(aset: AnnotationSet, mixture: MixtureConfig) -> int:
  if mixture.weighted and mixture.epoch_size is not None:
    return mixture.epoch_size
  sizes = np.bincount(aset.corpus, minlength=len(mixture.corpora))
  return int(sum(int(n) * c.repeat for n, c in zip(sizes, mixture.corpora)))


def epoch_order(aset: AnnotationSet, mixture: MixtureConfig, seed: int, epoch: int) -> np.ndarray:
  """Record indices of epoch ``epoch``, in order (int64): a function of (seed, epoch) only."""
  rng = np.random.default_rng([seed, epoch, 0x5EED])
  ranges = [np.flatnonzero(aset.corpus == c) for c in range(len(mixture.corpora))]
  if not mixture.weighted:
    pool = np.concatenate([np.tile(r, c.repeat) for r, c in zip(ranges, mixture.corpora)])
    return rng.permutation(pool)
  # weighted: every corpus has a weight (MixtureConfig gives all or none)
  counts = _apportion(epoch_size(aset, mixture), [c.weight for c in mixture.corpora])  # type: ignore[misc]
  parts = []
  for c, (r, n) in enumerate(zip(ranges, counts)):
    cycles = -(-n // len(r)) if len(r) else 0
    crng = np.random.default_rng([seed, epoch, c + 1])
    parts.append(
      np.concatenate([crng.permutation(r) for _ in range(cycles)])[:n] if cycles else r[:0]
    )
  return rng.permutation(np.concatenate(parts))
