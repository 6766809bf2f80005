"""Configs are typed dataclasses; a config file is Python with a ``get_config()``.

As in big_vision, a run is described by a file under ``configs/`` that builds the
dataclass, so every setting is named, typed and checked in one place.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any


def load_config(path: str | Path, expected_type: type | None = None,
                functions: tuple[str, ...] = ("get_config",)) -> Any:
  """Runs the first of ``functions`` that the Python file at ``path`` defines (a recipe
  file may define ``get_run_config()`` beside a ``TrainConfig`` ``get_config()``)."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  name = next((f for f in functions if hasattr(module, f)), None)
  if name is None:
    raise ValueError(f"{path} defines no {' or '.join(f + '()' for f in functions)}")
  config = getattr(module, name)()
  if expected_type is not None and not isinstance(config, expected_type):
    raise TypeError(f"{path}: {name}() returned {type(config).__name__}, "
                    f"expected {expected_type.__name__}")
  if not dataclasses.is_dataclass(config):
    raise TypeError(f"{path}: {name}() must return a dataclass, got {type(config).__name__}")
  return config
