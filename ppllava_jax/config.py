"""The one home of the config mechanism: a config file, ``--set`` overrides, JSON.

Configs are typed frozen dataclasses, each beside what it configures (the step's in
``train.core.config``, the run's in ``train.run.config``, the data's in ``data.*``), so
every setting is named, typed and checked when built. As in big_vision, a run is a
Python file under ``configs/`` whose ``get_config()`` builds it (``load_config``).

``apply_overrides(cfg, ["train.optim.lr=1e-3", "steps=20"])`` parses each value with the
type of the field it sets (int, float, bool, str, None for optional fields, tuples and
anything else as a Python literal; a tuple of strings also as ``a,b``); an unknown key is
an error naming the valid ones. An item of a tuple of sections is named by its index or,
for corpora, its name: ``data.mixture.corpora.videos.annotation=/data/v.json`` (or
``corpora.1.annotation=...``). ``to_json`` / ``from_json`` (``to_dict`` / ``from_dict``)
round-trip a whole tree, typed (what a checkpoint stores).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import json
import types
import typing
from pathlib import Path
from typing import Any


def load_config(path: str | Path, expected_type: type | None = None) -> Any:
  """What the ``get_config()`` of the Python file at ``path`` returns, checked to be an
  ``expected_type`` (a dataclass in any case)."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
  if spec is None or spec.loader is None:  # a suffix no loader claims
    raise ValueError(f"{path}: a config is a Python file (.py) defining get_config()")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path} defines no get_config()")
  config = module.get_config()
  if expected_type is not None and not isinstance(config, expected_type):
    raise ValueError(
      f"{path}: get_config() returned {type(config).__name__}, expected {expected_type.__name__}"
    )
  if not dataclasses.is_dataclass(config):
    raise ValueError(f"{path}: get_config() must return a dataclass, got {type(config).__name__}")
  return config


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
    raise ValueError(
      f"--set {key}={text}: not a {getattr(base, '__name__', base)} ({err})"
    ) from None
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
    raise ValueError(
      f"--set {prefix}.{next(iter(tree))}: {prefix} is not a config section ({type(node).__name__})"
    )
  valid, changes = _fields(type(node)), {}
  for name, sub in tree.items():
    key = f"{prefix}.{name}".lstrip(".")
    if name not in valid:
      where = prefix or "the config"
      raise ValueError(
        f"--set {key}: {where} ({type(node).__name__}) has no field {name!r}; "
        f"valid: {', '.join(valid)}"
      )
    if isinstance(sub, dict):
      changes[name] = _apply(getattr(node, name), sub, key)
    else:
      # is_dataclass narrows to "instance or class"; node is an instance (a config section)
      changes[name] = parse_value(sub[0], _hints(type(node))[name], sub[1])  # type: ignore[arg-type]
  return dataclasses.replace(node, **changes)  # type: ignore[type-var]


def _apply_items(items: tuple, tree: dict, prefix: str) -> tuple:
  """Overrides of the items of a tuple of sections, each named by its index or its
  ``name`` field."""
  names = [getattr(item, "name", None) for item in items]
  out = list(items)
  for part, sub in tree.items():
    index = (
      int(part)
      if part.isdigit() and int(part) < len(items)
      else names.index(part)
      if part in names
      else None
    )
    if index is None:
      valid = ", ".join([str(i) for i in range(len(items))] + [n for n in names if n])
      raise ValueError(f"--set {prefix}.{part}: {prefix} has no item {part!r}; valid: {valid}")
    if not isinstance(sub, dict):
      raise ValueError(
        f"--set {prefix}.{part}: set a field of the item ({prefix}.{part}.FIELD="
        f"...), or the whole tuple ({prefix}=...)"
      )
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
  missing = [
    f.name
    for f in dataclasses.fields(cls)
    if f.init
    and f.name not in kwargs
    and f.default is dataclasses.MISSING
    and f.default_factory is dataclasses.MISSING
  ]
  if missing:
    raise ValueError(f"{key or cls.__name__}: missing field(s) {', '.join(missing)}")
  return cls(**kwargs)


def _tuples(value):
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def from_json(cls, text: str):
  """A ``cls`` dataclass from ``to_json``'s text."""
  return from_dict(cls, json.loads(text))
