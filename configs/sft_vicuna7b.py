"""The original's Vicuna-7B SFT recipe (config/vicuna/ppllava_vicuna7b_image_video.yaml) as a
``train.config.TrainConfig``: what the train step needs; the loop's data, checkpoint and log
sections join it.

2e-5, cosine, warmup 0.03, no weight decay, AdamW (0.9, 0.999, 1e-8), max grad norm 1.0,
2 micro-batches per update (8 per device x 8 GPUs x 2 = 128 a step), bf16 compute with
float32 masters, gradient checkpointing, ZeRO-3 (here: fsdp over every device), seed 42.
``total_steps`` is one epoch of the paper's 1.36M samples at 128 a step; set it from the
real data (``--set optim.total_steps=...``).
"""

from ppllava_jax.train.config import MeshConfig, OptimConfig, TrainConfig
from ppllava_jax.train.partition import VICUNA_SFT


def get_config() -> TrainConfig:
  return TrainConfig(
      optim=OptimConfig(lr=2e-5, schedule="cosine", warmup_ratio=0.03,
                        total_steps=1_360_000 // 128, weight_decay=0.0, clip_norm=1.0,
                        grad_accum=2),
      mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
      trainable=VICUNA_SFT, compute_dtype="bfloat16", remat="nothing_saveable", seed=42)
