"""The typed config tree of a training run.

``RunConfig`` is what a ``configs/*.py`` ``get_config()`` returns for ``train.py``: the
model (a pretrained folder, or a tiny random one built in code), the data (SFT's
``data.sft.pipeline.DataConfig``, or DPO's ``data.dpo.pairs.PreferenceDataConfig`` with
its ``DPOConfig``), what the step needs (``train.core.config.TrainConfig``) and the loop's
own settings. Strings in the data, preference and mcq sections may contain
``{workdir}``: the loop replaces it with the run's folder (a config that generates its
data there). Loading, ``--set`` overrides and JSON: ``ppllava_jax.config``.

A workdir belongs to one run: ``resume_changes(stored, cfg)`` lists what a resumed run
would change in the checkpoint's config. ``SAFE_ON_RESUME`` may always change (when to
log, evaluate and checkpoint, where to stop, the data workers, the mesh, remat and the
attention kernel: how the same updates are computed or reported, not which); anything
else that differs stops the run unless ``RunConfig.resume`` names it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ppllava_jax.config import from_dict, to_dict
from ppllava_jax.data.dpo.pairs import PreferenceDataConfig
from ppllava_jax.data.sft.pipeline import DataConfig
from ppllava_jax.eval.mcq.protocols import PROTOCOLS
from ppllava_jax.models.btadapter import BTAdapterConfig
from ppllava_jax.models.tiny import TinyConfig
from ppllava_jax.train.core.config import TrainConfig
from ppllava_jax.train.dpo.losses import DPOConfig


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """checkpoint: a transformers-layout folder (``PPLLaVA.from_pretrained``: llava-hf,
  PPLLaVA's own, or one ``train.py export`` wrote) with its tokenizer; empty: the tiny
  random model ``tiny`` (``models.tiny.build_tiny``) and the char tokenizer. clip: a CLIP /
  SigLIP folder whose text tower becomes the scorer, for a llava-hf folder without one.
  scorer_tokenizer: the scorer's tokenizer folder (default: ``clip``, else the
  checkpoint's ``scorer_tokenizer/``, else its config.json's ``clip_weight`` folder:
  ``data.text.tokenizer.tokenizer_folders``). btadapter: a fresh BT-Adapter put on a CLIP
  tower that has none (``PPLLaVA.add_btadapter``, the Vicuna recipe's start); a tower that
  has one keeps it."""

  checkpoint: str = ""
  clip: str = ""
  scorer_tokenizer: str = ""
  btadapter: BTAdapterConfig | None = None
  tiny: TinyConfig = TinyConfig()


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """A set the loop draws into ``{workdir}/data`` first (``train.run.synthetic``): ``kind``
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
      raise ValueError(f"McqEvalConfig.protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
    if self.every < 0 or self.limit < 0 or self.batch_size < 1:
      raise ValueError(
        f"McqEvalConfig: need every >= 0, limit >= 0 and batch_size >= 1, got "
        f"{self.every}, {self.limit}, {self.batch_size}"
      )
    for name in ("frames", "max_new_tokens"):
      if getattr(self, name) is not None and getattr(self, name) < 1:
        raise ValueError(f"McqEvalConfig.{name} must be >= 1 or None, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """steps: updates the run makes (each of ``train.optim.grad_accum`` batches; a skipped
  one counts too); log_every, checkpoint_every: in steps; keep: checkpoints kept; init_from: an
  Orbax checkpoint
  (a workdir, its ``checkpoints`` folder or one step's folder) whose trainable parameters
  start a run that has none of its own; max_nan_in_a_row: consecutive skipped updates
  that stop the run; peak_flops: the FLOP/s the MFU estimate divides by (default: about
  what this class of CPU does); eval_every: steps between evaluations (0: none) of
  the token-mean loss over the first ``eval_batches`` batches of ``eval_data``; mcq:
  multiple-choice accuracy, at its own interval (``McqEvalConfig``); resume: config keys
  (or whole sections) that may differ from the checkpoint's when the run resumes, beyond
  ``SAFE_ON_RESUME`` (``--set resume=train.optim.lr,data.mixture``).

  The run's kind: SFT with ``data``; DPO with ``preference`` (pairs, ``data.dpo.pairs``) and
  ``dpo`` (the loss and the reference, ``train.dpo.losses.DPOConfig``) instead. The held-out
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
      raise ValueError(
        f"RunConfig.steps={self.steps} is past train.optim.total_steps={total}, "
        f"where the {self.train.optim.schedule} schedule ends (a cosine would "
        "climb back to its peak): lower steps, raise train.optim.total_steps, "
        "or set it to None to follow steps"
      )
    if self.eval_every < 0 or self.eval_batches < 1:
      raise ValueError(
        f"RunConfig: need eval_every >= 0 and eval_batches >= 1, got "
        f"{self.eval_every}, {self.eval_batches}"
      )
    if (self.data is None) == (self.preference is None):
      raise ValueError(
        "RunConfig: give data (an SFT run) or preference (a DPO run), not "
        f"{'both' if self.data else 'neither'}"
      )
    if (self.dpo is None) != (self.preference is None):
      raise ValueError(
        "RunConfig: a DPO run needs both preference (its pairs) and dpo (its "
        "loss settings); an SFT run neither"
      )
    if self.preference is not None and self.eval_data is not None:
      raise ValueError(
        "RunConfig.eval_data (a held-out SFT loss) is not measured in a DPO run; "
        "use mcq for accuracy during training"
      )
    if self.eval_every and self.eval_data is None:
      raise ValueError("RunConfig.eval_every is set but there is no eval_data")
    if self.peak_flops <= 0:
      raise ValueError(f"RunConfig.peak_flops must be positive, got {self.peak_flops}")

  def resolved(self) -> RunConfig:
    """This config with ``train.optim.total_steps`` set (None follows ``steps``): what a
    run computes with, stores and compares at resume."""
    if self.train.optim.total_steps is not None:
      return self
    optim = dataclasses.replace(self.train.optim, total_steps=self.steps)
    return dataclasses.replace(self, train=dataclasses.replace(self.train, optim=optim))


# Keys that change how a run is reported, when it stops, or how the same updates are laid
# out on the machine, never which updates it makes (module doc).
SAFE_ON_RESUME = (
  "steps",
  "log_every",
  "checkpoint_every",
  "keep",
  "eval_every",
  "eval_batches",
  "eval_data",
  "mcq",
  "max_nan_in_a_row",
  "peak_flops",
  "resume",
  "data.num_workers",
  "data.worker_buffer_size",
  "data.threads",
  "preference.num_workers",
  "preference.worker_buffer_size",
  "preference.threads",
  "train.mesh",
  "train.remat",
  "train.attention",
)


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
  old = _flat(to_dict(from_dict(RunConfig, stored)))  # defaults of newer fields
  new = _flat(to_dict(cfg.resolved()))
  refused: list[str]
  allowed: list[str]
  refused, allowed = [], []
  for key in sorted(set(old) | set(new)):
    if old.get(key, "(absent)") != new.get(key, "(absent)"):
      line = f"{key}: {old.get(key, '(absent)')!r} -> {new.get(key, '(absent)')!r}"
      (allowed if _under(key, SAFE_ON_RESUME + cfg.resume) else refused).append(line)
  return refused, allowed


def with_workdir(cfg: RunConfig, workdir: str) -> RunConfig:
  """The data, preference and mcq sections with ``{workdir}`` replaced in every string."""

  def sub(node):
    if dataclasses.is_dataclass(node):
      return dataclasses.replace(
        node, **{f.name: sub(getattr(node, f.name)) for f in dataclasses.fields(node) if f.init}
      )
    if isinstance(node, tuple):
      return tuple(sub(v) for v in node)
    if isinstance(node, str):
      return node.replace("{workdir}", str(workdir))
    return node

  return dataclasses.replace(
    cfg,
    data=sub(cfg.data),
    preference=sub(cfg.preference),
    eval_data=sub(cfg.eval_data),
    mcq=sub(cfg.mcq),
  )
