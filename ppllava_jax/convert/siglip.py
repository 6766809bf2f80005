"""Key table: transformers SiglipModel checkpoints <-> ppllava_jax.models.SiglipModel.

Names mirror transformers'; the attention-pooling head's packed ``in_proj_weight``
(torch.nn.MultiheadAttention) becomes one (D, 3D) linear, q | k | v along the output.
"""

from ppllava_jax.convert.clip import LINEARS
from ppllava_jax.convert.loader import Rule, Transform


def head_rules(hf_prefix: str, ours_prefix: str) -> tuple[Rule, ...]:
  """The packed input projection of a SigLIP pooling head stored under ``hf_prefix``;
  its other tensors follow the generic linear / catch-all rules of the table."""
  return (
    Rule(
      hf_prefix + "attention.in_proj_weight",
      ours_prefix + "attention.in_proj.kernel",
      Transform.LINEAR,
    ),
    Rule(hf_prefix + "attention.in_proj_bias", ours_prefix + "attention.in_proj.bias"),
  )


SIGLIP_RULES = (
  Rule("{p*}.position_ids", None),
  Rule(
    "vision_model.embeddings.patch_embedding.weight",
    "vision_model.embeddings.patch_embedding.kernel",
    Transform.CONV,
  ),
  *head_rules("vision_model.head.", "vision_model.head."),
  Rule("{p*}.{lin:" + LINEARS + "|head}.weight", "{p*}.{lin}.kernel", Transform.LINEAR),
  Rule("{p*}", "{p*}"),
)
