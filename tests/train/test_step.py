"""train.core.step on a tiny PPLLaVA: the loss is a plain cross-entropy over the model's logits,
frozen parameters never move, accumulation is token-weighted, the sharded step equals the
unsharded one, a non-finite batch is skipped, and the model can overfit one batch."""

import dataclasses
import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec
from support.train_data import tiny_model_config

from ppllava_jax.data.batching import IGNORE
from ppllava_jax.data.sft.batches import BatchConfig, collate
from ppllava_jax.data.sft.samples import Sample
from ppllava_jax.models.btadapter import BTAdapterConfig
from ppllava_jax.models.ppllava import PPLLaVA
from ppllava_jax.train.core.config import MeshConfig, OptimConfig, TrainConfig
from ppllava_jax.train.core.inputs import embed_batch
from ppllava_jax.train.core.optimizer import lr_schedule
from ppllava_jax.train.core.partition import VICUNA_SFT, partition, path_name
from ppllava_jax.train.core.step import make_gradients, stack_micro_batches
from ppllava_jax.train.run.assembly import assemble, materialize
from ppllava_jax.train.sft import TokenMean

IMG, SCORER = 7, 40


def make_sample(rng, cfg, kind="text", answer=3, prompt=6, frames=4):
  media = cfg.video_tokens(frames) if kind == "video" else 0
  ids = np.concatenate(
    [[1, 11], np.full(media, -1), rng.integers(10, 90, prompt), rng.integers(10, 90, answer)]
  ).astype(np.int32)
  labels = np.where(np.arange(len(ids)) >= len(ids) - answer, ids, IGNORE).astype(np.int32)
  scorer = np.concatenate([rng.integers(3, 500, 9), np.ones(SCORER - 9)]).astype(np.int32)
  s = Sample(
    ids, labels, np.ones(len(ids), np.int32), scorer, (np.arange(SCORER) < 9).astype(np.int32), kind
  )
  if kind == "video":
    s.video = rng.normal(size=(frames, 3, 24, 24)).astype(np.float32)
  return s


def batch_of(samples, cfg, rows, video_slots=0, length=32):
  layout = BatchConfig(
    batch_size=rows,
    seq_buckets=(length,),
    video_slots=video_slots,
    image_slots=0,
    multi_image_slots=0,
    num_frames=4,
    max_pictures=1,
  )
  return collate(samples, cfg, layout, scorer_length=SCORER)


def setup(model, tc, mesh_shape=(1, 1, 1)):
  """A run of ``model`` (a module, or a constructor) on a mesh of the first devices, as
  the trainer assembles one (``train.run.assembly``)."""
  model = model if isinstance(model, nnx.Module) else model()
  a = assemble(
    model,
    dataclasses.replace(tc, mesh=MeshConfig(*mesh_shape)),
    devices=jax.devices()[: int(np.prod(mesh_shape))],
  )
  state, frozen = materialize(a, model)
  return SimpleNamespace(
    part=a.partition,
    graphdef=a.graphdef,
    state=state,
    frozen=frozen,
    steps=a.steps,
    shardings=a.shardings,
  )


def flat(state):
  return {path_name(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


VIDEO_TC = TrainConfig(
  optim=OptimConfig(
    lr=1e-3, schedule="cosine", warmup_ratio=0.2, total_steps=5, weight_decay=0.01, clip_norm=1.0
  ),
  trainable=VICUNA_SFT,
)


@pytest.fixture(scope="module")
def video_run():
  """Three steps on a batch of two videos and two text rows, on one device."""
  cfg = tiny_model_config(IMG, scorer_context=SCORER)
  model = PPLLaVA(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  samples = [
    make_sample(rng, cfg, "video", answer=3),
    make_sample(rng, cfg, "text", answer=5),
    None,
    make_sample(rng, cfg, "video", answer=2),
  ]
  batch = batch_of(samples, cfg, 4, video_slots=2)
  run = setup(model, VIDEO_TC)
  state, metrics = run.state, []
  for _ in range(3):
    state, m = run.steps.train(state, run.frozen, batch)
    metrics.append(jax.device_get(m))
  return SimpleNamespace(
    cfg=cfg, model=model, batch=batch, run=run, metrics=metrics, final=jax.device_get(state)
  )


def numpy_ce(logits_blv, labels_bl):
  logits, targets = np.asarray(logits_blv, np.float64)[:, :-1], labels_bl[:, 1:]
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  keep = targets != IGNORE
  picked = np.take_along_axis(logp, np.maximum(targets, 0)[..., None], -1)[..., 0]
  return -(picked * keep).sum(), keep.sum()


@nnx.jit
def model_logits(model, batch):
  return model.language_model(
    inputs_embeds=embed_batch(model, batch),
    attention_mask=batch.attention_mask,
    position_ids=batch.position_ids,
  ).logits


def test_loss_is_cross_entropy_over_the_models_logits(video_run):
  logits = model_logits(video_run.model, jax.tree.map(jnp.asarray, video_run.batch))
  want_sum, want_count = numpy_ce(logits, video_run.batch.labels)
  assert want_count == video_run.metrics[0]["tokens"] == 3 + 5 + 2
  np.testing.assert_allclose(video_run.metrics[0]["loss"], want_sum / want_count, rtol=1e-5)


def test_frozen_parameters_never_move(video_run):
  run = video_run.run
  before = flat(nnx.state(video_run.model))
  after = flat(nnx.state(nnx.merge(run.graphdef, video_run.final.params, run.frozen)))
  assert before.keys() == after.keys()
  for name in before:
    if name in run.part.trainable:
      continue
    assert np.array_equal(before[name], after[name]), name  # bit-identical
  moved = {n for n in run.part.trainable if not np.array_equal(before[n], after[n])}
  for group in (
    "language_model/",
    "multi_modal_projector/",
    "scorer/visual_projection/",
    "scorer/text_projection/",
    "scorer/visual_ln/",
  ):
    assert any(n.startswith(group) for n in moved), group
  assert not any(n.startswith(("vision_tower/", "scorer/text_model/")) for n in run.part.trainable)
  assert int(video_run.final.step) == 3 and int(video_run.final.skipped) == 0
  assert not any(x.is_deleted() for x in jax.tree.leaves(run.frozen))  # never donated


def test_metrics_and_one_compilation(video_run):
  lrs = [float(m["lr"]) for m in video_run.metrics]
  np.testing.assert_allclose(lrs, [float(lr_schedule(VIDEO_TC.optim)(n)) for n in range(3)])
  assert lrs[0] == 0.0 and video_run.metrics[0]["update_norm"] == 0.0  # warmup starts at 0
  m = video_run.metrics[-1]
  assert m["tokens"] == 10 and m["skipped"] == 0 and m["update_norm"] > 0
  params = flat(video_run.final.params).values()
  np.testing.assert_allclose(
    m["param_norm"], np.sqrt(sum(np.sum(x.astype(np.float64) ** 2) for x in params)), rtol=1e-5
  )
  assert m["loss"] < video_run.metrics[0]["loss"]
  assert video_run.run.steps.traces["train"] == 1  # three steps, one compilation


def test_nonfinite_batch_skips_the_update(video_run):
  run = video_run.run
  state = jax.device_put(video_run.final, run.shardings.state)
  videos = np.array(video_run.batch.videos)
  videos[0, 1, 0, 3, 3] = np.nan
  bad = video_run.batch.replace(videos=videos)
  new, m = run.steps.train(state, run.frozen, bad)
  new = jax.device_get(new)
  assert not np.isfinite(m["loss"]) and m["skipped"] == 1 and m["update_norm"] == 0
  assert int(new.step) == 3 and int(new.skipped) == 1
  assert run.steps.traces["train"] == 1  # same shapes: no new compilation
  empty = video_run.batch.replace(labels=np.full_like(video_run.batch.labels, IGNORE))
  new, m = run.steps.train(jax.device_put(video_run.final, run.shardings.state), run.frozen, empty)
  assert m["tokens"] == 0 and m["loss"] == 0 and m["skipped"] == 1  # nothing supervised
  assert int(new.step) == 3 and int(new.skipped) == 1
  old = video_run.final
  for a, b in zip(
    jax.tree.leaves((new.params, new.opt_state)), jax.tree.leaves((old.params, old.opt_state))
  ):
    assert np.array_equal(a, b)


def test_sharded_step_equals_unsharded(video_run):
  # built by its constructor under jit, straight into the (2, 2, 2) shardings
  run = setup(lambda: PPLLaVA(video_run.cfg, rngs=nnx.Rngs(0)), VIDEO_TC, mesh_shape=(2, 2, 2))
  kernel = run.state.params["language_model"]["model"]["layers"][0]["mlp"]["up_proj"]["kernel"]
  assert kernel[...].sharding.spec == PartitionSpec("fsdp", "tensor")  # (embed, mlp)
  assert len(kernel[...].sharding.device_set) == 8
  mu = run.state.opt_state[1][0].mu["language_model"]["model"]["layers"][0]["mlp"]["up_proj"]
  assert mu["kernel"][...].sharding.spec == kernel[...].sharding.spec  # moments follow params
  state = run.state
  for want in video_run.metrics:
    state, m = run.steps.train(state, run.frozen, video_run.batch)
    for key in ("loss", "grad_norm", "update_norm", "param_norm"):
      np.testing.assert_allclose(m[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)
  got, want = flat(jax.device_get(state).params), flat(video_run.final.params)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_train_step_draws_drop_path_keys_per_batch():
  """BT-Adapter drop path (rate 0.5): off in the eval step; on in the train step with the
  key of the batch number, so each batch gets another loss (the update is ~0 at lr
  1e-12), and the same steps from the same state draw the same ones. Depth 3: the first
  spatial block never drops, a fresh temporal block's branch is zero and the last layer
  is past the features (layer -2), so the second spatial block's draw is the one seen."""
  cfg = tiny_model_config(IMG, scorer_context=SCORER)
  cfg = dataclasses.replace(
    cfg,
    vision=dataclasses.replace(cfg.vision, num_hidden_layers=3),
    btadapter=BTAdapterConfig(depth=3, max_T=4, drop_path_rate=0.5, temporal_drop_path_rate=0.5),
  )
  rng = np.random.default_rng(2)
  batch = batch_of(
    [make_sample(rng, cfg, "video", answer=4) for _ in range(2)], cfg, 2, video_slots=2
  )
  run = setup(
    lambda: PPLLaVA(cfg, rngs=nnx.Rngs(0)),
    TrainConfig(optim=dataclasses.replace(TEXT_OPTIM, lr=1e-12), trainable=VICUNA_SFT),
  )
  start = jax.device_get(run.state)

  def train_losses():
    state, out = jax.device_put(start, run.shardings.state), []
    for _ in range(3):
      state, m = run.steps.train(state, run.frozen, batch)
      out.append(float(m["loss"]))
    return out

  evals = [jax.device_get(run.steps.eval(run.state, run.frozen, batch)) for _ in range(2)]
  eval_loss = float(evals[0][0] / evals[0][1])
  assert float(evals[1][0] / evals[1][1]) == eval_loss
  first = train_losses()
  assert len(set(first)) == 3 and eval_loss not in first
  assert train_losses() == first


# ---- text-only runs: accumulation, remat, overfitting ------------------------------------


@pytest.fixture(scope="module")
def text_setup():
  cfg = tiny_model_config(IMG, scorer_context=SCORER, mode="average")
  model = PPLLaVA(cfg, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(1)
  # rows supervise 9, 1, 4 and 2 tokens: micro-batch means would weigh them unequally
  samples = [make_sample(rng, cfg, answer=a, prompt=p) for a, p in ((9, 4), (1, 8), (4, 3), (2, 9))]
  return SimpleNamespace(cfg=cfg, model=model, samples=samples)


_GRADIENTS = {}  # one jitted function per config, so shapes seen before do not recompile


def gradients_of(text, tc, batch):
  _, params, frozen = partition(text.model, tc.trainable).split(text.model)
  if tc not in _GRADIENTS:
    _GRADIENTS[tc] = jax.jit(
      make_gradients(TokenMean(nnx.graphdef(text.model), tc), tc.optim.grad_accum)
    )
  grads, loss, measured = _GRADIENTS[tc](params, frozen, batch, jax.random.PRNGKey(0))
  return flat(grads), float(loss), float(measured["tokens"])


TEXT_OPTIM = OptimConfig(
  lr=1e-2, schedule="constant", warmup_ratio=0.0, total_steps=10, clip_norm=None
)


def assert_trees_close(got, want, tol):
  assert got.keys() == want.keys()
  scale = max(np.abs(w).max() for w in want.values())
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=tol, atol=tol * scale, err_msg=name)


def test_accumulation_is_the_global_token_mean(text_setup):
  cfg, samples = text_setup.cfg, text_setup.samples
  whole = batch_of(samples, cfg, 4, length=24)
  parts = [batch_of(samples[:2], cfg, 2, length=24), batch_of(samples[2:], cfg, 2, length=16)]
  micro = stack_micro_batches(parts)
  assert micro.input_ids.shape == (2, 2, 24)
  want, loss1, n1 = gradients_of(text_setup, TrainConfig(optim=TEXT_OPTIM), whole)
  accum = TrainConfig(optim=dataclasses.replace(TEXT_OPTIM, grad_accum=2))
  got, loss2, n2 = gradients_of(text_setup, accum, micro)
  assert n1 == n2 == 16
  np.testing.assert_allclose(loss2, loss1, rtol=1e-6)
  assert_trees_close(got, want, 1e-6)
  # the original's reduction: the mean of the two micro-batch means (10 and 6 tokens)
  means = [
    gradients_of(text_setup, TrainConfig(optim=TEXT_OPTIM), jax.tree.map(lambda x: x[i], micro))
    for i in range(2)
  ]
  micro_mean = TrainConfig(optim=dataclasses.replace(accum.optim, accum_reduction="micro_mean"))
  got_mean, loss3, _ = gradients_of(text_setup, micro_mean, micro)
  np.testing.assert_allclose(loss3, (means[0][1] + means[1][1]) / 2, rtol=1e-6)
  assert_trees_close(got_mean, {k: (means[0][0][k] + means[1][0][k]) / 2 for k in want}, 1e-6)
  assert abs(loss3 - loss1) > 1e-3


def test_remat_gives_the_same_gradients(text_setup):
  batch = batch_of(text_setup.samples, text_setup.cfg, 4, length=24)
  want, loss, _ = gradients_of(text_setup, TrainConfig(optim=TEXT_OPTIM), batch)
  got, loss_remat, _ = gradients_of(
    text_setup, TrainConfig(optim=TEXT_OPTIM, remat="nothing_saveable"), batch
  )
  np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)  # the same forward; fusion may differ
  assert_trees_close(got, want, 1e-6)
  _, params, frozen = partition(text_setup.model, VICUNA_SFT).split(text_setup.model)
  graphdef = nnx.graphdef(text_setup.model)
  checkpoints = [
    len(
      re.findall(
        r"\b(?:remat\d*|checkpoint)\[",
        str(
          jax.make_jaxpr(make_gradients(TokenMean(graphdef, TrainConfig(remat=r))))(
            params, frozen, batch, jax.random.PRNGKey(0)
          )
        ),
      )
    )
    for r in ("none", "nothing_saveable")
  ]
  assert checkpoints[1] > checkpoints[0]  # one more per decoder layer


def test_tiny_model_overfits_one_batch_in_bfloat16(text_setup):
  batch = batch_of(text_setup.samples, text_setup.cfg, 4, length=24)
  optim = dataclasses.replace(TEXT_OPTIM, lr=3e-2, clip_norm=1.0)
  run = setup(text_setup.model, TrainConfig(optim=optim, compute_dtype="bfloat16"))
  assert all(
    x.dtype == jnp.bfloat16
    for x in jax.tree.leaves(run.frozen)
    if jnp.issubdtype(x.dtype, jnp.floating)
  )
  state, losses = run.state, []
  for _ in range(20):
    state, m = run.steps.train(state, run.frozen, batch)
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.1 * losses[0], losses
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))  # f32 masters
  total, count = jax.device_get(run.steps.eval(state, run.frozen, batch))
  assert count == 16 and total / count < 0.1 * losses[0]
