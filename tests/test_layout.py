"""The import rules of docs/architecture.md, read from the source: imports point one way.

Every ``import`` / ``from ... import`` of every module in ``ppllava_jax/`` counts,
function-level (lazy) ones included: a lazy import upward is still an arrow upward.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ppllava_jax"

# A module may import its own layer and those below it.
LAYERS = {
  "ops": 0, "convert": 0, "files": 0, "signals": 0, "cli": 0, "config": 0, "distributed": 0,
  "models": 1, "checkpoints": 2, "data": 3, "eval": 4, "train": 5, "plan": 6, "demo": 6,
}  # fmt: skip
INSIDE = {  # the same inside a folder cut by workflow
  "data": {"media": 0, "text": 0, "batching": 0, "workers": 0, "engine": 1, "processor": 1,
           "sft": 2, "dpo": 3},
  "train": {"core": 0, "sft": 1, "dpo": 1, "align": 1, "run": 2},
}  # fmt: skip


def _imports(path: Path) -> list[tuple[int, str]]:
  """(line, imported ppllava_jax module path) of every import in ``path``."""
  module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: resolve against this module's package
        parent = module.split(".")[: -node.level]
        base = ".".join(parent + ([base] if base else []))
      found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
  return [(line, name) for line, name in found if name.startswith("ppllava_jax.")]


def _violation(source: list[str], target: list[str]) -> str | None:
  """Why ``source`` (a module's path parts under the package) may not import ``target``."""
  top_s, top_t = source[0], target[0]
  if top_s == "__init__" or top_t not in LAYERS:
    return None  # the package's lazy facade; an attribute of the package itself
  if LAYERS[top_t] > LAYERS[top_s]:
    return f"{top_s}/ (layer {LAYERS[top_s]}) imports {top_t} (layer {LAYERS[top_t]})"
  inner = INSIDE.get(top_s)
  if top_s == top_t and inner and len(source) > 1 and len(target) > 1:
    a, b = inner.get(source[1]), inner.get(target[1])
    if a is not None and b is not None and (b > a or (b == a and source[1] != target[1])):
      return f"{top_s}/{source[1]} imports {top_s}/{target[1]}"
  return None


def test_imports_point_one_way():
  wrong = []
  for path in sorted(PACKAGE.rglob("*.py")):
    source = list(path.relative_to(PACKAGE).with_suffix("").parts)
    for line, name in _imports(path):
      why = _violation(source, name.split(".")[1:])
      if why:
        wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name}: {why}")
  assert not wrong, "imports against docs/architecture.md's rules:\n" + "\n".join(wrong)


def test_the_rule_check_sees_an_upward_import():
  assert _violation(["models", "clip"], ["train", "core", "step"])
  assert _violation(["data", "media", "video"], ["data", "sft", "samples"])
  assert _violation(["train", "sft"], ["train", "dpo", "losses"])
  assert _violation(["data", "sft", "samples"], ["data", "media", "frames"]) is None
