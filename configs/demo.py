"""The demo's settings, written out: `python -m ppllava_jax.demo --config configs/demo.py`.

Edit a copy to try other settings, e.g. kernel=(4, 3, 3) or temperature=0.001.
"""

from ppllava_jax.demo import DemoConfig


def get_config() -> DemoConfig:
  return DemoConfig(frames=32, grid=24, embed_dim=64, feature_dim=256, kernel=(2, 3, 3),
                    temperature=0.01, logit_scale=4.6052, seed=0)
