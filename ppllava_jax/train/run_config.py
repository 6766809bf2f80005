"""The typed config tree of a training run, and ``--set a.b=v`` overrides.

``RunConfig`` is what a ``configs/*.py`` ``get_config()`` returns for ``train.py``: the
model (a pretrained folder, or a tiny random one built in code), the data (SFT's
``data.pipeline.DataConfig``, or DPO's ``data.pairs.PreferenceDataConfig`` with its
``DPOConfig``), what the step needs (``train.config.TrainConfig``) and the loop's own
settings. Strings in the data, preference and mcq sections may contain ``{workdir}``: the
loop replaces it with the run's folder (a config that generates its data there).

``apply_overrides(cfg, ["train.optim.lr=1e-3", "steps=20"])`` parses each value with the
type of the field it sets (int, float, bool, str, None for optional fields, tuples and
anything else as a Python literal; a tuple of strings also as ``a,b``); an unknown key is
an error naming the valid ones. An item of a tuple of sections is named by its index or,
for corpora, its name: ``data.mixture.corpora.videos.annotation=/data/v.json`` (or
``corpora.1.annotation=...``). ``to_json`` / ``from_json`` round-trip the whole tree (what
a checkpoint stores).

A workdir belongs to one run: ``resume_changes(stored, cfg)`` lists what a resumed run
would change in the checkpoint's config. ``SAFE_ON_RESUME`` may always change (when to
log, evaluate and checkpoint, where to stop, the data workers, the mesh, remat and the
attention kernel: how the same updates are computed or reported, not which); anything
else that differs stops the run unless ``RunConfig.resume`` names it.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import types
import typing
from typing import Any

from ppllava_jax.data.pairs import PreferenceDataConfig
from ppllava_jax.data.pipeline import DataConfig
from ppllava_jax.eval.mcq.protocols import PROTOCOLS
from ppllava_jax.models.btadapter import BTAdapterConfig
from ppllava_jax.models.tiny import TinyConfig
from ppllava_jax.train.config import TrainConfig
from ppllava_jax.train.preference import DPOConfig


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """checkpoint: a transformers-layout folder (``PPLLaVA.from_pretrained``: llava-hf,
  PPLLaVA's own, or one ``train.py export`` wrote) with its tokenizer; empty: the tiny
  random model ``tiny`` (``models.tiny.build_tiny``) and the char tokenizer. clip: a CLIP /
  SigLIP folder whose text tower becomes the scorer, for a llava-hf folder without one.
  scorer_tokenizer: the scorer's tokenizer folder (default: ``clip``, else the
  checkpoint's ``scorer_tokenizer/``, else its config.json's ``clip_weight`` folder:
  ``data.tokenizer.tokenizer_folders``). btadapter: a fresh BT-Adapter put on a CLIP
  tower that has none (``PPLLaVA.add_btadapter``, the Vicuna recipe's start); a tower that
  has one keeps it."""
  checkpoint: str = ""
  clip: str = ""
  scorer_tokenizer: str = ""
  btadapter: BTAdapterConfig | None = None
  tiny: TinyConfig = TinyConfig()


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """A set the loop draws into ``{workdir}/data`` first (``train.synthetic``): ``kind``
  "qa" (SFT): ``train.json`` of ``videos`` videos; "preference" (DPO):
  ``preference.jsonl``, a pair per video; both with the held-out ``eval.json`` and
  multiple-choice tasks of ``eval_videos`` others."""
  kind: str = "qa"
  videos: int = 24
  eval_videos: int = 0
  frames: int = 8
  size: int = 64
  seed: int = 0

  def __post_init__(self):
    if self.kind not in ("qa", "preference"):
      raise ValueError(f"SyntheticConfig.kind must be 'qa' or 'preference', got {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class McqEvalConfig:
  """Multiple-choice accuracy during training, measured as ``eval.py --mvbench`` does: the
  current parameters answer the items of ``tasks`` (an MVBench task JSON file, or a folder
  of them; a task is named by its file's stem) about the videos under ``video_root``; both
  may contain ``{workdir}``. every: batches between evaluations (0: none during the run);
  the run's last batch is always evaluated. protocol: ``eval.py --protocol`` (prompts and
  scoring); frames: sampled per video (None: eval.py's 32); max_new_tokens (None: the
  protocol's); limit: only the first items (0: all)."""
  tasks: str
  video_root: str
  every: int = 0
  protocol: str = "original"
  frames: int | None = None
  batch_size: int = 4
  max_new_tokens: int | None = None
  limit: int = 0

  def __post_init__(self):
    if not self.tasks or not self.video_root:
      raise ValueError("McqEvalConfig needs tasks and video_root")
    if self.protocol not in PROTOCOLS:
      raise ValueError(f"McqEvalConfig.protocol must be one of {PROTOCOLS}, got "
                       f"{self.protocol!r}")
    if self.every < 0 or self.limit < 0 or self.batch_size < 1:
      raise ValueError(f"McqEvalConfig: need every >= 0, limit >= 0 and batch_size >= 1, got "
                       f"{self.every}, {self.limit}, {self.batch_size}")
    for name in ("frames", "max_new_tokens"):
      if getattr(self, name) is not None and getattr(self, name) < 1:
        raise ValueError(f"McqEvalConfig.{name} must be >= 1 or None, got "
                         f"{getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """steps: updates the run makes (each of ``train.optim.grad_accum`` batches; a skipped
  one counts too); log_every, checkpoint_every: in steps; keep: checkpoints kept; init_from: an Orbax checkpoint
  (a workdir, its ``checkpoints`` folder or one step's folder) whose trainable parameters
  start a run that has none of its own; max_nan_in_a_row: consecutive skipped updates
  that stop the run; peak_flops: the FLOP/s the MFU estimate divides by (default: about
  what this class of CPU does); eval_every: steps between evaluations (0: none) of
  the token-mean loss over the first ``eval_batches`` batches of ``eval_data``; mcq:
  multiple-choice accuracy, at its own interval (``McqEvalConfig``); resume: config keys
  (or whole sections) that may differ from the checkpoint's when the run resumes, beyond
  ``SAFE_ON_RESUME`` (``--set resume=train.optim.lr,data.mixture``).

  The run's kind: SFT with ``data``; DPO with ``preference`` (pairs, ``data.pairs``) and
  ``dpo`` (the loss and the reference, ``train.preference.DPOConfig``) instead. The held-out
  loss (``eval_data``) is SFT's; a DPO run measures multiple-choice accuracy (``mcq``)."""
  data: DataConfig | None = None
  preference: PreferenceDataConfig | None = None
  dpo: DPOConfig | None = None
  model: ModelConfig = ModelConfig()
  eval_data: DataConfig | None = None
  eval_every: int = 0
  eval_batches: int = 4
  mcq: McqEvalConfig | None = None
  train: TrainConfig = TrainConfig()
  synthetic: SyntheticConfig | None = None
  steps: int = 100
  log_every: int = 10
  checkpoint_every: int = 50
  keep: int = 3
  init_from: str = ""
  max_nan_in_a_row: int = 10
  peak_flops: float = 100e9
  resume: tuple[str, ...] = ()

  def __post_init__(self):
    for name in ("steps", "log_every", "checkpoint_every", "keep", "max_nan_in_a_row"):
      if getattr(self, name) < 1:
        raise ValueError(f"RunConfig.{name} must be >= 1, got {getattr(self, name)}")
    total = self.train.optim.total_steps
    if total is not None and self.steps > total:
      raise ValueError(f"RunConfig.steps={self.steps} is past train.optim.total_steps={total}, "
                       f"where the {self.train.optim.schedule} schedule ends (a cosine would "
                       "climb back to its peak): lower steps, raise train.optim.total_steps, "
                       "or set it to None to follow steps")
    if self.eval_every < 0 or self.eval_batches < 1:
      raise ValueError(f"RunConfig: need eval_every >= 0 and eval_batches >= 1, got "
                       f"{self.eval_every}, {self.eval_batches}")
    if (self.data is None) == (self.preference is None):
      raise ValueError("RunConfig: give data (an SFT run) or preference (a DPO run), not "
                       f"{'both' if self.data else 'neither'}")
    if (self.dpo is None) != (self.preference is None):
      raise ValueError("RunConfig: a DPO run needs both preference (its pairs) and dpo (its "
                       "loss settings); an SFT run neither")
    if self.preference is not None and self.eval_data is not None:
      raise ValueError("RunConfig.eval_data (a held-out SFT loss) is not measured in a DPO run; "
                       "use mcq for accuracy during training")
    if self.eval_every and self.eval_data is None:
      raise ValueError("RunConfig.eval_every is set but there is no eval_data")
    if self.peak_flops <= 0:
      raise ValueError(f"RunConfig.peak_flops must be positive, got {self.peak_flops}")


  def resolved(self) -> "RunConfig":
    """This config with ``train.optim.total_steps`` set (None follows ``steps``): what a
    run computes with, stores and compares at resume."""
    if self.train.optim.total_steps is not None:
      return self
    optim = dataclasses.replace(self.train.optim, total_steps=self.steps)
    return dataclasses.replace(self, train=dataclasses.replace(self.train, optim=optim))


# Keys that change how a run is reported, when it stops, or how the same updates are laid
# out on the machine, never which updates it makes (module doc).
SAFE_ON_RESUME = ("steps", "log_every", "checkpoint_every", "keep", "eval_every",
                  "eval_batches", "eval_data", "mcq", "max_nan_in_a_row", "peak_flops",
                  "resume", "data.num_workers", "data.worker_buffer_size", "data.threads",
                  "preference.num_workers", "preference.worker_buffer_size",
                  "preference.threads", "train.mesh", "train.remat", "train.attention")


def _flat(tree, prefix: str = "") -> dict[str, Any]:
  """``to_dict``'s tree as dotted keys; a list of sections by their ``name`` (or index),
  as ``--set`` names them."""
  if isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
    tree = {str(v.get("name", i)): v for i, v in enumerate(tree)}
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flat(value, f"{prefix}.{key}" if prefix else key))
    return out if out or not prefix else {prefix: {}}
  return {prefix: tree}


def _under(key: str, prefixes) -> bool:
  return any(key == p or key.startswith(p + ".") for p in prefixes)


def resume_changes(stored: dict, cfg: RunConfig) -> tuple[list[str], list[str]]:
  """(refused, allowed): ``key: stored -> new`` for each config key that ``cfg`` (resolved)
  changes in ``stored`` (a checkpoint's ``to_dict``); refused unless ``SAFE_ON_RESUME`` or
  ``cfg.resume`` covers it."""
  old = _flat(to_dict(from_dict(RunConfig, _tuples(stored))))  # defaults of newer fields
  new = _flat(to_dict(cfg.resolved()))
  refused, allowed = [], []
  for key in sorted(set(old) | set(new)):
    if old.get(key, "(absent)") != new.get(key, "(absent)"):
      line = f"{key}: {old.get(key, '(absent)')!r} -> {new.get(key, '(absent)')!r}"
      (allowed if _under(key, SAFE_ON_RESUME + cfg.resume) else refused).append(line)
  return refused, allowed


@functools.cache
def _hints(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _optional(tp) -> tuple[Any, bool]:
  """(the type without None, whether None is allowed)."""
  if typing.get_origin(tp) in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return (args[0] if len(args) == 1 else tp), len(args) < len(typing.get_args(tp))
  return tp, False


def parse_value(text: str, tp, key: str = "value"):
  """``text`` as a value of type ``tp`` (module doc)."""
  base, nullable = _optional(tp)
  if nullable and text.strip().lower() == "none":
    return None
  try:
    if base is bool:
      low = text.strip().lower()
      if low in ("true", "1", "yes"):
        return True
      if low in ("false", "0", "no"):
        return False
      raise ValueError("expected true / false")
    if base is int:
      return int(text)
    if base is float:
      return float(text)
    if base is str:
      return text
    if _str_tuple(base) and not text.strip().startswith(("(", "[")):
      return tuple(part.strip() for part in text.split(",") if part.strip())
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError) as err:
    raise ValueError(f"--set {key}={text}: not a {getattr(base, '__name__', base)} ({err})") from None
  return _coerce(value, base, key)


def _str_tuple(tp) -> bool:
  return typing.get_origin(tp) is tuple and typing.get_args(tp) == (str, Ellipsis)


def _coerce(value, tp, key):
  base, nullable = _optional(tp)
  if value is None and nullable:
    return None
  if dataclasses.is_dataclass(base) and isinstance(value, dict):
    return from_dict(base, value, key)
  origin = typing.get_origin(base)
  if origin is tuple or base is tuple:
    if not isinstance(value, (list, tuple)):
      raise ValueError(f"{key}: expected a tuple, got {value!r}")
    args = typing.get_args(base)
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_coerce(v, args[0], key) for v in value)
    if args and len(args) != len(value):
      raise ValueError(f"{key}: expected {len(args)} items, got {value!r}")
    return tuple(_coerce(v, a, key) for v, a in zip(value, args)) if args else tuple(value)
  if base is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if base in (int, float, str, bool) and not isinstance(value, base):
    raise ValueError(f"{key}: expected a {base.__name__}, got {value!r}")
  return value


def _fields(cls) -> list[str]:
  return [f.name for f in dataclasses.fields(cls)]


def apply_overrides(cfg, overrides) -> Any:
  """``cfg`` with each ``a.b.c=value`` applied (module doc). The fields of one section
  change together, so its checks see them all (``data.batch.batch_size=2`` and
  ``data.batch.video_slots=2`` in any order)."""
  tree: dict = {}
  for item in overrides:
    if "=" not in item:
      raise ValueError(f"--set takes key=value, got {item!r}")
    key, text = item.split("=", 1)
    key = key.strip()
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ValueError(f"--set {key}: {part!r} is set as a value and as a section")
    node[parts[-1]] = (text, key)
  return _apply(cfg, tree, "")


def _apply(node, tree: dict, prefix: str):
  if isinstance(node, tuple) and node and all(dataclasses.is_dataclass(v) for v in node):
    return _apply_items(node, tree, prefix)
  if not dataclasses.is_dataclass(node):
    raise ValueError(f"--set {prefix}.{next(iter(tree))}: {prefix} is not a config section "
                     f"({type(node).__name__})")
  valid, changes = _fields(type(node)), {}
  for name, sub in tree.items():
    key = f"{prefix}.{name}".lstrip(".")
    if name not in valid:
      where = prefix or "the config"
      raise ValueError(f"--set {key}: {where} ({type(node).__name__}) has no field {name!r}; "
                       f"valid: {', '.join(valid)}")
    if isinstance(sub, dict):
      changes[name] = _apply(getattr(node, name), sub, key)
    else:
      changes[name] = parse_value(sub[0], _hints(type(node))[name], sub[1])
  return dataclasses.replace(node, **changes)


def _apply_items(items: tuple, tree: dict, prefix: str) -> tuple:
  """Overrides of the items of a tuple of sections, each named by its index or its
  ``name`` field."""
  names = [getattr(item, "name", None) for item in items]
  out = list(items)
  for part, sub in tree.items():
    index = (int(part) if part.isdigit() and int(part) < len(items)
             else names.index(part) if part in names else None)
    if index is None:
      valid = ", ".join([str(i) for i in range(len(items))] + [n for n in names if n])
      raise ValueError(f"--set {prefix}.{part}: {prefix} has no item {part!r}; valid: {valid}")
    if not isinstance(sub, dict):
      raise ValueError(f"--set {prefix}.{part}: set a field of the item ({prefix}.{part}.FIELD="
                       f"...), or the whole tuple ({prefix}=...)")
    out[index] = _apply(out[index], sub, f"{prefix}.{part}")
  return tuple(out)


def to_dict(cfg) -> dict:
  return json.loads(to_json(cfg))


def to_json(cfg) -> str:
  return json.dumps(dataclasses.asdict(cfg), sort_keys=True)


def from_dict(cls, data: dict, key: str = ""):
  """A ``cls`` dataclass from ``to_dict``'s output (lists back to tuples, typed)."""
  hints, kwargs = _hints(cls), {}
  for name, value in data.items():
    if name not in hints:
      raise ValueError(f"{key or cls.__name__}: unknown field {name!r}")
    kwargs[name] = _coerce(_tuples(value), hints[name], f"{key}.{name}".lstrip("."))
  missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in kwargs
             and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
  if missing:
    raise ValueError(f"{key or cls.__name__}: missing field(s) {', '.join(missing)}")
  return cls(**kwargs)


def _tuples(value):
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def from_json(text: str) -> RunConfig:
  return from_dict(RunConfig, json.loads(text))


def with_workdir(cfg: RunConfig, workdir: str) -> RunConfig:
  """The data, preference and mcq sections with ``{workdir}`` replaced in every string."""
  def sub(node):
    if dataclasses.is_dataclass(node):
      return dataclasses.replace(node, **{f.name: sub(getattr(node, f.name))
                                          for f in dataclasses.fields(node) if f.init})
    if isinstance(node, tuple):
      return tuple(sub(v) for v in node)
    if isinstance(node, str):
      return node.replace("{workdir}", str(workdir))
    return node
  return dataclasses.replace(cfg, data=sub(cfg.data), preference=sub(cfg.preference),
                             eval_data=sub(cfg.eval_data), mcq=sub(cfg.mcq))
