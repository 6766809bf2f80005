"""The original's Vicuna-7B SFT recipe (config/vicuna/ppllava_vicuna7b_image_video.yaml) as a
whole run: ``python train.py --config configs/sft_vicuna7b.py --workdir W``.

The start: llava-hf/llava-v1.6-vicuna-7b-hf, CLIP-L/336's text tower as the scorer (its
tokenizer is the scorer's), a fresh BT-Adapter on the CLIP tower. The step: 2e-5, cosine,
warmup 0.03, no weight decay, AdamW (0.9, 0.999, 1e-8), max grad norm 1.0, 2 micro-batches
per update (8 rows per device x 8 GPUs x 2 = 128 a step), bf16 compute with float32
masters, gradient checkpointing, ZeRO-3 (here: fsdp over every device), seed 42.
``steps`` is one epoch of the paper's 1.36M samples at 128 a step, and the schedule
decays over the run's steps (``train.optim.total_steps=None``): ``--set steps=N`` for
one epoch of your data.

The data, as one 8-device process loads it: 64 rows a batch (8 per device), every row may
hold a 32-frame video, half of them an anyres image, sequences bucketed up to 4096 tokens.
The corpora are placeholders for the original's mixture (LLaVA-1.5 images; LLaVA-Hound,
K400, SSv2, NExT-QA, CLEVRER videos): list the real ones, or point these two at your files
from the command line, e.g.::

  python train.py --config configs/sft_vicuna7b.py --workdir out/sft_vicuna7b \\
    --set data.mixture.corpora.images.annotation=/data/llava_v1_5/llava_v1_5_mix665k.json \\
    --set data.mixture.corpora.images.media_root=/data/llava_v1_5 \\
    --set data.mixture.corpora.videos.annotation=/data/videos/annotations.json \\
    --set data.mixture.corpora.videos.media_root=/data/videos \\
    --set steps=<one epoch of your data at 128 a step>

On several hosts see scripts/ (``python -m ppllava_jax.plan`` sizes the memory first).
"""

from ppllava_jax.data.sft.annotations import CorpusConfig, MixtureConfig
from ppllava_jax.data.sft.batches import BatchConfig
from ppllava_jax.data.sft.pipeline import DataConfig
from ppllava_jax.data.sft.samples import SampleConfig
from ppllava_jax.models.btadapter import BTAdapterConfig
from ppllava_jax.train.core.config import MeshConfig, OptimConfig, TrainConfig
from ppllava_jax.train.core.partition import VICUNA_SFT
from ppllava_jax.train.run.config import ModelConfig, RunConfig

ROWS_PER_PROCESS = 64  # 8 per device on one 8-device host
SAMPLES, GLOBAL_BATCH = 1_360_000, 128


def get_config() -> RunConfig:
  corpora = (
    CorpusConfig("images", "data/llava_v1_5/annotations.json", "data/llava_v1_5", "image"),
    CorpusConfig("videos", "data/videos/annotations.json", "data/videos", "video", num_frames=32),
  )
  data = DataConfig(
    MixtureConfig(corpora),
    SampleConfig(template="plain_v1", max_length=4096),
    BatchConfig(
      batch_size=ROWS_PER_PROCESS,
      seq_buckets=(1024, 2048, 4096),
      video_slots=ROWS_PER_PROCESS,
      image_slots=ROWS_PER_PROCESS // 2,
      multi_image_slots=0,
      num_frames=32,
      pixel_dtype="bfloat16",
    ),
    seed=42,
    num_epochs=1,
    num_workers=8,
  )
  train = TrainConfig(
    optim=OptimConfig(
      lr=2e-5,
      schedule="cosine",
      warmup_ratio=0.03,
      total_steps=None,
      weight_decay=0.0,
      clip_norm=1.0,
      grad_accum=2,
    ),
    mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
    trainable=VICUNA_SFT,
    compute_dtype="bfloat16",
    remat="nothing_saveable",
    seed=42,
  )
  return RunConfig(
    data=data,
    model=ModelConfig(
      checkpoint="llava-hf/llava-v1.6-vicuna-7b-hf",
      clip="openai/clip-vit-large-patch14-336",
      btadapter=BTAdapterConfig(),
    ),
    train=train,
    steps=SAMPLES // GLOBAL_BATCH,
    log_every=10,
    checkpoint_every=500,
    keep=3,
  )
