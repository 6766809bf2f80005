"""What trains and what decays: ordered ``(path regex, value)`` rules, resolved once.

A parameter's path is its NNX state path joined by ``/``
(``language_model/model/layers/0/mlp/up_proj/kernel``); a rule's regex must match the
whole path (``re.fullmatch``), and the first rule that matches decides, as big_vision's
config rules do. A path that no rule matches takes the explicit default (frozen, for the
trainable rules). Rules are resolved once, on the model's (abstract) state, into a set of
paths; the NNX filter, the split and the optimizer masks are built from that set, and
``Partition.table()`` is the log line of what each rule took.

Only ``nnx.Param`` variables can train: a ``Frozen`` variable (the copied rows of the
extended text position tables) never does, whatever the rules say, and is counted in the
table as such.

The presets follow the original's code (``llava_interleave.py:474-502``,
``llava_projector.py``; see the reference notes):

- ``VICUNA_SFT``: the whole LLM, the projector, ``image_newline``, the scorer's
  ``visual_ln`` / ``visual_projection`` / ``text_projection`` and the BT-Adapter; frozen: the
  CLIP ViT (the vision tower outside ``btadapter_*``), ``logit_scale`` and the CLIP text
  tower (marked trainable in the original but run under ``torch.no_grad``, so it never
  changes: frozen here, which gives it no optimizer state).
- ``QWEN_SFT``: the LLM, the projector, ``image_newline``, and the SigLIP scorer's parts
  that sit in the original's trainable ``multi_modal_projector``: the text tower
  (``position_embedding_res`` included), ``visual_ln`` and the pooling head's value path
  (``in_proj``, ``layernorm``, ``mlp``); frozen: the SigLIP vision tower (its own head too),
  ``logit_scale``, ``logit_bias``, and the head's ``probe`` and ``out_proj``, which the
  per-patch value path never reads (no gradient, so no optimizer state).
- ``DPO``: ``language_model`` only (the original's ``onlyLLM``).

Two things get a zero gradient without being frozen, as in the original: ``image_newline``
on video-only data, and, with the layer -2 read, the BT-Adapter's last block pair. With
weight decay 0 (every recipe) AdamW leaves them unchanged.

``DECAY_RULES`` (weight decay): never norms or biases, everything else trainable decays,
embeddings included. That is the original's grouping (transformers' ``Trainer``:
``ALL_LAYERNORM_LAYERS`` and names with ``bias`` are excluded, ``nn.Embedding`` is not), kept
so that a run with weight decay > 0 decays what the original would; every recipe sets it to
0. Excluding embeddings (rare tokens' rows shrink every step under decoupled decay while
getting no gradient) is one rule in front: ``(r".*embed.*", False)``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable, Sequence

import jax
from flax import nnx

log = logging.getLogger(__name__)

Rules = tuple[tuple[str, object], ...]  # ordered (path regex, value); first fullmatch wins

VICUNA_SFT: Rules = (
  (r"language_model/.*", True),
  (r"multi_modal_projector/.*", True),
  (r"image_newline", True),
  (r"scorer/(visual_ln|visual_projection|text_projection)/.*", True),
  (r"scorer/text_model/.*", False),  # under torch.no_grad in the original
  (r"scorer/logit_scale", False),
  (r"vision_tower/btadapter_.*", True),
  (r"vision_tower/.*", False),  # the CLIP ViT
)

QWEN_SFT: Rules = (
  (r"language_model/.*", True),
  (r"multi_modal_projector/.*", True),
  (r"image_newline", True),
  (r"scorer/logit_(scale|bias)", False),
  (r"scorer/visual_head/(probe|attention/out_proj/.*)", False),  # off the value path
  (r"scorer/(text_model|visual_ln|visual_head)/.*", True),
  (r"vision_tower/.*", False),  # the SigLIP vision tower, its head included
)

DPO: Rules = ((r"language_model/.*", True),)

_NORM = r"(.*/)?[A-Za-z_]*(norm\d*|_ln)"  # RMSNorm / LayerNorm modules, by their names
DECAY_RULES: Rules = (
  (r".*/bias", False),
  (_NORM + r"/weight", False),
  (r".*", True),
)


def path_name(path: Sequence) -> str:
  """An NNX state path as the rules see it: its keys joined by '/'."""
  return "/".join(str(k) for k in path)


def _compile(rules: Rules) -> list[tuple[re.Pattern, object]]:
  compiled = []
  for i, rule in enumerate(rules):
    if not (isinstance(rule, tuple) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ValueError(f"rule {i} must be a (path regex, value) pair, got {rule!r}")
    try:
      compiled.append((re.compile(rule[0]), rule[1]))
    except re.error as err:
      raise ValueError(f"rule {i} {rule[0]!r} is not a regex: {err}") from err
  return compiled


def resolve(rules: Rules, names: Iterable[str], default) -> dict[str, tuple[object, int | None]]:
  """Each name -> (its value, the index of the rule that gave it; None: the default)."""
  compiled = _compile(rules)
  out: dict[str, tuple[object, int | None]] = {}
  for name in names:
    out[name] = next(
      ((value, i) for i, (regex, value) in enumerate(compiled) if regex.fullmatch(name)),
      (default, None),
    )
  return out


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of the table: a rule (or the default / Frozen) and what it took."""

  group: str
  value: object
  tensors: int
  elements: int


def _size(var: nnx.Variable) -> int:
  shape = getattr(var.get_value(), "shape", ())
  n = 1
  for d in shape:
    n *= int(d)
  return n


@dataclasses.dataclass(frozen=True)
class Partition:
  """The trainable rules resolved on one model: the set of trainable paths, and the rows
  of the table. Build it with ``partition``."""

  trainable: frozenset[str]  # path names of the trainable nnx.Params
  rows: tuple[Row, ...]
  unused: tuple[str, ...]  # rules that matched no parameter

  def is_trainable(self, path: Sequence, var=None) -> bool:
    return path_name(path) in self.trainable

  @property
  def filter(self):
    """The NNX filter of the trainable variables (``nnx.Param`` and named by the rules)."""
    return nnx.All(nnx.Param, self.is_trainable)

  def split(self, model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable state, frozen state: everything else)."""
    return nnx.split(model, self.filter, ...)  # type: ignore[return-value]  # two filters: 2 states

  def table(self) -> str:
    width = max(len(r.group) for r in self.rows)
    lines = [f"{'group':<{width}}  {'value':>7}  {'tensors':>7}  {'elements':>13}"]
    for r in self.rows:
      lines.append(f"{r.group:<{width}}  {str(r.value):>7}  {r.tensors:>7}  {r.elements:>13,}")
    total = sum(r.elements for r in self.rows)
    trained = sum(r.elements for r in self.rows if r.value is True)
    lines.append(
      f"trainable: {trained:,} of {total:,} elements "
      f"({100 * trained / max(total, 1):.2f}%) in {len(self.trainable)} tensors"
    )
    return "\n".join(lines)


def partition(model: nnx.Module | nnx.State, rules: Rules, default: bool = False) -> Partition:
  """Resolves the trainable ``rules`` (values True / False) on ``model`` (a module, an
  abstract one from ``nnx.eval_shape``, or its state); unmatched parameters take
  ``default``. Logs the table, and the rules that matched nothing (``unused``)."""
  bad = [r for r in rules if not isinstance(r[1], bool)]
  if bad:
    raise ValueError(f"trainable rules take True / False values, got {bad}")
  state = model if isinstance(model, nnx.State) else nnx.state(model)
  params: list[tuple[str, int]]
  other: list[tuple[str, int]]
  params, other = [], []
  for path, var in nnx.to_flat_state(state):
    (params if isinstance(var, nnx.Param) else other).append((path_name(path), _size(var)))
  decided = resolve(rules, [name for name, _ in params], default)
  sizes = dict(params)
  rows, unused = [], []
  for i, (regex, value) in enumerate(rules):
    hit = [n for n, (_, j) in decided.items() if j == i]
    rows.append(Row(regex, value, len(hit), sum(sizes[n] for n in hit)))
    if not hit:
      unused.append(regex)
  rest = [n for n, (_, j) in decided.items() if j is None]
  rows.append(Row("(no rule: default)", default, len(rest), sum(sizes[n] for n in rest)))
  rows.append(Row("(Frozen variables)", False, len(other), sum(s for _, s in other)))
  result = Partition(frozenset(n for n, (v, _) in decided.items() if v), tuple(rows), tuple(unused))
  log.info("trainable parameters:\n%s", result.table())
  if unused:  # a preset's rule for a part this model lacks (a BT-Adapter): the table's 0
    log.info("rules that match no parameter of this model: %s", ", ".join(map(repr, unused)))
  return result


def map_by_path(fn, state: nnx.State) -> nnx.State:
  """``state`` with each variable's value replaced by ``fn(path name, variable)``: a tree of
  the same structure (a mask, a sharding per parameter)."""
  key = lambda k: getattr(k, "key", getattr(k, "idx", k))
  return jax.tree.map_with_path(
    lambda path, var: var.replace(value=fn(path_name([key(k) for k in path]), var)),
    state,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )


def decay_mask(params: nnx.State, rules: Rules = DECAY_RULES) -> nnx.State:
  """A bool per parameter of ``params`` (same structure): whether weight decay applies.
  Every parameter must be matched (``DECAY_RULES`` ends in a catch-all)."""
  names = [path_name(p) for p, _ in nnx.to_flat_state(params)]
  decided = resolve(rules, names, None)
  missing = [n for n, (v, _) in decided.items() if v is None]
  if missing:
    raise ValueError(
      f"the weight-decay rules match no rule for {missing[:5]}: end them with a "
      "catch-all (r'.*', True)"
    )
  return map_by_path(lambda name, _: bool(decided[name][0]), params)
