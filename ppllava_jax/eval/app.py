"""``eval.py``: run a PPLLaVA checkpoint on one video, a multiple-choice benchmark
(MVBench, VideoMME) or open-ended questions, resumably, and score it.

  python eval.py --checkpoint DIR [--clip DIR] --video FILE --question "..."
  python eval.py --checkpoint DIR --mvbench JSON_DIR --video-root DIR --out out/mvbench
  python eval.py --checkpoint DIR --videomme FILE --video-root DIR [--subtitles] --out out/vmme
  python eval.py --checkpoint DIR --qa FILE.jsonl --video-root DIR --out out/qa

Decisions:

- The checkpoint is a transformers folder (``PPLLaVA.from_pretrained``: llava-hf
  LLaVA-NeXT(-Video) / OneVision, PPLLaVA's released folders, what ``convert.py
  to-hf`` writes). Its tokenizer is read from it (or ``--tokenizer``); the scorer's
  tokenizer from ``--clip`` (or ``--scorer-tokenizer``), as the original reads CLIP's.
- Templates follow the LLM: Vicuna ``plain_v1`` for LLaMA, ChatML for Qwen2.
- Frames: ``--frames`` for every video; by default 32, and 64 for VideoMME's medium
  and long videos (the original's settings).
- Videos: MVBench items at ``--video-root/<video>`` (the item's path as written in
  its task file); VideoMME at ``--video-root/<videoID>.mp4`` (or a frame folder
  ``<videoID>/``); open-ended JSONL lines ``{"id", "video", "question"}``.
- VideoMME with ``--subtitles``: the items' own ``subtitles`` lines, or with
  ``--subtitle-root`` the lines of ``<videoID>.srt`` shown at the sampled frames
  (``data.subtitles``, as the original picks them).
- Outputs in ``--out``: ``predictions.jsonl`` (appended as answers come, so a rerun
  resumes), and for benchmarks ``results.json`` plus the printed table, which names
  the failed items and how many answers were empty or unparseable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from ppllava_jax.data.templates import CHATML, VICUNA, render_generation_prompt
from ppllava_jax.data.video import BACKENDS, VIDEO_EXTENSIONS
from ppllava_jax.eval import mcq
from ppllava_jax.eval.runner import Job, MediaRef, RunConfig, Subtitled, run

log = logging.getLogger("eval")


def _template(cfg):
  return CHATML if cfg.text.model_type == "qwen2" else VICUNA


def _video_path(root: Path, stem: str) -> str:
  """``root/stem.mp4``, else another video extension, else a frame folder ``root/stem``."""
  for ext in (".mp4", *sorted(VIDEO_EXTENSIONS - {".mp4"})):
    if (root / (stem + ext)).exists():
      return str(root / (stem + ext))
  return str(root / stem) if (root / stem).is_dir() else str(root / (stem + ".mp4"))


def _mcq_text(item, protocol, template) -> tuple[str, str]:
  question, prefix, scorer_text = mcq.build_prompt(item, protocol)
  prompt = render_generation_prompt(template, question, prefix, scorer_text=scorer_text)
  return prompt.text, prompt.scorer_text


def mcq_jobs(items, protocol, template, root: Path, frames: int | None,
             subtitle_root: Path | None = None) -> list[Job]:
  """One job per item; with ``subtitle_root``, VideoMME prompts quote ``<videoID>.srt``."""
  jobs = []
  for index, item in enumerate(items):
    text, scorer_text = _mcq_text(item, protocol, template)
    subtitled = None
    if isinstance(item, mcq.MVBenchItem):
      job_id, ref = f"{item.task}/{index}", MediaRef("video", str(root / item.video), item.start,
                                                      item.end)
      n = frames or 32
    else:
      job_id = item.question_id or f"{item.video_id}/{index}"
      ref = MediaRef("video", _video_path(root, item.video_id))
      n = frames or (32 if item.duration == "short" else 64)
      if subtitle_root is not None and protocol.subtitles:
        subtitled = Subtitled(
            str(subtitle_root / f"{item.video_id}.srt"),
            lambda lines, item=item: _mcq_text(dataclasses.replace(item, subtitles=lines),
                                               protocol, template))
    jobs.append(Job(job_id, text, scorer_text, (ref,), n, item.question, subtitled))
  return jobs


def qa_jobs(path: Path, template, root: Path, frames: int | None) -> list[Job]:
  jobs = []
  for number, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    row = json.loads(line)
    missing = [k for k in ("video", "question") if k not in row]
    if missing:
      raise ValueError(f"{path}:{number}: missing field(s) {missing}")
    prompt = render_generation_prompt(template, row["question"])
    jobs.append(Job(str(row.get("id", number)), prompt.text, prompt.scorer_text,
                    (MediaRef("video", str(root / row["video"])),), frames or 32, row["question"]))
  return jobs


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="\n".join(__doc__.splitlines()[2:7]))
  p.add_argument("--checkpoint", required=True, help="a transformers-layout PPLLaVA / LLaVA folder")
  p.add_argument("--clip", help="CLIP / SigLIP folder: the scorer, for folders without one")
  p.add_argument("--tokenizer", help="tokenizer folder (default: --checkpoint)")
  p.add_argument("--scorer-tokenizer", help="the scorer's tokenizer folder (default: --clip)")
  what = p.add_mutually_exclusive_group(required=True)
  what.add_argument("--video", help="one video file or frame folder (with --question)")
  what.add_argument("--mvbench", help="an MVBench task JSON file or a folder of them")
  what.add_argument("--videomme", help="VideoMME items: JSON, JSONL or parquet")
  what.add_argument("--qa", help="open-ended questions, JSONL {id, video, question}")
  p.add_argument("--question", help="the question for --video")
  p.add_argument("--video-root", default=".", help="folder the benchmark's video paths start in")
  p.add_argument("--protocol", choices=("original", "lmms_eval"), default="original")
  p.add_argument("--videomme-extractor", choices=("2024", "2026"), default="2024",
                 help="lmms-eval's VideoMME answer extractor (2024: regex; 2026: mcq_extract)")
  p.add_argument("--subtitles", action="store_true", help="VideoMME with subtitles")
  p.add_argument("--subtitle-root", help="folder of VideoMME's <videoID>.srt files (with "
                 "--subtitles; else the items' own subtitle lines are used)")
  p.add_argument("--out", default="out/eval", help="folder for predictions.jsonl, results.json")
  p.add_argument("--limit", type=int, help="only the first N items")
  p.add_argument("--batch-size", type=int, default=4)
  p.add_argument("--frames", type=int, help="frames per video (default 32; VideoMME 32/64)")
  p.add_argument("--pooling", default="ppllava",
                 choices=("ppllava", "paper", "average", "llava_next_video", "llava_onevision",
                          "none"))
  p.add_argument("--max-new-tokens", type=int, help="default: the protocol's (200 open-ended)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: as stored")
  p.add_argument("--visualize", help="folder for relevance heat-map PNGs, one per item")
  p.add_argument("--video-backend", choices=BACKENDS, default="pyav",
                 help="video decoder: PyAV, or decord as the original (pip install decord)")
  args = p.parse_args(argv)
  if args.video and not args.question:
    p.error("--video needs --question")
  return args


def load(args):
  import jax.numpy as jnp
  from transformers import AutoTokenizer
  from ppllava_jax.data.processor import Processor
  from ppllava_jax.models.ppllava import PPLLaVA, PoolingConfig
  model = PPLLaVA.from_pretrained(args.checkpoint, clip=args.clip,
                                  pooling=PoolingConfig(args.pooling),
                                  dtype=getattr(jnp, args.dtype) if args.dtype else None)
  source = args.scorer_tokenizer or args.clip
  if model.cfg.pooling.scored and source is None:
    raise SystemExit(f"pooling {args.pooling!r} needs the scorer's tokenizer: give "
                     "--scorer-tokenizer (or --clip) with the CLIP / SigLIP folder")
  scorer_tok = AutoTokenizer.from_pretrained(source) if source else None
  tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.checkpoint)
  return model, Processor(model.cfg, tokenizer, scorer_tok)


def main(argv=None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("ppllava_jax").setLevel(logging.INFO)
  args = parse_args(argv)
  out = Path(args.out)
  model, processor = load(args)
  template, root = _template(model.cfg), Path(args.video_root)
  protocol, items = None, None
  if args.mvbench or args.videomme:
    protocol = (mcq.OriginalProtocol(subtitles=args.subtitles) if args.protocol == "original"
                else mcq.LmmsEvalProtocol(videomme_extractor=args.videomme_extractor,
                                          subtitles=args.subtitles))
    items = (mcq.load_mvbench(args.mvbench) if args.mvbench
             else mcq.load_videomme(args.videomme))[:args.limit]
    jobs = mcq_jobs(items, protocol, template, root, args.frames,
                    Path(args.subtitle_root) if args.subtitle_root else None)
  elif args.qa:
    jobs = qa_jobs(Path(args.qa), template, root, args.frames)[:args.limit]
  else:
    prompt = render_generation_prompt(template, args.question)
    jobs = [Job("video", prompt.text, prompt.scorer_text, (MediaRef("video", args.video),),
                args.frames or 32, args.question)]
  cfg = RunConfig(batch_size=args.batch_size,
                  max_new_tokens=args.max_new_tokens or (protocol.max_new_tokens if protocol
                                                         else 200),
                  visualize=Path(args.visualize) if args.visualize else None,
                  video_backend=args.video_backend)
  start = time.perf_counter()
  records = run(model, processor, jobs, out / "predictions.jsonl", cfg)
  seconds = time.perf_counter() - start
  failed = {j.id: records[j.id]["error"] for j in jobs if records[j.id]["status"] != "ok"}
  for job_id, error in failed.items():
    print(f"failed: {job_id}: {error}")
  if args.video:
    if failed:
      return 1
    print(records["video"]["prediction"])
    return 0
  if protocol is None:
    print(f"{len(jobs) - len(failed)} answers in {out / 'predictions.jsonl'}")
    return 0
  ok = [(item, job) for item, job in zip(items, jobs) if job.id not in failed]
  if not ok:
    print("no item could be run")
    return 1
  report = mcq.score([i for i, _ in ok], [records[j.id]["prediction"] for _, j in ok], protocol)
  print(report.table())
  print(f"failed items (not scored): {len(failed)} of {len(jobs)}; {seconds:.1f} s this run")
  results = dict(report.to_dict(), failed=failed, items=len(jobs))
  (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
