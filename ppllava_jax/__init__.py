"""ppllava-jax: PPLLaVA (prompt-guided pooling video LLM) in JAX.

``from ppllava_jax import PPLLaVA`` (also ``PoolingConfig``, ``generate``) is resolved
lazily, so importing the package (or its ops) does not build the model stack.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
  if name in ("PPLLaVA", "PoolingConfig"):
    from ppllava_jax.models import ppllava

    return getattr(ppllava, name)
  if name == "generate":
    from ppllava_jax.models.generate import generate

    return generate
  raise AttributeError(f"module 'ppllava_jax' has no attribute {name!r}")
