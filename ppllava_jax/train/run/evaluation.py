"""What the loop measures besides the training loss, on the parameters in training:
``held_out_loss`` (``RunConfig.eval_data``) and ``McqEval``, multiple-choice accuracy as
``eval.py --mvbench`` measures it (``RunConfig.mcq``). Each returns one metrics record.

``run`` is the loop's ``Run`` (tokenizers, model config, graphdef, frozen state, steps).
"""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec

from ppllava_jax import distributed
from ppllava_jax.data.processor import Processor
from ppllava_jax.data.sft.pipeline import DataConfig, make_train_iterator
from ppllava_jax.eval import mcq, runner
from ppllava_jax.eval.jobs import chat_template, mcq_jobs
from ppllava_jax.models import generate as generation
from ppllava_jax.train.core.state import cast_floating
from ppllava_jax.train.run.config import McqEvalConfig
from ppllava_jax.train.run.global_batch import DataBlocks, agreed_next, to_global


def held_out_loss(
  run, state, data_cfg: DataConfig, batches: int, step: int, blocks: DataBlocks
) -> dict:
  """The metrics record of the token-mean loss over the first ``batches`` batches of
  ``data_cfg`` (a fresh iterator each time: the same batches every evaluation); each data
  block (``train.run.global_batch``) loads its slice of them, fetched in agreement
  (``agreed_next``: a data error on one process stops them all)."""
  data = make_train_iterator(
    data_cfg,
    tokenizer=run.tokenizer,
    model=run.model_cfg,
    scorer_tokenizer=run.scorer_tokenizer,
    block=blocks.block,
    blocks=blocks.blocks,
  )
  start, sums = time.perf_counter(), []
  try:
    for _ in range(batches):
      batch = agreed_next(lambda: next(data))
      if batch is None:
        break
      batch = to_global(batch, run.shardings.mesh, blocks, pad_id=data.builder.pad_id)
      sums.append(run.steps.eval(state, run.frozen, batch))
  finally:
    data.close()
  host = jax.device_get(sums)
  total, count = sum(float(s) for s, _ in host), sum(float(c) for _, c in host)
  return dict(
    step=step,
    eval_loss=total / count if count else float("nan"),
    eval_tokens=count,
    eval_batches=len(host),
    eval_time=time.perf_counter() - start,
  )


class McqEval:
  """Multiple-choice accuracy of the parameters in training, as ``eval.py --mvbench``
  measures it (``RunConfig.mcq``): the same items, jobs, runner and scorer.

  Built before the model, so a missing task file or video folder stops the run before
  it trains. Each evaluation answers every item into a fresh
  ``mcq/step_N/predictions.jsonl``: the runner reuses saved answers by fingerprint, and
  a fingerprint knows checkpoint files, not weights in memory, so nothing saved may be
  there to match (a folder per step; a killed run's answers at the step deleted).
  Generation compiles once per prompt-length bucket and frame count, so only the first
  evaluation should: each record has process 0's count so far (``mcq_compilations``, on
  several processes broadcast from it).

  Several processes: the parameters are global arrays, sharded over every host's
  devices, which no process can run alone; so each process takes a whole local copy
  (``_local_copy``: one more model's worth on one of its devices, for the evaluation) and
  answers its share of the batches, and the runner merges the answers (``eval.runner``).
  Every process then scores the same merged records and returns the same record (with
  process 0's time and compilation count): the loop writes process 0's, and every
  process goes on in lockstep.
  """

  def __init__(self, cfg: McqEvalConfig, folder: Path):
    if not Path(cfg.tasks).exists():
      raise FileNotFoundError(
        f"mcq.tasks {cfg.tasks}: no such file or folder (an MVBench "
        "task JSON file or a folder of them)"
      )
    if not Path(cfg.video_root).is_dir():
      raise FileNotFoundError(f"mcq.video_root {cfg.video_root}: not a folder")
    items = mcq.load_mvbench(cfg.tasks)
    self.items = items[: cfg.limit] if cfg.limit else items
    self.protocol = mcq.make_protocol(cfg.protocol)
    self.cfg, self.folder = cfg, folder

  def __call__(self, run, params: nnx.State, step: int) -> dict:
    """The metrics record of one evaluation of the trainable ``params`` at ``step``."""
    start = time.perf_counter()
    dtype = run.steps.cfg.dtype  # what the step computes in
    params, frozen = cast_floating(params, dtype), cast_floating(run.frozen, dtype)
    if jax.process_count() > 1:
      params, frozen = _local_copy(params), _local_copy(frozen)
    model = nnx.merge(run.graphdef, params, frozen)
    model.eval()  # deterministic: no drop path
    jobs = mcq_jobs(
      self.items,
      self.protocol,
      chat_template(run.model_cfg),
      Path(self.cfg.video_root),
      self.cfg.frames,
    )
    out = self.folder / f"step_{step}" / "predictions.jsonl"
    if distributed.is_primary() and out.parent.exists():
      shutil.rmtree(out.parent)  # a killed run's answers (and parts) at this step
    settings = runner.GenerationSettings(
      batch_size=self.cfg.batch_size,
      max_new_tokens=self.cfg.max_new_tokens or self.protocol.max_new_tokens,
      model_key=f"training step {step}",
    )
    result = runner.run(model, _own_processor(run), jobs, out, settings)
    report = runner.score_answers(self.items, jobs, result, self.protocol)
    seconds, compiled = time.perf_counter() - start, generation.compilations()
    if jax.process_count() > 1:  # process 0's, the one the loop writes
      seconds, compiled = multihost_utils.broadcast_one_to_all(
        (np.float32(seconds), np.int32(compiled))
      )
    return dict(
      step=step,
      **_scores(report),
      mcq_items=len(jobs),
      mcq_chance=_chance(self.items),
      mcq_failed=len(runner.failures(jobs, result)),
      mcq_time=float(seconds),
      mcq_compilations=int(compiled),
    )


def _chance(items) -> float | None:
  """The accuracy (%) of answering at random: the mean of 1 / candidates, drawn beside the
  accuracy in loss.png."""
  return 100 * float(np.mean([1 / len(i.candidates) for i in items])) if items else None


def _identity(x):
  return x


def _local_copy(tree):
  """Each global array of ``tree`` whole on one device of this process: replicated over
  its mesh (a leaf at a time, so only one leaf is ever on every device), then this
  process's first copy."""

  def one(x):
    whole = jax.jit(_identity, out_shardings=x.sharding.update(spec=PartitionSpec()))(x)
    return whole.addressable_data(0)

  return jax.tree.map(one, tree)


def _own_processor(run) -> Processor:
  """A processor on copies of the run's tokenizers: the training data's loader thread
  tokenizes meanwhile, and a fast tokenizer's padding and truncation are state each call
  sets (shared, the two would pad each other's texts)."""
  return Processor(run.model_cfg, copy.deepcopy(run.tokenizer), copy.deepcopy(run.scorer_tokenizer))


def _scores(report: mcq.ScoreReport | None) -> dict:
  """Accuracy (percent) overall and per task, and the answers the scorer could not read:
  empty or unparseable (under the original protocol an empty reply counts as right)."""
  if report is None:  # nothing answered
    return dict(mcq_accuracy=None, mcq_empty=None, mcq_unparseable=None)
  overall = report.overall
  return dict(
    mcq_accuracy=overall.accuracy,
    **{f"mcq_accuracy/{t.name}": t.accuracy for t in report.groups["task"]},
    mcq_empty=overall.empty,
    mcq_unparseable=overall.unparseable,
  )
