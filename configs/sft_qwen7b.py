"""The original's Qwen2-7B SFT recipe (config/qwen/ppllava_qwen7b_videoonly.yaml) as a whole
run: ``python train.py --config configs/sft_qwen7b.py --workdir W``.

The start: llava-hf/llava-onevision-qwen2-7b-si-hf, SigLIP-so400m/384's text tower as the
scorer (extended 64 -> 196 positions; its tokenizer is the scorer's). The data: LLaVA-Hound's
300k video QA, 32 frames, ChatML (``plain_qwen``). The step: 1e-5, cosine, warmup 0.03, no
weight decay, AdamW (0.9, 0.999, 1e-8), max grad norm 1.0, 8 rows per device x 8 GPUs x 2
micro-batches = 128 a step, bf16 compute, gradient checkpointing, ZeRO-3 (fsdp over every
device); what trains: ``train.core.partition.QWEN_SFT`` (the LLM, the projector and the SigLIP
text tower). ``steps``: one epoch of the 300k videos at 128 a step, over which the
schedule decays (``train.optim.total_steps=None``): ``--set steps=N`` for your data.

Point the corpus at your files from the command line, e.g.::

  python train.py --config configs/sft_qwen7b.py --workdir out/sft_qwen7b \\
    --set data.mixture.corpora.llava_hound.annotation=/data/llava_hound/qa_300k.json \\
    --set data.mixture.corpora.llava_hound.media_root=/data/llava_hound/frames
"""

from ppllava_jax.data.sft.annotations import CorpusConfig, MixtureConfig
from ppllava_jax.data.sft.batches import BatchConfig
from ppllava_jax.data.sft.pipeline import DataConfig
from ppllava_jax.data.sft.samples import SampleConfig
from ppllava_jax.train.core.config import MeshConfig, OptimConfig, TrainConfig
from ppllava_jax.train.core.partition import QWEN_SFT
from ppllava_jax.train.run.config import ModelConfig, RunConfig

ROWS_PER_PROCESS = 64  # 8 per device on one 8-device host
SAMPLES, GLOBAL_BATCH = 300_000, 128


def get_config() -> RunConfig:
  corpora = (
    CorpusConfig(
      "llava_hound",
      "data/llava_hound/annotations.json",
      "data/llava_hound/frames",
      "video",
      num_frames=32,
    ),
  )
  data = DataConfig(
    MixtureConfig(corpora),
    # the original trains the SigLIP scorer on each text unpadded (pooled at its own last
    # token) and evaluates it padded; "max_length" pads in training too (data.sft.samples)
    SampleConfig(template="plain_qwen", max_length=4096, scorer_padding="none"),
    BatchConfig(
      batch_size=ROWS_PER_PROCESS,
      seq_buckets=(1024, 2048, 4096),
      video_slots=ROWS_PER_PROCESS,
      image_slots=0,
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
      lr=1e-5,
      schedule="cosine",
      warmup_ratio=0.03,
      total_steps=None,
      weight_decay=0.0,
      clip_norm=1.0,
      grad_accum=2,
    ),
    mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
    trainable=QWEN_SFT,
    compute_dtype="bfloat16",
    remat="nothing_saveable",
    seed=42,
  )
  return RunConfig(
    data=data,
    model=ModelConfig(
      checkpoint="llava-hf/llava-onevision-qwen2-7b-si-hf", clip="google/siglip-so400m-patch14-384"
    ),
    train=train,
    steps=-(-SAMPLES // GLOBAL_BATCH),
    log_every=10,
    checkpoint_every=500,
    keep=3,
  )
