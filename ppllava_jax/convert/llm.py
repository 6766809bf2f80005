"""Key table: transformers LlamaForCausalLM / Qwen2ForCausalLM <-> models.llm.CausalLM.

Names mirror transformers'; linear weights transpose. A tied model has no
``lm_head.weight``; the loader's strict accounting reports one that appears anyway.
"""

from ppllava_jax.convert.loader import Rule, Transform

LLM_LINEARS = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"

LLM_RULES = (
  Rule("{p*}.rotary_emb.inv_freq", None),  # a buffer some older checkpoints saved
  Rule("{p*}.{lin:" + LLM_LINEARS + "}.weight", "{p*}.{lin}.kernel", Transform.LINEAR),
  Rule("lm_head.weight", "lm_head.kernel", Transform.LINEAR),
  Rule("{p*}", "{p*}"),
)
