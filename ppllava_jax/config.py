"""Configs are typed dataclasses; a config file is Python with a ``get_config()``.

As in big_vision, a run is described by a file under ``configs/`` that builds the
dataclass, so every setting is named, typed and checked in one place.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Any


def load_config(path: str | Path, expected_type: type | None = None) -> Any:
  """What the ``get_config()`` of the Python file at ``path`` returns, checked to be an
  ``expected_type`` (a dataclass in any case)."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path} defines no get_config()")
  config = module.get_config()
  if expected_type is not None and not isinstance(config, expected_type):
    raise ValueError(f"{path}: get_config() returned {type(config).__name__}, "
                    f"expected {expected_type.__name__}")
  if not dataclasses.is_dataclass(config):
    raise ValueError(f"{path}: get_config() must return a dataclass, got {type(config).__name__}")
  return config
