"""Key table: PPLLaVA BT-Adapter vision towers <-> ppllava_jax.models.CLIPVisionBTAdapter.

The adapter's parameters carry the original's names (``btadapter_S_layers.N``,
``btadapter_T_layers.N``, ``btadapter_time_embed``, ``btadapter_cls_token``), and its
spatial and temporal blocks reuse CLIP's ``self_attn`` / ``mlp`` names, so CLIP's table
maps them. The one layer CLIP lacks is each temporal block's ``temporal_fc``.
"""

from ppllava_jax.convert.clip import CLIP_RULES
from ppllava_jax.convert.loader import Rule, Transform

BTADAPTER_RULES = (
  Rule("{p*}.temporal_fc.weight", "{p*}.temporal_fc.kernel", Transform.LINEAR),
  *CLIP_RULES,
)
