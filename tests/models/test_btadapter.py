"""BT-Adapter vision tower: parity with an independent PyTorch port of the original
(tests/support/btadapter_reference.py) on the same saved weights, float32."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from safetensors.torch import save_file as save_torch_file
from support.btadapter_reference import BTAdapterTower
from support.hf_fixtures import assert_same_state, make_clip, rewrite_checkpoint

from ppllava_jax.convert.loader import CheckpointError
from ppllava_jax.models.btadapter import BTAdapterConfig, CLIPVisionBTAdapter, TemporalBlock
from ppllava_jax.models.clip import CLIPModel, CLIPVisionConfig

TOL = 1e-4  # float32 max-abs-diff, tiny models
LAYERS, DEPTH, MAX_T = 4, 3, 8  # adapter beside layers 1, 2, 3: hidden state -2 has seen 2 pairs
START = LAYERS - DEPTH

# One compile per (model structure, input shape): eager dispatch would compile every op.
forward = nnx.jit(lambda model, x: model(x))
forward_train = nnx.jit(lambda model, x, rngs: nnx.view(model, deterministic=False)(x, rngs))


def tiny_vision_config():
  from transformers import CLIPVisionConfig  # odd heads, width 45, 5x5 patches of 6 px

  return CLIPVisionConfig(
    hidden_size=45,
    intermediate_size=70,
    num_hidden_layers=LAYERS,
    num_attention_heads=3,
    image_size=30,
    patch_size=6,
  )


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
  """(torch reference, checkpoint folder in the original's key layout, ours loaded from it)."""
  torch.manual_seed(0)
  config = tiny_vision_config()
  ref = BTAdapterTower(config, DEPTH, MAX_T).eval()
  with torch.no_grad():  # randomise every tensor (temporal_fc and the CLS token too)
    for p in ref.parameters():
      p.add_(torch.randn_like(p) * 0.1)
  path = tmp_path_factory.mktemp("btadapter")
  save_torch_file(
    {k: v.contiguous() for k, v in ref.state_dict().items()},
    str(path / "model.safetensors"),
    metadata={"format": "pt"},
  )
  hf = config.to_dict() | {"depth": DEPTH, "max_T": MAX_T}  # as the original stamps them
  (path / "config.json").write_text(json.dumps(hf))
  return ref, path, CLIPVisionBTAdapter.from_pretrained(path)


def video(b, t, seed=0):
  return np.random.default_rng(seed).standard_normal((b, t, 3, 30, 30)).astype(np.float32)


def run_ref(ref, x, **kw):
  with torch.no_grad():
    states, pooled = ref(torch.from_numpy(x), **kw)
  return [s.numpy() for s in states], pooled.numpy()


def rows(a):
  """Ours (B, T, ...) -> the original's frame rows (B*T, ...)."""
  a = np.asarray(a)
  return a.reshape(-1, *a.shape[2:])


def assert_matches_reference(ours, ref_out):
  hidden, pooled = ours
  states, ref_pooled = ref_out
  assert len(hidden) == len(states) == LAYERS + 1
  for i, (a, b) in enumerate(zip(hidden, states)):
    assert np.abs(rows(a) - b).max() <= TOL, f"hidden state {i}"
  assert np.abs(rows(pooled) - ref_pooled).max() <= TOL


@pytest.mark.parametrize("b,t", [(1, 4), (2, 5), (2, 1)])
def test_matches_reference(tower, b, t):
  ref, _, ours = tower
  x = video(b, t, seed=t)
  assert_matches_reference(forward(ours, jnp.asarray(x)), run_ref(ref, x))


def test_three_frames_are_frames(tower):
  """The original reads any (B, 3, ...) video as (B, C, T, H, W); we take (B, T, C, H, W)."""
  ref, _, ours = tower
  x = video(1, 3)
  hidden, pooled = forward(ours, jnp.asarray(x))
  assert_matches_reference((hidden, pooled), run_ref(ref, x))
  misread, _ = run_ref(ref, x, guess_layout=True)
  assert np.abs(rows(hidden[-2]) - misread[-2]).max() > 0.1
  # Up to the adapter's first layer every frame is encoded alone, so the three frames
  # give the same states inside a four-frame clip; past it, frames mix.
  hidden4, _ = forward(ours, jnp.asarray(np.concatenate([x, video(1, 1, seed=9)], axis=1)))
  for i in range(START + 1):
    np.testing.assert_allclose(hidden[i], hidden4[i][:, :3], atol=1e-6, err_msg=f"state {i}")
  assert np.abs(np.asarray(hidden[-2]) - np.asarray(hidden4[-2][:, :3])).max() > 1e-3


def with_zero_temporal_fc(model):
  for block in model.vision_model.btadapter_T_layers:
    for var in (block.temporal_fc.kernel, block.temporal_fc.bias):
      var.set_value(jnp.zeros_like(var[...]))
  return model


def test_zero_temporal_fc_makes_temporal_blocks_identities(tower):
  """temporal_fc = 0 (its initial value) zeroes the temporal branch, and a temporal block
  is ``patches + temporal_fc(...)``: exactly the identity. The whole tower then does not
  depend on the temporal blocks' other weights, bit for bit."""
  _, path, _ = tower
  model = with_zero_temporal_fc(CLIPVisionBTAdapter.from_pretrained(path))
  x_btpd = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 25, 45)) * 30, jnp.float32)
  for block in model.vision_model.btadapter_T_layers:
    np.testing.assert_array_equal(block(x_btpd), x_btpd)
  x = jnp.asarray(video(1, 4))
  hidden, pooled = forward(model, x)
  for block in model.vision_model.btadapter_T_layers:  # scramble all but temporal_fc
    for module in (block.layer_norm1, block.self_attn):
      for _, var in nnx.to_flat_state(nnx.state(module)):
        var.set_value(var[...] + 1.0)
  hidden2, pooled2 = forward(model, x)
  for a, b in zip(hidden + [pooled], hidden2 + [pooled2]):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
  """(transformers CLIP, our CLIP vision tower, a fresh adapter on it: depth 2 of 3 layers)."""
  hf, path = make_clip("a", tmp_path_factory.mktemp("clip"))  # width 48, 3 heads, 30 px
  clip = CLIPModel.from_pretrained(path).vision_model
  adapter = CLIPVisionBTAdapter.from_clip(clip, BTAdapterConfig(depth=2, max_T=4), rngs=nnx.Rngs(3))
  return hf, clip, adapter


def test_from_clip_initialisation(fresh):
  _, clip, adapter = fresh
  tower = adapter.vision_model
  flat = lambda module: dict(nnx.to_flat_state(nnx.state(module)))

  def assert_same(ours, theirs, what):
    a, b = flat(ours), flat(theirs)
    assert a.keys() == b.keys(), what
    for name in a:
      np.testing.assert_array_equal(a[name][...], b[name][...], err_msg=f"{what} {name}")

  for k, block in enumerate(tower.btadapter_S_layers):  # CLIP's last 2 of 3 layers
    assert_same(block, clip.encoder.layers[1 + k], f"S{k}")
  for block in tower.btadapter_T_layers:
    assert not np.any(block.temporal_fc.kernel[...]) and not np.any(block.temporal_fc.bias[...])
  assert not np.any(tower.btadapter_cls_token[...])
  for name in ("embeddings", "pre_layrnorm", "encoder", "post_layernorm"):
    assert_same(getattr(tower, name), getattr(clip, name), name)


def test_fresh_adapter_on_one_frame_is_clip_layers_rerun(fresh):
  """``from_clip`` copies CLIP layer start+k into spatial block k and zeroes temporal_fc.
  With one frame a spatial block is then exactly that CLIP layer, so the adapter is
  CLIP's last layers rerun on a second stream: s_0 = L_start([(y_0 cls + cls_token +
  pos_0) / 2, y_0 patches + pos + time_0]), s_k = L_{start+k}(s_{k-1} + y_k), where y_k
  is CLIP layer start+k's output. Checked with transformers' own CLIP layers."""
  hf, _, adapter = fresh
  depth, start = 2, 1
  tower = adapter.vision_model
  x = np.random.default_rng(0).standard_normal((2, 1, 3, 30, 30)).astype(np.float32)
  hidden, pooled = forward(adapter, jnp.asarray(x))

  vm = hf.vision_model
  t = lambda a: torch.from_numpy(np.array(a))
  pos = vm.embeddings.position_embedding.weight
  with torch.no_grad():
    ys = vm(pixel_values=torch.from_numpy(x[:, 0]), output_hidden_states=True).hidden_states
    want = list(ys[: start + 1])
    y = ys[start + 1]
    cls = (y[:, :1] + t(tower.btadapter_cls_token[...])[0] + pos[:1]) / 2
    s = torch.cat([cls, y[:, 1:] + pos[1:] + t(tower.btadapter_time_embed.weight[0])], 1)
    for k in range(depth):
      y = ys[start + k + 1]
      s = vm.encoder.layers[start + k](s if k == 0 else s + y, None)
      want.append(torch.cat([y[:, :1], (y[:, 1:] + s[:, 1:]) / 2], 1))
    want_pooled = vm.post_layernorm(y[:, 0] + s[:, 0])
  assert len(hidden) == len(want) == 4
  for i, (a, b) in enumerate(zip(hidden, want)):
    assert np.abs(rows(a) - b.numpy()).max() <= TOL, f"hidden state {i}"
  assert np.abs(rows(pooled) - want_pooled.numpy()).max() <= TOL


def test_drop_path_only_in_train_mode(tower):
  _, _, ours = tower
  x = jnp.asarray(video(1, 4))
  hidden, _ = forward(ours, x)
  dropped, _ = forward_train(ours, x, nnx.Rngs(dropout=0))
  for i in range(START + 1):  # only the adapter drops paths
    np.testing.assert_allclose(hidden[i], dropped[i], rtol=0, atol=1e-6)
  assert np.abs(np.asarray(dropped[-1]) - np.asarray(hidden[-1])).max() > 1e-3
  rates = [b.drop_path.rate for b in ours.vision_model.btadapter_S_layers]
  np.testing.assert_allclose(rates, np.linspace(0, 0.1, DEPTH))  # the original's schedule
  assert [b.drop_path.rate for b in ours.vision_model.btadapter_T_layers] == [0.1] * DEPTH
  assert all(b.drop_path.deterministic for b in ours.vision_model.btadapter_S_layers)


def test_temporal_drop_path_drops_whole_patch_tracks():
  """Stochastic depth draws once per (video, patch) row of the temporal attention."""
  cfg = CLIPVisionConfig(
    hidden_size=12,
    intermediate_size=8,
    num_hidden_layers=1,
    num_attention_heads=3,
    image_size=4,
    patch_size=2,
  )
  block = TemporalBlock(cfg, 0.5, rngs=nnx.Rngs(0))
  block.temporal_fc.kernel.set_value(jnp.ones((12, 12)))
  x_btpd = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 30, 12)), jnp.float32)
  out = forward_train(block, x_btpd, nnx.Rngs(dropout=1))
  eval_with_rngs = nnx.jit(lambda model, x, rngs: model(x, rngs))
  np.testing.assert_array_equal(
    eval_with_rngs(block, x_btpd, nnx.Rngs(dropout=1)), forward(block, x_btpd)
  )  # rngs without train mode: no change
  kept_bp = np.asarray(jnp.any(out != x_btpd, axis=(1, 3)))  # per (video, patch)
  untouched_btp = np.asarray(jnp.all(out == x_btpd, axis=3))
  np.testing.assert_array_equal(untouched_btp, ~kept_bp[:, None].repeat(5, 1))
  assert 0 < kept_bp.sum() < kept_bp.size


def test_save_load_round_trip_is_bit_exact_in_the_original_layout(tower, tmp_path):
  ref, path, ours = tower
  ours.save_pretrained(tmp_path / "saved")
  again = CLIPVisionBTAdapter.from_pretrained(tmp_path / "saved")
  assert again.adapter_cfg == BTAdapterConfig(depth=DEPTH, max_T=MAX_T)
  assert_same_state(ours, again)
  saved = load_file(tmp_path / "saved" / "model.safetensors")
  original = load_file(path / "model.safetensors")
  assert saved.keys() == original.keys() == ref.state_dict().keys()
  for k in original:
    np.testing.assert_array_equal(saved[k], original[k], err_msg=k)


def test_missing_adapter_keys_are_named(tower, tmp_path):
  _, path, _ = tower

  def edit(t):
    t.pop("vision_model.btadapter_T_layers.1.temporal_fc.weight")
    t.pop("vision_model.btadapter_cls_token")

  with pytest.raises(
    CheckpointError,
    match=r"missing .*: 2\n\s+vision_model\.btadapter_T_layers"
    r"\.1\.temporal_fc\.weight \(-> vision_model\.btadapter_T_layers\.1\."
    r"temporal_fc\.kernel\)\n\s+vision_model\.btadapter_cls_token",
  ):
    CLIPVisionBTAdapter.from_pretrained(rewrite_checkpoint(path, tmp_path / "bad", edit))


def test_wrong_adapter_shape_is_named(tower, tmp_path):
  _, path, _ = tower

  def edit(t):
    t["vision_model.btadapter_time_embed.weight"] = np.zeros((MAX_T + 1, 45), np.float32)

  with pytest.raises(
    CheckpointError,
    match=r"vision_model\.btadapter_time_embed\.weight: "
    r"checkpoint \(9, 45\) -> \(9, 45\), model "
    r"vision_model\.btadapter_time_embed\.weight expects \(8, 45\)",
  ):
    CLIPVisionBTAdapter.from_pretrained(rewrite_checkpoint(path, tmp_path / "bad", edit))


def test_bad_inputs_are_refused(tower):
  _, _, ours = tower
  with pytest.raises(ValueError, match=r"\(B, T, C, H, W\)"):
    ours(jnp.zeros((2, 3, 30, 30)))
  with pytest.raises(ValueError, match="9 frames exceed .* max_T=8"):
    ours(jnp.zeros((1, 9, 3, 30, 30)))
  with pytest.raises(ValueError, match="NCHW"):
    ours(jnp.zeros((1, 2, 30, 30, 3)))
