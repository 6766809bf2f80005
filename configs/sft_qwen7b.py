"""The original's Qwen2-7B SFT recipe (config/qwen/ppllava_qwen7b_videoonly.yaml) as a
``train.config.TrainConfig`` (see configs/sft_vicuna7b.py for what is and is not in it).

1e-5, cosine, warmup 0.03, no weight decay, AdamW (0.9, 0.999, 1e-8), max grad norm 1.0,
8 per device x 8 GPUs x 2 micro-batches = 128 a step, bf16 compute, gradient
checkpointing, ZeRO-3 (fsdp over every device). ``total_steps``: one epoch of LLaVA-Hound's
300k videos at 128 a step; set it from the real data.
"""

from ppllava_jax.train.config import MeshConfig, OptimConfig, TrainConfig
from ppllava_jax.train.partition import QWEN_SFT


def get_config() -> TrainConfig:
  return TrainConfig(
      optim=OptimConfig(lr=1e-5, schedule="cosine", warmup_ratio=0.03,
                        total_steps=-(-300_000 // 128), weight_decay=0.0, clip_norm=1.0,
                        grad_accum=2),
      mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
      trainable=QWEN_SFT, compute_dtype="bfloat16", remat="nothing_saveable", seed=42)
