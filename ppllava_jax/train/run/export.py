"""``train.py export``: a run's checkpoint as a complete transformers folder.

``export(workdir, out, step)`` rebuilds the run from the checkpoint's own config, reads
the trained parameters into it and writes ``write_model_folder``: the weights and
config.json (pooling mode and windows, scorer, BT-Adapter), the tokenizers of the run's
source folders (``data.text.tokenizer.write_tokenizers``: the LLM's as the source had
them, the scorer's in ``scorer_tokenizer/``) and a ``generation_config.json``, so
``eval.py``, ``train.py`` (``model.checkpoint``, DPO) and ``PPLLaVA.from_pretrained``
read it with no other flag. Frozen parameters are written as loaded (a bfloat16 run's
frozen tower is not rounded).
"""

from __future__ import annotations

import time
from pathlib import Path

from flax import nnx

from ppllava_jax.config import from_dict
from ppllava_jax.data.text.tokenizer import tokenizer_folders, write_tokenizers
from ppllava_jax.models import pretrained
from ppllava_jax.train.run import checkpoint as ckpt_lib
from ppllava_jax.train.run import config as rc
from ppllava_jax.train.run.assembly import load


def export(workdir: str | Path, out: str | Path, step: int | None = None) -> Path:
  """Checkpoint ``step`` (default: the latest) of the run in ``workdir`` as a complete
  transformers folder (``write_model_folder``), with progress lines."""
  workdir = Path(workdir)
  checkpoints = ckpt_lib.Checkpoints(workdir, async_save=False)
  try:
    steps = checkpoints.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {checkpoints.directory}")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise ValueError(f"no checkpoint {step} in {checkpoints.directory}; there are {steps}")
    cfg = from_dict(rc.RunConfig, checkpoints.read_config(step))
    cfg = rc.with_workdir(cfg, str(workdir))
    started = time.perf_counter()
    print(f"export: building the model of checkpoint {step} of {workdir} ...", flush=True)
    run, _ = load(cfg, cast_frozen=False)
    print("export: reading the trained parameters ...", flush=True)
    params = checkpoints.restore_params(step, run.assembly.state.params)
  finally:
    checkpoints.close()
  model = nnx.merge(run.graphdef, params, run.frozen)
  folder = write_model_folder(model, Path(out), cfg, run.tokenizer, run.scorer_tokenizer)
  print(
    f"exported checkpoint {step} of {workdir} to {folder} in {time.perf_counter() - started:.1f} s",
    flush=True,
  )
  return folder


def write_model_folder(model, out: Path, cfg: rc.RunConfig, tokenizer, scorer_tokenizer) -> Path:
  """``model`` as a folder the next stage reads with no extra flag: ``save_pretrained``'s
  weights and config.json (pooling mode and windows, scorer, BT-Adapter included), the
  tokenizers of the run's source folders (``data.text.tokenizer.write_tokenizers``) and a
  ``generation_config.json``."""
  folder = model.save_pretrained(out, progress=True)
  m = cfg.model
  sources = (
    tokenizer_folders(
      m.checkpoint, scorer_tokenizer=m.scorer_tokenizer or None, clip=m.clip or None
    )
    if m.checkpoint
    else None
  )
  write_tokenizers(folder, sources, tokenizer, scorer_tokenizer)
  pretrained.write_generation_config(folder, model.cfg.text)
  return folder
