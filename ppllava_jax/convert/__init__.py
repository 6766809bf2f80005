"""Checkpoint conversion: one streaming loader, one key table per checkpoint family.

``tensor_names(model, tree)`` gives any tree shaped like a model's parameters (the
parameters, gradients, updates, optimizer moments; all of them or a part, such as the
trainer's trainable subset) under the names and layouts ``save_pretrained`` writes.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from ppllava_jax.convert.btadapter import BTADAPTER_RULES
from ppllava_jax.convert.clip import CLIP_RULES
from ppllava_jax.convert.llava import LLAVA_NEXT_RULES
from ppllava_jax.convert.llm import LLM_RULES
from ppllava_jax.convert.loader import Rule, named_tensors
from ppllava_jax.convert.siglip import SIGLIP_RULES

# The table each model class saves with, by class name: the models import this package,
# so it names them rather than importing them. Subclasses find their base's entry.
FAMILY_RULES: dict[str, tuple[Rule, ...]] = {
  "PPLLaVA": LLAVA_NEXT_RULES,
  "CLIPModel": CLIP_RULES,
  "SiglipModel": SIGLIP_RULES,
  "CausalLM": LLM_RULES,
  "CLIPVisionBTAdapter": BTADAPTER_RULES,
}


def family_rules(model_type: type) -> tuple[Rule, ...]:
  """The key table ``model_type``'s ``save_pretrained`` writes with."""
  for cls in model_type.__mro__:
    if cls.__name__ in FAMILY_RULES:
      return FAMILY_RULES[cls.__name__]
  raise TypeError(
    f"{model_type.__name__} has no checkpoint key table (known: {sorted(FAMILY_RULES)})"
  )


def tensor_names(model: nnx.Module | nnx.GraphDef, tree) -> dict[str, Any]:
  """``{checkpoint tensor name: array}`` of ``tree``, a tree shaped like ``model``'s
  parameter state or a part of it (an ``nnx.State``, or nested dicts of arrays keyed
  like one): each leaf under the name ``save_pretrained`` gives that parameter, in the
  checkpoint's layout (linear kernels transposed back to torch's (out, in), ...).

  ``model``: the model (abstract from ``nnx.eval_shape`` is enough) or its graphdef. With
  the model every leaf is also checked to be one of its parameters, in its shape; a
  graphdef gives the table only. Leaves that have no checkpoint name raise one
  ``CheckpointError`` naming each."""
  if isinstance(model, nnx.GraphDef):
    # a module's graphdef starts with its NodeDef; the stubs type nodes[0] as any node kind
    return named_tensors(tree, family_rules(model.nodes[0].type))  # type: ignore[union-attr]
  shapes = {
    ".".join(map(str, path)): tuple(getattr(var.get_value(), "shape", ()))
    for path, var in nnx.to_flat_state(nnx.state(model))
  }
  return named_tensors(tree, family_rules(type(model)), shapes)
