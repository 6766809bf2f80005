"""How well each pooling mode keeps a prompt-relevant object: the ops alone, synthetic data.

No network is involved: a synthetic clip of ``frames`` frames carries a moving
"target" object whose patch embeddings point along the prompt's embedding and a
moving "distractor" that does not. Prints token counts before and after pooling, how
much relevance lands on the target, and how well the pooled tokens of windows
holding the target keep its feature under each pooling mode (docs/differences.md's "where the
paper and the code differ" figures); writes the relevance heat-map PNG.

  python benchmarks/pooling_modes.py [--out out/pooling_modes]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import common
import jax
import jax.numpy as jnp
import numpy as np

from ppllava_jax import ops
from ppllava_jax.eval.heatmap import relevance_grid


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  frames: int = 32
  grid: int = 24  # patches per side: CLIP ViT-L/14 at 336 px
  embed_dim: int = 64  # the CLIP joint space (768 in ViT-L/14)
  feature_dim: int = 256  # the LLM space the pooling runs in (4096 for Vicuna-7B)
  kernel: tuple[int, int, int] = (2, 3, 3)  # the paper's video setting
  temperature: float = 0.01
  logit_scale: float = 4.6052  # CLIP's, exp() = 100
  object_size: int = 3  # patches per side of each synthetic object
  seed: int = 0


def synthetic_clip(cfg: SyntheticConfig):
  """Patch embeddings (1,T,H,W,E), prompt (1,E), features (1,T,H,W,D), target mask (T,H,W)."""
  rng = np.random.default_rng(cfg.seed)
  t, g, e, s = cfg.frames, cfg.grid, cfg.embed_dim, cfg.object_size
  prompt = rng.standard_normal(e)
  distractor = rng.standard_normal(e)
  patches = rng.standard_normal((t, g, g, e))
  target = np.zeros((t, g, g), bool)
  for i in range(t):
    # The target crosses the frame diagonally; the distractor moves the other way.
    r = c = round(i / max(t - 1, 1) * (g - s))
    target[i, r : r + s, c : c + s] = True
    patches[i, r : r + s, c : c + s] = 1.0 * prompt + rng.standard_normal((s, s, e))
    patches[i, g - s - r : g - r, c : c + s] = 2.0 * distractor
  # A fixed random map stands in for the MLP projector into the LLM space.
  projector = rng.standard_normal((e, cfg.feature_dim)) / np.sqrt(e)
  features = patches @ projector
  query = prompt + 0.3 * rng.standard_normal(e)
  as_f32 = lambda a: jnp.asarray(a[None], jnp.float32)
  return as_f32(patches), as_f32(query), as_f32(features), target, prompt @ projector


def run(cfg: SyntheticConfig, out_dir: Path) -> dict:
  patches, query, features, target, target_feature = synthetic_clip(cfg)
  probs = jax.jit(ops.relevance_scores)(patches, query, cfg.logit_scale)
  pooled = {
    mode: ops.prompt_guided_pool(
      features, probs, cfg.kernel, mode=mode, temperature=cfg.temperature
    )
    for mode in ops.POOL_MODES
  }

  # Windows that hold any target patch: prompt-guided pooling should emit the
  # target's feature there, average pooling blurs it with the background.
  target_share = ops.prompt_guided_pool(
    jnp.asarray(target, jnp.float32)[None, ..., None], probs, cfg.kernel, mode="average"
  )
  touched = np.asarray(target_share)[0, ..., 0] > 0

  def mean_cosine(tokens):  # float64: weighted_sum tokens are ~1e-4 of the features
    tokens = np.asarray(tokens, np.float64)[0][touched]
    norms = np.linalg.norm(tokens, axis=-1) * np.linalg.norm(target_feature)
    cos = np.divide(tokens @ target_feature, norms, out=np.zeros(len(tokens)), where=norms > 0)
    return float(cos.mean())

  stats = dict(
    input_tokens=int(np.prod(features.shape[1:4])),
    pooled_tokens=int(np.prod(pooled["average"].shape[1:4])),
    pooled_shape=tuple(pooled["average"].shape[1:4]),
    target_patch_share=float(target.mean()),
    target_relevance_share=float(np.asarray(probs)[0][target].sum()),
    windows_with_target=int(touched.sum()),
    cosine={mode: mean_cosine(tokens) for mode, tokens in pooled.items()},
  )
  out_dir.mkdir(parents=True, exist_ok=True)
  # Pictures show cosines: the probabilities, exp(100 * cos) normalised, are so
  # peaked that a linear colour scale would light up a handful of patches.
  cosines = np.asarray(ops.relevance_logits(patches, query))[0]
  picture = relevance_grid(
    cosines,
    title=(
      f"cosine of each patch to the prompt ({cfg.frames} frames, {cfg.grid}x{cfg.grid} patches; "
      "the target moves down-right, a distractor up-right)"
    ),
  )
  stats["heatmap"] = str(out_dir / "relevance.png")
  picture.save(stats["heatmap"])
  return stats


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="out/pooling_modes", help="folder for relevance.png")
  args = parser.parse_args(argv)
  print(common.machine())  # the line each figure is read with
  cfg = SyntheticConfig()
  s = run(cfg, Path(args.out))
  print(
    f"synthetic video: {cfg.frames} frames x {cfg.grid}x{cfg.grid} patches, "
    f"features of dim {cfg.feature_dim}; ops run on {jax.default_backend()}"
  )
  print(
    f"visual tokens: {s['input_tokens']} in -> {s['pooled_tokens']} out "
    f"{s['pooled_shape']} with kernel {cfg.kernel} "
    f"({s['input_tokens'] / s['pooled_tokens']:.0f}x fewer)"
  )
  print(
    f"relevance on the target: {100 * s['target_relevance_share']:.1f}% of the probability "
    f"on {100 * s['target_patch_share']:.1f}% of the patches"
  )
  print(
    f"how well the {s['windows_with_target']} pooled tokens whose window holds the target "
    f"keep its feature (mean cosine):"
  )
  notes = dict(
    softmax=f"the original code, temperature {cfg.temperature}",
    weighted_sum="the paper's Eq. 3",
    max="most relevant token per window",
    average="plain average pooling, the baseline",
  )
  for mode, cosine in s["cosine"].items():
    print(f"  {mode:13s}{cosine:.3f}  ({notes[mode]})")
  print(f"heat-map: {s['heatmap']}")


if __name__ == "__main__":
  main()
