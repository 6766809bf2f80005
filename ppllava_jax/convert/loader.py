"""One strict, streaming safetensors <-> NNX loader driven by per-family rule tables.

It imports no model: the tables beside it are data, and models call it from their
``from_pretrained`` / ``save_pretrained``.

A ``Rule`` pairs a Hugging Face key template with our parameter-path template and a
``Transform`` (how the tensor is laid out on each side). Templates use ``{name}`` for
one dotted segment, ``{name*}`` for one or more, and ``{name:a|b}`` for a choice, so
the same table maps names both ways (load and save). Rules are tried in order.

Loading fills an abstract model (``nnx.eval_shape``: no random init of billions of
weights) tensor by tensor; it fails with one error listing every unexpected key,
every parameter left unfilled and every shape mismatch. Nothing is skipped silently:
keys that checkpoints carry but models do not need are ignored only by an explicit
``Rule(hf, None)``.

Saving walks the model's state through the same table (``hf_tensors``);
``named_tensors`` does it for any tree shaped like (part of) that state: gradients,
updates, optimizer moments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.flax import save_file
from tqdm.auto import tqdm

from ppllava_jax.files import DataFileError, read_json

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_ModelT = TypeVar("_ModelT", bound=nnx.Module)  # load_into returns its model's type


class Transform(enum.Enum):
  """How a tensor's axes are laid out in torch vs here, as the permutation to ours."""

  COPY = None
  LINEAR = (1, 0)  # torch (out, in) -> ours (in, out)
  CONV = (2, 3, 1, 0)  # torch (out, in, kh, kw) -> ours (kh, kw, in, out)

  def to_ours(self, x: jax.Array) -> jax.Array:
    return x if self.value is None else x.transpose(self.value)

  def to_hf(self, x: jax.Array) -> jax.Array:
    return x if self.value is None else x.transpose(tuple(np.argsort(self.value)))


_PLACEHOLDER = re.compile(r"\{(\w+)(\*)?(?::([^}]*))?\}")


def _template_regex(template: str) -> re.Pattern:
  parts, pos = [], 0
  for m in _PLACEHOLDER.finditer(template):
    parts.append(re.escape(template[pos : m.start()]))
    name, many, choices = m.groups()
    body = choices if choices else (r".+" if many else r"[^.]+")
    parts.append(f"(?P<{name}>{body})")
    pos = m.end()
  parts.append(re.escape(template[pos:]))
  return re.compile("".join(parts))


def _fill(template: str, groups: dict[str, str]) -> str:
  return _PLACEHOLDER.sub(lambda m: groups[m.group(1)], template)


@dataclasses.dataclass(frozen=True)
class Rule:
  hf: str
  ours: str | None  # None: a key checkpoints carry that has no parameter (ignored, explicitly)
  transform: Transform = Transform.COPY


def _match(name: str, rules: Sequence[Rule], side: str) -> tuple[Rule, dict[str, str]] | None:
  for rule in rules:
    template = getattr(rule, side)
    if template is None:
      continue
    m = _template_regex(template).fullmatch(name)
    if m:
      return rule, m.groupdict()
  return None


def _hf_key(name: str, rules: Sequence[Rule]) -> tuple[str, Rule] | None:
  """The checkpoint key that holds our parameter ``name`` and its rule (``ours -> hf``)."""
  hit = _match(name, rules, "ours")
  return None if hit is None else (_fill(hit[0].hf, hit[1]), hit[0])


class CheckpointError(ValueError):
  """A checkpoint that does not fit the model; the message lists every problem."""


def read_checkpoint_json(file: Path) -> dict[str, Any]:
  """The JSON object in ``file`` (config.json, the index) of a checkpoint folder; a bad
  file fails naming itself, the line and the folder."""
  try:
    return read_json(file, expect=dict)
  except DataFileError as err:
    raise CheckpointError(f"{err}; checkpoint {file.parent} cannot be loaded") from err


def checkpoint_files(path: str | Path) -> list[Path]:
  """The safetensors files of a checkpoint folder (single file or sharded with an index)."""
  path = Path(path)
  if not path.is_dir():
    raise CheckpointError(f"checkpoint folder not found: {path}")
  if (path / INDEX_FILE).is_file():
    weight_map = read_checkpoint_json(path / INDEX_FILE).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
      raise CheckpointError(
        f'{path / INDEX_FILE}: no "weight_map" object of tensor names to '
        f"shard files; checkpoint {path} cannot be loaded"
      )
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (path / s).is_file()]
    if missing:
      raise CheckpointError(f"{path / INDEX_FILE} names shards that are not there: {missing}")
    return [path / s for s in shards]
  if (path / SINGLE_FILE).is_file():
    return [path / SINGLE_FILE]
  found = sorted(p.name for p in path.iterdir())
  raise CheckpointError(
    f"no {SINGLE_FILE} or {INDEX_FILE} in {path} (found: {found}); "
    "only safetensors checkpoints are read"
  )


@contextlib.contextmanager
def _reading(file: Path):
  """Opens a safetensors file; a damaged one (empty, truncated, a bad header) fails with
  one error naming it, its size and its folder, not safetensors' bare message."""
  try:
    with safe_open(file, framework="flax") as f:
      yield f
  except SafetensorError as err:
    raise CheckpointError(
      f"{file}: not a readable safetensors file ({file.stat().st_size:,} "
      f"bytes; safetensors: {err}); it may be truncated or corrupt, so "
      f"checkpoint {file.parent} cannot be loaded"
    ) from err


def checkpoint_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
  """Every tensor's name and shape in the checkpoint at ``path``, from the headers only."""
  shapes = {}
  for file in checkpoint_files(path):
    with _reading(file) as f:
      shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
  return shapes


def checkpoint_keys(path: str | Path) -> set[str]:
  return set(checkpoint_shapes(path))


def iter_tensors(files: Sequence[Path]) -> Iterator[tuple[str, jax.Array]]:
  """Streams (key, array) one tensor at a time, dtypes as stored (bf16 stays bf16)."""
  for file in files:
    with _reading(file) as f:
      for key in f.keys():
        yield key, f.get_tensor(key)


def _param_paths(state: nnx.State) -> dict[str, tuple]:
  return {".".join(map(str, path)): path for path, _ in nnx.to_flat_state(state)}


def _missing_key(name: str, rules: Sequence[Rule]) -> str:
  """A missing parameter as the checkpoint would spell it, beside our name when they differ."""
  hit = _hf_key(name, rules)
  if hit is None:
    return f"{name} (a model parameter no rule names)"
  return hit[0] if hit[0] == name else f"{hit[0]} (-> {name})"


def load_into(
  abstract_model: _ModelT,
  path: str | Path,
  rules: Sequence[Rule],
  dtype: jnp.dtype | None = None,
  progress: bool = False,
) -> _ModelT:
  """Fills ``abstract_model`` (from ``nnx.eval_shape``) from the checkpoint at ``path``.

  ``dtype`` casts floating tensors; by default each keeps its stored dtype.
  """
  graphdef, state = nnx.split(abstract_model)
  flat = dict(nnx.to_flat_state(state))
  wanted = _param_paths(state)
  filled: dict[tuple, jax.Array] = {}
  unexpected, mismatched, mismatched_names = [], [], set()
  files = checkpoint_files(path)
  for key, tensor in tqdm(
    iter_tensors(files), desc=f"reading {Path(path).name}", unit="tensor", disable=not progress
  ):
    hit = _match(key, rules, "hf")
    if hit is None:
      unexpected.append(key)
      continue
    rule, groups = hit
    if rule.ours is None:
      continue
    name = _fill(rule.ours, groups)
    if name not in wanted:
      unexpected.append(f"{key} (-> {name}, which the model does not have)")
      continue
    value = rule.transform.to_ours(tensor)
    target = flat[wanted[name]]
    if tuple(value.shape) != tuple(target.shape):
      mismatched.append(
        f"{key}: checkpoint {tuple(tensor.shape)} -> {tuple(value.shape)}, "
        f"model {name} expects {tuple(target.shape)}"
      )
      mismatched_names.add(name)
      continue
    if dtype is not None and jnp.issubdtype(value.dtype, jnp.floating):
      value = value.astype(dtype)
    filled[wanted[name]] = value
  missing = sorted(
    _missing_key(name, rules)
    for name, p in wanted.items()
    if p not in filled and name not in mismatched_names
  )
  if unexpected or missing or mismatched:
    lines = [f"checkpoint {Path(path)} does not fit {type(abstract_model).__name__}:"]
    for title, items in (
      ("missing (keys the checkpoint lacks -> the parameter each fills)", missing),
      ("unexpected (keys no parameter takes)", unexpected),
      ("shape mismatches", mismatched),
    ):
      if items:
        lines.append(f"  {title}: {len(items)}")
        lines += [f"    {item}" for item in items[:50]]
        if len(items) > 50:
          lines.append(f"    ... and {len(items) - 50} more")
    raise CheckpointError("\n".join(lines))
  for p, value in filled.items():
    flat[p].set_value(value)
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def hf_tensors(model: nnx.Module, rules: Sequence[Rule]) -> Iterator[tuple[str, jax.Array]]:
  """The model's parameters under their Hugging Face names and layouts, one at a time."""
  for name, value in tree_leaves_by_name(nnx.state(model)):
    named = _to_checkpoint(name, jnp.asarray(value), rules)
    if named is None:
      raise CheckpointError(f"no rule names parameter {name} for saving")
    yield named


def _to_checkpoint(name: str, value, rules: Sequence[Rule]) -> tuple[str, Any] | None:
  """(checkpoint tensor name, ``value`` in the checkpoint's layout) of the parameter at
  dotted path ``name``, or None when no rule names it."""
  hit = _hf_key(name, rules)
  if hit is None:
    return None
  key, rule = hit
  return key, rule.transform.to_hf(value)


def path_segment(entry) -> str:
  """One step of a jax key path as a state path segment: a dict key, an index, an attribute."""
  for field in ("key", "idx", "name"):
    if hasattr(entry, field):
      return str(getattr(entry, field))
  return str(entry)


def tree_leaves_by_name(tree) -> list[tuple[str, Any]]:
  """(dotted state path, value) of every leaf of ``tree``: an ``nnx.State`` (its
  ``nnx.Variable``s or plain arrays as leaves) or nested dicts / lists keyed like one
  (``nnx.to_pure_dict``); None leaves (masked-out parts) are no leaves."""
  flat, _ = jax.tree_util.tree_flatten_with_path(
    tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )
  return [
    (
      ".".join(path_segment(k) for k in path),
      leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf,
    )
    for path, leaf in flat
  ]


def named_tensors(
  tree, rules: Sequence[Rule], shapes: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, Any]:
  """``{checkpoint tensor name: value in the checkpoint's layout}`` of ``tree``, shaped like a
  model's parameter state or a part of it (``tree_leaves_by_name``), by the rules saving
  uses (``hf_tensors``): the same names, transposes and reshapes. ``shapes`` (the model's
  parameters by dotted path) also checks that every leaf is one of them, in its shape.
  Leaves with no checkpoint name raise one ``CheckpointError`` listing each."""
  named, problems = {}, []
  for name, value in tree_leaves_by_name(tree):
    if shapes is not None and name not in shapes:
      problems.append(f"{name}: not a parameter of the model")
      continue
    if shapes is not None and tuple(np.shape(value)) != tuple(shapes[name]):
      problems.append(
        f"{name}: shape {tuple(np.shape(value))}, the parameter's is {tuple(shapes[name])}"
      )
      continue
    hit = _to_checkpoint(name, value, rules)
    if hit is None:
      problems.append(f"{name}: no rule of the table names it")
      continue
    named[hit[0]] = hit[1]
  if problems:
    raise CheckpointError(
      f"{len(problems)} leaves of the tree have no checkpoint tensor name:\n"
      + "\n".join(f"  {p}" for p in problems)
    )
  return named


def _ordinary_permissions(file: Path) -> None:
  """Gives ``file`` the mode a plain ``open()`` would (0o666 less the umask). safetensors
  0.8 writes through a temporary file created 0o600 (safetensors issue #782), which
  would leave checkpoints readable by their writer alone."""
  umask = os.umask(0o077)  # reading it means setting it: a strict one for that instant
  os.umask(umask)
  file.chmod(0o666 & ~umask)


def save_tensors(
  tensors: Iterable[tuple[str, jax.Array]],
  path: str | Path,
  max_shard_bytes: int = 5 * 2**30,
  progress: bool = False,
) -> list[Path]:
  """Writes (name, array) pairs as safetensors, streaming: at most one shard in memory.

  One shard is ``model.safetensors``; more are ``model-0000i-of-0000n.safetensors`` with
  a ``model.safetensors.index.json``, as transformers writes them.
  """
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  shards: list[tuple[Path, list[str]]]
  current: dict[str, jax.Array]
  shards, current, size = [], {}, 0

  def flush():
    nonlocal current, size
    file = path / f"shard-{len(shards):05d}.tmp"
    save_file(current, str(file), metadata={"format": "pt"})
    _ordinary_permissions(file)
    shards.append((file, list(current)))
    current, size = {}, 0

  for name, value in tqdm(
    tensors, desc=f"writing {path.name}", unit="tensor", disable=not progress
  ):
    # safetensors wants contiguous host buffers; transposed views are materialised here.
    host = jnp.asarray(np.array(jax.device_get(value), order="C"))
    if current and size + host.nbytes > max_shard_bytes:
      flush()
    current[name] = host
    size += host.nbytes
  if current or not shards:
    flush()
  if len(shards) == 1:
    final = [shards[0][0].rename(path / SINGLE_FILE)]
  else:
    n = len(shards)
    final = [
      file.rename(path / f"model-{i + 1:05d}-of-{n:05d}.safetensors")
      for i, (file, _) in enumerate(shards)
    ]
    weight_map = {name: f.name for f, (_, names) in zip(final, shards) for name in names}
    (path / INDEX_FILE).write_text(
      json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n"
    )
  return final
