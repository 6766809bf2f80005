"""Run checkpoints: an Orbax ``CheckpointManager`` in ``WORKDIR/checkpoints``.

A checkpoint is numbered by the batches the run has consumed (the loop step, which a
skipped update still advances; ``TrainState.step`` counts applied updates) and holds
three items:

- ``state``: the ``TrainState`` (trainable params, optimizer state, update count, base
  rng, skipped count). The frozen parameters are not in it: they are the initial
  checkpoint's, or the tiny model's seeded initialisation, rebuilt on restore.
- ``data``: ``DataIterator.get_state()`` (the global batch cursor and counters), JSON.
- ``config``: the ``RunConfig`` (``run_config.to_dict``), JSON.

Saves are asynchronous (the arrays are copied off the device before ``save`` returns,
so the donated state can go on training); only finalised checkpoints are listed, so a
run killed mid-write resumes from the previous one (the half-written folder is removed
when the manager next starts). ``restore`` reads the state into an
abstract target carrying the run's shardings: every array lands sharded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import orbax.checkpoint as ocp

from ppllava_jax.train.state import TrainState

log = logging.getLogger(__name__)


class Checkpoints:
  """The checkpoints of one run (module doc)."""

  def __init__(self, workdir: str | Path, keep: int = 3, async_save: bool = True):
    self.directory = Path(workdir).absolute() / "checkpoints"
    # cleanup_tmp_directories: a save that a kill interrupted left a temporary folder
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data", "config"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: TrainState, data_state: dict, config: dict) -> None:
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config)), force=True)
    log.info("checkpoint %d: saving in %s", step, self.directory)

  def restore(self, step: int, target: TrainState) -> tuple[TrainState, dict, dict]:
    """(state, data state, config dict) of checkpoint ``step``; ``target``: an abstract
    sharded state (``train.state.placed``)."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
        config=ocp.args.JsonRestore()))
    return out.state, out.data, out.config

  def read_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore())).config

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def restore_params(path: str | Path, target: TrainState) -> TrainState:
  """The ``state`` item of another run's checkpoint (``path``: its workdir, its
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
  log.info("init_from: reading the state of %s", step_dir)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(step_dir / "state", target)
