"""Key table: transformers SiglipModel checkpoints <-> ppllava_jax.models.SiglipModel.

Names mirror transformers'; the attention-pooling head's packed ``in_proj_weight``
(torch.nn.MultiheadAttention) becomes one (D, 3D) linear, q | k | v along the output.
"""

from ppllava_jax.convert.clip import LINEARS
from ppllava_jax.convert.loader import Rule, Transform

SIGLIP_RULES = (
    Rule("{p*}.position_ids", None),
    Rule("vision_model.embeddings.patch_embedding.weight",
         "vision_model.embeddings.patch_embedding.kernel", Transform.CONV),
    Rule("vision_model.head.attention.in_proj_weight", "vision_model.head.attention.in_proj.kernel",
         Transform.LINEAR),
    Rule("vision_model.head.attention.in_proj_bias", "vision_model.head.attention.in_proj.bias"),
    Rule("{p*}.{lin:" + LINEARS + "|head}.weight", "{p*}.{lin}.kernel", Transform.LINEAR),
    Rule("{p*}", "{p*}"),
)
