"""The demo's settings, written out: `python -m ppllava_jax.demo --config configs/demo.py`.

Edit a copy to try others, e.g. steps=1500, train_vision=True or llm_layers=2.
"""

from ppllava_jax.demo import DemoConfig


def get_config() -> DemoConfig:
  return DemoConfig(
    base="configs/sft_tiny.py",
    steps=600,
    lr=1e-3,
    videos=96,
    eval_videos=24,
    train_vision=False,
    llm_layers=1,
    max_new_tokens=10,
    eval_batch_size=8,
    seed=0,
  )
