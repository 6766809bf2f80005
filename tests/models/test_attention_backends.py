"""models.attention's cuDNN and Pallas implementations against its XLA path.

The XLA path is the reference (``test_attention.py`` holds it to float64 NumPy). Pallas
runs everywhere as "pallas_interpret", the splash kernel itself in Pallas' interpret mode;
"pallas" (compiled by Mosaic) only on a TPU and "cudnn" only on a CUDA GPU, skipped elsewhere
with the platform named. Where no GPU is, the mask mapping the cuDNN path uses is checked
through ``jax.nn.dot_product_attention``'s own XLA implementation (same call, other kernel).

Every row is compared, rows that may attend no key included: each implementation gives
them the mean of v, as the XLA path does (``attention._uniform_rows``). Bounds in f32:
1e-5 on outputs and gradients (measured here: under 3e-6, values of order 1-6); compiled
on a TPU 1e-2, since f32 matmuls there default to bfloat16 passes in both paths; bf16
(cuDNN): 2^-6, one bf16 rounding of the probabilities and of the output beside the f32
reference. The TPU and GPU bounds have not been run yet.
"""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import backend as jax_backend

from ppllava_jax.models import attention as attn
from ppllava_jax.models.attention import Mask, attention
from ppllava_jax.models.tiny import TinyConfig, build_tiny
from ppllava_jax.train.core.config import MeshConfig, TrainConfig
from ppllava_jax.train.core.state import make_mesh
from ppllava_jax.train.core.step import merged

PLATFORM = attn._platform()  # "cuda" / "rocm" where JAX says "gpu"
B, L, N, K, A = 2, 37, 4, 2, 16  # GQA: 2 query heads per kv head; L pads to 128 in splash
ATOL = {"pallas_interpret": 1e-5, "pallas": 1e-2}  # f32 (module doc)


def needs(implementation: str) -> None:
  """Skips, naming what is missing, where ``implementation``'s platform is absent."""
  want, what = {"cudnn": ("cuda", "an NVIDIA (CUDA) GPU"), "pallas": ("tpu", "a TPU")}.get(
    implementation, (PLATFORM, "")
  )
  if PLATFORM != want:
    pytest.skip(
      f"attention implementation {implementation!r} needs {what}; this platform is {PLATFORM!r}"
    )


def qkv(l=L, s=L, n=N, k=K, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return (
    rng.standard_normal((B, l, n, A)).astype(dtype),
    rng.standard_normal((B, s, k, A)).astype(dtype),
    rng.standard_normal((B, s, k, A)).astype(dtype),
  )


def padding(pads, s=L, left=True):
  """(B, S) key validity: row i padded by pads[i] slots on the left (or right)."""
  slot = np.arange(s)[None] if left else (s - 1 - np.arange(s))[None]
  return slot >= np.asarray(pads)[:, None]


def segments():
  """Two packed sequences per row, then padding (segment 0, not valid)."""
  seg_bl = np.zeros((B, L), np.int32)
  seg_bl[0, :20], seg_bl[0, 20:30] = 1, 2
  seg_bl[1, :9], seg_bl[1, 9:37] = 1, 2
  return Mask(valid_bs=seg_bl > 0, q_segment_bl=seg_bl, kv_segment_bs=seg_bl, causal=True)


CASES = {  # name: (mask, L, S); left padding leaves rows with no key at all
  "causal, left padding": (Mask(valid_bs=padding([0, 12]), causal=True), L, L),
  "causal, right padding": (Mask(valid_bs=padding([5, 0], left=False), causal=True), L, L),
  "padding, bidirectional": (Mask(valid_bs=padding([0, 30])), L, L),
  "packed segments, causal, padding": (segments(), L, L),
  "no mask, few queries over more keys": (None, 3, 45),
}


@functools.cache
def jitted(implementation: str):
  """attention(q, k, v, mask) through ``implementation``, jitted once: cases of one mask
  structure and shape share a compilation (splash's interpreted kernels are slow to build)."""
  return jax.jit(functools.partial(attention, implementation=implementation))


@functools.cache
def jitted_grad(implementation: str):
  """d(sum(out * cot))/d(q, k, v)."""
  loss = lambda q, k, v, m, cot: jnp.sum(attention(q, k, v, m, implementation=implementation) * cot)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def assert_close(got, want, atol, what=""):
  np.testing.assert_allclose(
    np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=0, atol=atol, err_msg=what
  )


def test_mask_dense_is_the_structure():
  """``Mask.dense`` against loops over its definition, a cache's first slot included."""
  seg = segments()
  valid = padding([3, 0], s=9)
  for mask, l, start in [
    (seg, L, 0),
    (Mask(valid_bs=valid, q_start=jnp.asarray(4), causal=True), 2, 4),
  ]:
    got = np.asarray(mask.dense(l))
    want = np.zeros(got.shape, bool)
    for b, i in np.ndindex(*got.shape[:2]):  # query i of row b, over every key slot j
      j = np.arange(got.shape[2])
      same = True if mask.q_segment_bl is None else mask.q_segment_bl[b, i] == mask.kv_segment_bs[b]
      want[b, i] = mask.valid_bs[b] & (j <= start + i) & same
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("implementation", ["pallas_interpret", "pallas"])
@pytest.mark.parametrize("case", CASES)
def test_pallas_matches_xla(case, implementation):
  needs(implementation)
  mask, l, s = CASES[case]
  q, k, v = qkv(l, s)
  got = jitted(implementation)(q, k, v, mask)
  assert got.shape == q.shape and got.dtype == jnp.float32
  assert_close(got, attention(q, k, v, mask), ATOL[implementation])


@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["pallas_interpret", "pallas"])
@pytest.mark.parametrize("case", ["causal, left padding", "packed segments, causal, padding"])
def test_pallas_gradients_match_xla(case, implementation):
  """Splash's own backward against the XLA path's (FlashAttention-2's, itself against
  autodiff of the dense formulation), rows with no key included."""
  needs(implementation)
  mask, l, s = CASES[case]
  q, k, v = qkv(l, s, seed=1)
  cot = np.random.default_rng(2).standard_normal(q.shape).astype(np.float32)
  got = jitted_grad(implementation)(q, k, v, mask, cot)
  want = jitted_grad("xla")(q, k, v, mask, cot)
  for name, g, w in zip("qkv", got, want):
    assert_close(g, w, ATOL[implementation], name)


def mapped(q, k, v, mask):
  """The cuDNN path's call (dense mask, is_causal where it applies, GQA, rows with no key)
  through jax.nn.dot_product_attention's XLA implementation."""
  return attn._dot_product(q, k, v, mask, "xla")


@pytest.mark.parametrize("case", CASES)
def test_cudnn_mask_mapping_matches_xla(case):
  mask, l, s = CASES[case]
  q, k, v = qkv(l, s, seed=2)
  assert_close(jax.jit(mapped)(q, k, v, mask), attention(q, k, v, mask), 1e-5)


@pytest.mark.parametrize("case", ["causal, left padding", "packed segments, causal, padding"])
def test_cudnn_mask_mapping_gradients_match_xla(case):
  mask, l, s = CASES[case]
  q, k, v = qkv(l, s, seed=3)
  cot = np.random.default_rng(4).standard_normal(q.shape).astype(np.float32)
  grad = lambda fn: jax.jit(
    jax.grad(lambda q, k, v, m: jnp.sum(fn(q, k, v, m) * cot), argnums=(0, 1, 2))
  )(q, k, v, mask)
  for name, g, w in zip("qkv", grad(mapped), grad(attention)):
    assert_close(g, w, 1e-5, name)


@pytest.mark.parametrize("case", CASES)
def test_cudnn_matches_xla(case):
  """cuDNN in bf16 against the XLA path in f32 on the same (bf16-rounded) inputs."""
  needs("cudnn")
  mask, l, s = CASES[case]
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in qkv(l, s, seed=4))
  got = jitted("cudnn")(q, k, v, mask)
  assert got.dtype == jnp.bfloat16
  assert_close(got, attention(*(x.astype(jnp.float32) for x in (q, k, v)), mask), 2**-6)


def test_unavailable_platform_names_implementation_and_platform():
  q, k, v = qkv()
  for implementation, platform in [("cudnn", "cuda"), ("pallas", "tpu")]:
    if PLATFORM == platform:
      continue
    with pytest.raises(RuntimeError, match=rf"'{implementation}' needs .*'{PLATFORM}'"):
      attention(q, k, v, implementation=implementation)
  with pytest.raises(ValueError, match="'flash' is not one of"):
    attention(q, k, v, implementation="flash")


@pytest.mark.parametrize(
  "version, found",
  [
    ("PJRT C API\ncuda 12080", "cuda"),
    ("PJRT C API\nrocm 60302", "rocm"),
    ("PJRT C API\nsomething else", "gpu"),
  ],
)
def test_cudnn_needs_cuda_not_any_gpu(monkeypatch, version, found):
  """JAX names ROCm GPUs "gpu" as well; only CUDA has cuDNN (the backend's
  platform_version tells them apart, as in JAX's own cuDNN attention)."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(
    jax_backend, "get_backend", lambda: types.SimpleNamespace(platform_version=version)
  )
  assert attn._platform() == found
  if found != "cuda":
    q, k, v = qkv()
    with pytest.raises(
      RuntimeError,
      match=rf"'cudnn' needs an NVIDIA GPU \(CUDA, for cuDNN\); "
      rf"JAX's platform here is '{found}' .*use 'xla'",
    ):
      attention(q, k, v, implementation="cudnn")


def test_pallas_is_refused_on_a_mesh_of_several_devices():
  """The splash kernel is not wrapped in shard_map, so Mosaic cannot be partitioned: refused
  by check_attention, by TrainConfig for fixed mesh sizes and when traced under a mesh."""
  attn.check_attention("pallas", 1)
  attn.check_attention("pallas_interpret", 8)  # interpreted: plain XLA ops
  attn.check_attention("xla", 8)
  refused = r"'pallas' \(splash attention\) runs on one device: the kernel is not wrapped in "
  with pytest.raises(
    ValueError,
    match=refused + r"shard_map.* over 2 devices; use 'xla', or a "
    r"1-device mesh",
  ):
    attn.check_attention("pallas", 2)
  with pytest.raises(ValueError, match=refused + r".* over 4 devices"):
    TrainConfig(attention="pallas", mesh=MeshConfig(data=-1, fsdp=2, tensor=2))
  TrainConfig(attention="pallas")  # data=-1: known at make_mesh, checked when traced
  q, k, v = qkv()
  with jax.set_mesh(make_mesh(MeshConfig(), jax.devices()[:2])):
    with pytest.raises(ValueError, match=refused + r".* over 2 devices"):
      jax.make_jaxpr(functools.partial(attention, implementation="pallas"))(q, k, v)
  with jax.set_mesh(make_mesh(MeshConfig(), jax.devices()[:1])):  # one device: on to the TPU check
    if PLATFORM != "tpu":
      with pytest.raises(RuntimeError, match="'pallas' needs a TPU"):
        jax.make_jaxpr(functools.partial(attention, implementation="pallas"))(q, k, v)


def test_masks_splash_cannot_express_are_refused():
  q, k, v = qkv()
  dense_bls = np.asarray(CASES["causal, left padding"][0].dense(L))
  with pytest.raises(ValueError, match="'pallas'.*not a dense"):
    attention(q, k, v, dense_bls, implementation="pallas_interpret")
  cached = Mask(valid_bs=padding([0, 0]), q_start=jnp.asarray(0), causal=True)
  with pytest.raises(ValueError, match="'pallas'.*traced"):
    jax.jit(lambda m: attention(q, k, v, m, implementation="pallas_interpret"))(cached)


def test_mask_shapes_are_checked():
  q, k, v = qkv()
  with pytest.raises(ValueError, match=r"Mask for B, L, S = \(2, 37, 37\)"):
    attention(q, k, v, Mask(valid_bs=np.ones((B, 5), bool)))
  seg_bl = np.ones((B, L), np.int32)
  with pytest.raises(ValueError, match="both or neither"):
    attention(q, k, v, Mask(valid_bs=np.ones((B, L), bool), q_segment_bl=seg_bl))


def test_train_config_attention_is_checked():
  with pytest.raises(ValueError, match="TrainConfig.attention must be one of"):
    TrainConfig(attention="flash")
  with pytest.raises(ValueError, match="needs compute_dtype='bfloat16'"):
    TrainConfig(attention="cudnn")
  TrainConfig(attention="cudnn", compute_dtype="bfloat16")


# ---- a whole tiny model ------------------------------------------------------------------

# 42-pixel frames of 14-pixel patches (3 x 3, pooled (1, 3, 3) to one token a frame); one
# layer per tower: the CLIP vision tower, the LLaMA decoder, the scorer's CLIP text tower
TINY = TinyConfig(
  frames=2,
  image_size=42,
  patch_size=14,
  vision_width=32,
  vision_layers=1,
  llm_width=64,
  llm_layers=1,
  text_width=32,
  text_layers=1,
  kernel=(1, 3, 3),
)
VOCAB = 40


def tiny_inputs(cfg):
  """Two samples: a video, the prompt (row 1 left-padded by 2) and the scorer's question
  (padded)."""
  rng = np.random.default_rng(0)
  ids = np.concatenate(
    [
      [1, 7, 8],
      np.full(cfg.video_tokens(TINY.frames), cfg.video_token_index),
      rng.integers(5, VOCAB, 6),
    ]
  )
  ids_bl = np.stack([ids, np.concatenate([[0, 0], ids[:-2]])]).astype(np.int32)
  clip_ids_bl = np.zeros((2, 12), np.int32)
  clip_ids_bl[0, :5], clip_ids_bl[1, :8] = [1, 9, 10, 11, 2], [1, 9, 12, 13, 14, 15, 16, 2]
  inputs = dict(
    input_ids=ids_bl,
    attention_mask=(ids_bl != 0).astype(np.int32),
    pixel_values_videos=rng.normal(size=(2, TINY.frames, 3, 42, 42)).astype(np.float32),
    clip_input_ids=clip_ids_bl,
    clip_attention_mask=(clip_ids_bl != 0).astype(np.int32),
  )
  return {k: jnp.asarray(x) for k, x in inputs.items()}


def random_tiny():
  """The tiny model with N(0, 0.5²) weights drawn in NumPy: its own initialiser compiles
  one jax.random call per parameter shape, which took most of this test's time."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: build_tiny(TINY, VOCAB)))
  rng = np.random.default_rng(0)
  return nnx.merge(
    graphdef,
    jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.5, x.shape).astype(x.dtype)), state),
  )


def logits_of(model, inputs):
  graphdef, state = nnx.split(model)
  return jax.jit(lambda state, inputs: nnx.merge(graphdef, state)(**inputs).logits)(state, inputs)


@pytest.mark.parametrize("attention", ["pallas_interpret", "xla"])
def test_train_step_model_runs_every_attention_through_the_kernel(attention):
  """``step.merged`` applies ``TrainConfig.attention`` to every tower: one splash kernel
  per attention layer in the traced forward (vision, LLM, scorer text), none under "xla".
  Traced on the model's shapes alone (nothing initialised)."""
  graphdef, params, frozen = nnx.split(
    nnx.eval_shape(lambda: build_tiny(TINY, VOCAB)), nnx.Param, ...
  )
  cfg = TrainConfig(attention=attention)
  forward = lambda params, frozen, inputs: merged(graphdef, cfg, params, frozen)(**inputs).logits
  inputs = tiny_inputs(TINY.model_config(VOCAB))
  calls = str(jax.make_jaxpr(forward)(params, frozen, inputs)).count("pallas_call")
  assert calls == (
    TINY.vision_layers + TINY.llm_layers + TINY.text_layers if attention != "xla" else 0
  )


@pytest.mark.slow
def test_tiny_model_logits_match_xla():
  """The whole forward (every tower, left padding, padded scorer text) through the
  interpreted splash kernel equals it through the XLA path: logits up to about 6 within
  2e-5 (measured 4e-6; the left padding alone moves them by 6)."""
  model = random_tiny()
  inputs = tiny_inputs(model.cfg)
  want = logits_of(model, inputs)
  got = logits_of(nnx.clone(model).set_attention("pallas_interpret"), inputs)
  assert_close(got, want, 2e-5)
