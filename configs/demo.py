"""The demo's settings, written out: `python -m ppllava_jax.demo --config configs/demo.py`.

Edit a copy to try other settings, e.g. kernel=(4, 3, 3), frames=64 or a larger LLM.
"""

from ppllava_jax.demo import DemoConfig


def get_config() -> DemoConfig:
  return DemoConfig(frames=32, image_size=336, patch_size=14, vision_width=64, vision_layers=2,
                    llm_width=128, llm_layers=2, text_width=64, text_layers=2, kernel=(2, 3, 3),
                    max_new_tokens=24, question="What does the red circle do?", seed=0)
