"""ppllava-jax: PPLLaVA (prompt-guided pooling video LLM) in JAX."""

__version__ = "0.1.0"
