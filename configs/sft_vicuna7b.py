"""The original's Vicuna-7B SFT recipe (config/vicuna/ppllava_vicuna7b_image_video.yaml).

``get_config()``: the recipe as a ``train.config.TrainConfig``, what the train step needs.
2e-5, cosine, warmup 0.03, no weight decay, AdamW (0.9, 0.999, 1e-8), max grad norm 1.0,
2 micro-batches per update (8 per device x 8 GPUs x 2 = 128 a step), bf16 compute with
float32 masters, gradient checkpointing, ZeRO-3 (here: fsdp over every device), seed 42.
``total_steps`` is one epoch of the paper's 1.36M samples at 128 a step; set it from the
real data (``--set optim.total_steps=...``).

``get_run_config()``: the whole run around it (``python -m ppllava_jax.plan`` reads it): the
recipe's start (llava-hf/llava-v1.6-vicuna-7b-hf, CLIP-L/336 as the scorer, a fresh
BT-Adapter) and its data as one 8-device process loads it: 64 rows a batch (8 per device),
every row may hold a 32-frame video, half of them an anyres image, sequences bucketed up
to 4096 tokens. Annotation paths are placeholders: list the real corpora.
"""

from ppllava_jax.data.annotations import CorpusConfig, MixtureConfig
from ppllava_jax.data.batch import BatchConfig
from ppllava_jax.data.pipeline import DataConfig
from ppllava_jax.data.sft import SampleConfig
from ppllava_jax.models.btadapter import BTAdapterConfig
from ppllava_jax.train.config import MeshConfig, OptimConfig, TrainConfig
from ppllava_jax.train.partition import VICUNA_SFT
from ppllava_jax.train.run_config import ModelConfig, RunConfig

ROWS_PER_PROCESS = 64  # 8 per device on one 8-device host


def get_config() -> TrainConfig:
  return TrainConfig(
      optim=OptimConfig(lr=2e-5, schedule="cosine", warmup_ratio=0.03,
                        total_steps=1_360_000 // 128, weight_decay=0.0, clip_norm=1.0,
                        grad_accum=2),
      mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
      trainable=VICUNA_SFT, compute_dtype="bfloat16", remat="nothing_saveable", seed=42)


def get_run_config() -> RunConfig:
  train = get_config()
  corpora = (CorpusConfig("llava_images", "data/llava_v1_5/annotations.json", "data/llava_v1_5",
                          "image"),
             CorpusConfig("videos", "data/videos/annotations.json", "data/videos", "video",
                          num_frames=32))
  data = DataConfig(
      MixtureConfig(corpora), SampleConfig(template="plain_v1", max_length=4096),
      BatchConfig(batch_size=ROWS_PER_PROCESS, seq_buckets=(1024, 2048, 4096),
                  video_slots=ROWS_PER_PROCESS, image_slots=ROWS_PER_PROCESS // 2,
                  multi_image_slots=0, num_frames=32, pixel_dtype="bfloat16"),
      seed=42, num_epochs=1, num_workers=8)
  return RunConfig(
      data=data,
      model=ModelConfig(checkpoint="llava-hf/llava-v1.6-vicuna-7b-hf",
                        clip="openai/clip-vit-large-patch14-336", btadapter=BTAdapterConfig()),
      train=train, steps=train.optim.total_steps, log_every=10, checkpoint_every=500, keep=3)
