"""One pure train step, ``train_step(state, constants, batch) -> (state, metrics)``, for any
``Objective``, and the SFT eval step ``eval_step(state, frozen, batch) -> (loss sum, token
count)``.

The graphdef is closed over. An ``Objective`` says what the step minimises: SFT's
(``train.sft.TokenMean``) merges the trainable and frozen states into the model once,
embeds the batch (``train.core.inputs.embed_batch``), runs the LLM to its final hidden
states and takes ``train.core.losses.cross_entropy`` (sum, count) on them, never the full
logits; DPO's (``train.dpo.objective.PreferenceObjective``) takes a
``data.dpo.pairs.PairBatch`` and its constants add the reference. Gradients are taken
with respect to the trainable state only; the update, the skip rule, the metrics and the
jitting are the same for every objective.

Gradient accumulation happens inside the step: with ``OptimConfig.grad_accum = k`` every
batch field carries a leading micro-batch axis of k (``stack_micro_batches``). The
objective's normalisers (the step's supervised tokens, or pairs) are counted from the
whole batch first (``Objective.totals``), so each micro-batch's share of the loss is its
sum over them, and a ``lax.scan`` adds the shares' values and gradients: the gradient of
the global token mean (``accum_reduction="tokens"``). ``"micro_mean"`` averages the k
micro-batch means instead, as transformers 4.45 (the original's) did; across
data-parallel devices our micro-batch mean is still the global one, where the original's
DDP averaged per-GPU means too.

bfloat16 compute (``TrainConfig.compute_dtype``): the forward and backward run on a
bfloat16 cast of the parameters; the cast is inside the differentiated function, so
gradients arrive in float32 on the float32 masters. The logits of each loss chunk are
float32 (``train.core.losses``).

Randomness: the train step runs the model in training mode (``model.train()``: the
BT-Adapter's drop path) with the key ``fold_in(state.rng, n)`` for batch ``n`` (``step +
skipped``: every batch, skipped or not, gets its own key, and a resumed run draws the
same ones), folded again with the micro-batch index under accumulation. The eval step is
deterministic (``model.eval()``).

An update whose loss or gradient norm is not finite, or whose batch has nothing to learn
from (no supervised token, no pair: ``totals[objective.count]`` = 0), is skipped: the
state comes back unchanged but for ``skipped + 1`` (``step`` and AdamW's count do not
advance, so neither does the schedule), and ``metrics["skipped"]`` is 1.

``Steps`` jits both with the state's shardings in and out, the batch's on the ``batch``
rule, the state donated (argument 0), the constants not; it logs each new batch shape it
compiles for.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ppllava_jax.data.batching import join_batches
from ppllava_jax.data.sft.batches import TrainBatch
from ppllava_jax.models.ppllava import PPLLaVA
from ppllava_jax.train.core.config import TrainConfig
from ppllava_jax.train.core.optimizer import lr_schedule
from ppllava_jax.train.core.state import Shardings, TrainState, batch_shardings, cast_floating

log = logging.getLogger(__name__)


class Objective(Protocol):
  """What a train step minimises, in a form micro-batches add up.

  ``totals(batch)``: the normalisers of the whole step, over every micro-batch (token
  or pair counts), known from the batch before any forward pass; ``totals[count]`` = 0
  means nothing to learn from (the update is skipped). ``share(params, constants, micro,
  key, totals)``: (this micro-batch's share of the loss, its shares of the metrics): the
  shares of the micro-batches add up to the step's loss and metrics, so their gradients
  add up to the step's gradient. ``constants``: what the objective reads besides the
  trainable parameters (the frozen state; DPO adds its reference).
  """

  @property
  def count(self) -> str: ...  # read-only: the objectives are frozen dataclasses

  def totals(self, batch) -> dict[str, jax.Array]: ...

  def share(
    self, params, constants, batch, key, totals
  ) -> tuple[jax.Array, dict[str, jax.Array]]: ...


def merged(graphdef: nnx.GraphDef, cfg: TrainConfig, params, frozen) -> PPLLaVA:
  """The model of ``params`` and ``frozen`` in the compute dtype, remat and attention as
  configured."""
  model = nnx.merge(graphdef, cast_floating(params, cfg.dtype), cast_floating(frozen, cfg.dtype))
  model.set_remat(cfg.remat)  # LLM and vision-tower layers (PPLLaVA.set_remat)
  model.set_attention(cfg.attention)  # every tower's attention (PPLLaVA.set_attention)
  return model


def make_gradients(objective: Objective, grad_accum: int = 1):
  """``gradients(params, constants, batch, key) -> (grads, loss, metrics)``: the gradient of
  ``objective`` with respect to the trainable ``params`` over the step's ``grad_accum``
  micro-batches (module doc), its value, and its metrics with the totals."""
  value_and_grad = jax.value_and_grad(objective.share, has_aux=True)

  def gradients(params, constants, batch, key):
    totals = objective.totals(batch)
    if grad_accum == 1:
      (loss, metrics), grads = value_and_grad(params, constants, batch, key, totals)
      return grads, loss, {**metrics, **totals}
    if batch.input_ids.ndim != 3 or batch.input_ids.shape[0] != grad_accum:
      raise ValueError(
        f"grad_accum={grad_accum}: every batch field needs a leading micro-batch "
        f"axis of {grad_accum} (stack_micro_batches), got input_ids "
        f"{batch.input_ids.shape}"
      )

    def body(carry, indexed):
      i, micro = indexed
      (loss, metrics), grads = value_and_grad(
        params, constants, micro, jax.random.fold_in(key, i), totals
      )
      return jax.tree.map(jnp.add, carry, (grads, loss, metrics)), None

    first = jax.tree.map(lambda x: x[0], batch)
    shapes = jax.eval_shape(value_and_grad, params, constants, first, key, totals)
    zero = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    init = (zero[1], zero[0][0], zero[0][1])
    (grads, loss, metrics), _ = jax.lax.scan(body, init, (jnp.arange(grad_accum), batch))
    return grads, loss, {**metrics, **totals}

  return gradients


def make_steps(objective: Objective, cfg: TrainConfig, tx: optax.GradientTransformation):
  """The pure train step of a run (module doc)."""
  schedule, gradients = lr_schedule(cfg.optim), make_gradients(objective, cfg.optim.grad_accum)

  def train_step(state: TrainState, constants, batch):
    key = jax.random.fold_in(state.rng, state.step + state.skipped)
    grads, loss, measured = gradients(state.params, constants, batch, key)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (measured[objective.count] > 0)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new = state.replace(  # type: ignore[attr-defined]  # flax.struct.dataclass's, not in its stubs
      step=state.step + ok.astype(jnp.int32),
      params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      skipped=state.skipped + (~ok).astype(jnp.int32),
    )
    metrics = dict(
      measured,
      loss=loss,
      grad_norm=grad_norm,
      param_norm=optax.tree.norm(new.params),
      update_norm=jnp.where(ok, optax.tree.norm(updates), 0.0),
      lr=schedule(state.step),
      skipped=(~ok).astype(jnp.float32),
    )
    return new, {name: jnp.asarray(v, jnp.float32) for name, v in metrics.items()}

  return train_step


def stack_micro_batches(batches: Sequence[TrainBatch], pad_id: int = 0) -> TrainBatch:
  """k batches of one layout -> one batch whose fields carry a leading axis of k, padded to
  the longest one's sequence length (``data.batching.pad_batch``)."""
  return join_batches(batches, pad_id, stack=True)


@dataclasses.dataclass
class Steps:
  """The jitted steps of one run on ``shardings.mesh`` (module doc). ``train`` donates the
  state: use the state it returns. ``objective``: what the train step minimises (SFT's
  ``train.sft.TokenMean``, DPO's ``train.dpo.objective.PreferenceObjective``);
  ``constant_shardings``: those of the step's ``constants`` (default: the frozen
  state's); ``held_out``: an objective whose ``sums(params, frozen, batch)`` is the
  ``eval`` step's (loss sum, count) (None: no eval step)."""

  graphdef: nnx.GraphDef
  cfg: TrainConfig
  tx: optax.GradientTransformation
  shardings: Shardings
  objective: Objective
  constant_shardings: object = None
  held_out: object = None

  def __post_init__(self) -> None:
    if self.constant_shardings is None:
      self.constant_shardings = self.shardings.frozen
    train_step = make_steps(self.objective, self.cfg, self.tx)
    held_out = self.held_out

    def eval_step(state, frozen, batch):
      if held_out is None:
        raise ValueError("Steps.eval needs held_out (an objective with sums)")
      return held_out.sums(state.params, frozen, batch)

    self.traces = {"train": 0, "eval": 0}  # how often each was traced, i.e. compiled

    def counted(kind, fn):
      def traced(*args):
        self.traces[kind] += 1
        return fn(*args)

      return traced

    self._pure = {"train": counted("train", train_step), "eval": counted("eval", eval_step)}
    self._jitted: dict[tuple, object] = {}
    self._seen: set[tuple] = set()

  def _fn(self, kind: str, batch: TrainBatch):
    micro = kind == "train" and self.cfg.optim.grad_accum > 1
    key = (kind, batch.shape_key())
    if key not in self._seen:
      self._seen.add(key)
      # the loop says when the train step compiles, and how long it took
      say = log.debug if kind == "train" else log.info
      say(
        "%s step: compiling for batch shape %s",
        kind,
        {n: s for n, s, _ in batch.shape_key() if n in ("input_ids", "videos")},
      )
    batch_sh = batch_shardings(batch, self.shardings.mesh, micro)
    spec = (kind, tuple(s.spec for s in jax.tree.leaves(batch_sh)))
    if spec not in self._jitted:
      sh, rep = self.shardings, self.shardings.replicated
      donate = (0,) if kind == "train" else ()
      out = (sh.state, rep) if kind == "train" else (rep, rep)
      constants = self.constant_shardings if kind == "train" else sh.frozen
      self._jitted[spec] = jax.jit(
        self._pure[kind],
        in_shardings=(sh.state, constants, batch_sh),
        out_shardings=out,
        donate_argnums=donate,
      )
    return self._jitted[spec]

  def lower_train(self, state: TrainState, constants, batch):
    """The train step for ``batch``'s layout, lowered (for its cost analysis)."""
    with jax.set_mesh(self.shardings.mesh):
      return self._fn("train", batch).lower(state, constants, batch)

  @property
  def train_compilations(self) -> int:
    """Batch layouts the train step has been compiled for so far."""
    return sum(1 for kind, _ in self._seen if kind == "train")

  def train(self, state: TrainState, constants, batch) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update; ``constants``: the objective's (the frozen state for SFT)."""
    with jax.set_mesh(self.shardings.mesh):
      return self._fn("train", batch)(state, constants, batch)

  def eval(
    self, state: TrainState, frozen: nnx.State, batch: TrainBatch
  ) -> tuple[jax.Array, jax.Array]:
    with jax.set_mesh(self.shardings.mesh):
      return self._fn("eval", batch)(state, frozen, batch)
