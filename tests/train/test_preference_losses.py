"""DPO losses against their formulas, written here in NumPy from the papers' / trl's
equations, and against trl's own DPOTrainer code (trl 1.16.0, when installed).

trl 1.16 computes its losses inside ``DPOTrainer._compute_loss``; ``trl_reference`` runs
that method on a stand-in trainer and model whose per-token log-probs sum to the given
sequence log-probs, with the reference log-probs precomputed, so every number it returns
is trl's arithmetic.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppllava_jax.train.core import losses
from ppllava_jax.train.dpo.losses import DPOConfig, dpo_loss, preference_loss

RNG = np.random.default_rng(0)
B = 6
POLICY_C, POLICY_R = RNG.normal(-40, 8, B), RNG.normal(-40, 8, B)
REF_C, REF_R = RNG.normal(-40, 8, B), RNG.normal(-40, 8, B)
COUNT_C, COUNT_R = RNG.integers(1, 30, B).astype(float), RNG.integers(1, 30, B).astype(float)


def log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def numpy_loss(
  loss_type, beta, eps, pc=POLICY_C, pr=POLICY_R, rc=REF_C, rr=REF_R, nc=COUNT_C, nr=COUNT_R
):
  """Per-pair losses from the papers' equations (DPO Eq. 7 with cDPO smoothing; IPO
  Eq. 17 on per-token log-ratios; RSO's hinge; rDPO Eq. 8)."""
  h = (pc - rc) - (pr - rr)
  if loss_type == "sigmoid":
    return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
  if loss_type == "hinge":
    return np.maximum(0.0, 1 - beta * h)
  if loss_type == "ipo":
    return ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
  return ((1 - eps) * -log_sigmoid(beta * h) - eps * -log_sigmoid(-beta * h)) / (1 - 2 * eps)


def ours(config, pc=POLICY_C, pr=POLICY_R, rc=REF_C, rr=REF_R, nc=COUNT_C, nr=COUNT_R):
  args = [jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr, nc, nr)]
  loss, metrics = preference_loss(*args, config)
  return float(loss), {k: float(v) for k, v in metrics.items()}


CASES = [
  ("sigmoid", 0.1, 0.0),
  ("sigmoid", 0.5, 0.2),
  ("hinge", 0.1, 0.0),
  ("hinge", 0.05, 0.0),
  ("ipo", 0.1, 0.0),
  ("ipo", 0.5, 0.0),
  ("robust", 0.1, 0.1),
  ("robust", 0.3, 0.0),
]


@pytest.mark.parametrize("loss_type, beta, eps", CASES)
def test_each_loss_is_its_formula(loss_type, beta, eps):
  got = dpo_loss(
    *(jnp.asarray(x, jnp.float32) for x in (POLICY_C, POLICY_R, REF_C, REF_R)),
    loss_type=loss_type,
    beta=beta,
    label_smoothing=eps,
    chosen_count_b=jnp.asarray(COUNT_C),
    rejected_count_b=jnp.asarray(COUNT_R),
  )
  np.testing.assert_allclose(got, numpy_loss(loss_type, beta, eps), rtol=2e-5, atol=1e-6)
  loss, _ = ours(DPOConfig(loss_type, beta, eps))
  np.testing.assert_allclose(loss, numpy_loss(loss_type, beta, eps).mean(), rtol=2e-5)


def test_metrics_are_the_rewards_and_logps_batch_means():
  beta = 0.2
  _, m = ours(DPOConfig(beta=beta))
  chosen, rejected = beta * (POLICY_C - REF_C), beta * (POLICY_R - REF_R)
  want = {
    "rewards/chosen": chosen.mean(),
    "rewards/rejected": rejected.mean(),
    "rewards/accuracies": (chosen > rejected).mean(),
    "rewards/margins": (chosen - rejected).mean(),
    "logps/chosen": POLICY_C.mean(),
    "logps/rejected": POLICY_R.mean(),
    "ref_logps/chosen": REF_C.mean(),
    "ref_logps/rejected": REF_R.mean(),
    "losses/dpo": numpy_loss("sigmoid", beta, 0.0).mean(),
    "losses/sft": -POLICY_C.sum() / COUNT_C.sum(),
  }
  want["losses/total"] = want["losses/dpo"]
  assert set(m) == set(want)
  for name, value in want.items():
    np.testing.assert_allclose(m[name], value, rtol=2e-5, err_msg=name)
  assert 0 < m["rewards/accuracies"] < 1  # the draw has pairs both ways


def test_the_sft_term_is_the_chosen_token_mean_cross_entropy_times_gamma():
  loss, m = ours(DPOConfig(beta=0.1, gamma=0.25))
  sft = -POLICY_C.sum() / COUNT_C.sum()
  np.testing.assert_allclose(m["losses/sft"], sft, rtol=2e-5)
  np.testing.assert_allclose(loss, numpy_loss("sigmoid", 0.1, 0.0).mean() + 0.25 * sft, rtol=2e-5)
  assert m["losses/total"] == loss


def test_identical_reference_gives_ln2_and_zero_rewards():
  """The first step of DPO from the SFT model: policy == reference."""
  loss, m = ours(DPOConfig(), rc=POLICY_C, rr=POLICY_R)
  np.testing.assert_allclose(loss, math.log(2), rtol=1e-6)
  for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
    assert m[name] == 0.0, name


def test_identical_reference_through_sequence_logprobs():
  """From hidden states: one model as policy and reference gives ln 2 and a gradient
  that pushes the chosen rows up and the rejected down."""
  b, l, d, v = 2, 7, 8, 11
  key_x, key_w, key_t = jax.random.split(jax.random.key(0), 3)
  hidden_bld = jax.random.normal(key_x, (2 * b, l, d))
  head_dv = jax.random.normal(key_w, (d, v))
  ids_bl = jax.random.randint(key_t, (2 * b, l), 0, v)
  labels_bl = jnp.where(jnp.arange(l) >= 4, ids_bl, losses.IGNORE)  # the last 3: the completion

  def objective(head_dv, ref_head_dv):
    logp_b, count_b = losses.sequence_logprobs(hidden_bld, head_dv, labels_bl, chunk=3)
    ref_b, _ = losses.sequence_logprobs(hidden_bld, ref_head_dv, labels_bl, chunk=3)
    return preference_loss(
      logp_b[:b], logp_b[b:], ref_b[:b], ref_b[b:], count_b[:b], count_b[b:], DPOConfig()
    )

  (loss, m), grad_dv = jax.value_and_grad(objective, has_aux=True)(head_dv, head_dv)
  np.testing.assert_allclose(loss, math.log(2), rtol=1e-6)
  assert m["rewards/margins"] == 0.0
  assert jnp.abs(grad_dv).max() > 0
  step = head_dv - 0.1 * grad_dv
  _, after = objective(step, head_dv)
  assert after["rewards/margins"] > 0 and after["losses/dpo"] < math.log(2)


def test_the_reference_gets_no_gradient():
  args = [jnp.asarray(x, jnp.float32) for x in (POLICY_C, POLICY_R, REF_C, REF_R, COUNT_C, COUNT_R)]
  grads = jax.grad(lambda *a: preference_loss(*a, DPOConfig("ipo"))[0], argnums=(0, 2, 3))(*args)
  assert jnp.abs(grads[0]).max() > 0
  assert not jnp.any(grads[1]) and not jnp.any(grads[2])


def test_jit_with_the_config_closed_over():
  cfg = DPOConfig("robust", 0.1, 0.1)
  args = [jnp.asarray(x, jnp.float32) for x in (POLICY_C, POLICY_R, REF_C, REF_R, COUNT_C, COUNT_R)]
  loss, _ = jax.jit(lambda *a: preference_loss(*a, cfg))(*args)
  np.testing.assert_allclose(loss, numpy_loss("robust", 0.1, 0.1).mean(), rtol=2e-5)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(loss_type="kto_pair"), "loss_type must be one of"),
    (dict(beta=0.0), "beta must be > 0"),
    (dict(gamma=-1.0), "gamma >= 0"),
    (dict(loss_type="hinge", label_smoothing=0.1), r"'hinge' must be in \{0\}"),
    (dict(loss_type="ipo", label_smoothing=0.1), r"'ipo' must be in \{0\}"),
    (dict(loss_type="robust", label_smoothing=0.5), r"\[0, 0.5\)"),
    (dict(label_smoothing=0.6), r"\[0, 0.5\]"),
  ],
)
def test_config_rejects_settings_that_would_be_ignored_or_undefined(kwargs, match):
  with pytest.raises(ValueError, match=match):
    DPOConfig(**kwargs)


# ---- trl itself ---------------------------------------------------------------------


def trl_reference(
  loss_type, beta, eps, pc=POLICY_C, pr=POLICY_R, rc=REF_C, rr=REF_R, nc=COUNT_C, nr=COUNT_R
):
  """(loss, metrics) of trl 1.16's ``DPOTrainer._compute_loss`` on these log-probs."""
  torch = pytest.importorskip("torch")
  trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
  counts = np.concatenate([nc, nr]).astype(int)
  rows, length = len(counts), int(counts.max()) + 2
  # completion tokens at positions 1..n; the per-token log-probs (shifted: position i
  # predicts i + 1) put each row's whole sum on its first completion token
  completion_mask = torch.zeros(rows, length, dtype=torch.long)
  log_probs = torch.zeros(rows, length - 1, dtype=torch.float64)
  for i, n in enumerate(counts):
    completion_mask[i, 1 : 1 + n] = 1
  log_probs[:, 0] = torch.tensor(np.concatenate([pc, pr]))
  zeros = torch.zeros(rows, length - 1, dtype=torch.float64)
  outputs = SimpleNamespace(
    log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
  )
  gather = lambda x: x
  trainer = SimpleNamespace(
    model=SimpleNamespace(training=True),
    aux_loss_enabled=False,
    ld_alpha=None,
    precompute_ref_logps=True,
    f_divergence_type="reverse_kl",
    loss_types=[loss_type],
    loss_weights=[1.0],
    beta=beta,
    label_smoothing=eps,
    use_weighting=False,
    accelerator=SimpleNamespace(device="cpu", gather=gather, gather_for_metrics=gather),
    _metrics=defaultdict(lambda: defaultdict(list)),
    _total_train_tokens=0,
    _tp_size=1,
  )
  inputs = dict(
    input_ids=torch.zeros(rows, length, dtype=torch.long),
    attention_mask=torch.ones(rows, length, dtype=torch.long),
    completion_mask=completion_mask,
    ref_chosen_logps=torch.tensor(rc),
    ref_rejected_logps=torch.tensor(rr),
  )
  loss = trl_dpo.DPOTrainer._compute_loss(trainer, lambda **_: outputs, inputs, False)
  return float(loss), {k: v[0] for k, v in trainer._metrics["train"].items()}


TRL_CASES = [c for c in CASES if not (c[0] == "sigmoid" and c[2])]  # trl 1.16: no smoothed sigmoid


@pytest.mark.parametrize("loss_type, beta, eps", TRL_CASES)
def test_against_trl(loss_type, beta, eps):
  want_loss, want = trl_reference(loss_type, beta, eps)
  loss, got = ours(DPOConfig(loss_type, beta, eps))
  np.testing.assert_allclose(loss, want_loss, rtol=2e-5)
  for name in (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
  ):
    np.testing.assert_allclose(got[name], want[name], rtol=2e-5, atol=1e-6, err_msg=name)


def test_against_trl_with_an_identical_reference():
  want_loss, want = trl_reference("sigmoid", 0.1, 0.0, rc=POLICY_C, rr=POLICY_R)
  assert want_loss == pytest.approx(math.log(2)) and want["rewards/margins"] == 0.0
