"""Key table: transformers CLIPModel checkpoints <-> ppllava_jax.models.CLIPModel.

Our parameter names mirror transformers', so most keys map to themselves; only
linear and conv weights change layout. PPLLaVA's extended text tower stores its two
position tables as bare parameters (``position_embedding``, ``position_embedding_res``),
which the catch-all maps as they are.
"""

from ppllava_jax.convert.loader import Rule, Transform

LINEARS = "q_proj|k_proj|v_proj|out_proj|fc1|fc2"

CLIP_RULES = (
  # A buffer older checkpoints saved; the model derives positions itself.
  Rule("{p*}.position_ids", None),
  Rule(
    "vision_model.embeddings.patch_embedding.weight",
    "vision_model.embeddings.patch_embedding.kernel",
    Transform.CONV,
  ),
  Rule("{p*}.{lin:" + LINEARS + "}.weight", "{p*}.{lin}.kernel", Transform.LINEAR),
  Rule("{proj:visual_projection|text_projection}.weight", "{proj}.kernel", Transform.LINEAR),
  # LayerNorms, biases, embedding tables, class_embedding, logit_scale.
  Rule("{p*}", "{p*}"),
)
