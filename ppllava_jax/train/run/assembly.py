"""One assembly of a run: everything a training run needs besides its data, built from
its ``RunConfig`` (``build``) for the loop (``train.run.loop``), the export, the plan, the
tests and the benchmarks.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from ppllava_jax import distributed
from ppllava_jax.data.text.tokenizer import model_tokenizers, tokenizer_folders
from ppllava_jax.models.attention import check_attention
from ppllava_jax.train.core.optimizer import make_optimizer
from ppllava_jax.train.core.partition import decay_mask, partition
from ppllava_jax.train.core.state import init_state, make_mesh
from ppllava_jax.train.core.step import Steps
from ppllava_jax.train.dpo.objective import (DPOConstants, PreferenceObjective, check_trainable,
                                             reference_copy)
from ppllava_jax.train.run import config as rc
from ppllava_jax.train.sft import TokenMean

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
  """Everything built from a config: the model side of a run. ``constants``: what the
  train step reads besides the state (the frozen state; DPO's ``DPOConstants``, whose
  reference ``start_reference`` fills in)."""
  tokenizer: object
  scorer_tokenizer: object
  model_cfg: object
  graphdef: nnx.GraphDef
  state: object
  frozen: nnx.State
  shardings: object
  steps: Steps
  constants: object = None


def _model(cfg: rc.RunConfig):
  """(constructor or loaded model, tokenizer, scorer tokenizer): the folder's, each checked
  against the embedding it feeds (``data.text.tokenizer.model_tokenizers``)."""
  if cfg.model.checkpoint:
    from ppllava_jax.models.ppllava import PPLLaVA
    m = cfg.model
    folders = tokenizer_folders(m.checkpoint, scorer_tokenizer=m.scorer_tokenizer or None,
                                clip=m.clip or None)
    model = PPLLaVA.from_pretrained(m.checkpoint, clip=m.clip or None, pooling=None,
                                    progress=distributed.is_primary())
    if m.btadapter is not None and model.cfg.btadapter is None:
      model.add_btadapter(m.btadapter, nnx.Rngs(cfg.train.seed))
      distributed.say(f"a fresh BT-Adapter ({m.btadapter}) on the vision tower of {m.checkpoint}")
    tok, scorer = model_tokenizers(model.cfg, folders, m.checkpoint)
    return model, tok, scorer
  from ppllava_jax.data.text.tokenizer import char_tokenizer
  from ppllava_jax.models.tiny import build_tiny
  tok = char_tokenizer()
  return (lambda: build_tiny(cfg.model.tiny, len(tok))), tok, tok


def build(cfg: rc.RunConfig, cast_frozen: bool = True) -> Run:
  """The run's model side (``Run``). ``cast_frozen``: the frozen parameters in the compute
  dtype, as the step reads them; ``export`` keeps them as loaded, so a bfloat16 run's
  frozen vision tower is written back bit for bit."""
  model, tok, scorer = _model(cfg)
  abstract = model if isinstance(model, nnx.Module) else nnx.eval_shape(model)
  part = partition(abstract, cfg.train.trainable)
  tx = make_optimizer(cfg.train.optim, decay_mask(part.split(abstract)[1]))
  mesh = make_mesh(cfg.train.mesh)
  check_attention(cfg.train.attention, mesh.size)  # before the weights load
  frozen_dtype = cfg.train.dtype if cfg.train.compute_dtype != "float32" and cast_frozen else None
  graphdef, state, frozen, shardings = init_state(model, part, tx, mesh, seed=cfg.train.seed,
                                                  frozen_dtype=frozen_dtype)
  if cfg.dpo is None:
    sft = TokenMean(graphdef, cfg.train)
    return Run(tok, scorer, abstract.cfg, graphdef, state, frozen, shardings,
               Steps(graphdef, cfg.train, tx, shardings, sft, held_out=sft), frozen)
  check_trainable(part)
  live = None if cfg.dpo.precompute_reference else shardings.state.params
  steps = Steps(graphdef, cfg.train, tx, shardings, PreferenceObjective(graphdef, cfg.train, cfg.dpo),
                DPOConstants(shardings.frozen, live))
  return Run(tok, scorer, abstract.cfg, graphdef, state, frozen, shardings, steps)


def start_reference(run: Run, cfg: rc.RunConfig, workdir: Path, initial_params,
                    read=None) -> dict | None:
  """A DPO run's reference (``train.dpo.objective``): a live copy of ``initial_params()`` into
  ``run.constants``, or the cached log-probs table (returned, for the data pipeline) of
  the rows ``read``."""
  if cfg.dpo.precompute_reference:
    from ppllava_jax.train.dpo.reference import reference_table
    run.constants = DPOConstants(run.frozen, None)
    return reference_table(run, cfg, workdir, initial_params, read)
  dtype = jnp.dtype(cfg.dpo.reference_dtype)
  run.constants = DPOConstants(run.frozen, reference_copy(initial_params(), dtype,
                                                          run.shardings.state.params))
  return None
