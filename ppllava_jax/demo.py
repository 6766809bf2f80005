"""``make demo``: the whole PPLLaVA pipeline on a video it draws, with a small model
built in code from **random weights**.

It writes a short video of moving coloured shapes (PyAV), samples it as evaluation
does, preprocesses it, runs the vision tower, scores relevance against the question,
projects and pools the visual tokens, and generates text with the KV cache; it prints
the token counts before and after pooling, the time of each stage (first call, which
compiles, and a second, warm call), the generated text, and writes the relevance
heat-map. The weights are random, so the text is not an answer and the heat-map
shows an untrained scorer; both are printed only to show the pipeline runs. The model
is saved with its tokenizer as a checkpoint folder, and the ``eval.py`` command that
runs it the way a converted real checkpoint runs is printed at the end.

  python -m ppllava_jax.demo [--config configs/demo.py] [--out out/demo]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import av
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ppllava_jax.config import load_config
from ppllava_jax.data.processor import Media, Processor, Prompt
from ppllava_jax.data.templates import VICUNA, render_generation_prompt
from ppllava_jax.data.tokenizer import char_tokenizer
from ppllava_jax.data.video import load_video
from ppllava_jax.eval.heatmap import relevance_grid
from ppllava_jax.models.clip import CLIPTextConfig, CLIPVisionConfig
from ppllava_jax.models.llm import DecoderConfig
from ppllava_jax.models.ppllava import PPLLaVA
from ppllava_jax.models.ppllava_config import PoolingConfig, PPLLaVAConfig
from ppllava_jax.models.pure import pure
from ppllava_jax.models.scorer import ScorerConfig


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  frames: int = 32  # sampled, as evaluation does
  image_size: int = 336  # CLIP ViT-L/14-336's input: 24 x 24 patches per frame
  patch_size: int = 14
  vision_width: int = 64
  vision_layers: int = 2
  llm_width: int = 128
  llm_layers: int = 2
  text_width: int = 64  # the scorer's CLIP text tower, extended 77 -> 248 positions
  text_layers: int = 2
  kernel: tuple[int, int, int] = (2, 3, 3)
  max_new_tokens: int = 24
  video_frames: int = 48  # the drawn video
  video_size: int = 128
  question: str = "What does the red circle do?"
  seed: int = 0


def draw_video(path: Path, frames: int, size: int) -> Path:
  """A red circle crossing left to right and a blue square falling, on grey, as H.264."""
  yy, xx = np.mgrid[:size, :size]
  with av.open(str(path), "w") as container:
    stream = container.add_stream("libx264", rate=8)
    stream.width = stream.height = size
    stream.pix_fmt = "yuv420p"
    for i in range(frames):
      frame = np.full((size, size, 3), 96, np.uint8)
      cx, sy = int(size * (0.15 + 0.7 * i / frames)), int(size * (0.1 + 0.6 * i / frames))
      frame[(yy - size // 2) ** 2 + (xx - cx) ** 2 < (size // 8) ** 2] = (220, 30, 30)
      frame[sy:sy + size // 6, size // 8:size // 8 + size // 6] = (30, 60, 220)
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())
  return path


def build_model(cfg: DemoConfig, vocab: int) -> PPLLaVA:
  """A PPLLaVA of the real geometry (24x24 patches, (2,3,3) pooling, CLIP scorer with
  248 text positions) but tiny widths, randomly initialised."""
  tiles = cfg.image_size
  model_cfg = PPLLaVAConfig(
      vision=CLIPVisionConfig(hidden_size=cfg.vision_width, intermediate_size=4 * cfg.vision_width,
                              num_hidden_layers=cfg.vision_layers, num_attention_heads=2,
                              image_size=cfg.image_size, patch_size=cfg.patch_size),
      text=DecoderConfig(vocab_size=vocab, hidden_size=cfg.llm_width,
                         intermediate_size=3 * cfg.llm_width, num_hidden_layers=cfg.llm_layers,
                         num_attention_heads=4, num_key_value_heads=2,
                         head_dim=cfg.llm_width // 4, max_position_embeddings=4096,
                         eos_token_id=(2,), pad_token_id=0),
      image_token_index=4, video_token_index=-1,  # the char tokenizer's <image>; no video token
      grid_pinpoints=((tiles, 2 * tiles), (2 * tiles, tiles), (2 * tiles, 2 * tiles)),
      pooling=PoolingConfig("ppllava", video_kernel=cfg.kernel),
      scorer=ScorerConfig(
          text=CLIPTextConfig(vocab_size=vocab, hidden_size=cfg.text_width,
                              intermediate_size=2 * cfg.text_width,
                              num_hidden_layers=cfg.text_layers, num_attention_heads=2,
                              max_position_embeddings=4 * 77 - 3 * 20, extend_keep=20,
                              eos_token_id=2, bos_token_id=1, pad_token_id=0),
          vision_width=cfg.vision_width, projection_dim=32))
  return PPLLaVA(model_cfg, rngs=nnx.Rngs(cfg.seed))


def _timed(fn, *args):
  """(result, first-call seconds (compiles), warm seconds)."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return out, first, time.perf_counter() - start


def run(cfg: DemoConfig, out_dir: Path) -> dict:
  out_dir.mkdir(parents=True, exist_ok=True)
  tokenizer = char_tokenizer()
  model = build_model(cfg, len(tokenizer))
  processor = Processor(model.cfg, tokenizer, tokenizer)
  video = draw_video(out_dir / "shapes.mp4", cfg.video_frames, cfg.video_size)
  times = {}

  start = time.perf_counter()
  frames, info = load_video(video, cfg.frames)
  times["decode + sample video"] = (time.perf_counter() - start, None)
  prompt = render_generation_prompt(VICUNA, cfg.question)
  start = time.perf_counter()
  encoded = processor.encode(Prompt(prompt.text, (Media("video", frames),), prompt.scorer_text))
  batch = processor.collate([encoded])
  times["preprocess + tokenize"] = (time.perf_counter() - start, None)

  videos = jnp.asarray(batch["pixel_values_videos"])
  clip_ids, clip_mask = jnp.asarray(batch["clip_input_ids"]), jnp.asarray(batch["clip_attention_mask"])
  graphdef, state = nnx.split(model)

  @jax.jit
  def vision(state, videos):
    return nnx.merge(graphdef, state).patch_features(videos)

  @jax.jit
  def relevance(state, feats, ids, mask):
    m = nnx.merge(graphdef, state)
    return m.scorer(feats, m.scorer.text_features(ids, mask))

  @jax.jit
  def project_and_pool(state, feats, ids, mask):
    m = nnx.merge(graphdef, state)
    return m.pool(feats, m.scorer.text_features(ids, mask), m.cfg.pooling.video_kernel)

  feats, *times["vision tower"] = _timed(vision, state, videos)
  probs, *times["relevance (CLIP text + Eq. 1)"] = _timed(relevance, state, feats, clip_ids,
                                                          clip_mask)
  pooled, *times["projector + prompt-guided pooling"] = _timed(project_and_pool, state, feats,
                                                               clip_ids, clip_mask)
  generate = lambda: model.generate(jnp.asarray(batch["input_ids"]),
                                    jnp.asarray(batch["attention_mask"]),
                                    pixel_values_videos=videos, clip_input_ids=clip_ids,
                                    clip_attention_mask=clip_mask,
                                    max_new_tokens=cfg.max_new_tokens)
  ids, *times[f"generate (whole pipeline + {cfg.max_new_tokens} tokens)"] = _timed(generate)
  new = np.asarray(ids)[0, batch["input_ids"].shape[1]:]

  fn, maps_state = pure(model, "relevance_maps")
  cosines = np.asarray(jax.jit(fn)(maps_state, videos, clip_ids, clip_mask))[0]
  heatmap = out_dir / "relevance.png"
  relevance_grid(cosines, frames, title=f"{cfg.question} (random weights: untrained scorer)"
                 ).save(heatmap)
  checkpoint = model.save_pretrained(out_dir / "checkpoint")
  tokenizer.save_pretrained(checkpoint)
  g = model.cfg.vision.grid
  return dict(
      video=str(video), video_frames=cfg.video_frames, sampled=info.indices,
      input_tokens=cfg.frames * g * g, input_shape=(cfg.frames, g, g),
      pooled_tokens=int(np.prod(pooled.shape[1:4])), pooled_shape=tuple(pooled.shape[1:4]),
      llm_tokens=int(batch["attention_mask"].sum()), relevance_sum=float(np.asarray(probs).sum()),
      times=times, text=tokenizer.decode(new, skip_special_tokens=True),
      heatmap=str(heatmap), checkpoint=str(checkpoint))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", help="a Python file whose get_config() returns a DemoConfig "
                      "(default: the embedded DemoConfig())")
  parser.add_argument("--out", default="out/demo", help="folder for the video, heat-map, checkpoint")
  args = parser.parse_args(argv)
  cfg = load_config(args.config, DemoConfig) if args.config else DemoConfig()
  s = run(cfg, Path(args.out))
  print(f"model: built in code with RANDOM weights (vision {cfg.vision_layers}x{cfg.vision_width}, "
        f"LLM {cfg.llm_layers}x{cfg.llm_width}, CLIP text {cfg.text_layers}x{cfg.text_width} "
        f"with 248 positions); nothing it says is an answer. Backend: {jax.default_backend()}")
  print(f"video: {s['video']} ({s['video_frames']} frames), {cfg.frames} sampled at the middle "
        f"of equal segments")
  print(f"visual tokens: {s['input_tokens']} {s['input_shape']} -> {s['pooled_tokens']} "
        f"{s['pooled_shape']} after prompt-guided pooling with kernel {cfg.kernel} "
        f"({s['input_tokens'] / s['pooled_tokens']:.0f}x fewer); the LLM reads "
        f"{s['llm_tokens']} tokens in all")
  print("stage times (first call compiles; warm = second call):")
  for stage, (first, warm) in s["times"].items():
    warm_text = "" if warm is None else f"   warm {1000 * warm:8.1f} ms"
    print(f"  {stage:45s} {1000 * first:8.1f} ms{warm_text}")
  print(f"generated text (random weights, NOT an answer): {s['text']!r}")
  print(f"relevance heat-map: {s['heatmap']}")
  print(f"checkpoint: {s['checkpoint']}; run it as a converted checkpoint runs:\n"
        f"  python eval.py --checkpoint {s['checkpoint']} --scorer-tokenizer {s['checkpoint']} "
        f"--video {s['video']} --question {cfg.question!r}")


if __name__ == "__main__":
  # Run the imported module's main, not this __main__ copy's: config files import
  # DemoConfig from ppllava_jax.demo, and main must check against that same class.
  from ppllava_jax import demo
  demo.main()
