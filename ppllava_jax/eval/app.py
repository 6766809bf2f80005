"""``eval.py``: run a PPLLaVA checkpoint on one video, a multiple-choice benchmark
(MVBench, VideoMME) or open-ended questions, resumably, and score it.

Decisions:

- The checkpoint is a transformers folder (``PPLLaVA.from_pretrained``: llava-hf
  LLaVA-NeXT(-Video) / OneVision, PPLLaVA's released folders, what ``train.py export``
  and ``convert.py to-hf`` write). Its tokenizer is read from it (or ``--tokenizer``);
  the scorer's from ``--scorer-tokenizer``, else ``--clip``, else the folder's
  ``scorer_tokenizer/`` (``data.text.tokenizer.tokenizer_folders``); the pooling mode is the
  one the folder was saved with unless ``--pooling`` says otherwise. Each tokenizer is
  checked against the embedding it feeds before anything runs: another model's
  tokenizer is an error, never NaN logits and empty answers.
- Nothing wrong is reported as a result: a run whose every answer is empty exits 1
  saying so (the original protocol would count empty MVBench replies as right), and the
  table prints the empty and unparseable counts beside each accuracy.
- Templates follow the LLM: Vicuna ``plain_v1`` for LLaMA, ChatML for Qwen2.
- Frames: ``--frames`` for every video; by default 32, and 64 for VideoMME's medium
  and long videos (the original's settings).
- Videos: MVBench items at ``--video-root/<video>`` (the item's path as written in
  its task file); VideoMME at ``--video-root/<videoID>.mp4`` (or a frame folder
  ``<videoID>/``); open-ended JSONL lines ``{"id", "video", "question"}``.
- VideoMME with ``--subtitles``: the items' own ``subtitles`` lines, or with
  ``--subtitle-root`` the lines of ``<videoID>.srt`` shown at the sampled frames
  (``data.media.subtitles``, as the original picks them).
- Inputs (benchmark and question files, the video and its folders, the numbers) are
  checked before the model loads, so a typo costs seconds, not a model load.
- Outputs in ``--out``: ``predictions.jsonl`` (``eval.records``, appended as answers
  come) and for benchmarks ``results.json`` plus the printed table, which names the
  failed items and how many answers were empty or unparseable. A rerun reuses an
  answer only for the same item id and fingerprint (``eval.jobs``, ``eval.fingerprint``).
- Ctrl-C (SIGINT) or SIGTERM stops at the next batch with one line, ``interrupted: N
  answers kept in <path>``, and exit 130 (143 for SIGTERM); every finished answer is
  kept. A first signal only sets a flag (``ppllava_jax.signals``) that the runner checks
  after the model loads, after each batch's media are read and after its answers are
  saved, so no library that catches a ``KeyboardInterrupt`` can make the run go on; a
  second one stops at once. On several processes each stops by its own signal: signal
  all of them.
- Several processes (``--coordinator``/``--num-processes``/``--process-id`` or the
  ``JAX_*`` variables, ``--cluster-detection``, or a cluster JAX detects:
  ``ppllava_jax.distributed``): each loads its own replica of
  the model on its own devices, as one process does, and answers its share of the
  batches into ``predictions.jsonl.part-<i>-of-<n>``; process 0 merges the parts into
  ``predictions.jsonl`` in one process's order, then scores and prints; the others print
  nothing and write nothing shared but their parts and pictures (``eval.runner``). The
  ``--out`` (and ``--visualize``) folder must be one every host mounts.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ppllava_jax import cli, distributed, signals
from ppllava_jax.data.media.video import BACKENDS
from ppllava_jax.eval import mcq, records
from ppllava_jax.eval.fingerprint import model_key
from ppllava_jax.eval.jobs import chat_template, mcq_jobs, qa_jobs, video_job
from ppllava_jax.eval.qa import QAItem, load_qa
from ppllava_jax.eval.runner import GenerationSettings, failures, process_output, run, score_answers
from ppllava_jax.models.ppllava_config import PoolingConfig

DESCRIPTION = """\
Run a PPLLaVA checkpoint on one video, a multiple-choice benchmark (MVBench, VideoMME)
or open-ended questions, resumably, and score it."""
EPILOG = """\
examples:
  python eval.py --checkpoint DIR [--clip DIR] --video FILE --question "..."
  python eval.py --checkpoint DIR --mvbench JSON_DIR --video-root DIR --out out/mvbench
  python eval.py --checkpoint DIR --videomme FILE --video-root DIR [--subtitles] --out out/vmme
  python eval.py --checkpoint DIR --qa FILE.jsonl --video-root DIR --out out/qa

Answers are appended to OUT/predictions.jsonl as they come; benchmark scores go to
OUT/results.json and are printed as a table. A rerun with the same --out reuses a
saved answer only when the same question was asked of the same video file under the
same settings (checkpoint and tokenizer files, pooling, dtype, frames, max new tokens,
video decoder); everything else is generated again, and a summary line says how many
answers were reused and how many redone. Ctrl-C or SIGTERM stops after the batch in
progress and keeps every finished answer (exit status 130 or 143; again: at once).

On several hosts, run the same command on each, with --coordinator HOST:PORT
--num-processes N --process-id I (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID) and an OUT every host mounts: they split the items, and process 0
writes the one predictions.jsonl and results.json.
"""


STOP_NOTICE = "{} received: stopping after the batch in progress (again: at once)"


def _at_least(low: int) -> Callable[[str], int]:
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < low:
      raise argparse.ArgumentTypeError(f"must be {low} or more, got {value}")
    return value

  return parse


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="eval.py",
    description=DESCRIPTION,
    epilog=EPILOG,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    add_help=False,
  )
  p.add_argument("-h", "--help", action="help", help="Show this help and exit.")
  p.add_argument(
    "--checkpoint",
    required=True,
    metavar="DIR",
    help="The transformers-layout PPLLaVA or LLaVA folder to run.",
  )
  p.add_argument(
    "--clip",
    metavar="DIR",
    help="A CLIP or SigLIP folder to score relevance with, for checkpoints without a scorer.",
  )
  p.add_argument("--tokenizer", metavar="DIR", help="The tokenizer folder (default: --checkpoint).")
  p.add_argument(
    "--scorer-tokenizer",
    metavar="DIR",
    help="The scorer's tokenizer folder (default: --clip, else the checkpoint's "
    "scorer_tokenizer/).",
  )
  what = p.add_mutually_exclusive_group(required=True)
  what.add_argument(
    "--video", metavar="PATH", help="One video file or frame folder to ask --question of."
  )
  what.add_argument(
    "--mvbench", metavar="PATH", help="An MVBench task JSON file, or a folder of them."
  )
  what.add_argument("--videomme", metavar="FILE", help="VideoMME items as JSON, JSONL or parquet.")
  what.add_argument(
    "--qa",
    metavar="FILE",
    help="Open-ended questions, one JSON object {id, video, question} per line.",
  )
  p.add_argument("--question", metavar="TEXT", help="The question to ask of --video.")
  p.add_argument(
    "--video-root",
    default=".",
    metavar="DIR",
    help="The folder the benchmark's video paths start in (default: here).",
  )
  p.add_argument(
    "--protocol",
    choices=mcq.PROTOCOLS,
    default="original",
    help="Whose prompts and scorers to reproduce: PPLLaVA's scripts or lmms-eval's.",
  )
  p.add_argument(
    "--videomme-extractor",
    choices=("2024", "2026"),
    default="2024",
    help="The lmms-eval VideoMME answer extractor: 2024, the regex one; 2026, extract_mcq_answer.",
  )
  p.add_argument("--subtitles", action="store_true", help="Put VideoMME's subtitles in the prompt.")
  p.add_argument(
    "--subtitle-root",
    metavar="DIR",
    help="The folder of VideoMME's "
    "<videoID>.srt files; without it, --subtitles uses the items' own lines.",
  )
  p.add_argument(
    "--out",
    default="out/eval",
    metavar="DIR",
    help="The folder "
    "predictions.jsonl and results.json go to; a rerun reuses what it holds "
    "(default: out/eval).",
  )
  p.add_argument(
    "--limit",
    type=_at_least(0),
    metavar="N",
    help="Run only the first N items; 0 checks the inputs and runs nothing.",
  )
  p.add_argument(
    "--batch-size",
    type=_at_least(1),
    default=4,
    metavar="N",
    help="How many items generate together (default: 4).",
  )
  p.add_argument(
    "--frames",
    type=_at_least(1),
    metavar="N",
    help="Frames sampled per video (default: 32; VideoMME's medium and long videos 64).",
  )
  p.add_argument(
    "--pooling",
    choices=("ppllava", "paper", "average", "llava_next_video", "llava_onevision", "none"),
    help="How visual tokens are pooled (default: the mode the checkpoint was "
    "saved with, else ppllava, the original's).",
  )
  p.add_argument(
    "--max-new-tokens",
    type=_at_least(1),
    metavar="N",
    help="The most tokens generated per answer (default: the protocol's; 200 "
    "for open-ended questions).",
  )
  p.add_argument(
    "--dtype", choices=("float32", "bfloat16"), help="The dtype to compute in (default: as stored)."
  )
  p.add_argument(
    "--visualize", metavar="DIR", help="A folder to write one relevance heat-map PNG per item to."
  )
  p.add_argument(
    "--video-backend",
    choices=BACKENDS,
    default="pyav",
    help="The video decoder: PyAV, or decord as the original (pip install decord).",
  )
  distributed.add_flags(p)
  cli.add_debug_flag(p)
  return p


def parse_args(argv):
  p = build_parser()
  args = p.parse_args(argv)
  if args.video and not (args.question or "").strip():
    p.error("--video needs a --question that is not blank")
  if args.question is not None and not args.video:
    p.error("--question goes with --video")
  return args


def _pooling(args) -> str:
  """``--pooling``, else the mode config.json says the checkpoint was saved with."""
  if args.pooling:
    return args.pooling
  from ppllava_jax.models.ppllava_config import POOLING_MODE_KEY
  from ppllava_jax.models.pretrained import resolve_checkpoint

  config = resolve_checkpoint(args.checkpoint) / "config.json"
  try:
    return json.loads(config.read_text()).get(POOLING_MODE_KEY, PoolingConfig().mode)
  except (OSError, ValueError):
    return PoolingConfig().mode  # the model's loader names a missing or bad config.json


def _read_inputs(args) -> Sequence[mcq.Item] | Sequence[QAItem] | None:
  """The benchmark items or open-ended rows (None for ``--video``), and every path the
  run needs, checked before the model loads."""
  if PoolingConfig(args.pooling).scored and args.folders.scorer is None:
    raise ValueError(
      f"pooling {args.pooling!r} needs the scorer's tokenizer, and "
      f"{args.checkpoint} has no scorer_tokenizer/: give --scorer-tokenizer "
      "(or --clip) with the CLIP / SigLIP folder"
    )
  if args.video:
    if not Path(args.video).exists():
      raise ValueError(f"--video {args.video}: no such file or folder")
    return None
  for flag, folder in (("--video-root", args.video_root), ("--subtitle-root", args.subtitle_root)):
    if folder is not None and not Path(folder).is_dir():
      raise ValueError(f"{flag} {folder}: not a folder")
  items = (
    mcq.load_mvbench(args.mvbench)
    if args.mvbench
    else mcq.load_videomme(args.videomme)
    if args.videomme
    else load_qa(args.qa)
  )
  return items[: args.limit]


def load(args):
  """The model and its processor: the weights with progress, then the tokenizers, each
  checked against the embedding it feeds (``data.text.tokenizer.model_tokenizers``)."""
  import jax.numpy as jnp

  from ppllava_jax.data.processor import Processor
  from ppllava_jax.data.text.tokenizer import model_tokenizers
  from ppllava_jax.models.ppllava import PPLLaVA

  start = time.perf_counter()
  model = PPLLaVA.from_pretrained(
    args.checkpoint,
    clip=args.clip,
    pooling=PoolingConfig(args.pooling),
    dtype=getattr(jnp, args.dtype) if args.dtype else None,
    progress=distributed.is_primary(),
  )
  tokenizer, scorer_tokenizer = model_tokenizers(model.cfg, args.folders, args.checkpoint)
  if distributed.is_primary():
    print(f"loaded {args.checkpoint} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
  return model, Processor(model.cfg, tokenizer, scorer_tokenizer)


def main(argv=None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("ppllava_jax").setLevel(logging.INFO)
  args = parse_args(argv)
  distributed.initialize(args)
  predictions = Path(args.out) / "predictions.jsonl"
  with signals.Signals(STOP_NOTICE) as stop:
    try:
      return _evaluate(args, predictions, stop.check)
    except KeyboardInterrupt:  # stop.check's Interrupted, or a second signal
      mine = process_output(predictions)  # a part on several processes: the next run merges it
      print(f"interrupted: {records.count_answers(mine)} answers kept in {mine}", file=sys.stderr)
      return signals.exit_code(stop.received or "SIGINT")


def _evaluate(args, predictions: Path, check_stop: Callable[[], None]) -> int:
  from ppllava_jax.data.text.tokenizer import tokenizer_folders

  args.folders = tokenizer_folders(
    args.checkpoint,
    tokenizer=args.tokenizer,
    scorer_tokenizer=args.scorer_tokenizer,
    clip=args.clip,
  )
  args.pooling = _pooling(args)
  items = _read_inputs(args)
  protocol = (
    mcq.make_protocol(args.protocol, args.subtitles, args.videomme_extractor)
    if args.mvbench or args.videomme
    else None
  )
  cfg = _settings(args, protocol)
  model, processor = load(args)
  check_stop()  # a signal while the model loaded
  jobs = _jobs(args, items, protocol, chat_template(model.cfg))
  start = time.perf_counter()
  result = run(model, processor, jobs, predictions, cfg, check_stop)
  seconds = time.perf_counter() - start
  if not distributed.is_primary():
    return 0  # process 0 reports and scores every process's answers
  print(result.summary())
  if processor.scorer_truncated:
    print(
      f"the scorer text of {processor.scorer_truncated} items was cut to the text encoder's context"
    )
  return _report(args, items, protocol, jobs, result, predictions, seconds)


def _settings(args, protocol) -> GenerationSettings:
  """How the run answers, the model's identity included (``fingerprint.model_key``)."""
  return GenerationSettings(
    batch_size=args.batch_size,
    max_new_tokens=args.max_new_tokens or (protocol.max_new_tokens if protocol else 200),
    visualize=Path(args.visualize) if args.visualize else None,
    video_backend=args.video_backend,
    model_key=model_key(
      checkpoint=args.checkpoint,
      clip=args.clip,
      tokenizer=str(args.folders.llm),
      scorer_tokenizer=args.folders.scorer and str(args.folders.scorer),
      pooling=args.pooling,
      dtype=args.dtype,
    ),
  )


def _jobs(args, items, protocol, template) -> list:
  """The run's jobs: one video, or ``items`` (None with --video; MCQ items with a
  protocol, QA items without: ``_read_inputs``)."""
  root = Path(args.video_root)
  if args.video:
    return [video_job(args.video, args.question, template, args.frames)]
  if protocol is None:
    return qa_jobs(items, template, root, args.frames)
  subtitle_root = Path(args.subtitle_root) if args.subtitle_root else None
  return mcq_jobs(items, protocol, template, root, args.frames, subtitle_root)


def _report(args, items, protocol, jobs, result, predictions: Path, seconds: float) -> int:
  """Process 0's report: failures, the answer (--video) or the scores; the exit status."""
  failed = failures(jobs, result)
  for job_id, error in failed.items():
    print(f"failed: {job_id}: {error}")
  answers = [r["prediction"] for r in result.records.values() if "prediction" in r]
  empty = sum(not a.strip() for a in answers)
  if answers and empty == len(answers):
    print(
      f"error: all {len(answers)} answers are empty: the model generated only end or "
      "special tokens (is the tokenizer the checkpoint's own? are the weights trained?); "
      f"nothing is scored. The answers are in {predictions}",
      file=sys.stderr,
    )
    return 1
  if args.video:
    if failed:
      return 1
    print(result.records[jobs[0].id]["prediction"])
    return 0
  if protocol is None or not jobs:
    return 0
  report = score_answers(items, jobs, result, protocol)
  if report is None:
    print("no item could be run")
    return 1
  print(report.table())
  print(f"failed items (not scored): {len(failed)} of {len(jobs)}; {seconds:.1f} s this run")
  results = dict(report.to_dict(), failed=failed, items=len(jobs))
  (predictions.parent / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  return 0
