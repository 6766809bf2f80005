"""One SFT train step (forward + backward + AdamW), ours vs transformers + torch, one run.

Two workloads, each on the same random weights for every contender (transformers init
plus N(0, 0.02) on every tensor, as tests/support/hf_fixtures.py, saved once), f32 on CPU:

- llm: a LLaMA of 4 layers, width 512, 8 heads x 64 (8 kv heads), MLP 1408, vocab 32000, on
  2 x 1024 random tokens, every next token supervised.
- video: the whole tiny PPLLaVA at 32 frames: the real geometry (336-px frames of 14-px
  patches, 24 x 24 patches, (2, 3, 3) prompt-guided pooling, a CLIP text scorer extended
  77 -> 248 positions) at ``models.tiny.TinyConfig``'s tower widths (vision 2 x 64, scorer
  text 2 x 64), in front of the same 4 x 512 LLM; one sample: a 32-frame video between a
  prompt and a 32-token supervised answer. The vision tower is frozen, the LLM and the
  projector train (``train.core.partition.VICUNA_SFT``).

Contenders, each in a fresh worker process (peak memory = the worker's VmHWM: runtime,
weights, optimizer state and activations):

- ours: the real train step (``train.core.step.Steps`` of ``train.run.assembly.assemble``: jitted,
  state donated), on a ``PPLLaVA`` read with ``PPLLaVA.from_pretrained``; the llm workload
  is a text-only ``TrainBatch`` through the same step (the shell's vision tower is never
  run). AdamW (0.9, 0.999, 1e-8), weight decay 0, constant learning rate, gradients
  clipped to norm 1. Modes of the video workload: ``ppllava`` (1024 video tokens) and
  ``llava_next_video`` (LLaVA-NeXT-Video's 2 x 2 spatial mean, 32 x 144 = 4608 tokens:
  the same model as transformers', so its loss is compared).
- transformers ``LlamaForCausalLM`` / ``LlavaNextVideoForConditionalGeneration`` with
  ``attn_implementation="sdpa"`` (torch's fused CPU attention) and ``"eager"``; the loss
  from ``labels``, ``loss.backward()``, ``clip_grad_norm_(1.0)``, ``torch.optim.AdamW``
  with the same settings. PyTorch has no prompt-guided pooling: its video model pools
  with its own 2 x 2 spatial mean.

Each step is timed warm (ours: after the step that compiles; torch: after one step),
median of ``--reps`` (eager torch: one, it is the slowest); tokens/s counts the LLM's
tokens (batch x sequence). The first step's loss of each contender is printed: ours and
torch's agree on the same weights and batch. Then the compiled memory
(``memory_analysis``: temporaries, arguments, outputs) of our train step for the llm
workload at 1 x 8192 tokens, which must stay below 8 GiB.

``--profile`` adds, for ours on the llm workload, where one step's time goes: a
``jax.profiler`` trace, each op's own time (its nested ops' subtracted) summed by the
source function its HLO metadata names, forward and backward apart.

``--quick``: one timed step, no eager contenders (roughly half the default run).

  python benchmarks/train_step.py [--reps 3] [--quick] [--profile]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import os
import re
import tempfile
import time
from pathlib import Path

import common
import numpy as np
from common import median_time, status_kib

FRAMES, IMAGE, PATCH = 32, 336, 14
VOCAB, IMAGE_TOKEN, VIDEO_TOKEN = 32000, 31999, 31998
LLM = dict(
  model_type="llama",
  hidden_size=512,
  num_hidden_layers=4,
  num_attention_heads=8,
  num_key_value_heads=8,
  head_dim=64,
  intermediate_size=1408,
  vocab_size=VOCAB,
  max_position_embeddings=8192,
  bos_token_id=1,
  eos_token_id=2,
  pad_token_id=0,
)
TEXT_BATCH, TEXT_LENGTH, MEMORY_LENGTH = 2, 1024, 8192
ANSWER = 32  # supervised tokens of the video sample
LR = 1e-4
MODES = {
  "ppllava": FRAMES // 2 * (IMAGE // PATCH // 3) ** 2,  # video tokens per mode
  "llava_next_video": FRAMES * (IMAGE // PATCH // 2) ** 2,
}
TORCH = ("sdpa", "eager")
GIB = 2**30


def _tiny():
  """The tiny PPLLaVA's tower sizes (``models.tiny``, or the demo's builder before it)."""
  try:
    from ppllava_jax.models.tiny import TinyConfig
  except ImportError:
    from ppllava_jax.demo import DemoConfig as TinyConfig
  return TinyConfig()


def build(folder: Path) -> None:
  """The LLaMA, the LLaVA-NeXT-Video around the same LLM, the CLIP scorer, the inputs."""
  import torch
  from transformers import (
    CLIPConfig,
    CLIPModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
  )
  from transformers.utils import logging

  logging.disable_progress_bar()
  tiny = _tiny()
  vision = dict(
    image_size=IMAGE,
    patch_size=PATCH,
    hidden_size=tiny.vision_width,
    intermediate_size=4 * tiny.vision_width,
    num_hidden_layers=tiny.vision_layers,
    num_attention_heads=2,
  )
  torch.manual_seed(0)

  def perturbed(model):  # transformers' init alone is nearly degenerate
    with torch.no_grad():
      for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.02)
    return model

  llama = perturbed(LlamaForCausalLM(LlamaConfig(**LLM)))
  llama.save_pretrained(folder / "llama")
  llava = perturbed(
    LlavaNextVideoForConditionalGeneration(
      LlavaNextVideoConfig(
        vision_config=dict(model_type="clip_vision_model", **vision),
        text_config=LLM,
        image_token_index=IMAGE_TOKEN,
        video_token_index=VIDEO_TOKEN,
      )
    )
  )
  llava.model.language_model.load_state_dict(llama.model.state_dict())
  llava.lm_head.load_state_dict(llama.lm_head.state_dict())
  llava.save_pretrained(folder / "llava")
  clip = CLIPConfig(
    vision_config=vision,
    projection_dim=32,
    text_config=dict(
      hidden_size=tiny.text_width,
      intermediate_size=2 * tiny.text_width,
      num_hidden_layers=tiny.text_layers,
      num_attention_heads=2,
    ),
  )
  perturbed(CLIPModel(clip)).save_pretrained(folder / "clip")
  rng = np.random.default_rng(0)
  np.savez(
    folder / "inputs.npz",
    text=rng.integers(3, VOCAB - 2, (MEMORY_LENGTH,)),
    video=rng.standard_normal((FRAMES, 3, IMAGE, IMAGE), dtype=np.float32),
    before=np.concatenate([[1], rng.integers(3, VOCAB - 2, 12)]),
    after=rng.integers(3, VOCAB - 2, 10),
    answer=rng.integers(3, VOCAB - 2, ANSWER),
    clip_ids=np.concatenate([[49406], rng.integers(300, 49000, 14), [49407]]),
  )


def _text(inputs, rows: int, length: int) -> tuple[np.ndarray, np.ndarray]:
  """(ids, labels) (rows, length): rows of the stored random text, all supervised."""
  ids = inputs["text"][: rows * length].reshape(rows, length).astype(np.int64)
  return ids, ids.copy()


def _video_prompt(inputs, mode: str) -> tuple[np.ndarray, np.ndarray]:
  """(ids, labels) (1, L): prompt, the mode's video placeholders, question, answer; only
  the answer supervised."""
  head = np.concatenate([inputs["before"], np.full(MODES[mode], VIDEO_TOKEN), inputs["after"]])
  ids = np.concatenate([head, inputs["answer"]])
  labels = np.where(np.arange(len(ids)) >= len(head), ids, -100)
  return ids[None].astype(np.int64), labels[None].astype(np.int64)


def _train_batch(model_cfg, ids_bl, labels_bl, video=None, clip_ids=None):
  """A ``TrainBatch`` of these rows (the collate a run's pipeline does)."""
  from ppllava_jax.data.sft.batches import BatchConfig, collate
  from ppllava_jax.data.sft.samples import Sample

  rows, length = ids_bl.shape
  scorer = 0 if clip_ids is None else len(clip_ids)
  samples = []
  for ids, labels in zip(ids_bl.astype(np.int32), labels_bl.astype(np.int32)):
    s = Sample(
      ids,
      labels,
      np.ones_like(ids),
      clip_ids,
      None if clip_ids is None else np.ones_like(clip_ids),
      "text" if video is None else "video",
    )
    s.video = video
    samples.append(s)
  layout = BatchConfig(
    batch_size=rows,
    seq_buckets=(length,),
    video_slots=int(video is not None),
    image_slots=0,
    multi_image_slots=0,
    num_frames=FRAMES,
    max_pictures=1,
  )
  return collate(samples, model_cfg, layout, scorer_length=scorer)


@dataclasses.dataclass
class Ours:
  """Our model, its train step and a batch for ``workload`` / ``mode``."""

  steps: object
  state: object
  frozen: object
  batch: object
  tokens: int


def _ours(
  folder: Path, workload: str, mode: str, length: int = TEXT_LENGTH, rows: int = TEXT_BATCH
) -> Ours:
  import jax

  from ppllava_jax.models.ppllava import PoolingConfig, PPLLaVA
  from ppllava_jax.train.core.config import MeshConfig, OptimConfig, TrainConfig
  from ppllava_jax.train.core.partition import DPO, VICUNA_SFT
  from ppllava_jax.train.run.assembly import assemble, materialize

  inputs = np.load(folder / "inputs.npz")
  model = PPLLaVA.from_pretrained(
    folder / "llava",
    clip=folder / "clip" if mode == "ppllava" else None,
    pooling=PoolingConfig(mode),
  )
  tc = TrainConfig(
    optim=OptimConfig(lr=LR, schedule="constant", warmup_ratio=0.0, total_steps=1),
    trainable=DPO if workload == "llm" else VICUNA_SFT,
  )  # DPO: the LLM alone
  a = assemble(model, dataclasses.replace(tc, mesh=MeshConfig(1, 1, 1)), devices=jax.devices()[:1])
  state, frozen = materialize(a, model)
  if workload == "llm":
    batch = _train_batch(model.cfg, *_text(inputs, rows, length))
  else:
    batch = _train_batch(
      model.cfg,
      *_video_prompt(inputs, mode),
      video=inputs["video"],
      clip_ids=inputs["clip_ids"].astype(np.int32),
    )
  del model
  return Ours(a.steps, state, frozen, jax.device_put(batch), int(np.prod(batch.input_ids.shape)))


def ours_worker(folder: Path, workload: str, mode: str, reps: int, profile: bool) -> dict:
  import jax

  run = _ours(folder, workload, mode)
  box = {"state": run.state}

  def step():
    box["state"], metrics = run.steps.train(box["state"], run.frozen, run.batch)
    return float(metrics["loss"])  # fetching it waits for the step

  start = time.perf_counter()
  loss = step()  # compiles
  first = time.perf_counter() - start
  sec, _ = median_time(step, reps)
  out = dict(
    seconds=sec,
    first_seconds=first,
    loss=loss,
    tokens=run.tokens,
    peak_mib=status_kib("VmHWM") / 1024,
  )
  if profile:
    compiled = run.steps.lower_train(box["state"], run.frozen, run.batch).compile()
    with tempfile.TemporaryDirectory() as trace:
      with jax.profiler.trace(trace):
        step()
      out["profile"] = _profile(
        glob.glob(f"{trace}/**/*.xplane.pb", recursive=True)[0], compiled.as_text()
      )
  return out


def memory_worker(folder: Path) -> dict:
  """The compiled memory of our llm-workload train step at 1 x MEMORY_LENGTH tokens."""
  run = _ours(folder, "llm", "average", length=MEMORY_LENGTH, rows=1)
  mem = run.steps.lower_train(run.state, run.frozen, run.batch).compile().memory_analysis()
  return dict(
    temp=mem.temp_size_in_bytes,
    argument=mem.argument_size_in_bytes,
    output=mem.output_size_in_bytes,
    alias=mem.alias_size_in_bytes,
  )


def torch_worker(folder: Path, workload: str, attn: str, reps: int) -> dict:
  import torch
  from transformers import LlamaForCausalLM, LlavaNextVideoForConditionalGeneration

  inputs = np.load(folder / "inputs.npz")
  if workload == "llm":
    model = LlamaForCausalLM.from_pretrained(
      folder / "llama", dtype=torch.float32, attn_implementation=attn
    )
    ids, labels = _text(inputs, TEXT_BATCH, TEXT_LENGTH)
    batch = dict(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(labels))
  else:
    model = LlavaNextVideoForConditionalGeneration.from_pretrained(
      folder / "llava", dtype=torch.float32, attn_implementation=attn
    )
    model.model.vision_tower.requires_grad_(False)  # frozen, as VICUNA_SFT freezes ours
    ids, labels = _video_prompt(inputs, "llava_next_video")
    batch = dict(
      input_ids=torch.from_numpy(ids),
      labels=torch.from_numpy(labels),
      pixel_values_videos=torch.from_numpy(inputs["video"][None]),
    )
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

  def step():
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)

  loss = step()
  sec, _ = median_time(step, reps)
  return dict(
    seconds=sec,
    loss=loss,
    tokens=int(ids.size),
    peak_mib=status_kib("VmHWM") / 1024,
    attn=model.config._attn_implementation,
    threads=torch.get_num_threads(),
  )


# ---- profile ---------------------------------------------------------------------------


def _self_times(xplane: str) -> collections.Counter:
  """Each op name's own time in the trace (ns), nested ops subtracted (a while loop's
  body ops are its children on the same thread)."""
  import jax

  own = collections.Counter()
  for plane in jax.profiler.ProfileData.from_file(xplane).planes:
    for line in plane.lines:
      stack = []
      for start, end, name in sorted(
        (e.start_ns, e.start_ns + e.duration_ns, e.name) for e in line.events
      ):
        while stack and stack[-1][0] <= start:
          stack.pop()
        if stack:
          own[stack[-1][1]] -= end - start
        own[name] += end - start
        stack.append((end, name))
  return own


def _op_sources(hlo: str) -> dict[str, str]:
  """HLO instruction name -> "file:function fwd|bwd" of its innermost stack frame."""
  tables, table = collections.defaultdict(dict), None
  for line in hlo.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      table = line
    elif table and re.match(r"\d+ ", line):
      key, value = line.split(" ", 1)
      tables[table][int(key)] = value
    else:
      table = None
  field = lambda text, key: int(re.search(key + r"=(\d+)", text).group(1))
  name = lambda table, i: tables[table].get(i, "?").strip('"')
  frames = {}
  for frame_id, text in tables["StackFrames"].items():
    loc = tables["FileLocations"][field(text, "file_location_id")]
    frames[frame_id] = (
      f"{Path(name('FileNames', field(loc, 'file_name_id'))).name}:"
      f"{name('FunctionNames', field(loc, 'function_name_id'))}"
    )
  sources = {}
  for m in re.finditer(
    r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)" stack_frame_id=(\d+)', hlo, re.M
  ):
    where = frames.get(int(m.group(3)), "?").replace(".<locals>", "")
    sources[m.group(1)] = f"{where} {'bwd' if 'transpose(' in m.group(2) else 'fwd'}"
  return sources


def _profile(xplane: str, hlo: str, top: int = 14) -> list[tuple[str, float]]:
  """[(source, share of the step's op time)], the largest first, the rest summed."""
  sources = _op_sources(hlo)
  by_source = collections.Counter()
  for op, ns in _self_times(xplane).items():
    if op in sources or re.sub(r"\.\d+$", "", op) in ("copy", "wrapped_copy"):
      by_source[sources.get(op, "copies")] += ns
  total = sum(by_source.values())
  rows = [(src, ns / total) for src, ns in by_source.most_common(top)]
  return rows + [("everything else", 1 - sum(share for _, share in rows))]


# ---- the run ---------------------------------------------------------------------------


def run_worker(folder: Path, *args: str) -> dict:
  return common.run_worker(__file__, ["--folder", str(folder), "--worker", *args])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=3, help="timed steps per contender")
  parser.add_argument("--quick", action="store_true", help="one timed step, no eager torch")
  parser.add_argument("--profile", action="store_true", help="where our llm step's time goes")
  parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
  parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if not args.worker:
    print(common.machine())  # the line each figure is read with
  if args.worker:
    kind, *rest = args.worker
    if kind == "memory":
      out = memory_worker(args.folder)
    elif kind == "ours":
      out = ours_worker(args.folder, rest[0], rest[1], int(rest[2]), rest[3] == "1")
    else:
      out = torch_worker(args.folder, rest[0], rest[1], int(rest[2]))
    print(json.dumps(out))
    return

  reps = 1 if args.quick else args.reps
  torch_attn = TORCH[:1] if args.quick else TORCH
  start = time.perf_counter()
  tiny = _tiny()
  print(
    f"LLaMA 4 x 512 (8 heads x 64, MLP 1408, vocab {VOCAB}); f32; AdamW; {os.cpu_count()} "
    f"CPUs, load average {os.getloadavg()[0]:.1f} at start; median of {reps} warm steps"
  )
  print(
    f"llm: {TEXT_BATCH} x {TEXT_LENGTH} tokens. video: 1 sample, {FRAMES} frames of {IMAGE} "
    f"px / {PATCH} px patches, vision tower {tiny.vision_layers} x {tiny.vision_width} "
    f"(frozen), CLIP text scorer {tiny.text_layers} x {tiny.text_width}, {ANSWER} answer "
    "tokens; torch pools with LLaVA-NeXT-Video's 2 x 2 mean (no prompt-guided pooling)"
  )
  print(
    f"{'':12s}{'contender':30s}{'LLM tokens':>11s}{'step s':>9s}{'tokens/s':>10s}"
    f"{'peak MiB':>10s}{'first loss':>12s}"
  )
  rows = {}
  with tempfile.TemporaryDirectory() as tmp:
    folder = Path(tmp)
    build(folder)
    contenders = [
      ("llm", "ours", "average", "ours"),
      *[("llm", "torch", attn, f"transformers ({attn})") for attn in torch_attn],
      *[("video", "ours", mode, f"ours ({mode})") for mode in MODES],
      *[("video", "torch", attn, f"transformers ({attn})") for attn in torch_attn],
    ]
    for workload, kind, variant, label in contenders:
      profile = kind == "ours" and workload == "llm" and args.profile
      extra = [str(int(profile))] if kind == "ours" else []
      r = run_worker(
        folder, kind, workload, variant, str(1 if variant == "eager" else reps), *extra
      )
      rows[workload, label] = r
      _print_row(workload, label, r)
    memory = run_worker(folder, "memory")
  _print_ratios(rows)
  _print_memory(memory)
  profile = rows["llm", "ours"].get("profile")
  if profile:
    print("where our llm step's time goes (op time by source function, one traced step):")
    for source, share in profile:
      print(f"  {100 * share:5.1f}%  {source}")
  print(f"whole run {time.perf_counter() - start:.0f} s")


def _print_row(workload: str, label: str, r: dict) -> None:
  if "error" in r:
    print(f"{workload:12s}{label:30s}  {r['error']}", flush=True)
    return
  print(
    f"{workload:12s}{label:30s}{r['tokens']:11d}{r['seconds']:9.2f}"
    f"{r['tokens'] / r['seconds']:10.0f}{r['peak_mib']:10.0f}{r['loss']:12.5f}",
    flush=True,
  )


def _print_ratios(rows: dict) -> None:
  """Step-time ratios against ours (> 1: ours is faster), and the loss agreement."""
  for workload, ours in (
    ("llm", "ours"),
    ("video", "ours (llava_next_video)"),
    ("video", "ours (ppllava)"),
  ):
    mine = rows.get((workload, ours), {})
    if "seconds" not in mine:
      continue
    parts = [
      f"{attn} {rows[workload, f'transformers ({attn})']['seconds'] / mine['seconds']:.2f}x"
      for attn in TORCH
      if "seconds" in rows.get((workload, f"transformers ({attn})"), {})
    ]
    print(f"{workload} step time of transformers / {ours}: {', '.join(parts)}")
  for workload, ours in (("llm", "ours"), ("video", "ours (llava_next_video)")):
    torch_sdpa = rows.get((workload, "transformers (sdpa)"), {})
    if "loss" in rows.get((workload, ours), {}) and "loss" in torch_sdpa:
      diff = abs(rows[workload, ours]["loss"] - torch_sdpa["loss"])
      print(f"{workload} first-step loss, {ours} vs transformers (sdpa): |diff| = {diff:.1e}")


def _print_memory(m: dict) -> None:
  if "error" in m:
    print(f"compiled memory at {MEMORY_LENGTH} tokens: {m['error']}")
    return
  total = m["temp"] + m["argument"] + m["output"]
  print(
    f"compiled memory of our train step, llm workload at 1 x {MEMORY_LENGTH} tokens: "
    f"temp {m['temp'] / GIB:.2f} + arguments {m['argument'] / GIB:.2f} + outputs "
    f"{m['output'] / GIB:.2f} = {total / GIB:.2f} GiB (target < 8: "
    f"{'PASS' if total < 8 * GIB else 'MISS'}; {m['alias'] / GIB:.2f} GiB of the outputs "
    "alias donated arguments)"
  )


if __name__ == "__main__":
  main()
