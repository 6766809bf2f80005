"""The training loop: ``train(cfg, workdir)`` (``train.run.export`` writes a model folder).

``train`` first checks what can fail cheaply: that the workdir's latest checkpoint is
this run's and intact (``train.run.resume``), every annotation and the media roots
(``data.sft.preflight``). Then it builds the model (``PPLLaVA.from_pretrained
(cfg.model.checkpoint)`` with its tokenizers, checked against the embeddings they feed,
or the tiny random one of ``cfg.model.tiny`` with the char tokenizer), partitions it,
makes the optimizer, the state on the mesh and the jitted ``Steps``, then resumes: the
run's own latest checkpoint (state, data cursor), else ``cfg.init_from``'s trainable
parameters, else the initial model. A DPO run (``cfg.preference``) first starts its
reference from the starting parameters (``start_reference``: a live copy, or the cached
log-probs, computed once), whatever checkpoint it then resumes. Then, per update (a
batch, or ``grad_accum`` of them stacked: ``_next_update``): data -> step -> hooks
(``every(n, k)``): metrics (fetched to the host only on log steps), evaluation (``eval_every``),
multiple-choice accuracy (``mcq.every``, and after the last batch: ``evaluation``),
checkpoints, the stop checks. A run that trained on no sample (every one skipped) ends
with a ``DataError``, not a summary of 0 updates.

Exactness: a checkpoint is taken between batches and holds the state (the rng is the
state's base key: batch n's key is ``fold_in(rng, n)``, nothing is drawn on the host),
the data cursor and the loop step, and the data stream from a cursor is a function of
(config, cursor) alone; so a run killed at any point and started again with the same
command ends with the parameters of one that never stopped (bit for bit on one CPU).

Several processes (``ppllava_jax.distributed``; ``train.py`` starts the runtime): every
process runs this loop in lockstep on one global mesh. Each loads its data block's
slice of every step (``train.run.global_batch``; the data config's ``shards`` fix the global
batch whatever the process count), ``to_global`` makes the step's global arrays, and
Orbax saves and restores the sharded state collectively, so a checkpoint of P processes
resumes on any other count. Only process 0 writes what the run shares (metrics, pictures,
config.json, the synthetic set, the reference cache) and shows progress and messages; a
stop signal any process receives is all-gathered each step, and so is the outcome of each
batch fetch (``global_batch.agreed_next``: the data's end, or an error on any process), so
all of them save and stop, or raise, together.

Stopping: SIGTERM / SIGINT set a flag; the loop saves at the next batch boundary
(skipping a multiple-choice evaluation due there, and the final one: they can take
long) and ``train`` returns with ``stopped`` set to the signal's name (``train.py``
exits with 128 + its number). ``max_nan_in_a_row`` consecutive skipped updates (non-finite loss or
gradient, or nothing supervised: ``train.core.step``) raise ``NonFiniteError``; the streak
is counted on the device and checked on log steps and every ``max_nan_in_a_row``
batches.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from ppllava_jax import distributed
from ppllava_jax.config import to_dict
from ppllava_jax.data.batching import empty_like
from ppllava_jax.data.engine import DataError
from ppllava_jax.data.sft import preflight
from ppllava_jax.data.text.tokenizer import check_batch_ids
from ppllava_jax.signals import Signals
from ppllava_jax.train.core.step import Steps, stack_micro_batches
from ppllava_jax.train.run import checkpoint as ckpt_lib
from ppllava_jax.train.run import config as rc
from ppllava_jax.train.run import evaluation, resume
from ppllava_jax.train.run import metrics as metrics_lib
from ppllava_jax.train.run.assembly import Run, fresh_state, load, start_reference
from ppllava_jax.train.run.global_batch import DataBlocks, agreed_next, data_blocks, to_global

STOP_NOTICE = "{} received: saving a checkpoint at the next step, then stopping"

log = logging.getLogger(__name__)


class NonFiniteError(ValueError):
  """Too many updates in a row were skipped."""


def every(step: int, n: int) -> bool:
  return n > 0 and step % n == 0


def prepare_data(cfg: rc.RunConfig, workdir: Path) -> rc.RunConfig:
  """``{workdir}`` substituted; the synthetic set generated first if the config has one
  (by process 0, the others waiting for it)."""
  cfg = rc.with_workdir(cfg, str(workdir))
  if cfg.synthetic is not None:
    from ppllava_jax.train.run import synthetic

    make = synthetic.generate if cfg.synthetic.kind == "qa" else synthetic.generate_preference
    if distributed.is_primary():
      make(cfg.synthetic, workdir / "data")
    distributed.barrier("synthetic data")
  return cfg


def _data(
  cfg: rc.RunConfig,
  run: Run,
  blocks: DataBlocks,
  state: dict | None,
  reference: dict | None,
  inputs,
):
  """This process's block of the run's batches: SFT ``TrainBatch``es or DPO
  ``PairBatch``es; ``inputs``: what ``_check_data`` read."""
  where: dict[str, Any] = dict(block=blocks.block, blocks=blocks.blocks)  # keyword arguments
  if cfg.preference is not None:
    from ppllava_jax.data.dpo.pairs import make_preference_iterator

    assert cfg.dpo is not None  # RunConfig: preference comes with dpo

    return make_preference_iterator(
      cfg.preference,
      tokenizer=run.tokenizer,
      model=run.model_cfg,
      scorer_tokenizer=run.scorer_tokenizer,
      state=state,
      reference=reference,
      pin_frames=cfg.dpo.precompute_reference,
      read=inputs,
      **where,
    )
  from ppllava_jax.data.sft.pipeline import make_train_iterator

  assert cfg.data is not None  # RunConfig: data, when not preference
  return make_train_iterator(
    cfg.data,
    tokenizer=run.tokenizer,
    model=run.model_cfg,
    scorer_tokenizer=run.scorer_tokenizer,
    state=state,
    annotation_set=inputs,
    **where,
  )


def _next_update(data, k: int, pad_id: int):
  """The batch of one update: the next batch, or under ``grad_accum = k`` the next k
  stacked on a leading axis (``step.stack_micro_batches``); when the data ends inside an
  update, its last micro-batches are empty (``batch.empty_like``), so every batch read
  is trained on. ``StopIteration`` when no batch is left."""
  if k == 1:
    return next(data)
  micro = []
  for _ in range(k):
    try:
      micro.append(next(data))
    except StopIteration:
      if not micro:
        raise
      break
  micro += [empty_like(micro[0])] * (k - len(micro))
  return stack_micro_batches(micro, pad_id)


def _step_flops(steps: Steps, state, constants, batch) -> float | None:
  """FLOPs of one train step from XLA's cost analysis of its lowering."""
  try:
    return metrics_lib.cost_flops(steps.lower_train(state, constants, batch).cost_analysis())
  except Exception as err:
    log.warning("no FLOP count for the MFU estimate: %s", err)
    return None


def train(cfg: rc.RunConfig, workdir: str | Path) -> dict:
  """Runs (or resumes) ``cfg`` in ``workdir`` (module doc). Returns a summary:
  step, updates, skipped, stopped (a signal name or None), the final loss, the last
  multiple-choice accuracy (None without one)."""
  cfg = cfg.resolved()
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  checkpoints = ckpt_lib.Checkpoints(workdir, keep=cfg.keep)
  try:
    return _train(cfg, workdir, checkpoints)
  finally:
    checkpoints.close()


def _train(cfg: rc.RunConfig, workdir: Path, checkpoints: ckpt_lib.Checkpoints) -> dict:
  config_dict = to_dict(cfg)
  latest = resume.resume_step(checkpoints, cfg)  # this workdir's run, before anything loads
  cfg = prepare_data(cfg, workdir)
  inputs = _check_data(cfg)  # every annotation and the media roots, before the weights
  mcq_eval = evaluation.McqEval(cfg.mcq, workdir / "mcq") if cfg.mcq else None
  if distributed.is_primary():
    (workdir / "config.json").write_text(json.dumps(config_dict, indent=1, sort_keys=True))
  run, constants, start, state, data = _start(cfg, workdir, checkpoints, latest, inputs)
  writer = (
    metrics_lib.MetricsWriter(workdir, resume_step=start)
    if distributed.is_primary()
    else metrics_lib.NoMetrics()
  )
  loop = _Loop(cfg, run, constants, data, checkpoints, writer, mcq_eval, config_dict, start)
  try:
    state, done, stopped = loop(state)
  finally:
    loop.close()
  if stopped:
    distributed.say(
      f"stopped by {stopped} after step {done}: checkpoint {done} saved in "
      f"{checkpoints.directory}; run the same command again to resume"
    )
  return _summary(workdir, state, done, stopped, loop.last)


def _start(
  cfg: rc.RunConfig, workdir: Path, checkpoints: ckpt_lib.Checkpoints, latest: int | None, inputs
):
  """(run, the step's constants, the step it starts after, its state, its data): the
  model loaded and assembled, the reference started (DPO), then the checkpoint restored,
  or the first state made from ``init_from``'s or the loaded parameters; those are then
  dropped, so one state is live."""
  run, loaded = load(cfg)
  target = run.assembly.state
  initial = functools.cache(
    lambda: (
      ckpt_lib.restore_params(cfg.init_from, target.params) if cfg.init_from else loaded.params
    )
  )  # read once
  constants, reference = start_reference(run, cfg, workdir, initial, inputs)
  if latest is not None:
    loaded.drop()  # a resume never makes a first state (resume.restore): free them first
    initial.cache_clear()
  start, state, data_state = resume.restore(
    checkpoints, cfg, latest, target, lambda: fresh_state(run.assembly, initial(), cfg.train.seed)
  )
  loaded.drop()  # the state holds the trainable parameters now
  initial.cache_clear()
  if start:
    distributed.say(f"resuming from checkpoint {start} in {checkpoints.directory}")
  elif cfg.init_from:
    distributed.say(f"starting from the parameters of {cfg.init_from}")
  data = _data(cfg, run, data_blocks(run.shardings.mesh), data_state, reference, inputs)
  return run, constants, start, state, data


class _Loop:
  """The updates of a run from step ``start`` to ``cfg.steps`` (module doc): ``loop(state)``
  returns (state, the last step done, the stop signal's name or None)."""

  def __init__(
    self,
    cfg: rc.RunConfig,
    run: Run,
    constants,
    data,
    checkpoints: ckpt_lib.Checkpoints,
    writer,
    mcq_eval,
    config_dict: dict,
    start: int,
  ):
    self.cfg, self.run, self.constants, self.data = cfg, run, constants, data
    self.checkpoints, self.writer, self.mcq_eval = checkpoints, writer, mcq_eval
    self.config_dict, self.start = config_dict, start
    self.blocks = data_blocks(run.shardings.mesh)
    # the skipped-update streak, on the whole mesh like the step's metrics, so every
    # process can read it
    replicated = run.shardings.replicated
    self._streak_fn = jax.jit(lambda s, k: jnp.where(k > 0, s + 1, 0), out_shardings=replicated)
    self.streak = jax.device_put(np.zeros((), np.int32), replicated)
    self.flops: dict = {}  # by batch shape: the step's FLOPs (XLA's count)
    self.window = _Window(start, time.perf_counter(), data.stats.skipped_total)
    self.last: dict = {}  # the last metrics record
    self.bar = tqdm(
      total=cfg.steps,
      initial=start,
      desc="train",
      dynamic_ncols=True,
      mininterval=1.0,
      disable=not distributed.is_primary(),
    )

  def __call__(self, state):
    cfg, checkpoints, start = self.cfg, self.checkpoints, self.start
    done, stopped = start, None
    with Signals(STOP_NOTICE) as signals:
      for done in range(start + 1, cfg.steps + 1):
        batch = agreed_next(self._fetch)
        if batch is None:
          distributed.say(f"the data ran out after {done - 1} batches")
          done -= 1
          break
        state = self._update(state, batch)
        self._check_streak(done)
        if every(done, cfg.log_every) or done == cfg.steps:
          self._record(state, done)
        if every(done, cfg.eval_every):
          _evaluate(self.writer, self.run, state, cfg, done, self.blocks)
        received = signals.agreed()
        if self.mcq_eval and every(done, cfg.mcq.every) and not received:
          _evaluate_mcq(self.writer, self.mcq_eval, self.run, state, done)
        if every(done, cfg.checkpoint_every) or received:
          checkpoints.save(done, state, self.data.get_state(), self.config_dict)
        if received:
          stopped = received
          break
      if not stopped:
        _check_trained(self.data.stats, self.blocks)  # before the last save: a rerun says it again
      if done > start or checkpoints.latest_step() is None:
        checkpoints.save(done, state, self.data.get_state(), self.config_dict)
      if self.mcq_eval and done > start and not stopped and not every(done, cfg.mcq.every):
        _evaluate_mcq(self.writer, self.mcq_eval, self.run, state, done)  # the run's end
      checkpoints.wait()
    return state, done, stopped

  def close(self) -> None:
    self.bar.close()
    self.data.close()
    self.writer.close()

  def _fetch(self):
    batch = _next_update(self.data, self.cfg.train.optim.grad_accum, self.data.builder.pad_id)
    check_batch_ids(batch, self.run.model_cfg)
    return batch

  def _update(self, state, batch):
    """One train step on this process's ``batch``, compiled (with a message) on a new
    shape."""
    self.window.samples += int(np.sum(batch.sample_mask))  # this process's
    batch = to_global(
      batch,
      self.run.shardings.mesh,
      self.blocks,
      self.cfg.train.optim.grad_accum > 1,
      self.data.builder.pad_id,
    )
    steps, key = self.run.steps, batch.shape_key()
    compiling = key not in self.flops
    if compiling:
      distributed.say(f"compiling the train step for {_shapes(batch)} ...")
      compile_start = time.perf_counter()
      self.flops[key] = _step_flops(steps, state, self.constants, batch)
    state, m = steps.train(state, self.constants, batch)
    if compiling:
      jax.block_until_ready(m["loss"])
      distributed.say(f"train step compiled and run in {time.perf_counter() - compile_start:.1f} s")
    self.streak = self._streak_fn(self.streak, m["skipped"])
    self.window.metrics.append((m, self.flops[key]))
    self.bar.update(1)
    return state

  def _check_streak(self, done: int) -> None:
    """``NonFiniteError`` after ``max_nan_in_a_row`` skipped updates, read from the device
    only on log steps, every ``max_nan_in_a_row`` steps and the last."""
    cfg = self.cfg
    if not (every(done, cfg.log_every) or every(done, cfg.max_nan_in_a_row) or done == cfg.steps):
      return
    streak = int(jax.device_get(self.streak))
    if streak >= cfg.max_nan_in_a_row:
      raise NonFiniteError(
        f"{streak} updates in a row were skipped (non-finite loss or gradient "
        f"norm, or no supervised token) by step {done}; max_nan_in_a_row="
        f"{cfg.max_nan_in_a_row}. Lower train.optim.lr, check the data, or resume "
        f"from an earlier checkpoint in {self.checkpoints.directory}"
      )

  def _record(self, state, done: int) -> None:
    window, skipped = self.window, self.data.stats.skipped_total
    counts = _over_blocks((window.samples, skipped - window.skipped_before), self.blocks)
    self.last = _log(
      self.writer, self.run, state, window.metrics, done, window.step, window.time, counts, self.cfg
    )
    self.bar.set_postfix(loss=f"{self.last['loss']:.4f}", refresh=False)
    self.window = _Window(done, time.perf_counter(), skipped)


@dataclasses.dataclass
class _Window:
  """The updates since the last metrics record: it was at ``step`` and ``time``, with
  ``skipped_before`` samples skipped (this block's count)."""

  step: int
  time: float
  skipped_before: int
  metrics: list = dataclasses.field(default_factory=list)  # (step metrics, FLOPs) per update
  samples: int = 0  # this process's samples since


def _summary(workdir: Path, state, done: int, stopped: str | None, last: dict) -> dict:
  curve, accuracies = None, []
  if distributed.is_primary():
    records = metrics_lib.read_metrics(workdir)
    curve = metrics_lib.loss_curve(records, workdir / "loss.png")
    accuracies = [r["mcq_accuracy"] for r in records if "mcq_accuracy" in r]
  updates, skipped = jax.device_get((state.step, state.skipped))  # replicated scalars
  return dict(
    step=done,
    updates=int(updates),
    skipped=int(skipped),
    stopped=stopped,
    loss=last.get("loss"),
    loss_curve=str(curve) if curve else None,
    mcq_accuracy=accuracies[-1] if accuracies else None,
  )


def _check_trained(stats, blocks: DataBlocks) -> None:
  """A ``DataError`` when every sample the run has read (all data blocks, since its start:
  the counters resume with the data state) was skipped: not a success of 0 updates."""
  seen, skipped = _over_blocks((stats.samples, stats.skipped_total), blocks)
  if seen and skipped >= seen:
    raise DataError(
      f"no sample was trained on: all {seen} samples read were skipped "
      f"({dict(stats.skipped)}; the last: {stats.last_skip}); check the "
      "annotations and the media roots"
    )


def _shapes(batch) -> str:
  """The fields that set a step's size, as a compile message shows them."""
  return ", ".join(
    f"{name} {shape}"
    for name, shape, _ in batch.shape_key()
    if name in ("input_ids", "videos", "images")
  )


def _check_data(cfg: rc.RunConfig):
  """The run's data validated before any weight loads (``data.sft.preflight``): SFT's
  annotation set, or DPO's preference rows; the held-out set's annotations too."""
  if cfg.eval_data is not None:
    preflight.sft_annotations(cfg.eval_data.mixture, cfg.eval_data.sample.media_store)
  if cfg.preference is not None:
    from ppllava_jax.data.dpo.rows import read_preference_rows

    return read_preference_rows(cfg.preference.rows, cfg.preference.media_root)
  assert cfg.data is not None  # RunConfig: data, when not preference
  return preflight.sft_annotations(cfg.data.mixture, cfg.data.sample.media_store)


def _over_blocks(counts: tuple[int, ...], blocks: DataBlocks) -> tuple[int, ...]:
  """``counts`` (this process's block's) summed over every data block: one all-gather on
  several processes, each block taken once (from its owner)."""
  if jax.process_count() == 1:
    return tuple(counts)
  gathered = multihost_utils.process_allgather(np.asarray(counts, np.int64))  # (processes, n)
  return tuple(int(v) for v in gathered[list(blocks.owners)].sum(0))


def _log(writer, run, state, pending, done, last_step, last_time, counts, cfg) -> dict:
  """The metrics record of the updates since the last one (``pending``): means of the
  loss (of updates not skipped), grad norm and an objective's own metrics; the last lr;
  tokens/s, samples/s, step time and MFU over the interval; the train-step compilations,
  and the skipped updates and updates so far (the state's counts, the run's totals).
  ``counts``: (samples, skipped samples) of every data block in the interval, so
  ``skipped_samples`` is the samples skipped since the previous record, not a running
  total: a data state's counters are per block and resume from process 0's, while these
  differences summed over the blocks are exact on any process count, resumed or not
  (their sum over the records is the run's; DPO rows left out when reading, which the
  data state counts from the start, are not in it)."""
  samples, skipped_samples = counts
  host = jax.device_get([m for m, _ in pending])
  seconds = time.perf_counter() - last_time
  n = max(1, done - last_step)
  losses = [float(m["loss"]) for m in host if not m["skipped"]]
  tokens = sum(float(m["tokens"]) for m in host)
  step_flops = [f for _, f in pending]
  flops = sum(step_flops) if all(f is not None for f in step_flops) else None
  record = dict(
    step=done,
    loss=float(np.mean(losses)) if losses else float("nan"),
    lr=float(host[-1]["lr"]),
    grad_norm=float(np.mean([float(m["grad_norm"]) for m in host])),
    tokens_per_s=tokens / seconds,
    samples_per_s=samples / seconds,
    step_time=seconds / n,
    compilations=run.steps.train_compilations,
    skipped_samples=skipped_samples,  # in the interval, over every block (docstring)
    skipped_updates=int(jax.device_get(state.skipped)),
    updates=int(jax.device_get(state.step)),
    mfu=metrics_lib.mfu(flops, seconds, cfg.peak_flops),
    peak_flops=cfg.peak_flops,
  )
  kept = [m for m in host if not m["skipped"]]
  for name in sorted(host[-1]):  # an objective's own metrics (DPO: rewards/*, logps/*, ...)
    if "/" in name:
      record[name] = float(np.mean([float(m[name]) for m in kept])) if kept else float("nan")
  if "pairs" in host[-1]:
    record["pairs"] = sum(float(m["pairs"]) for m in host)
  writer.write(record)
  return record


def _evaluate(writer, run, state, cfg: rc.RunConfig, done: int, blocks: DataBlocks) -> None:
  assert cfg.eval_data is not None  # RunConfig: eval_every needs eval_data
  record = evaluation.held_out_loss(run, state, cfg.eval_data, cfg.eval_batches, done, blocks)
  writer.write(record)
  log.info(
    "eval at step %d: loss %.4f over %d tokens", done, record["eval_loss"], record["eval_tokens"]
  )


def _evaluate_mcq(writer, mcq_eval: evaluation.McqEval, run: Run, state, done: int) -> None:
  """One multiple-choice evaluation, written and printed. It runs between steps and
  ends with every answer on the host: the model it merges holds ``state.params``'
  buffers, which the next train step donates."""
  record = mcq_eval(run, state.params, done)
  writer.write(record)
  accuracy = "n/a" if record["mcq_accuracy"] is None else f"{record['mcq_accuracy']:.2f}%"
  distributed.say(
    f"mcq at step {done}: accuracy {accuracy} over {record['mcq_items']} items "
    f"({record['mcq_failed']} failed), {record['mcq_time']:.1f} s"
  )
