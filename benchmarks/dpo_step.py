"""One DPO train step: ours (the media once per pair, the reference cached) against the
original's form (every row with its own copy of the video, a live reference that embeds
the batch again), same model, same pairs, same loss and optimizer, one run.

Why: a DPO batch of B pairs is 2B LLM rows (chosen, rejected) over B videos. The
original (LLaVA-Hound's trl-0.8-era trainer: trl's concatenated forward) joins the chosen and
rejected rows with a copy of the pixels each, so the policy runs the vision tower (and
the scorer, and the pooling) over 2B videos, and its live reference model, run in the
same step, embeds the same 2B rows again: 4B passes of the tower per step. Ours
(``train.dpo.objective``) encodes the B videos once (``train.core.inputs.pair_media``), writes each
video's tokens into both of its rows (``embed_pairs``), and reads the reference's
log-probs from ``PairBatch.ref_logps``, computed once before training
(``train.run.reference``): B passes of the tower, one LLM forward + backward, no reference
weights. Only the LLM trains under DPO (``train.core.partition.DPO``), so the media tokens
are the same for the policy and the reference and both forms compute the same loss.

Workload: the tiny PPLLaVA (``models.tiny.TinyConfig``) at 32 frames of 168 px / 14 px
patches (12 x 12 patches a frame; the (2, 3, 3) prompt-guided pooling makes 256 video
tokens), TinyConfig's vision tower (2 x 64, frozen) and CLIP text scorer (2 x 64, 248
positions), a LLaMA decoder of 2 x 256 over the char tokenizer's vocabulary (trains),
float32 on the CPU. Sized so that one pass of the tower over a video is about as large
against the LLM's forward over a pair (~0.35) as in the 7B model (CLIP-L/336 over 32
frames ~12 TFLOP, Vicuna-7B over two rows of ~1.1k tokens ~31 TFLOP). ``PAIRS`` = 4
pairs of random tokens at LLaVA-Hound's lengths in LLaMA tokens: a prompt of 40 tokens
(BOS, the Vicuna system sentence, ``USER:``) + the video + 24 (the question,
``ASSISTANT:``), completions of 48 to 96 supervised tokens, every row padded to one
bucket of 448; the scorer reads a 16-token question. AdamW at a constant 1e-5, gradients
clipped to norm 1, sigmoid DPO, beta 0.1.

Contenders, each in a worker process of its own (its peak memory, VmHWM, is its own:
runtime, weights, optimizer state, compiled program, activations), all through the same
``train.core.step.Steps`` (jitted, the state donated) on the same weights (``build_tiny``,
seed 0, built once and saved; each worker loads them and assembles the run
(``train.run.assembly``)):

- ours: ``PreferenceObjective`` with ``DPOConstants(frozen, None)`` on a ``PairBatch``
  (``data.dpo.pairs.collate_pairs``) whose ``ref_logps`` come from ``train.dpo.objective.
  reference_logps`` of the initial parameters (the cache's function; its time per batch
  is printed: a run pays it once per pair, not per step or epoch).
- ours, live reference: the same step with ``DPOConstants(frozen, reference_copy(...))``
  (``DPOConfig.precompute_reference=False``): the media still once, the reference's LLM
  run in the step on the same media tokens.
- duplicated + live: ``Duplicated`` below, an ``Objective`` of package primitives: the
  pairs as a ``TrainBatch`` of 2B rows (``data.sft.batches.collate``) whose 2B video slots each
  hold a copy of their pair's video (``video_row`` = the row), embedded by
  ``train.core.inputs.embed_batch`` for the policy and again for the live reference, then
  ``losses.sequence_logprobs`` and ``train.dpo.losses.preference_loss`` as ours. The
  reference is a whole float32 model of its own, as the original's: a copy of the LLM and
  a copy of the frozen state. (On the policy's frozen buffers XLA sees that the
  reference's media path repeats the policy's and computes it once: 75 instead of 90
  GFLOP, a saving the original's eager PyTorch never gets.)

Timing: the workers build and compile side by side, then the timed steps go
round-robin, one step of each contender in turn, the order rotating each round, so a busy
machine's load falls on all alike; a step time is the median over ``--reps`` rounds
(after the compiling step and one more), a time ratio the median of the per-round ratios.
Memory and work: the compiled step's ``memory_analysis`` (temporaries; arguments: state,
constants and batch) and ``cost_analysis`` FLOPs (of the compiled program, what runs;
the lowering's, as written, in the ratio line), the worker's peak RSS. Equality check:
at the first step the policy is the reference, so every form's loss is log 2; the first
step's policy and reference log-probs, and the second step's loss (after one update),
are what must agree, and are printed.

``--quick``: one timed step, ours and duplicated + live only (a smoke run).

  python benchmarks/dpo_step.py [--reps 7] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import flax.struct
import numpy as np
from common import status_kib

FRAMES, IMAGE, PATCH = 32, 168, 14
PAIRS = 4
TINY = dict(
  frames=FRAMES,
  image_size=IMAGE,
  patch_size=PATCH,
  vision_width=64,
  vision_layers=2,
  llm_width=256,
  llm_layers=2,
  text_width=64,
  text_layers=2,
)
BEFORE, AFTER = 40, 24  # prompt tokens before / after the video's placeholders
COMPLETIONS = ((96, 64), (72, 48), (88, 80), (56, 64))  # (chosen, rejected) per pair
QUESTION = 16  # scorer tokens between its BOS and EOS
LR, BETA = 1e-5, 0.1
CONTENDERS = {
  "ours": "ours (shared, cached ref)",
  "ours_live": "ours (shared, live ref)",
  "duplicated": "duplicated + live ref",
}
BASE = "ours"
MIB = 2**20


def _setup():
  """(tokenizer vocab size, TinyConfig, its model config, TrainConfig, DPOConfig)."""
  from ppllava_jax.data.text.tokenizer import char_tokenizer
  from ppllava_jax.models.tiny import TinyConfig
  from ppllava_jax.train.core.config import MeshConfig, OptimConfig, TrainConfig
  from ppllava_jax.train.core.partition import DPO
  from ppllava_jax.train.dpo.losses import DPOConfig

  vocab = len(char_tokenizer())
  tiny = TinyConfig(**TINY)
  tc = TrainConfig(
    optim=OptimConfig(lr=LR, schedule="constant", warmup_ratio=0.0, clip_norm=1.0),
    mesh=MeshConfig(1, 1, 1),
    trainable=DPO,
    seed=0,
  )
  return vocab, tiny, tiny.model_config(vocab), tc, DPOConfig(loss_type="sigmoid", beta=BETA)


def _pairs(model_cfg, vocab: int):
  """The ``PreferenceSample``s of the workload (random tokens and pixels, seed 0) and
  the sequence bucket they share."""
  from ppllava_jax.data.dpo.rows import PreferenceSample

  rng = np.random.default_rng(0)
  video_tokens = model_cfg.video_tokens(FRAMES)
  context = model_cfg.scorer.text.max_position_embeddings
  words = lambda n: rng.integers(5, vocab, n).astype(np.int32)  # past the specials and <image>
  samples = []
  for chosen, rejected in COMPLETIONS:
    prompt = np.concatenate(
      [[1], words(BEFORE - 1), np.full(video_tokens, model_cfg.video_token_index), words(AFTER)]
    )
    scorer_ids = np.zeros(context, np.int32)
    scorer_ids[: QUESTION + 2] = np.concatenate([[1], words(QUESTION), [2]])
    samples.append(
      PreferenceSample(
        prompt.astype(np.int32),
        np.append(words(chosen - 1), 2).astype(np.int32),
        np.append(words(rejected - 1), 2).astype(np.int32),
        rng.standard_normal((FRAMES, 3, IMAGE, IMAGE), dtype=np.float32),
        tuple(range(FRAMES)),
        video_tokens,
        scorer_ids,
        (np.arange(context) < QUESTION + 2).astype(np.int32),
      )
    )
  longest = max(s.length for s in samples)
  return samples, -(-longest // 64) * 64


def pair_batch(samples, model_cfg, length: int):
  """Ours: a ``PairBatch`` of the pairs (``ref_logps`` zeros, filled by the worker)."""
  from ppllava_jax.data.dpo.pairs import PreferenceDataConfig, collate_pairs
  from ppllava_jax.data.dpo.rows import PreferenceConfig

  layout = PreferenceDataConfig(
    "unused",
    sample=PreferenceConfig(num_frames=FRAMES, max_length=length),
    batch_size=len(samples),
    seq_buckets=(length,),
  )
  return collate_pairs(
    samples, model_cfg, layout, scorer_length=model_cfg.scorer.text.max_position_embeddings
  )


def duplicated_batch(samples, model_cfg, length: int):
  """The original's form: a ``TrainBatch`` of 2B rows (2i chosen, 2i + 1 rejected, as a
  ``PairBatch``), each row a video sample with its own copy of its pair's video."""
  from ppllava_jax.data.sft.batches import BatchConfig, collate
  from ppllava_jax.data.sft.samples import Sample

  rows = []
  for x in samples:
    for side in ("chosen", "rejected"):
      ids, labels = x.row(side)
      rows.append(
        Sample(
          ids,
          labels,
          np.ones_like(ids),
          x.scorer_ids,
          x.scorer_mask,
          "video",
          video=x.video.copy(),
          frame_indices=x.frame_indices,
          media_tokens=(x.media_tokens,),
        )
      )
  layout = BatchConfig(
    batch_size=len(rows),
    seq_buckets=(length,),
    video_slots=len(rows),
    image_slots=0,
    multi_image_slots=0,
    num_frames=FRAMES,
    max_pictures=1,
  )
  return collate(
    rows, model_cfg, layout, scorer_length=model_cfg.scorer.text.max_position_embeddings
  )


@flax.struct.dataclass
class WholeReference:
  """``Duplicated``'s constants: the policy's frozen state, and the reference as a whole
  model of its own (the original's separate reference model): a copy of the trainable
  part (the LLM) and a copy of the frozen state (vision tower, scorer, projector)."""

  frozen: object
  reference: object
  reference_frozen: object


@dataclasses.dataclass(frozen=True)
class Duplicated:
  """The duplicated-media DPO with a live reference as a ``train.core.step.Objective`` on a
  ``TrainBatch`` of interleaved rows; constants: ``WholeReference``. The policy and the
  reference each embed the whole batch (``embed_batch``: scorer, vision tower and pooling
  over every row's video copy). The reference's frozen state has buffers of its own, as
  the original's reference model: on the policy's, XLA would find the reference's media
  path identical and compute it once (common subexpressions), which no eager framework
  does."""

  graphdef: object
  cfg: object
  config: object
  count: str = "pairs"

  def totals(self, batch):
    import jax.numpy as jnp

    from ppllava_jax.train.core.losses import supervised_targets

    supervised = supervised_targets(batch.labels)
    return {
      "pairs": batch.row_mask[0::2].sum().astype(jnp.float32),
      "tokens": supervised.sum().astype(jnp.float32),
      "chosen_tokens": supervised[0::2].sum().astype(jnp.float32),
    }

  def _logps(self, params, frozen, batch):
    from ppllava_jax.train.core import losses
    from ppllava_jax.train.core.inputs import embed_batch
    from ppllava_jax.train.core.step import merged

    model = merged(self.graphdef, self.cfg, params, frozen)
    model.eval()
    lm = model.language_model
    hidden_bld, _ = lm.hidden_states(
      inputs_embeds=embed_batch(model, batch),
      attention_mask=batch.attention_mask,
      position_ids=batch.position_ids,
    )
    return losses.sequence_logprobs(hidden_bld, lm.head_dv, batch.labels, self.cfg.loss_chunk)

  def share(self, params, constants: WholeReference, batch, key, totals):
    import jax

    from ppllava_jax.train.dpo.losses import preference_loss

    del key
    logp_r, count_r = self._logps(params, constants.frozen, batch)
    ref_r = jax.lax.stop_gradient(
      self._logps(constants.reference, constants.reference_frozen, batch)[0]
    )
    return preference_loss(
      logp_r[0::2],
      logp_r[1::2],
      ref_r[0::2],
      ref_r[1::2],
      count_r[0::2],
      count_r[1::2],
      self.config,
      batch.row_mask[0::2],
      totals["pairs"],
      totals["chosen_tokens"],
    )


def _nbytes(tree) -> int:
  import jax

  return sum(x.nbytes for x in jax.tree.leaves(tree))


def _cost(program) -> float | None:
  """FLOPs of a lowered (as written) or compiled (as run) program."""
  cost = program.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def save_weights(folder: Path) -> None:
  """The tiny model's random initial weights (``models.tiny.build_tiny``, seed 0), built
  once for every worker (an initialisation compiles one small program per shape)."""
  import jax
  from flax import nnx

  from ppllava_jax.models.tiny import build_tiny

  vocab, tiny, *_ = _setup()
  leaves = jax.tree.leaves(nnx.split(build_tiny(tiny, vocab))[1])
  np.savez(folder / "weights.npz", *[np.asarray(x) for x in leaves])


def _model(folder: Path):
  """The saved model, merged into the abstract one."""
  import jax
  from flax import nnx

  from ppllava_jax.models.tiny import build_tiny

  vocab, tiny, *_ = _setup()
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_tiny(tiny, vocab)))
  with np.load(folder / "weights.npz") as z:
    leaves = [z[f"arr_{i}"] for i in range(len(z.files))]
  return nnx.merge(graphdef, jax.tree.unflatten(jax.tree.structure(abstract), leaves))


def _send(message: dict) -> None:
  print(json.dumps(message), flush=True)


def worker(folder: Path, contender: str) -> None:
  """Builds ``contender``'s step, runs the compiling step and one more and reports (one
  JSON line on stdout), then does what the main process asks, a line of stdin each:
  ``step`` (one timed step), ``reference`` (ours: the cache's pass over the batch, timed),
  ``done`` (the medians and the peak memory; then it exits)."""
  import functools

  import jax

  from ppllava_jax.train.core.step import Steps
  from ppllava_jax.train.dpo.objective import (
    DPOConstants,
    PreferenceObjective,
    reference_copy,
    reference_logps,
  )
  from ppllava_jax.train.run.assembly import assemble, materialize

  vocab, _, model_cfg, tc, dpo = _setup()
  model = _model(folder)
  a = assemble(model, tc, devices=jax.devices()[:1])
  state, frozen = materialize(a, model, seed=tc.seed)
  graphdef, tx, shardings, mesh = a.graphdef, a.tx, a.shardings, a.mesh
  del model
  samples, length = _pairs(model_cfg, vocab)
  out = dict(length=length, rows=2 * len(samples), video_tokens=model_cfg.video_tokens(FRAMES))
  live_sh = DPOConstants(shardings.frozen, shardings.state.params)
  box, reference = {"state": state}, None
  if contender == "duplicated":
    batch = duplicated_batch(samples, model_cfg, length)
    objective = Duplicated(graphdef, tc, dpo)
    constants = WholeReference(
      frozen,
      reference_copy(state.params, jax.numpy.float32, shardings.state.params),
      reference_copy(frozen, jax.numpy.float32, shardings.frozen),
    )
    sh = WholeReference(shardings.frozen, shardings.state.params, shardings.frozen)
  else:
    batch = jax.device_put(pair_batch(samples, model_cfg, length))
    objective = PreferenceObjective(graphdef, tc, dpo)
    if contender == "ours":  # the cache's pass (train.run.reference), on the initial parameters
      fn = jax.jit(functools.partial(reference_logps, graphdef, tc))

      def reference():  # timed later on the current parameters: the same work
        with jax.set_mesh(mesh):
          return np.asarray(jax.device_get(fn(box["state"].params, frozen, batch)))

      batch = batch.replace(ref_logps=reference())
      constants, sh = DPOConstants(frozen, None), DPOConstants(shardings.frozen, None)
    else:
      constants, sh = (
        DPOConstants(
          frozen, reference_copy(state.params, jax.numpy.float32, shardings.state.params)
        ),
        live_sh,
      )
  steps = Steps(graphdef, tc, tx, shardings, objective, sh)
  batch = jax.device_put(batch)
  lowered = steps.lower_train(state, constants, batch)
  compiled = lowered.compile()  # the step below reuses this executable
  mem = compiled.memory_analysis()
  out.update(
    flops=_cost(compiled),
    hlo_flops=_cost(lowered),
    temp=mem.temp_size_in_bytes,
    argument=mem.argument_size_in_bytes,
    output=mem.output_size_in_bytes,
    alias=mem.alias_size_in_bytes,
    batch_bytes=_nbytes(batch),
    reference_bytes=_nbytes(constants.reference)
    + _nbytes(getattr(constants, "reference_frozen", None)),
  )
  seen = []

  def step():
    box["state"], metrics = steps.train(box["state"], constants, batch)
    seen.append({k: float(v) for k, v in jax.device_get(metrics).items()})  # waits for it

  del state
  start = time.perf_counter()
  step()  # compiles (or finds the executable above)
  out["first_seconds"] = time.perf_counter() - start
  step()  # warm: allocator, first touch of the buffers
  first = seen[0]
  out.update(
    loss=first["loss"],
    second_loss=seen[1]["loss"],
    logps=[first["logps/chosen"], first["logps/rejected"]],
    ref_logps=[first["ref_logps/chosen"], first["ref_logps/rejected"]],
    grad_norm=first["grad_norm"],
  )
  _send(out)
  times = {"step": [], "reference": []}
  for line in sys.stdin:
    what = line.strip()
    if what not in times or (what == "reference" and reference is None):
      break
    start = time.perf_counter()
    step() if what == "step" else reference()
    times[what].append(time.perf_counter() - start)
    _send({"seconds": times[what][-1]})
  _send(
    dict(
      seconds=float(np.median(times["step"])) if times["step"] else None,
      times=times["step"],
      reference_seconds=float(np.median(times["reference"])) if times["reference"] else None,
      traces=steps.traces["train"],
      peak_mib=status_kib("VmHWM") / 1024,
    )
  )


# ---- the run ---------------------------------------------------------------------------


class WorkerError(RuntimeError):
  """A worker ended before answering."""


class Worker:
  """One contender's process (``worker``), driven a line at a time."""

  def __init__(self, name: str, folder: Path):
    self.name, self.stderr = name, folder / f"{name}.stderr"
    with open(self.stderr, "w") as err:
      self.proc = subprocess.Popen(
        [sys.executable, __file__, "--folder", str(folder), "--worker", name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
      )

  def ask(self, what: str | None = None) -> dict:
    """Sends ``what`` (None: nothing) and returns the next JSON line the worker prints."""
    try:
      if what is not None:
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
      for line in self.proc.stdout:
        if line.startswith("{"):
          return json.loads(line)
    except BrokenPipeError:
      pass
    code = self.proc.wait()
    lines = self.stderr.read_text().strip().splitlines() or [f"exit status {code}"]
    raise WorkerError("killed (out of memory?)" if code in (-9, 137) else lines[-1])

  def close(self) -> None:
    if self.proc.stdin and not self.proc.stdin.closed:
      try:
        self.proc.stdin.close()
      except BrokenPipeError:
        pass
    self.proc.wait()


def run(names, reps: int, folder: Path) -> dict:
  """Every contender's report. The workers build and compile side by side; then the timed
  steps go round-robin, one step of each in turn (the order rotating each round), so the
  load of a busy machine falls on every contender alike; ours also times its reference
  pass in each round."""
  workers, rows = {n: Worker(n, folder) for n in names}, {}

  def ask(name, what=None):
    try:
      return workers[name].ask(what)
    except WorkerError as err:
      rows[name] = dict(error=f"did not {'run' if what is None else 'finish'}: {err}")
      return None

  try:
    for name in names:
      rows[name] = {}
      got = ask(name)
      if got is not None:
        rows[name] = got
    for rep in range(reps):
      live = [n for n in names if "error" not in rows[n]]
      for name in live[rep % len(live) :] + live[: rep % len(live)] if live else ():
        if ask(name, "step") is not None and name == BASE:
          ask(name, "reference")
    for name in names:
      if "error" not in rows[name]:
        got = ask(name, "done")
        if got is not None:
          rows[name].update(got)
  finally:
    for w in workers.values():
      w.close()
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=7, help="timed steps per contender")
  parser.add_argument(
    "--quick", action="store_true", help="one timed step; ours and duplicated + live only"
  )
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if not args.worker:
    print(common.machine())  # the line each figure is read with
  if args.worker:
    worker(args.folder, args.worker)
    return

  reps = 1 if args.quick else args.reps
  names = ("ours", "duplicated") if args.quick else tuple(CONTENDERS)
  start = time.perf_counter()
  t = TINY
  print(
    f"tiny PPLLaVA: {FRAMES} frames of {IMAGE} px / {PATCH} px patches, vision tower "
    f"{t['vision_layers']} x {t['vision_width']} (frozen), CLIP text scorer "
    f"{t['text_layers']} x {t['text_width']}, LLM {t['llm_layers']} x {t['llm_width']} "
    f"(trains); f32; AdamW; sigmoid DPO, beta {BETA}; {PAIRS} pairs; {os.cpu_count()} CPUs, "
    f"load average {os.getloadavg()[0]:.1f} at start; median of {reps} warm steps, "
    "round-robin",
    flush=True,
  )
  with tempfile.TemporaryDirectory() as tmp:
    folder = Path(tmp)
    save_weights(folder)
    rows = run(names, reps, folder)
  r = rows[BASE]
  if "error" not in r:
    print(
      f"{PAIRS} pairs = {r['rows']} rows of {r['length']} tokens ({r['video_tokens']} "
      f"video tokens each); the cached reference's pass over the batch: "
      f"{r['reference_seconds']:.2f} s (once per pair per run, not per step)"
    )
  print(
    f"{'contender':30s}{'tower passes':>13s}{'step s':>9s}{'GFLOP':>8s}{'temp MiB':>10s}"
    f"{'arg MiB':>9s}{'peak MiB':>10s}{'1st loss':>10s}{'2nd loss':>11s}"
  )
  for name in names:
    _print_row(name, rows[name])
  print(
    "timed steps (s), in order: "
    + "; ".join(
      f"{CONTENDERS[n]} {' '.join(f'{x:.2f}' for x in rows[n]['times'])}"
      for n in names
      if "times" in rows[n]
    )
  )
  _print_ratios(rows)
  _print_agreement(rows)
  _print_markdown(rows)
  print(
    f"whole run {time.perf_counter() - start:.0f} s; load average "
    f"{os.getloadavg()[0]:.1f} at the end"
  )


def _passes(name: str) -> str:
  """Vision-tower (and scorer, pooling) passes over a video per step."""
  return {"ours": f"{PAIRS}", "ours_live": f"{PAIRS}", "duplicated": f"{4 * PAIRS}"}[name]


def _print_row(name: str, r: dict) -> None:
  label = CONTENDERS[name]
  if "error" in r:
    print(f"{label:30s}  {r['error']}", flush=True)
    return
  flops = f"{r['flops'] / 1e9:8.1f}" if r["flops"] else f"{'n/a':>8s}"
  print(
    f"{label:30s}{_passes(name):>13s}{r['seconds']:9.2f}{flops}{r['temp'] / MIB:10.0f}"
    f"{r['argument'] / MIB:9.0f}{r['peak_mib']:10.0f}{r['loss']:10.5f}{r['second_loss']:11.6f}",
    flush=True,
  )


def _others(rows: dict):
  """(ours, [(name, row)] of the other contenders), those that ran."""
  base = rows.get(BASE, {})
  if "error" in base or not base:
    return None, []
  return base, [(n, r) for n, r in rows.items() if n != BASE and "error" not in r]


def _sum_ratio(r: dict, base: dict) -> float:
  return (r["temp"] + r["argument"]) / (base["temp"] + base["argument"])


def _time_ratio(r: dict, base: dict) -> float:
  """The median over rounds of the step time over ours' in the same round (a busy
  machine's load drifts between rounds, much less within one)."""
  return float(np.median([a / b for a, b in zip(r["times"], base["times"])]))


def _print_ratios(rows: dict) -> None:
  """Each contender over ours (> 1: ours is smaller or faster)."""
  base, others = _others(rows)
  for name, r in others:
    flops = (
      f", FLOPs {r['flops'] / base['flops']:.2f}x (as written, before XLA: "
      f"{r['hlo_flops'] / base['hlo_flops']:.2f}x)"
      if r["flops"] and base["flops"]
      else ""
    )
    print(
      f"{CONTENDERS[name]} / {CONTENDERS[BASE]}: step time {_time_ratio(r, base):.2f}x "
      f"(round by round; medians {r['seconds'] / base['seconds']:.2f}x){flops}, temp "
      f"{r['temp'] / base['temp']:.2f}x, arguments {r['argument'] / base['argument']:.2f}x, "
      f"temp + arguments {_sum_ratio(r, base):.2f}x, peak RSS "
      f"{r['peak_mib'] / base['peak_mib']:.2f}x"
    )


def _print_agreement(rows: dict) -> None:
  """Same weights, same pairs: the first step's log-probs and the second step's loss agree."""
  base, others = _others(rows)
  for name, r in others:
    logps = max(
      abs(a - b) for a, b in zip(r["logps"] + r["ref_logps"], base["logps"] + base["ref_logps"])
    )
    print(
      f"{CONTENDERS[name]} vs {CONTENDERS[BASE]}: first-step loss {r['loss']:.6f} vs "
      f"{base['loss']:.6f} (log 2 = {np.log(2):.6f}: policy = reference), |diff| "
      f"{abs(r['loss'] - base['loss']):.1e}; first-step policy and reference mean log-probs "
      f"max |diff| {logps:.1e} (of {abs(base['logps'][0]):.1f}); second-step loss "
      f"{r['second_loss']:.6f} vs {base['second_loss']:.6f}, |diff| "
      f"{abs(r['second_loss'] - base['second_loss']):.1e}"
    )


def _print_markdown(rows: dict) -> None:
  """The table of docs/benchmarks.md."""
  base, others = _others(rows)
  if base is None:
    return
  print(
    "| contender | tower passes | step s | GFLOP | temp + arguments MiB (batch, reference) "
    "| peak MiB | step time vs ours |"
  )
  print("|---|---|---|---|---|---|---|")
  for name, r in [(BASE, base), *others]:
    label = f"**{CONTENDERS[name]}**" if name == BASE else CONTENDERS[name]
    flops = f"{r['flops'] / 1e9:.1f}" if r["flops"] else "n/a"
    print(
      f"| {label} | {_passes(name)} | {r['seconds']:.2f} | {flops} | "
      f"{r['temp'] / MIB:.0f} + {r['argument'] / MIB:.0f} ({r['batch_bytes'] / MIB:.0f}, "
      f"{r['reference_bytes'] / MIB:.1f}) | {r['peak_mib']:.0f} | "
      f"{_time_ratio(r, base):.2f}x |"
    )


if __name__ == "__main__":
  main()
