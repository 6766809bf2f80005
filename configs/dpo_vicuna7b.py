"""The original's DPO recipe (config/dpo/dpo_ppllava_vicuna7b.yaml) on its data: LLaVA-Hound's
``sft_dpo_17k.jsonl`` preference rows over frame folders, from the Vicuna-7B SFT export.

Only the LLM trains (``train.core.partition.DPO``); 5e-6, linear decay after a 10% warmup, no
weight decay, AdamW (0.9, 0.999, 1e-8), max grad norm 1.0; sigmoid loss, beta 0.1, no label
smoothing, no SFT term; two epochs; 64 pairs an update (the original: 2 per GPU x 4
accumulation x 8 GPUs; here 16 pairs per process on one 8-device host x 4 micro-batches);
32 frames; bfloat16 compute with float32 masters, gradient checkpointing, the parameters
sharded over every device (the original: ZeRO-2). The reference runs live in bfloat16 (the
original's frozen copy, in its compute dtype); ``--set dpo.precompute_reference=true``
caches its log-probs once instead (``train.run.reference``) and keeps no copy in memory.

Paths are placeholders: point them at the SFT export (``train.py export``) and the data;
``steps`` (two epochs of 17k rows; the schedule decays over them) from the rows you keep.
On H hosts keep 64 pairs an update with ``--set preference.shards=H --set
preference.batch_size=16/H`` (``data.engine``: a step is ``shards`` planned batches).

  python train.py --config configs/dpo_vicuna7b.py --workdir out/dpo_vicuna7b \\
    --set model.checkpoint=out/sft_vicuna7b/hf \\
    --set preference.rows=data/llava_hound/sft_dpo_17k.jsonl \\
    --set preference.media_root=data/llava_hound/frames
"""

from ppllava_jax.data.dpo.pairs import PreferenceDataConfig
from ppllava_jax.data.dpo.rows import PreferenceConfig
from ppllava_jax.train.core.config import MeshConfig, OptimConfig, TrainConfig
from ppllava_jax.train.core.partition import DPO
from ppllava_jax.train.dpo.losses import DPOConfig
from ppllava_jax.train.run.config import ModelConfig, RunConfig

ROWS = 17_000  # about sft_dpo_17k.jsonl's rows
PAIRS_PER_UPDATE = 64
ACCUM = 4


def get_config() -> RunConfig:
  steps = 2 * ROWS // PAIRS_PER_UPDATE  # two epochs; set from the rows actually kept
  return RunConfig(
    preference=PreferenceDataConfig(
      "data/llava_hound/sft_dpo_17k.jsonl",
      "data/llava_hound/frames",
      PreferenceConfig(template="vicuna_v1", num_frames=32, max_length=4096),
      batch_size=PAIRS_PER_UPDATE // ACCUM,
      seq_buckets=(2048, 4096),
      pixel_dtype="bfloat16",
      seed=42,
      num_epochs=2,
      num_workers=8,
    ),
    dpo=DPOConfig(
      loss_type="sigmoid", beta=0.1, label_smoothing=0.0, gamma=0.0, reference_dtype="bfloat16"
    ),
    model=ModelConfig(checkpoint="out/sft_vicuna7b/hf"),
    train=TrainConfig(
      optim=OptimConfig(
        lr=5e-6,
        schedule="linear",
        warmup_ratio=0.1,
        total_steps=None,
        weight_decay=0.0,
        clip_norm=1.0,
        grad_accum=ACCUM,
      ),
      mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
      trainable=DPO,
      compute_dtype="bfloat16",
      remat="nothing_saveable",
      seed=42,
    ),
    steps=steps,
    log_every=10,
    checkpoint_every=100,
    keep=3,
  )
