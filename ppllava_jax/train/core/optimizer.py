"""The optimizer: AdamW after global-norm clipping, on transformers' warmup schedules.

The learning rate of update ``n`` (0-based: the first update is ``n = 0``) is
``lr * factor(n)``, with transformers' ``get_{cosine,linear,constant}_schedule_with_warmup``
factors: ``n / max(1, warmup)`` during the warmup, then for cosine
``max(0, 0.5 * (1 + cos(pi * progress)))`` and for linear
``max(0, (total - n) / max(1, total - warmup))``, ``progress = (n - warmup) /
max(1, total - warmup)``. As in transformers, the first update of a run with warmup has
learning rate 0 (its scheduler steps after the optimizer). ``warmup = ceil(total *
warmup_ratio)`` (``OptimConfig.warmup_steps``).

AdamW is optax's, which is torch's ``AdamW`` (decoupled decay ``lr * wd * p``, bias
corrections, ``eps`` outside the square root); decay only where the mask says
(``train.core.partition.DECAY_RULES``). Gradients are clipped to ``clip_norm`` by their global
norm first (torch's ``clip_grad_norm_`` divides by ``norm + 1e-6``, optax by ``norm``: a
1e-6 relative difference on clipped steps).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ppllava_jax.train.core.config import OptimConfig


def lr_factor(cfg: OptimConfig, count: jax.Array | int) -> jax.Array:
  """transformers' schedule factor at update ``count`` (module doc), float32."""
  n = jnp.asarray(count, jnp.float32)
  # total_steps is set: warmup_steps, read first, raised if it were None
  warmup, total = float(cfg.warmup_steps), float(cfg.total_steps)  # type: ignore[arg-type]
  rise = n / max(1.0, warmup)
  progress = (n - warmup) / max(1.0, total - warmup)
  if cfg.schedule == "cosine":
    after = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
  elif cfg.schedule == "linear":
    after = jnp.maximum(0.0, (total - n) / max(1.0, total - warmup))
  else:
    after = jnp.ones_like(n)
  return jnp.where(n < warmup, rise, after)


def lr_schedule(cfg: OptimConfig) -> optax.Schedule:
  """The learning rate at each update count."""
  return lambda count: cfg.lr * lr_factor(cfg, count)


def make_optimizer(
  cfg: OptimConfig, decay_mask: nnx.State | None = None
) -> optax.GradientTransformation:
  """clip_by_global_norm(cfg.clip_norm) then AdamW on ``lr_schedule(cfg)``; weight decay on
  the parameters ``decay_mask`` marks True (``train.core.partition.decay_mask``; None: all)."""
  adamw = optax.adamw(
    lr_schedule(cfg),
    b1=cfg.b1,
    b2=cfg.b2,
    eps=cfg.eps,
    weight_decay=cfg.weight_decay,
    mask=decay_mask,
  )
  if cfg.clip_norm is None:
    return adamw
  return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
