"""train.dpo.objective on a tiny PPLLaVA (``models.tiny.build_tiny``), against independent
references.

References, none of them values the code under test produced:

- the completion log-probs: transformers' ``LlamaForCausalLM`` holding our LLM's weights
  (``CausalLM.save_pretrained``), fed our merged embeddings as ``inputs_embeds``, with the
  summed log-softmax of the shifted supervised labels taken in torch float32; the
  embeddings themselves are checked against a NumPy assembly of the token table and the
  pair's media tokens; the token counts against the completions' lengths;
- the first step against an identical reference: ln 2 and zero rewards, by the DPO formula;
- the vision tower's calls, counted while the train step is traced;
- gradient accumulation, padding pairs, the cached reference: the same step computed
  another way (one batch, fewer pairs, a live reference) must give the same numbers;
- training on one batch: the loss falls and the chosen rewards overtake the rejected.

Pairs are hand-built (``support.pairs``): random ids around a video's 8 placeholders,
completions of different lengths.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from support.pairs import make_pair, pair_batch

from ppllava_jax.data.batching import IGNORE
from ppllava_jax.data.sft.batches import BatchConfig, collate
from ppllava_jax.data.sft.samples import Sample
from ppllava_jax.data.text.tokenizer import char_tokenizer
from ppllava_jax.models.ppllava import PPLLaVA
from ppllava_jax.models.tiny import TinyConfig, build_tiny
from ppllava_jax.train.core.config import MeshConfig, OptimConfig, TrainConfig
from ppllava_jax.train.core.inputs import embed_batch, embed_pairs, pair_media
from ppllava_jax.train.core.partition import DPO, VICUNA_SFT, partition, path_name
from ppllava_jax.train.core.step import Steps, make_gradients, stack_micro_batches
from ppllava_jax.train.dpo.losses import DPOConfig
from ppllava_jax.train.dpo.objective import (
  DPOConstants,
  PreferenceObjective,
  check_trainable,
  pair_logps,
  reference_copy,
  reference_logps,
)
from ppllava_jax.train.run.assembly import assemble, materialize

VOCAB = len(char_tokenizer())
# 84-pixel frames of 14-pixel patches: a 6 x 6 grid, pooled (1, 3, 3) to 2 x 2 a frame, so a
# 2-frame video is 8 tokens
TINY = TinyConfig(
  frames=2,
  image_size=84,
  patch_size=14,
  vision_width=32,
  vision_layers=1,
  llm_width=64,
  llm_layers=1,
  text_width=32,
  text_layers=1,
  kernel=(1, 3, 3),
)
FRAMES, SCORER, LENGTH = 2, 16, 40
# (prompt text ids, chosen tokens, rejected tokens): every count differs
SHAPES = ((6, 3, 9), (10, 7, 2), (4, 5, 8), (8, 1, 6))
TC = TrainConfig(
  optim=OptimConfig(lr=1e-3, schedule="constant", warmup_ratio=0.0, total_steps=10, clip_norm=1.0),
  mesh=MeshConfig(1, 1, 1),
  trainable=DPO,
)
CHUNK = 16  # the parity test's logits chunks: 3 a row, the last one padded
LN2 = math.log(2.0)


CFG = TINY.model_config(VOCAB)


def batch_of(samples, size, length=LENGTH, ref_logps=None):
  return pair_batch(samples, CFG, size, length, FRAMES, SCORER, ref_logps)


@pytest.fixture(scope="module")
def run():
  """The tiny model, its DPO partition on one device, the pairs and their batches."""
  model = build_tiny(TINY, VOCAB)
  a = assemble(model, dataclasses.replace(TC, trainable=DPO), devices=jax.devices()[:1])
  state, frozen = materialize(a, model)
  part, tx, graphdef, shardings = a.partition, a.tx, a.graphdef, a.shardings
  rng = np.random.default_rng(0)
  pairs = [make_pair(rng, CFG, FRAMES, *shape, scorer_length=SCORER) for shape in SHAPES]
  keys = iter(jax.random.split(jax.random.key(7), len(jax.tree.leaves(state.params))))
  # a reference other than the policy, so that log-ratios, rewards and accuracies are not 0
  moved = jax.tree.map(
    lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), state.params
  )
  return dict(
    model=model,
    part=part,
    tx=tx,
    graphdef=graphdef,
    start=jax.device_get(state),
    params=state.params,
    frozen=frozen,
    shardings=shardings,
    pairs=pairs,
    batch4=batch_of(pairs, 4),
    batch3=batch_of(pairs[:3], 3),
    moved=reference_copy(moved, jnp.float32, shardings.state.params),
  )


def fresh(run):
  """The initial state on the mesh (the train step donates its state)."""
  return jax.device_put(run["start"], run["shardings"].state)


@functools.cache
def jitted_gradients(graphdef, config: DPOConfig, grad_accum: int = 1):
  return jax.jit(make_gradients(PreferenceObjective(graphdef, TC, config), grad_accum))


def gradients(run, constants, batch, config=DPOConfig(), grad_accum=1):
  grads, loss, metrics = jitted_gradients(run["graphdef"], config, grad_accum)(
    run["params"], constants, batch, jax.random.key(0)
  )
  flat = {path_name(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
  return flat, float(loss), {k: float(v) for k, v in jax.device_get(metrics).items()}


@functools.cache
def jitted_reference(graphdef):
  return jax.jit(functools.partial(reference_logps, graphdef, TC))


def cached(run, batch, params=None):
  """``batch`` with the reference log-probs of ``params`` (default: the policy's)."""
  logps = jitted_reference(run["graphdef"])(
    run["params"] if params is None else params, run["frozen"], batch
  )
  return batch.replace(ref_logps=np.asarray(logps))


def assert_same_step(got, want, tol):
  """Two ``gradients`` results agree: loss, every metric and every gradient."""
  (g_grads, g_loss, g_metrics), (w_grads, w_loss, w_metrics) = got, want
  np.testing.assert_allclose(g_loss, w_loss, rtol=tol, atol=tol)
  assert g_metrics.keys() == w_metrics.keys()
  for name in w_metrics:
    np.testing.assert_allclose(g_metrics[name], w_metrics[name], rtol=tol, atol=tol, err_msg=name)
  assert g_grads.keys() == w_grads.keys()
  scale = max(np.abs(w).max() for w in w_grads.values())
  assert scale > 0
  for name in w_grads:
    np.testing.assert_allclose(
      g_grads[name], w_grads[name], rtol=tol, atol=tol * scale, err_msg=name
    )


# ---- log-probs against transformers --------------------------------------------------------


@nnx.jit
def forward(model, batch):
  """(media tokens, merged embeddings, pair_logps) of ``batch`` under ``model``."""
  media_bnd = pair_media(model, batch)
  return (
    media_bnd,
    embed_pairs(model, batch, media_bnd),
    pair_logps(model, batch, media_bnd, chunk=CHUNK),
  )


def torch_logps(hf, emb_bld, batch):
  """Summed log-softmax of each row's shifted supervised labels, and their count."""
  with torch.no_grad():
    logits = hf(
      inputs_embeds=torch.from_numpy(np.array(emb_bld)),
      attention_mask=torch.from_numpy(np.asarray(batch.attention_mask)).long(),
      position_ids=torch.from_numpy(np.asarray(batch.position_ids)).long(),
    ).logits
  logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
  targets = torch.from_numpy(np.asarray(batch.labels)[:, 1:]).long()
  keep = targets != IGNORE
  picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
  return (picked * keep).sum(1).numpy(), keep.sum(1).numpy()


def test_pair_logps_match_transformers_on_the_same_weights(run, tmp_path):
  from transformers import LlamaForCausalLM

  model, batch = run["model"], run["batch3"]
  model.eval()
  media_bnd, emb_bld, (got, counts) = jax.device_get(forward(model, batch))
  assert media_bnd.shape == (3, CFG.video_tokens(FRAMES), CFG.text.hidden_size)
  # the embeddings: the token table's rows, and pair i's media tokens in both of its rows
  table = np.asarray(model.language_model.model.embed_tokens.weight[...])
  for r, ids in enumerate(np.asarray(batch.input_ids)):
    video = ids == CFG.video_token_index
    assert video.sum() == CFG.video_tokens(FRAMES)
    np.testing.assert_array_equal(emb_bld[r][~video], table[ids[~video]])
    np.testing.assert_array_equal(emb_bld[r][video], media_bnd[r // 2])
  hf = LlamaForCausalLM.from_pretrained(
    model.language_model.save_pretrained(tmp_path / "llm"),
    dtype=torch.float32,
    attn_implementation="eager",
  ).eval()
  want, want_counts = torch_logps(hf, emb_bld, batch)
  lengths = [
    len(getattr(x, side)) for x in run["pairs"][:3] for side in ("chosen_ids", "rejected_ids")
  ]
  np.testing.assert_array_equal(want_counts, lengths)  # the completions and their eos
  np.testing.assert_array_equal(counts, want_counts)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  assert len(set(np.round(want, 3))) == 6  # six different rows


# ---- the first step against an identical reference ----------------------------------------


def assert_first_step(m):
  np.testing.assert_allclose(m["loss"], LN2, rtol=0, atol=1e-6)
  for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
    np.testing.assert_allclose(m[name], 0.0, atol=1e-6, err_msg=name)
  assert m["pairs"] == 4 and m["skipped"] == 0
  assert m["chosen_tokens"] == sum(c for _, c, _ in SHAPES)
  assert m["tokens"] == sum(c + r for _, c, r in SHAPES)


@pytest.fixture(scope="module")
def live_steps(run):
  """The jitted DPO steps (sigmoid, beta 0.1) with a live reference."""
  objective = PreferenceObjective(run["graphdef"], TC, DPOConfig())
  sh = run["shardings"]
  return Steps(
    run["graphdef"], TC, run["tx"], sh, objective, DPOConstants(sh.frozen, sh.state.params)
  )


def test_first_step_with_an_identical_reference_is_ln2(run, live_steps):
  live = DPOConstants(
    run["frozen"], reference_copy(run["params"], jnp.float32, run["shardings"].state.params)
  )
  _, m = live_steps.train(fresh(run), live, run["batch4"])
  assert_first_step(jax.device_get(m))
  # cached: the step's gradients function (make_steps' own) with ref_logps in the batch
  _, loss, m = gradients(run, DPOConstants(run["frozen"], None), cached(run, run["batch4"]))
  assert_first_step(dict(m, loss=loss, skipped=0))


# ---- the vision tower runs once per pair ---------------------------------------------------


@pytest.fixture
def tower_calls(monkeypatch):
  calls = []
  original = PPLLaVA.patch_features

  def counted(self, frames_btchw, rngs=None):
    calls.append(tuple(frames_btchw.shape))
    return original(self, frames_btchw, rngs)

  monkeypatch.setattr(PPLLaVA, "patch_features", counted)
  return calls


def test_vision_tower_runs_once_per_pair(run, live_steps, tower_calls):
  sh = run["shardings"]
  steps = Steps(
    run["graphdef"],
    TC,
    run["tx"],
    sh,
    live_steps.objective,
    DPOConstants(sh.frozen, sh.state.params),
  )  # a new jit: traced afresh
  live = DPOConstants(run["frozen"], run["params"])
  steps.lower_train(fresh(run), live, run["batch4"])
  assert steps.traces["train"] == 1
  # policy and reference, forward and backward: one call, on the 4 videos of the 4 pairs
  assert tower_calls == [(4, FRAMES, 3, TINY.image_size, TINY.image_size)]


def test_duplicated_rows_would_run_it_on_2b_videos(run, tower_calls):
  """The contrast: the 4 pairs as 8 SFT rows with a video slot each, the original's form."""
  samples = []
  for x in run["pairs"]:
    for side in ("chosen", "rejected"):
      ids, labels = x.row(side)
      s = Sample(ids, labels, np.ones(len(ids), np.int32), x.scorer_ids, x.scorer_mask, "video")
      s.video = x.video
      samples.append(s)
  layout = BatchConfig(
    batch_size=8,
    seq_buckets=(LENGTH,),
    video_slots=8,
    image_slots=0,
    multi_image_slots=0,
    num_frames=FRAMES,
    max_pictures=1,
  )
  batch = collate(samples, CFG, layout, scorer_length=SCORER)
  jax.eval_shape(lambda b: embed_batch(run["model"], b), batch)
  assert tower_calls == [(8, FRAMES, 3, TINY.image_size, TINY.image_size)]


# ---- accumulation, padding pairs, cached references ----------------------------------------


# IPO normalises each row's log-ratio by its token count, gamma's SFT term by the step's chosen
# tokens, the mean by its pairs: each micro-batch must see the whole step's denominators
ACCUM = DPOConfig("ipo", beta=0.5, gamma=0.5)


def test_two_micro_batches_equal_one_batch(run):
  constants = DPOConstants(run["frozen"], run["moved"])
  pairs = run["pairs"]
  whole = gradients(run, constants, run["batch4"], ACCUM)
  micro = stack_micro_batches([batch_of(pairs[:2], 2), batch_of(pairs[2:], 2)])
  assert micro.input_ids.shape == (2, 4, LENGTH)
  assert_same_step(gradients(run, constants, micro, ACCUM, grad_accum=2), whole, 1e-5)
  m = whole[2]
  assert m["pairs"] == 4 and m["chosen_tokens"] == sum(c for _, c, _ in SHAPES)
  assert m["losses/sft"] > 0 and m["losses/total"] > m["losses/dpo"]
  assert 0 < m["rewards/accuracies"] < 1  # the moved reference: the pairs disagree
  # the halves' chosen tokens differ (10 and 6): per-micro-batch means would weigh them unequally
  assert sum(c for _, c, _ in SHAPES[:2]) != sum(c for _, c, _ in SHAPES[2:])


def test_micro_batches_of_different_lengths_are_padded_to_one(run):
  pairs = run["pairs"]
  micro = stack_micro_batches([batch_of(pairs[:2], 2, length=32), batch_of(pairs[2:], 2)])
  assert micro.input_ids.shape == (2, 4, LENGTH)
  constants = DPOConstants(run["frozen"], run["moved"])
  assert_same_step(
    gradients(run, constants, micro, ACCUM, grad_accum=2),
    gradients(run, constants, run["batch4"], ACCUM),
    1e-5,
  )


def test_an_empty_pair_changes_nothing(run):
  constants = DPOConstants(run["frozen"], run["moved"])
  padded = batch_of(run["pairs"][:3] + [None], 4)
  assert padded.pair_mask.tolist() == [True, True, True, False]
  assert_same_step(
    gradients(run, constants, padded), gradients(run, constants, run["batch3"]), 1e-5
  )


def test_a_batch_without_pairs_is_a_skipped_update(run, live_steps):
  empty = batch_of([], 4)
  assert empty.input_ids.shape == run["batch4"].input_ids.shape  # the compiled step's shapes
  state = fresh(run)
  before = jax.device_get(state)
  live = DPOConstants(run["frozen"], run["params"])
  new, m = live_steps.train(state, live, empty)
  new, m = jax.device_get((new, m))
  assert m["skipped"] == 1 and m["pairs"] == 0 and m["update_norm"] == 0
  assert int(new.step) == int(before.step) and int(new.skipped) == int(before.skipped) + 1
  for a, b in zip(
    jax.tree.leaves((new.params, new.opt_state, new.rng)),
    jax.tree.leaves((before.params, before.opt_state, before.rng)),
  ):
    assert np.array_equal(a, b)


def test_a_cached_reference_equals_a_live_one(run):
  live = gradients(run, DPOConstants(run["frozen"], run["moved"]), run["batch4"])
  batch = cached(run, run["batch4"], run["moved"])
  got = gradients(run, DPOConstants(run["frozen"], None), batch)
  assert_same_step(got, live, 1e-6)
  assert abs(live[1] - LN2) > 1e-2  # the moved reference makes a real difference


def test_a_bfloat16_reference_starts_near_ln2(run):
  reference = reference_copy(run["params"], jnp.bfloat16, run["shardings"].state.params)
  assert {x.dtype for x in jax.tree.leaves(reference)} == {jnp.dtype(jnp.bfloat16)}
  _, loss, m = gradients(run, DPOConstants(run["frozen"], reference), run["batch4"])
  assert np.isfinite(loss) and abs(loss - LN2) < 1e-2
  assert abs(m["rewards/margins"]) < 0.2


# ---- what may train ------------------------------------------------------------------------


def test_check_trainable_refuses_more_than_the_llm(run):
  with pytest.raises(ValueError, match=r"image_newline.*multi_modal_projector/linear_1/bias"):
    check_trainable(partition(run["model"], VICUNA_SFT))
  check_trainable(run["part"])  # the DPO preset
  assert run["part"].trainable and all(
    p.startswith("language_model/") for p in run["part"].trainable
  )


# ---- training on one batch -----------------------------------------------------------------


def test_training_raises_the_margins(run, live_steps):
  live = DPOConstants(
    run["frozen"], reference_copy(run["params"], jnp.float32, run["shardings"].state.params)
  )
  state, history = fresh(run), []
  for _ in range(10):
    state, m = live_steps.train(state, live, run["batch4"])
    history.append(jax.device_get(m))
  losses = [float(m["loss"]) for m in history]
  margins = [float(m["rewards/margins"]) for m in history]
  assert losses[0] == pytest.approx(LN2, abs=1e-6)
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  assert all(b > a for a, b in zip(margins, margins[1:])), margins
  assert margins[-1] > 0 and history[-1]["rewards/accuracies"] == 1
  assert int(jax.device_get(state).step) == 10
