"""A tiny SFT run that this CPU finishes in a minute or two: a random PPLLaVA built in code
(``models.tiny.build_tiny``: 4 frames of 126 pixels, 9 x 9 patches of 14, which the (2, 3, 3)
kernel pools to 2 x 3 x 3 tokens with no remainder left out; one layer per tower), the char
tokenizer, on a synthetic video-QA set of moving coloured shapes that the run draws into its
workdir first (``train.run.synthetic``: colour, shape and direction questions in the original
MVBench prompt format, the original's qa format), evaluated every 50 batches on 8 other
videos, whose questions are also MVBench task files in ``{workdir}/data/mcq``.

  python train.py --config configs/sft_tiny.py --workdir out/tiny [--set steps=20]
"""

import dataclasses

from ppllava_jax.data.sft.annotations import CorpusConfig, MixtureConfig
from ppllava_jax.data.sft.batches import BatchConfig
from ppllava_jax.data.sft.pipeline import DataConfig
from ppllava_jax.data.sft.samples import SampleConfig
from ppllava_jax.models.tiny import TinyConfig
from ppllava_jax.train.core.config import MeshConfig, OptimConfig, TrainConfig
from ppllava_jax.train.core.partition import VICUNA_SFT
from ppllava_jax.train.run.config import McqEvalConfig, ModelConfig, RunConfig, SyntheticConfig


def get_config() -> RunConfig:
  frames = 4
  data = DataConfig(
    MixtureConfig(
      (
        CorpusConfig(
          "shapes", "{workdir}/data/train.json", "{workdir}/data/videos", "video", num_frames=frames
        ),
      )
    ),
    SampleConfig(template="plain_v1", max_length=256, max_pictures=1),
    BatchConfig(
      batch_size=4,
      seq_buckets=(256,),
      video_slots=4,
      image_slots=0,
      multi_image_slots=0,
      num_frames=frames,
      max_pictures=1,
    ),
    seed=0,
    num_epochs=None,
    num_workers=0,
  )
  size = 126
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
  eval_data = dataclasses.replace(
    data,
    mixture=MixtureConfig(
      (dataclasses.replace(data.mixture.corpora[0], annotation="{workdir}/data/eval.json"),)
    ),
    num_epochs=1,
  )
  steps = 200
  return RunConfig(
    data=data,
    model=ModelConfig(tiny=tiny),
    eval_data=eval_data,
    eval_every=50,
    eval_batches=2,
    mcq=McqEvalConfig(
      "{workdir}/data/mcq", "{workdir}/data/videos", every=50, frames=frames, max_new_tokens=16
    ),
    synthetic=SyntheticConfig(videos=24, eval_videos=8, frames=8, size=size),
    train=TrainConfig(
      optim=OptimConfig(
        lr=1e-3, schedule="cosine", warmup_ratio=0.05, total_steps=steps, clip_norm=1.0
      ),
      mesh=MeshConfig(data=-1),
      trainable=VICUNA_SFT,
      seed=0,
    ),
    steps=steps,
    log_every=10,
    checkpoint_every=50,
    keep=2,
  )
