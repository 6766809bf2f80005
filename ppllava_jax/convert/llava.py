"""Key table: llava-hf LLaVA-NeXT(-Video) / LLaVA-OneVision checkpoints <-> models.ppllava.PPLLaVA.

Checkpoints store the vision tower (CLIP, or SigLIP for OneVision) as
``vision_tower.vision_model.*`` (the hub's llava-hf folders, and PPLLaVA's) or as
``vision_tower.*`` (what transformers 5.23 writes); both load, and saving writes the
first. The language model keeps its ``language_model.model.*`` /
``language_model.lm_head`` names, which are ours too. PPLLaVA's relevance scorer sits
under the original projector's ``clip_*`` names, for the SigLIP scorer too
(``clip_text_model`` is then SigLIP's text tower, ``clip_visual_head`` its pooling head).
"""

from collections.abc import Iterable

from ppllava_jax.convert.clip import LINEARS
from ppllava_jax.convert.llm import LLM_RULES
from ppllava_jax.convert.loader import Rule, Transform
from ppllava_jax.convert.siglip import head_rules


def prefixed(rules: Iterable[Rule], hf_prefix: str, ours_prefix: str) -> tuple[Rule, ...]:
  """The same rules one level down: under ``hf_prefix`` / ``ours_prefix``."""
  return tuple(
    Rule(hf_prefix + r.hf, None if r.ours is None else ours_prefix + r.ours, r.transform)
    for r in rules
  )


def vision_tower_rules(hf_prefix: str) -> tuple[Rule, ...]:
  """A CLIP / SigLIP vision transformer stored under ``hf_prefix``, ours under ``vision_tower.``."""
  return (
    Rule(
      hf_prefix + "embeddings.patch_embedding.weight",
      "vision_tower.embeddings.patch_embedding.kernel",
      Transform.CONV,
    ),
    *head_rules(hf_prefix + "head.", "vision_tower.head."),
    Rule(
      hf_prefix + "{p*}.{lin:" + LINEARS + "|temporal_fc}.weight",
      "vision_tower.{p*}.{lin}.kernel",
      Transform.LINEAR,
    ),
    Rule(hf_prefix + "{p*}", "vision_tower.{p*}"),
  )


LLAVA_NEXT_RULES = (
  Rule("{p*}.position_ids", None),
  *vision_tower_rules("vision_tower.vision_model."),
  *vision_tower_rules("vision_tower."),
  # PPLLaVA's relevance scorer, under the original projector's names.
  Rule(
    "multi_modal_projector.clip_text_model.{p*}.{lin:" + LINEARS + "}.weight",
    "scorer.text_model.{p*}.{lin}.kernel",
    Transform.LINEAR,
  ),
  Rule(
    "multi_modal_projector.clip_text_model.head.weight",
    "scorer.text_model.head.kernel",
    Transform.LINEAR,
  ),
  Rule("multi_modal_projector.clip_text_model.{p*}", "scorer.text_model.{p*}"),
  Rule("multi_modal_projector.clip_visual_ln.{p*}", "scorer.visual_ln.{p*}"),
  Rule(
    "multi_modal_projector.clip_{proj:visual_projection|text_projection}.weight",
    "scorer.{proj}.kernel",
    Transform.LINEAR,
  ),
  *head_rules("multi_modal_projector.clip_visual_head.", "scorer.visual_head."),
  Rule(
    "multi_modal_projector.clip_visual_head.{p*}.{lin:" + LINEARS + "}.weight",
    "scorer.visual_head.{p*}.{lin}.kernel",
    Transform.LINEAR,
  ),
  Rule("multi_modal_projector.clip_visual_head.{p*}", "scorer.visual_head.{p*}"),
  Rule("multi_modal_projector.{l:logit_scale|logit_bias}", "scorer.{l}"),
  Rule(
    "multi_modal_projector.{l:linear_1|linear_2}.weight",
    "multi_modal_projector.{l}.kernel",
    Transform.LINEAR,
  ),
  Rule("multi_modal_projector.{p*}", "multi_modal_projector.{p*}"),
  *prefixed(LLM_RULES, "language_model.", "language_model."),
  Rule("image_newline", "image_newline"),
)
