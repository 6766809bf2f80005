"""A tiny DPO run for the CPU: the tiny model of ``configs/sft_tiny.py`` (so an export of
that run can start it: ``--set model.checkpoint=out/tiny/hf``; by default the random one)
on a synthetic preference set that the run draws into its workdir first
(``train.run.synthetic.generate_preference``: per video, a chosen sentence that describes its
shape, colour and motion and a rejected one with one of them wrong, frame folders as the
original's data), the reference log-probs precomputed and cached, accuracy on the held-out
multiple-choice questions at the end.

The recipe's learning rate (5e-6, ``configs/dpo_vicuna7b.py``) moves a 7B model; this
model is tiny and random, so 1e-3 here, with the recipe's linear schedule, 10% warmup,
beta 0.1 and two epochs.

  python train.py --config configs/dpo_tiny.py --workdir out/dpo_tiny [--set steps=20]
"""

from ppllava_jax.data.dpo.pairs import PreferenceDataConfig
from ppllava_jax.data.dpo.rows import PreferenceConfig
from ppllava_jax.models.tiny import TinyConfig
from ppllava_jax.train.core.config import MeshConfig, OptimConfig, TrainConfig
from ppllava_jax.train.core.partition import DPO
from ppllava_jax.train.dpo.losses import DPOConfig
from ppllava_jax.train.run.config import McqEvalConfig, ModelConfig, RunConfig, SyntheticConfig


def get_config() -> RunConfig:
  frames, size, videos, pairs = 4, 126, 24, 4
  tiny = TinyConfig(
    frames=frames,
    image_size=size,
    patch_size=14,
    vision_width=32,
    vision_layers=1,
    llm_width=64,
    llm_layers=1,
    text_width=32,
    text_layers=1,
  )
  steps = 2 * videos // pairs  # two epochs
  return RunConfig(
    preference=PreferenceDataConfig(
      "{workdir}/data/preference.jsonl",
      "{workdir}/data",
      PreferenceConfig(template="plain_v1", num_frames=frames, max_length=256),
      batch_size=pairs,
      seq_buckets=(256,),
      seed=0,
      num_epochs=2,
      num_workers=0,
    ),
    dpo=DPOConfig(loss_type="sigmoid", beta=0.1, precompute_reference=True),
    model=ModelConfig(tiny=tiny),
    mcq=McqEvalConfig(
      "{workdir}/data/mcq", "{workdir}/data/videos", frames=frames, max_new_tokens=16
    ),
    synthetic=SyntheticConfig(kind="preference", videos=videos, eval_videos=8, frames=8, size=size),
    train=TrainConfig(
      optim=OptimConfig(
        lr=1e-3, schedule="linear", warmup_ratio=0.1, total_steps=steps, clip_norm=1.0
      ),
      mesh=MeshConfig(data=-1),
      trainable=DPO,
      seed=0,
    ),
    steps=steps,
    log_every=2,
    checkpoint_every=6,
    keep=2,
  )
