"""The typed config tree of a training run, and ``--set a.b=v`` overrides.

``RunConfig`` is what a ``configs/*.py`` ``get_config()`` returns for ``train.py``: the
model (a pretrained folder, or a tiny random one built in code), the data (SFT's
``data.pipeline.DataConfig``, or DPO's ``data.pairs.PreferenceDataConfig`` with its
``DPOConfig``), what the step needs (``train.config.TrainConfig``) and the loop's own
settings. Strings in the data, preference and mcq sections may contain ``{workdir}``: the
loop replaces it with the run's folder (a config that generates its data there).

``apply_overrides(cfg, ["train.optim.lr=1e-3", "steps=20"])`` parses each value with the
type of the field it sets (int, float, bool, str, None for optional fields, tuples and
anything else as a Python literal); an unknown key is an error naming the valid ones.
``to_json`` / ``from_json`` round-trip the whole tree (what a checkpoint stores).
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
  scorer_tokenizer: the scorer's tokenizer folder (default: ``clip``, else
  ``checkpoint``). btadapter: a fresh BT-Adapter put on a CLIP tower that has none
  (``PPLLaVA.add_btadapter``, the Vicuna recipe's start); a tower that has one keeps it."""
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
  multiple-choice accuracy, at its own interval (``McqEvalConfig``).

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

  def __post_init__(self):
    for name in ("steps", "log_every", "checkpoint_every", "keep", "max_nan_in_a_row"):
      if getattr(self, name) < 1:
        raise ValueError(f"RunConfig.{name} must be >= 1, got {getattr(self, name)}")
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
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError) as err:
    raise ValueError(f"--set {key}={text}: not a {getattr(base, '__name__', base)} ({err})") from None
  return _coerce(value, base, key)


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
