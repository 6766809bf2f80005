"""Where a run starts: the workdir's own latest checkpoint, if it is this run's and intact.

A workdir belongs to one run. ``resume_step`` reads the latest checkpoint's config before
anything loads and compares it with the new one (``train.run.config.resume_changes``): a change
to what the updates compute (model, data, optimizer, batch, seeds) is an error listing
every differing key, unless ``RunConfig.resume`` names it; changes that only say when to
log, evaluate, checkpoint or stop, or how the same updates are laid out on the devices
(``SAFE_ON_RESUME``), are printed and accepted.

A damaged checkpoint (``checkpoint.CheckpointDamaged``: a file missing, truncated or
garbled, by the evidence of its files) is set aside as ``<step>.damaged`` with a warning
naming the file, and the one before it is used: a run killed while its disk filled up,
or a copy cut short, loses the steps since the previous checkpoint, not the run. When
every checkpoint is damaged the run stops (``ResumeError``) rather than start over and
overwrite its metrics. Any other failure to restore, and a checkpoint of another model
(``CheckpointMismatch``), is an error that sets nothing aside.
"""

from __future__ import annotations

from ppllava_jax import distributed
from ppllava_jax.train.run import config as rc
from ppllava_jax.train.run.checkpoint import CheckpointDamaged, Checkpoints


class ResumeError(ValueError):
  """The workdir holds a run this config may not continue."""


def resume_step(checkpoints: Checkpoints, cfg: rc.RunConfig) -> int | None:
  """The step of the latest intact checkpoint, after checking that ``cfg`` may continue
  it (module doc); None when the workdir has none. A workdir whose checkpoints are all
  damaged is an error."""
  steps = checkpoints.all_steps()
  for step in reversed(steps):
    try:
      stored = checkpoints.read_config(step)
    except CheckpointDamaged as err:
      checkpoints.set_aside(step, err)
      continue
    refused, allowed = rc.resume_changes(stored, cfg)
    if refused:
      keys = ",".join(sorted({line.split(":")[0] for line in refused}))
      raise ResumeError(
        f"{checkpoints.directory.parent} holds another run: checkpoint {step}'s config "
        f"differs in {len(refused)} setting(s) that change what it computes:\n  "
        + "\n  ".join(refused)
        + f"\nStart it in a new --workdir; or, to go on with this run and these changes, "
        f"add --set resume={keys}"
      )
    if allowed:
      distributed.say(f"resuming checkpoint {step} with changed settings: " + "; ".join(allowed))
    return step
  if steps:
    raise ResumeError(
      f"every checkpoint in {checkpoints.directory} is damaged (set aside as "
      "<step>.damaged): nothing to resume; start over in a new --workdir"
    )
  return None


def restore(checkpoints: Checkpoints, cfg: rc.RunConfig, step: int | None, target, fresh):
  """(step, state, data state) of checkpoint ``step`` read into ``target``, or of the
  intact one before it when it is damaged; (0, ``fresh()``, None) without ``step``: the
  first state is made only when there is nothing to resume."""
  while step is not None:
    try:
      state, data_state, _ = checkpoints.restore(step, target)
      return step, state, data_state
    except CheckpointDamaged as err:
      checkpoints.set_aside(step, err)
      step = resume_step(checkpoints, cfg)  # raises when none intact is left
  return 0, fresh(), None
