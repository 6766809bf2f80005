"""One pure train step, ``train_step(state, frozen, batch) -> (state, metrics)``, and its
eval twin ``eval_step(state, frozen, batch) -> (loss sum, token count)``.

The graphdef is closed over; the step merges the trainable and frozen states into the
model once, embeds the batch (``train.inputs.embed_batch``), runs the LLM to its final
hidden states and takes ``train.losses.cross_entropy`` (sum, count) on them, never the full
logits. Gradients are taken with respect to the trainable state only.

Gradient accumulation happens inside the step: with ``OptimConfig.grad_accum = k`` every
batch field carries a leading micro-batch axis of k (``stack_micro_batches``), a
``lax.scan`` adds the gradients of the loss *sums* and the token counts, and one division
by the total count gives the gradient of the global token mean (``accum_reduction=
"tokens"``). ``"micro_mean"`` averages the k micro-batch means instead, as transformers
4.45 (the original's) did; across data-parallel devices our micro-batch mean is still the
global one, where the original's DDP averaged per-GPU means too.

bfloat16 compute (``TrainConfig.compute_dtype``): the forward and backward run on a
bfloat16 cast of the parameters; the cast is inside the differentiated function, so
gradients arrive in float32 on the float32 masters. The logits of each loss chunk are
float32 (``train.losses``).

Randomness: the train step runs the model in training mode (``model.train()``: the
BT-Adapter's drop path) with the key ``fold_in(state.rng, n)`` for batch ``n`` (``step +
skipped``: every batch, skipped or not, gets its own key, and a resumed run draws the
same ones), folded again with the micro-batch index under accumulation. The eval step is
deterministic (``model.eval()``).

An update whose loss or gradient norm is not finite, or whose batch supervises no token,
is skipped: the state comes back unchanged but for ``skipped + 1`` (``step`` and AdamW's
count do not advance, so neither does the schedule), and ``metrics["skipped"]`` is 1.

``Steps`` jits both with the state's shardings in and out, the batch's on the ``batch``
rule, the state donated (argument 0), the frozen state not; it logs each new batch shape
it compiles for.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ppllava_jax.data.batch import TrainBatch, pad_batch
from ppllava_jax.models.ppllava import PPLLaVA
from ppllava_jax.train import losses
from ppllava_jax.train.config import TrainConfig
from ppllava_jax.train.inputs import embed_batch
from ppllava_jax.train.optimizer import lr_schedule
from ppllava_jax.train.state import Shardings, TrainState, batch_shardings, cast_floating

log = logging.getLogger(__name__)


def loss_sums(model: PPLLaVA, batch: TrainBatch, chunk: int = losses.CHUNK,
              rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
  """(summed cross-entropy of the supervised tokens, their count) of one micro-batch."""
  emb_bld = embed_batch(model, batch, rngs)
  lm = model.language_model
  hidden_bld, _ = lm.hidden_states(inputs_embeds=emb_bld, attention_mask=batch.attention_mask,
                                   position_ids=batch.position_ids)
  return losses.cross_entropy(hidden_bld, lm.head_dv, batch.labels, chunk)


def _sums_fn(graphdef: nnx.GraphDef, cfg: TrainConfig):
  dtype = cfg.dtype

  def sums(params, frozen, batch, key=None):
    """``key``: training mode with drop-path keys from it; None: deterministic."""
    model = nnx.merge(graphdef, cast_floating(params, dtype), cast_floating(frozen, dtype))
    model.set_remat(cfg.remat)  # LLM and vision-tower layers (PPLLaVA.set_remat)
    if key is None:
      model.eval()
      return loss_sums(model, batch, cfg.loss_chunk)
    model.train()
    return loss_sums(model, batch, cfg.loss_chunk, nnx.Rngs(dropout=key))

  return sums


def make_gradients(graphdef: nnx.GraphDef, cfg: TrainConfig):
  """``gradients(params, frozen, batch, key) -> (grads, loss, tokens)``: the gradient of the
  step's loss with respect to the trainable ``params``, over its micro-batches (module doc)."""
  sums, k = _sums_fn(graphdef, cfg), cfg.optim.grad_accum
  per_micro_mean = cfg.optim.accum_reduction == "micro_mean"

  def objective(params, frozen, batch, key):
    s, c = sums(params, frozen, batch, key)
    return (s / jnp.maximum(c, 1.0) if per_micro_mean else s), (s, c)

  grad_fn = jax.grad(objective, has_aux=True)

  def gradients(params, frozen, batch, key):
    if k == 1:
      g, (s, c) = grad_fn(params, frozen, batch, key)
      n = jnp.maximum(c, 1.0)
      return jax.tree.map(lambda x: x / n, g), s / n, c
    if batch.input_ids.ndim != 3 or batch.input_ids.shape[0] != k:
      raise ValueError(f"grad_accum={k}: every batch field needs a leading micro-batch axis of "
                       f"{k} (stack_micro_batches), got input_ids {batch.input_ids.shape}")

    def body(carry, indexed):
      g_acc, obj_acc, s_acc, c_acc = carry
      i, micro = indexed
      g, (s, c) = grad_fn(params, frozen, micro, jax.random.fold_in(key, i))
      obj = s / jnp.maximum(c, 1.0) if per_micro_mean else s
      return (jax.tree.map(jnp.add, g_acc, g), obj_acc + obj, s_acc + s, c_acc + c), None

    zero = jnp.zeros((), jnp.float32)
    init = (jax.tree.map(jnp.zeros_like, params), zero, zero, zero)
    (g, obj, s, c), _ = jax.lax.scan(body, init, (jnp.arange(k), batch))
    n = jnp.float32(k) if per_micro_mean else jnp.maximum(c, 1.0)
    return jax.tree.map(lambda x: x / n, g), (obj if per_micro_mean else s) / n, c

  return gradients


def make_steps(graphdef: nnx.GraphDef, cfg: TrainConfig, tx: optax.GradientTransformation):
  """The pure (train_step, eval_step) of a run (module doc)."""
  schedule, gradients = lr_schedule(cfg.optim), make_gradients(graphdef, cfg)
  sums = _sums_fn(graphdef, cfg)

  def train_step(state: TrainState, frozen: nnx.State, batch: TrainBatch):
    key = jax.random.fold_in(state.rng, state.step + state.skipped)
    grads, loss, tokens = gradients(state.params, frozen, batch, key)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (tokens > 0)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new = state.replace(step=state.step + ok.astype(jnp.int32), params=keep(params, state.params),
                        opt_state=keep(opt_state, state.opt_state),
                        skipped=state.skipped + (~ok).astype(jnp.int32))
    metrics = dict(loss=loss, tokens=tokens, grad_norm=grad_norm,
                   param_norm=optax.tree.norm(new.params),
                   update_norm=jnp.where(ok, optax.tree.norm(updates), 0.0),
                   lr=schedule(state.step), skipped=(~ok).astype(jnp.float32))
    return new, {name: jnp.asarray(v, jnp.float32) for name, v in metrics.items()}

  def eval_step(state: TrainState, frozen: nnx.State, batch: TrainBatch):
    return sums(state.params, frozen, batch)

  return train_step, eval_step


def stack_micro_batches(batches: Sequence[TrainBatch], pad_id: int = 0) -> TrainBatch:
  """k batches of one layout -> one batch whose fields carry a leading axis of k, padded to
  the longest one's sequence length (``data.batch.pad_batch``)."""
  length = max(b.input_ids.shape[1] for b in batches)
  padded = [pad_batch(b, length, pad_id) for b in batches]
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *padded)


@dataclasses.dataclass
class Steps:
  """The jitted steps of one run on ``shardings.mesh`` (module doc). ``train`` donates the
  state: use the state it returns."""
  graphdef: nnx.GraphDef
  cfg: TrainConfig
  tx: optax.GradientTransformation
  shardings: Shardings

  def __post_init__(self):
    train_step, eval_step = make_steps(self.graphdef, self.cfg, self.tx)
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
      log.info("%s step: compiling for batch shape %s",
               kind, {n: s for n, s, _ in batch.shape_key() if n in ("input_ids", "videos")})
    batch_sh = batch_shardings(batch, self.shardings.mesh, micro)
    spec = (kind, tuple(s.spec for s in jax.tree.leaves(batch_sh)))
    if spec not in self._jitted:
      sh, rep = self.shardings, self.shardings.replicated
      donate = (0,) if kind == "train" else ()
      out = (sh.state, rep) if kind == "train" else (rep, rep)
      self._jitted[spec] = jax.jit(self._pure[kind], in_shardings=(sh.state, sh.frozen, batch_sh),
                                   out_shardings=out, donate_argnums=donate)
    return self._jitted[spec]

  def lower_train(self, state: TrainState, frozen: nnx.State, batch: TrainBatch):
    """The train step for ``batch``'s layout, lowered (for its cost analysis)."""
    with jax.set_mesh(self.shardings.mesh):
      return self._fn("train", batch).lower(state, frozen, batch)

  @property
  def train_compilations(self) -> int:
    """Batch layouts the train step has been compiled for so far."""
    return sum(1 for kind, _ in self._seen if kind == "train")

  def train(self, state: TrainState, frozen: nnx.State, batch: TrainBatch
            ) -> tuple[TrainState, dict[str, jax.Array]]:
    with jax.set_mesh(self.shardings.mesh):
      return self._fn("train", batch)(state, frozen, batch)

  def eval(self, state: TrainState, frozen: nnx.State, batch: TrainBatch
           ) -> tuple[jax.Array, jax.Array]:
    with jax.set_mesh(self.shardings.mesh):
      return self._fn("eval", batch)(state, frozen, batch)
