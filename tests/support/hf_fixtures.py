"""Tiny random transformers models saved as real safetensors checkpoints.

Shapes are chosen to catch layout bugs: hidden sizes not multiples of 64, odd head
counts, image sizes other than 336.
"""

from pathlib import Path

import numpy as np
import torch


def assert_same_state(ours, again) -> None:
  """Two NNX modules hold bit-identical parameters at the same paths (a save round trip)."""
  from flax import nnx

  theirs = dict(nnx.to_flat_state(nnx.state(again)))
  mine = list(nnx.to_flat_state(nnx.state(ours)))
  assert {path for path, _ in mine} == set(theirs)
  for path, var in mine:
    np.testing.assert_array_equal(
      np.asarray(var[...]), np.asarray(theirs[path][...]), err_msg=str(path)
    )


def assert_same_tensors(want: dict, got: dict) -> None:
  """The torch state dicts ``want`` and ``got`` hold the same names, bit-identical tensors."""
  assert want.keys() == got.keys()
  for name, p in want.items():
    torch.testing.assert_close(p, got[name], rtol=0, atol=0, msg=name)


def save_hf(model, path: Path) -> Path:
  model.save_pretrained(path, safe_serialization=True)
  return path


def tiny_clip_config(kind: str):
  from transformers import CLIPConfig

  if kind == "a":  # odd heads, widths not multiples of 64, 77 text positions (extendable)
    vision = dict(
      hidden_size=48,
      intermediate_size=80,
      num_hidden_layers=3,
      num_attention_heads=3,
      image_size=30,
      patch_size=6,
    )
    text = dict(
      vocab_size=99,
      hidden_size=40,
      intermediate_size=72,
      num_hidden_layers=2,
      num_attention_heads=5,
      max_position_embeddings=77,
      eos_token_id=98,
      bos_token_id=97,
      pad_token_id=0,
    )
  else:  # legacy eos (id 2, pooled at argmax id), even heads, another image size
    vision = dict(
      hidden_size=64,
      intermediate_size=96,
      num_hidden_layers=2,
      num_attention_heads=4,
      image_size=32,
      patch_size=8,
    )
    text = dict(
      vocab_size=50,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=2,
      max_position_embeddings=20,
      eos_token_id=2,
      bos_token_id=1,
      pad_token_id=0,
    )
  return CLIPConfig(vision_config=vision, text_config=text, projection_dim=24)


def tiny_siglip_config(kind: str):
  from transformers import SiglipConfig

  if kind == "a":  # odd heads, 64 text positions (extendable to 196 like PPLLaVA's Qwen model)
    vision = dict(
      hidden_size=48,
      intermediate_size=80,
      num_hidden_layers=3,
      num_attention_heads=3,
      image_size=30,
      patch_size=6,
    )
    text = dict(
      vocab_size=99,
      hidden_size=40,
      intermediate_size=72,
      num_hidden_layers=2,
      num_attention_heads=5,
      max_position_embeddings=64,
      projection_size=36,
      bos_token_id=97,
      eos_token_id=98,
      pad_token_id=1,
    )
  else:  # no pooling head, another image size
    vision = dict(
      hidden_size=64,
      intermediate_size=96,
      num_hidden_layers=2,
      num_attention_heads=4,
      image_size=32,
      patch_size=8,
      vision_use_head=False,
    )
    text = dict(
      vocab_size=50,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=2,
      max_position_embeddings=16,
      bos_token_id=47,
      eos_token_id=48,
      pad_token_id=1,
    )
  return SiglipConfig(vision_config=vision, text_config=text)


def _randomised(model_cls, config, path: Path, seed: int):
  torch.manual_seed(seed)
  model = model_cls(config).eval()
  with torch.no_grad():  # HF zero-inits some tensors; randomise everything so parity bites
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.02)
  return model, save_hf(model, path)


def make_clip(kind: str, path: Path, seed: int = 0):
  from transformers import CLIPModel

  return _randomised(CLIPModel, tiny_clip_config(kind), path, seed)


def make_siglip(kind: str, path: Path, seed: int = 0):
  from transformers import SiglipModel

  return _randomised(SiglipModel, tiny_siglip_config(kind), path, seed)


def text_batch(vocab: int, eos: int, lengths, total: int, seed: int = 0):
  """Right-padded ids with EOS at each row's end, and the attention mask."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((len(lengths), total), np.int64)
  mask = np.zeros((len(lengths), total), np.int64)
  for i, n in enumerate(lengths):
    ids[i, : n - 1] = rng.integers(3, vocab - 3, n - 1)
    ids[i, n - 1] = eos if eos != 2 else vocab - 1  # legacy: EOS is the largest id
    mask[i, :n] = 1
  return ids, mask


def rewrite_checkpoint(src: Path, dst: Path, edit) -> Path:
  """A copy of the single-file checkpoint ``src`` whose tensor dict ``edit`` changed."""
  from safetensors.numpy import load_file, save_file

  dst.mkdir()
  tensors = load_file(src / "model.safetensors")
  edit(tensors)
  save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
  (dst / "config.json").write_text((src / "config.json").read_text())
  return dst


def tiny_llm_config(kind: str):
  """Tiny decoders: GQA everywhere, rope scaling variants, Qwen2 biases and tied heads."""
  from transformers import LlamaConfig, Qwen2Config

  common = dict(
    vocab_size=64, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0
  )
  if kind == "llama_linear":
    return LlamaConfig(
      hidden_size=48,
      intermediate_size=80,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      **common,
      rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=10000.0),
    )
  if kind == "llama3":
    return LlamaConfig(
      hidden_size=48,
      intermediate_size=80,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=1,
      **common,
      rope_parameters=dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        rope_theta=500000.0,
        original_max_position_embeddings=16,
      ),
    )
  if kind == "qwen2":
    return Qwen2Config(
      hidden_size=40,
      intermediate_size=72,
      num_hidden_layers=2,
      num_attention_heads=5,
      num_key_value_heads=1,
      tie_word_embeddings=True,
      **common,
    )
  raise ValueError(kind)


def make_llm(kind: str, path: Path, seed: int = 0):
  from transformers import AutoModelForCausalLM

  config = tiny_llm_config(kind)
  torch.manual_seed(seed)
  model = AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():  # randomise biases and norms too, so parity bites
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model, save_hf(model, path)


def left_padded(vocab: int, lengths, total: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  ids = np.zeros((len(lengths), total), np.int64)
  mask = np.zeros((len(lengths), total), np.int64)
  for i, n in enumerate(lengths):
    ids[i, total - n :] = rng.integers(3, vocab, n)
    mask[i, total - n :] = 1
  return ids, mask


LLAVA_IMAGE_TOKEN, LLAVA_VIDEO_TOKEN = 62, 63
LLAVA_PINPOINTS = [[24, 48], [48, 24], [48, 48]]


def _tiny_llava(vision_type: str, text_type: str, image_size: int, pinpoints) -> dict:
  """What both tiny LLaVAs share: a 3-layer vision tower (odd heads, 4 px patches), a GQA
  LLM of vocabulary 64 and the placeholder ids."""
  return dict(
    vision_config=dict(
      model_type=vision_type,
      hidden_size=24,
      intermediate_size=40,
      num_hidden_layers=3,
      num_attention_heads=3,
      image_size=image_size,
      patch_size=4,
    ),
    text_config=dict(
      model_type=text_type,
      vocab_size=64,
      hidden_size=32,
      intermediate_size=48,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      bos_token_id=1,
      eos_token_id=2,
      pad_token_id=0,
    ),
    image_token_index=LLAVA_IMAGE_TOKEN,
    video_token_index=LLAVA_VIDEO_TOKEN,
    image_grid_pinpoints=pinpoints,
  )


def make_llava_next_video(
  path: Path,
  seed: int = 0,
  vocab_size: int | None = None,
  image_token: int = LLAVA_IMAGE_TOKEN,
  video_token: int = LLAVA_VIDEO_TOKEN,
):
  """Tiny LLaVA-NeXT-Video: 24 px tiles of 6x6 patches, odd vision heads, GQA LLM;
  ``vocab_size`` and the placeholder ids can be a real tokenizer's."""
  from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

  fields = _tiny_llava("clip_vision_model", "llama", 24, LLAVA_PINPOINTS)
  fields.update(image_token_index=image_token, video_token_index=video_token)
  if vocab_size:
    fields["text_config"]["vocab_size"] = vocab_size
  config = LlavaNextVideoConfig(**fields)
  return _randomised(LlavaNextVideoForConditionalGeneration, config, path, seed)


def make_scorer_clip(path: Path, seed: int = 1, openai_like: bool = False, **text_fields):
  """A CLIP whose vision width (24) matches the tiny LLaVA's, as PPLLaVA's scorer.

  ``openai_like``: OpenAI CLIP's conventions at a tiny size (64-wide heads, legacy
  EOS id 2, room for keep=20), so a scorer config can be inferred from its tensors.
  ``text_fields`` override the text config's (a real tokenizer's vocabulary and ids).
  """
  from transformers import CLIPConfig, CLIPModel

  text = (
    dict(
      vocab_size=99,
      hidden_size=64,
      intermediate_size=40,
      num_hidden_layers=2,
      num_attention_heads=1,
      max_position_embeddings=24,
      eos_token_id=2,
      bos_token_id=1,
      pad_token_id=0,
    )
    if openai_like
    else dict(
      vocab_size=99,
      hidden_size=20,
      intermediate_size=40,
      num_hidden_layers=1,
      num_attention_heads=2,
      max_position_embeddings=16,
      eos_token_id=98,
      bos_token_id=97,
      pad_token_id=0,
    )
  )
  text.update(text_fields)
  config = CLIPConfig(
    vision_config=dict(
      hidden_size=24,
      intermediate_size=40,
      num_hidden_layers=1,
      num_attention_heads=3,
      image_size=24,
      patch_size=4,
    ),
    text_config=text,
    projection_dim=12,
  )
  return _randomised(CLIPModel, config, path, seed)


OV_PINPOINTS = [[28, 56], [56, 28], [56, 56]]


def make_llava_onevision(
  path: Path,
  seed: int = 0,
  max_patches: int = 2,
  vocab_size: int | None = None,
  image_token: int = LLAVA_IMAGE_TOKEN,
  video_token: int = LLAVA_VIDEO_TOKEN,
):
  """Tiny LLaVA-OneVision: SigLIP tower on 28 px tiles of 7x7 patches (an odd grid, so the
  video's 2x downscale is a real bilinear resize), a Qwen2 LLM with GQA and biases, and
  ``anyres_max_{max_patches}`` small enough that 2x2-tile images are downscaled;
  ``vocab_size`` and the placeholder ids can be a real tokenizer's."""
  from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

  fields = _tiny_llava("siglip_vision_model", "qwen2", 28, OV_PINPOINTS)
  fields.update(image_token_index=image_token, video_token_index=video_token)
  if vocab_size:
    fields["text_config"]["vocab_size"] = vocab_size
  config = LlavaOnevisionConfig(**fields, vision_aspect_ratio=f"anyres_max_{max_patches}")
  return _randomised(LlavaOnevisionForConditionalGeneration, config, path, seed)


def make_scorer_siglip(path: Path, seed: int = 1, google_like: bool = False, **text_fields):
  """A SigLIP whose vision tower matches the tiny OneVision's (width 24, 28 px, head on; the
  text head projects to that width too, as so400m's 1152 -> 1152),
  as the Qwen model's scorer. ``google_like``: siglip-so400m's 72-wide text heads and room
  for keep=20, so a scorer config can be inferred from its tensors. ``text_fields``
  override the text config's (a real tokenizer's ids)."""
  from transformers import SiglipConfig, SiglipModel

  text = dict(
    vocab_size=99,
    hidden_size=72 if google_like else 20,
    intermediate_size=40,
    num_hidden_layers=2 if google_like else 1,
    num_attention_heads=1 if google_like else 2,
    max_position_embeddings=24 if google_like else 16,
    projection_size=24,
    bos_token_id=97,
    eos_token_id=98,
    pad_token_id=1,
  )
  text.update(text_fields)
  config = SiglipConfig(
    vision_config=dict(
      hidden_size=24,
      intermediate_size=40,
      num_hidden_layers=1,
      num_attention_heads=3,
      image_size=28,
      patch_size=4,
    ),
    text_config=text,
  )
  return _randomised(SiglipModel, config, path, seed)


# The original's pooling keys (farewellthree/PPLLaVA, llava_interleave.py); our
# PPLLaVA.save_pretrained writes them too.
ORIGINAL_POOLING_KEYS = (
  "pooling_kernel",
  "pooling_stride",
  "pllava_pooling_shape",
  "image_pooling_kernel",
  "image_pooling_stride",
  "pooling_temp",
)


def as_released(saved: Path, dst: Path, **keys) -> Path:
  """``saved`` (a folder holding a PPLLaVA checkpoint) as the original writes one, at ``dst``:
  the same tensors (linked, not copied), config.json without our ``ppllava_*`` entries and
  pooling keys, plus the original's ``keys``."""
  import json

  dst.mkdir(parents=True)
  (dst / "model.safetensors").symlink_to((saved / "model.safetensors").resolve())
  config = json.loads((saved / "config.json").read_text())
  for key in ("ppllava_scorer", "ppllava_btadapter", *ORIGINAL_POOLING_KEYS):
    config.pop(key, None)
  (dst / "config.json").write_text(json.dumps(config | keys))
  return dst
