"""LLaMA / Qwen2 parity with transformers (f32): logits, cached generation, round trip,
and sharding by the logical-axis rules."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from support.hf_fixtures import assert_same_state, assert_same_tensors, left_padded, make_llm

from ppllava_jax.convert.loader import CheckpointError
from ppllava_jax.models import LlamaForCausalLM, Qwen2ForCausalLM
from ppllava_jax.models.llm import positions_from_mask
from ppllava_jax.models.sharding import shard_model

TOL = 1e-4  # float32 max-abs-diff of logits, tiny models
CLASSES = {"llama_linear": LlamaForCausalLM, "llama3": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}


@pytest.fixture(scope="module", params=list(CLASSES))
def llm_pair(request, tmp_path_factory):
  hf, path = make_llm(request.param, tmp_path_factory.mktemp(request.param))
  return request.param, hf, path, CLASSES[request.param].from_pretrained(path)


def test_logits_match_with_left_padding(llm_pair):
  _, hf, _, ours = llm_pair
  ids, mask = left_padded(64, [12, 7, 1], 12)
  positions = np.asarray(positions_from_mask(jnp.asarray(mask)))
  with torch.no_grad():
    want = hf(
      input_ids=torch.from_numpy(ids),
      attention_mask=torch.from_numpy(mask),
      position_ids=torch.from_numpy(positions).long(),
    ).logits.numpy()
  got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)).logits)
  real = mask.astype(bool)  # padded positions' logits are never read
  assert np.abs(got - want)[real].max() <= TOL


def test_greedy_generation_matches_transformers(llm_pair):
  _, hf, _, ours = llm_pair
  ids, mask = left_padded(64, [9, 5], 9, seed=1)
  with torch.no_grad():
    want = hf.generate(
      input_ids=torch.from_numpy(ids),
      attention_mask=torch.from_numpy(mask),
      max_new_tokens=20,
      do_sample=False,
      pad_token_id=0,
    ).numpy()
  got = np.asarray(ours.generate(jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=20))
  assert got.shape == (2, 29)
  n = want.shape[1]  # transformers stops early once every row emitted EOS
  np.testing.assert_array_equal(got[:, :n], want)
  assert (got[:, n:] == 0).all()


@pytest.mark.slow
def test_cached_generation_equals_no_cache_loop(llm_pair):
  _, _, _, ours = llm_pair
  ids, mask = left_padded(64, [6, 4], 6, seed=2)
  got = np.asarray(
    ours.generate(jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=5, stop_tokens=())
  )
  seq, m = jnp.asarray(ids), jnp.asarray(mask)
  for _ in range(5):  # recompute the whole sequence every step, no cache
    nxt = jnp.argmax(ours(seq, m).logits[:, -1], axis=-1)
    seq = jnp.concatenate([seq, nxt[:, None]], axis=1)
    m = jnp.concatenate([m, jnp.ones((2, 1), m.dtype)], axis=1)
  np.testing.assert_array_equal(got, np.asarray(seq))


@pytest.mark.slow
def test_bfloat16_model_keeps_a_bfloat16_cache(llm_pair):
  kind, _, path, _ = llm_pair
  ours = CLASSES[kind].from_pretrained(path, dtype=jnp.bfloat16)
  cache = ours.init_cache(2, 8)
  assert {a.dtype for a in cache.k + cache.v} == {jnp.dtype(jnp.bfloat16)}
  ids, mask = left_padded(64, [6, 4], 6, seed=2)
  got = np.asarray(
    ours.generate(jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=2, stop_tokens=())
  )
  seq, m = jnp.asarray(ids), jnp.asarray(mask)
  for _ in range(2):  # bf16 keys/values lose nothing in a bf16 cache: the no-cache loop's tokens
    nxt = jnp.argmax(ours(seq, m).logits[:, -1], axis=-1)
    seq = jnp.concatenate([seq, nxt[:, None]], axis=1)
    m = jnp.concatenate([m, jnp.ones((2, 1), m.dtype)], axis=1)
  np.testing.assert_array_equal(got, np.asarray(seq))


def test_sampling_respects_top_p_and_stops(llm_pair):
  _, _, _, ours = llm_pair
  ids, mask = left_padded(64, [5, 5], 5, seed=3)
  a = ours.generate(
    jnp.asarray(ids),
    jnp.asarray(mask),
    max_new_tokens=6,
    temperature=0.7,
    top_p=0.9,
    rng=jax.random.key(1),
  )
  b = ours.generate(
    jnp.asarray(ids),
    jnp.asarray(mask),
    max_new_tokens=6,
    temperature=0.7,
    top_p=0.9,
    rng=jax.random.key(1),
  )
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same key, same tokens
  # top_p -> 0 keeps only the most likely token: sampling becomes greedy.
  tiny_p = ours.generate(
    jnp.asarray(ids),
    jnp.asarray(mask),
    max_new_tokens=6,
    temperature=1.0,
    top_p=1e-6,
    rng=jax.random.key(2),
    stop_tokens=(),
  )
  greedy = ours.generate(jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=6, stop_tokens=())
  np.testing.assert_array_equal(np.asarray(tiny_p), np.asarray(greedy))
  # A stop token ends its row: everything after it is padding.
  first = int(greedy[0, 5])
  stopped = np.asarray(
    ours.generate(
      jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=6, stop_tokens=(first,), pad_token_id=63
    )
  )
  assert stopped[0, 5] == first and (stopped[0, 6:] == 63).all()


def test_save_load_round_trip(llm_pair, tmp_path):
  from transformers import AutoModelForCausalLM

  kind, hf, _, ours = llm_pair
  ours.save_pretrained(tmp_path / "saved")
  assert_same_state(ours, CLASSES[kind].from_pretrained(tmp_path / "saved"))
  assert_same_tensors(
    hf.state_dict(), AutoModelForCausalLM.from_pretrained(tmp_path / "saved").state_dict()
  )


def test_wrong_family_is_refused(llm_pair):
  kind, _, path, _ = llm_pair
  other = Qwen2ForCausalLM if CLASSES[kind] is LlamaForCausalLM else LlamaForCausalLM
  with pytest.raises(CheckpointError, match="model_type is"):
    other.from_pretrained(path)


def test_sharded_by_logical_rules_equals_unsharded(tmp_path):
  assert jax.device_count() == 8
  _, path = make_llm("llama_linear", tmp_path / "ckpt")
  ours = LlamaForCausalLM.from_pretrained(path)
  ids, mask = left_padded(64, [8, 5, 8, 3], 8, seed=4)
  want = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)).logits)
  mesh = Mesh(
    mesh_utils.create_device_mesh((2, 2, 2)),
    ("data", "fsdp", "tensor"),
    axis_types=(AxisType.Auto,) * 3,
  )
  sharded = shard_model(LlamaForCausalLM.from_pretrained(path), mesh)
  q = sharded.model.layers[0].self_attn.q_proj.kernel[...]
  assert q.sharding.spec == P("fsdp", "tensor")  # (embed, heads) by the rules table
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  graphdef, state = nnx.split(sharded)
  forward = jax.jit(lambda state, i, m: nnx.merge(graphdef, state)(i, m).logits)
  with jax.set_mesh(mesh):
    got = forward(state, jax.device_put(ids, batch), jax.device_put(mask, batch))
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)
