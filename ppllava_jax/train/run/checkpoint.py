"""Run checkpoints: an Orbax ``CheckpointManager`` in ``WORKDIR/checkpoints``.

A checkpoint is numbered by the batches the run has consumed (the loop step, which a
skipped update still advances; ``TrainState.step`` counts applied updates) and holds
three items:

- ``state``: the ``TrainState`` (trainable params, optimizer state, update count, base
  rng, skipped count). The frozen parameters are not in it: they are the initial
  checkpoint's, or the tiny model's seeded initialisation, rebuilt on restore.
- ``data``: ``DataIterator.get_state()`` (the global batch cursor and counters), JSON.
- ``config``: the ``RunConfig`` (``ppllava_jax.config.to_dict``), JSON.

Saves are asynchronous (the arrays are copied off the device before ``save`` returns,
so the donated state can go on training); only finalised checkpoints are listed, so a
run killed mid-write resumes from the previous one (the half-written folder is removed
when the manager next starts). ``restore`` reads the state into an
abstract target carrying the run's shardings: every array lands sharded.

Damage: once a save this process made is final, process 0 writes ``files.json`` beside
it (every file's size). ``check`` compares the folder with it and parses the JSON files
Orbax reads, so a truncated, missing or garbled file is named before anything is
restored (``CheckpointDamaged``): evidence every process reads alike from the shared
folder, on which ``set_aside`` renames the checkpoint to ``<step>.damaged`` (kept for
inspection, no longer listed) and the run goes on from the one before. Any other failure
to restore (memory, the filesystem, a library upgrade, a shard garbled at its own size)
is a ``CheckpointError`` naming the checkpoint and Orbax's first line, and nothing is set
aside: a guess of damage would throw away good checkpoints. A checkpoint whose arrays do
not fit the model (another model in the same workdir) is ``CheckpointMismatch``, listing
the differing arrays.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from ppllava_jax import distributed
from ppllava_jax.convert.loader import CheckpointError, path_segment
from ppllava_jax.train.core.state import TrainState

log = logging.getLogger(__name__)
MANIFEST = "files.json"
# The JSON files Orbax reads back, by name: a garbled one fails with no file named.
_JSON_FILES = ("_CHECKPOINT_METADATA", "metadata", "_METADATA", "_sharding", "process_0")


class CheckpointDamaged(CheckpointError):
  """A checkpoint that cannot be read: a file is missing, truncated or garbled."""


class CheckpointMismatch(CheckpointError):
  """A checkpoint whose arrays are not the model's (names, shapes or dtypes differ)."""


class Checkpoints:
  """The checkpoints of one run (module doc)."""

  def __init__(self, workdir: str | Path, keep: int = 3, async_save: bool = True):
    self.directory = Path(workdir).absolute() / "checkpoints"
    # cleanup_tmp_directories: a save that a kill interrupted left a temporary folder;
    # the folder is made by the first save, so a run refused at its start leaves none
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      create=False,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "data", "config")
    )
    self._unlisted: set[int] = set()  # saved here, no manifest yet

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: TrainState, data_state: dict, config: dict) -> None:
    if step in self.manager.all_steps():
      return
    self.wait()  # what Orbax's save would wait for anyway; the manifest of the last one
    self.directory.mkdir(parents=True, exist_ok=True)
    self.manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config),
      ),
      force=True,
    )
    self._unlisted.add(step)
    log.info("checkpoint %d: saving in %s", step, self.directory)

  def _write_manifests(self) -> None:
    """``files.json`` (path -> size) of the finished saves of this process (never of
    checkpoints found here: their sizes now are no evidence)."""
    done, self._unlisted = self._unlisted, set()
    if not distributed.is_primary():
      return
    for step in sorted(done & set(self.manager.all_steps())):  # max_to_keep may drop one
      folder = self.directory / str(step)
      sizes = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file()
      }
      tmp = folder / (MANIFEST + ".tmp")
      tmp.write_text(json.dumps(sizes, indent=0, sort_keys=True))
      os.replace(tmp, folder / MANIFEST)

  def check(self, step: int) -> None:
    """Raises ``CheckpointDamaged`` naming the first file of checkpoint ``step`` that is
    missing, has another size than when it was saved, or is unreadable JSON."""
    folder = self.directory / str(step)
    manifest = folder / MANIFEST
    if manifest.is_file():
      try:
        sizes = json.loads(manifest.read_text())
      except (OSError, ValueError) as err:
        raise CheckpointDamaged(f"{manifest}: unreadable ({err})") from None
      for name, size in sorted(sizes.items()):
        path = folder / name
        found = path.stat().st_size if path.is_file() else None
        if found != size:
          state = "is missing" if found is None else f"has {found} bytes"
          raise CheckpointDamaged(f"{path} {state}; it had {size} when checkpoint {step} was saved")
    for path in sorted(folder.rglob("*")):
      if path.name in _JSON_FILES and path.is_file():
        try:
          json.loads(path.read_bytes())
        except ValueError as err:
          raise CheckpointDamaged(f"{path}: not valid JSON ({err})") from None

  def restore(self, step: int, target: TrainState) -> tuple[TrainState, dict, dict]:
    """(state, data state, config dict) of checkpoint ``step``; ``target``: an abstract
    sharded state (``train.core.state.placed``). Raises ``CheckpointDamaged`` when ``check``
    finds a damaged file, ``CheckpointMismatch`` when its arrays are not ``target``'s, a
    ``CheckpointError`` when Orbax fails to read it for any other reason."""
    self.check(step)
    check_fits(self.directory / str(step) / "state", target)
    try:
      out = self.manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target),
          data=ocp.args.JsonRestore(),
          config=ocp.args.JsonRestore(),
        ),
      )
    except Exception as err:
      raise CheckpointError(
        f"checkpoint {step} in {self.directory} could not be restored: {_first_line(err)}. "
        f"If its files are damaged, move {self.directory / str(step)} aside and run again "
        "to resume from the checkpoint before it"
      ) from err
    return out.state, out.data, out.config

  def restore_params(self, step: int, target: nnx.State) -> nnx.State:
    """The trainable parameters of checkpoint ``step`` alone (``read_params``), after
    ``check``: what ``export`` needs, without the optimizer state."""
    self.check(step)
    return read_params(self.directory / str(step), target)

  def read_config(self, step: int) -> dict:
    """The config item of checkpoint ``step``, after ``check``."""
    self.check(step)
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def set_aside(self, step: int, why: Exception) -> None:
    """Checkpoint ``step`` renamed to ``<step>.damaged`` (by process 0; every process then
    sees the same list), with a warning saying why."""
    folder = self.directory / str(step)
    aside = folder.with_name(f"{step}.damaged")
    if distributed.is_primary():
      if aside.exists():  # set aside before: keep both
        aside = folder.with_name(f"{step}.damaged.{os.getpid()}")
      print(
        f"warning: checkpoint {step} is damaged ({why}); moved to {aside}, going on from "
        "the one before",
        flush=True,
      )
      folder.rename(aside)
    distributed.barrier(f"checkpoint {step} set aside")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()
    self._write_manifests()

  def close(self) -> None:
    self.wait()
    self.manager.close()


def _first_line(err: BaseException) -> str:
  text = str(err).strip().splitlines()
  return f"{type(err).__name__}: {text[0] if text else ''}"


def _keys(path) -> tuple[str, ...]:
  """A tree path as strings: the saved metadata keys lists by dict key, the target by index."""
  return tuple(path_segment(k) for k in path)


def check_fits(state_dir: Path, target, partial: bool = False) -> None:
  """Raises ``CheckpointMismatch`` listing the arrays that the saved state at
  ``state_dir`` and ``target`` do not share with one shape and dtype (``partial``: only
  the saved arrays under ``target``'s top-level keys count)."""
  absl = logging.getLogger("absl")
  level = absl.level
  absl.setLevel(logging.ERROR)  # "no _CHECKPOINT_METADATA": an item folder has none, rightly
  try:
    with ocp.StandardCheckpointer() as ckptr:
      saved = ckptr.metadata(state_dir).item_metadata
  except Exception as err:
    raise CheckpointError(
      f"{state_dir}: the array metadata cannot be read: {_first_line(err)}"
    ) from err
  finally:
    absl.setLevel(level)
  have = {
    _keys(p): (tuple(m.shape), str(m.dtype))
    for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]
  }
  want = {
    _keys(p): (tuple(x.shape), str(x.dtype))
    for p, x in jax.tree_util.tree_flatten_with_path(target)[0]
  }
  if partial:
    tops = {k[0] for k in want}
    have = {k: v for k, v in have.items() if k[0] in tops}
  name = lambda k: "/".join(str(p) for p in k)
  problems = (
    [f"{name(k)}: only in the checkpoint {have[k]}" for k in have.keys() - want.keys()]
    + [f"{name(k)}: not in the checkpoint" for k in want.keys() - have.keys()]
    + [
      f"{name(k)}: saved {have[k][0]} {have[k][1]}, the model has {want[k][0]} {want[k][1]}"
      for k in have.keys() & want.keys()
      if have[k] != want[k]
    ]
  )
  if problems:
    shown = sorted(problems, key=lambda p: (not p.startswith("params"), p))  # params first
    more = f"\n  ... and {len(shown) - 12} more" if len(shown) > 12 else ""
    raise CheckpointMismatch(
      f"{state_dir.parent} was saved for another model or trainable set: "
      f"{len(problems)} array(s) differ:\n  " + "\n  ".join(shown[:12]) + more
    )


def read_params(step_dir: Path, target: nnx.State) -> nnx.State:
  """The trainable parameters of the checkpoint in ``step_dir`` alone, never its optimizer
  state, into ``target`` (abstract, with shardings: ``Assembly.state.params``)."""
  tree = {"params": target}
  check_fits(step_dir / "state", tree, partial=True)
  restore = ocp.args.PyTreeRestore(
    item=tree, partial_restore=True, restore_args=ocp.checkpoint_utils.construct_restore_args(tree)
  )
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      return ckptr.restore(step_dir / "state", args=restore)["params"]
  except Exception as err:
    raise CheckpointError(
      f"the parameters of {step_dir} could not be restored: {_first_line(err)}"
    ) from err


def restore_params(path: str | Path, target: nnx.State) -> nnx.State:
  """The trainable parameters of another run's checkpoint (``path``: its workdir, its
  ``checkpoints`` folder or one step's folder; the latest step), into ``target``."""
  path = Path(path).absolute()
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  if (path / "state").is_dir():
    step_dir = path
  else:
    steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.is_dir() else []
    if not steps:
      raise FileNotFoundError(f"init_from: no checkpoint in {path}")
    step_dir = path / str(steps[-1])
  log.info("init_from: reading the parameters of %s", step_dir)
  return read_params(step_dir, target)
