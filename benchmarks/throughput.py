"""End-to-end video generation: prefill, decode and memory per pooling mode, one run.

One random LLaVA-NeXT-Video checkpoint (transformers init plus N(0, 0.02) on every
tensor, as tests/support/hf_fixtures.py, saved once): a LLaMA of
4 layers, width 512, 8 heads, MLP 1376, LLaVA's 32064-token vocabulary, behind a
deliberately small CLIP vision tower (336 px, 14 px patches: 24x24 patches per frame,
but width 64 and 2 layers), since the tower is the same work in every mode and would
otherwise hide the LLM. A 32-frame video and a short prompt around its placeholders,
as many as the mode makes tokens: none 32x576 = 18432, llava_next_video 32x144 = 4608
(2x2 spatial mean, as transformers), ppllava and average (2,3,3) 16x8x8 = 1024. The
ppllava mode scores relevance with a random transformers ``CLIPModel`` whose vision
width is the tower's (its text tower extended 77 -> 248 positions on load).

Contenders, each in a fresh worker process (peak memory = the worker's VmHWM, so it
includes the runtime and the weights, ~0.5-1 GiB either side):

- ours, per mode: ``PPLLaVA.from_pretrained`` in f32.
  prefill: the forward ``pure(model, "__call__")`` with ``last_only=True`` (the last
  position's logits, as ``generate`` runs it) under ``jax.jit``, compiled ahead, one
  warm-up, median of the timed calls.
  generate: ``model.generate(..., max_new_tokens=N)``, EOS not stopping, warm (its
  first call compiles), median of the timed calls: prompt in, N tokens out.
  decode tokens/s = N / (generate - prefill): generate is the prefill plus N cached
  steps of its ``lax.while_loop`` (the last step's token is never used).
- transformers' ``LlavaNextVideoForConditionalGeneration`` (PyTorch eager mode, f32,
  ``torch.no_grad``), which is the llava_next_video mode, twice: with
  ``attn_implementation="eager"`` (the plain matmul-softmax-matmul attention, which
  the throughput target names) and with ``"sdpa"`` (transformers' default: torch's
  fused C++ kernel). The same timings, its prefill being the forward with
  ``logits_to_keep=1`` as its ``generate`` runs it, and its generate running N - 1
  cached steps after it. Its greedy tokens are compared with ours in that mode.
  The eager one takes ~10 s a prefill, so it is timed twice, not ``--reps`` times.

``--quick`` skips the none mode (18432 tokens, about half of the run's time).

  python benchmarks/throughput.py [--new-tokens 32] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import common
import numpy as np
from common import median_time, status_kib

FRAMES, IMAGE, PATCH = 32, 336, 14
VOCAB, IMAGE_TOKEN, VIDEO_TOKEN = 32064, 32001, 32000
VISION = dict(
  model_type="clip_vision_model",
  image_size=IMAGE,
  patch_size=PATCH,
  hidden_size=64,
  intermediate_size=256,
  num_hidden_layers=2,
  num_attention_heads=2,
)
TEXT = dict(
  model_type="llama",
  hidden_size=512,
  num_hidden_layers=4,
  num_attention_heads=8,
  num_key_value_heads=8,
  intermediate_size=1376,
  vocab_size=VOCAB,
  max_position_embeddings=32768,
  bos_token_id=1,
  eos_token_id=2,
  pad_token_id=0,
)
GRID = IMAGE // PATCH  # 24 patches a side
VIDEO_TOKENS = {
  "none": FRAMES * GRID**2,
  "llava_next_video": FRAMES * (GRID // 2) ** 2,
  "ppllava": FRAMES // 2 * (GRID // 3) ** 2,
  "average": FRAMES // 2 * (GRID // 3) ** 2,
}
MODES = tuple(VIDEO_TOKENS)
TORCH = {"torch_eager": "eager", "torch_sdpa": "sdpa"}  # worker name: attn_implementation


def build(folder: Path) -> None:
  """The LLaVA-NeXT-Video and scorer checkpoints (random transformers init) and inputs."""
  import torch
  from transformers import (
    CLIPConfig,
    CLIPModel,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
  )

  torch.manual_seed(0)
  llava = LlavaNextVideoConfig(
    vision_config=VISION,
    text_config=TEXT,
    image_token_index=IMAGE_TOKEN,
    video_token_index=VIDEO_TOKEN,
  )
  clip = CLIPConfig(
    vision_config={k: v for k, v in VISION.items() if k != "model_type"},
    text_config=dict(
      hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2
    ),
    projection_dim=128,
  )
  for model, name in (
    (LlavaNextVideoForConditionalGeneration(llava), "llava"),
    (CLIPModel(clip), "clip"),
  ):
    with torch.no_grad():  # transformers' init alone makes a model repeat one token forever
      for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder / name)
  rng = np.random.default_rng(0)
  clip_ids = np.concatenate([[49406], rng.integers(300, 49000, 14), [49407]])[None]
  np.savez(
    folder / "inputs.npz",
    video=rng.standard_normal((1, FRAMES, 3, IMAGE, IMAGE), dtype=np.float32),
    before=np.concatenate([[1], rng.integers(3, 31000, 12)]),
    after=rng.integers(3, 31000, 10),
    clip_ids=clip_ids,
    clip_mask=np.ones_like(clip_ids),
  )


def _prompt(inputs, mode: str) -> np.ndarray:
  """(1, L) ids: text, the mode's count of video placeholders, text."""
  ids = np.concatenate(
    [inputs["before"], np.full(VIDEO_TOKENS[mode], VIDEO_TOKEN), inputs["after"]]
  )
  return ids[None].astype(np.int64)


def jax_worker(folder: Path, mode: str, new: int, reps: int) -> dict:
  import jax
  import jax.numpy as jnp

  from ppllava_jax.models.ppllava import PoolingConfig, PPLLaVA
  from ppllava_jax.models.pure import pure

  inputs = np.load(folder / "inputs.npz")
  model = PPLLaVA.from_pretrained(
    folder / "llava",
    clip=folder / "clip" if mode == "ppllava" else None,
    pooling=PoolingConfig(mode),
  )
  ids = jnp.asarray(_prompt(inputs, mode))
  media = dict(pixel_values_videos=jnp.asarray(inputs["video"]))
  if mode == "ppllava":
    media.update(
      clip_input_ids=jnp.asarray(inputs["clip_ids"]),
      clip_attention_mask=jnp.asarray(inputs["clip_mask"]),
    )
  fn, state = pure(model, "__call__")
  prefill = jax.jit(lambda state, ids, media: fn(state, ids, last_only=True, **media).logits)
  prefill = prefill.lower(state, ids, media).compile()
  t_prefill, _ = median_time(lambda: prefill(state, ids, media).block_until_ready(), reps)

  def generate():
    return np.asarray(model.generate(ids, max_new_tokens=new, stop_tokens=(), **media))

  t_new, out = median_time(generate, reps)
  return dict(
    prefill=t_prefill,
    generate=t_new,
    decode_tps=new / (t_new - t_prefill),
    tokens=out[0, ids.shape[1] :].tolist(),
    peak_mib=status_kib("VmHWM") / 1024,
    llm_tokens=int(ids.shape[1]),
  )


def torch_worker(folder: Path, attn: str, new: int, reps: int) -> dict:
  import torch
  from transformers import LlavaNextVideoForConditionalGeneration

  inputs = np.load(folder / "inputs.npz")
  hf = LlavaNextVideoForConditionalGeneration.from_pretrained(
    folder / "llava", dtype=torch.float32, attn_implementation=attn
  ).eval()
  hf.generation_config.eos_token_id = None  # as ours with stop_tokens=(): always N tokens
  ids = torch.from_numpy(_prompt(inputs, "llava_next_video"))
  video = torch.from_numpy(inputs["video"])

  def generate():
    return hf.generate(
      input_ids=ids, pixel_values_videos=video, max_new_tokens=new, do_sample=False, pad_token_id=0
    )

  with torch.no_grad():
    t_prefill, _ = median_time(
      lambda: hf(input_ids=ids, pixel_values_videos=video, logits_to_keep=1), reps
    )
    t_new, out = median_time(generate, reps)
  return dict(
    prefill=t_prefill,
    generate=t_new,
    decode_tps=(new - 1) / (t_new - t_prefill),
    tokens=out[0, ids.shape[1] :].tolist(),
    peak_mib=status_kib("VmHWM") / 1024,
    llm_tokens=int(ids.shape[1]),
    attn=hf.config.text_config._attn_implementation,
  )


def run_worker(folder: Path, which: str, new: int, reps: int) -> dict:
  return common.run_worker(
    __file__,
    ["--worker", which, "--folder", str(folder), "--new-tokens", str(new), "--reps", str(reps)],
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--new-tokens", type=int, default=32)
  parser.add_argument("--reps", type=int, default=5, help="timed calls (none mode: 1)")
  parser.add_argument("--quick", action="store_true", help="skip the none mode")
  parser.add_argument("--worker", choices=[*MODES, *TORCH], help=argparse.SUPPRESS)
  parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if not args.worker:
    print(common.machine())  # the line each figure is read with
  if args.worker in TORCH:
    print(json.dumps(torch_worker(args.folder, TORCH[args.worker], args.new_tokens, args.reps)))
    return
  if args.worker:
    print(json.dumps(jax_worker(args.folder, args.worker, args.new_tokens, args.reps)))
    return

  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    folder = Path(tmp)
    build(folder)
    print(
      f"LLaMA 4 x 512 (8 heads, MLP 1376, vocab {VOCAB}); CLIP vision tower {IMAGE} px / "
      f"{PATCH} px patches, width {VISION['hidden_size']}, {VISION['num_hidden_layers']} "
      f"layers; {FRAMES} frames; f32; {args.new_tokens} new tokens; {os.cpu_count()} CPUs, "
      f"load average {os.getloadavg()[0]:.1f} at start",
      flush=True,
    )
    print(
      f"{'':24s}{'LLM tokens':>11s}{'prefill s':>11s}{'decode tok/s':>14s}"
      f"{'generate s':>12s}{'peak MiB':>10s}"
    )
    rows = {}
    for mode in MODES:
      if mode == "none" and args.quick:
        continue
      rows[mode] = run_worker(folder, mode, args.new_tokens, 1 if mode == "none" else args.reps)
      _print_row(f"ours {mode}", rows[mode])
    for name, attn in TORCH.items():
      rows[name] = run_worker(
        folder, name, args.new_tokens, min(args.reps, 2) if attn == "eager" else args.reps
      )
      _print_row(f"transformers ({attn})", rows[name])
  _print_verdicts(rows)
  print(f"whole run {time.perf_counter() - start:.0f} s")


def _print_row(label: str, r: dict) -> None:
  if "error" in r:
    print(f"{label:24s}  {r['error']}", flush=True)
    return
  print(
    f"{label:24s}{r['llm_tokens']:11d}{r['prefill']:11.2f}{r['decode_tps']:14.1f}"
    f"{r['generate']:12.2f}{r['peak_mib']:10.0f}",
    flush=True,
  )


def _print_verdicts(rows: dict) -> None:
  ours = rows.get("llava_next_video", {})
  for name in TORCH:
    hf = rows[name]
    if "tokens" in ours and "tokens" in hf:
      diff = [i for i, (a, b) in enumerate(zip(ours["tokens"], hf["tokens"])) if a != b]
      print(
        f"greedy tokens, ours (llava_next_video) vs transformers ({TORCH[name]}): "
        f"{f'differ from token {diff[0]}' if diff else 'identical'} ({len(hf['tokens'])} tokens)"
      )

  def ratio(slow: str, fast: str, key: str) -> float | None:
    return (
      rows[slow][key] / rows[fast][key]
      if key in rows.get(slow, {}) and key in rows.get(fast, {})
      else None
    )

  checks = (
    ("ppllava prefill speed-up over none", ratio("none", "ppllava", "prefill"), ">=", 4.0),
    ("ppllava prefill time / average's", ratio("ppllava", "average", "prefill"), "<=", 1.3),
    (
      "our generate speed-up over transformers (eager attention)",
      ratio("torch_eager", "llava_next_video", "generate"),
      ">=",
      1.5,
    ),
  )
  for name, value, op, target in checks:
    if value is None:
      print(f"{name}: not measured (target {op} {target}x)")
    else:
      met = value >= target if op == ">=" else value <= target
      print(f"{name}: {value:.2f}x (target {op} {target}x): {'PASS' if met else 'MISS'}")
  for name in TORCH:
    prefill = ratio(name, "llava_next_video", "prefill")
    if prefill is not None:
      print(
        f"ours (llava_next_video) vs transformers ({TORCH[name]}): generate "
        f"{ratio(name, 'llava_next_video', 'generate'):.2f}x, prefill {prefill:.2f}x, decode "
        f"tokens/s {ours['decode_tps'] / rows[name]['decode_tps']:.2f}x"
      )
  ppllava = ratio("torch_sdpa", "ppllava", "generate")
  if ppllava is not None:
    print(
      f"ours (ppllava) vs transformers (sdpa, llava_next_video's 4.6k tokens): generate "
      f"{ppllava:.2f}x"
    )


if __name__ == "__main__":
  main()
