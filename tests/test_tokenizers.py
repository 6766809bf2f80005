"""Tokenizers in the forms checkpoints ship load with the runtime requirements alone:
LLaMA from a sentencepiece model only, SigLIP's sentencepiece model (the Qwen model's
scorer), CLIP's BPE files, Qwen2's BPE files."""

from support.tokenizers import clip_tokenizer, llama_sp_tokenizer, qwen_tokenizer, siglip_tokenizer
from transformers import AutoTokenizer


def _sentencepiece(path):
  import sentencepiece as spm

  return spm.SentencePieceProcessor(model_file=str(path))


def test_llama_tokenizer_from_a_sentencepiece_model_only(tmp_path):
  folder = llama_sp_tokenizer(tmp_path / "llama")
  assert not (folder / "tokenizer.json").exists()
  tok = AutoTokenizer.from_pretrained(folder)
  sp = _sentencepiece(folder / "tokenizer.model")
  ids = tok("the red circle falls")["input_ids"]
  assert ids == [1, *sp.encode("the red circle falls")]
  assert tok.decode(ids, skip_special_tokens=True) == "the red circle falls"
  assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
  n = sp.get_piece_size()
  assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [n, n + 1] == [n, tok.pad_token_id]
  # legacy: the text after a special token is encoded as sentencepiece encodes it alone
  ids = tok("a dog</s>\nthe red", add_special_tokens=False)["input_ids"]
  assert ids == [*sp.encode("a dog"), 2, *sp.encode("\nthe red")]
  after = tok.convert_ids_to_tokens(ids)[ids.index(2) + 1 :]
  assert after[:2] == ["▁", "<0x0A>"]  # its own dummy prefix


def test_siglip_tokenizer_from_its_sentencepiece_model(tmp_path):
  folder = siglip_tokenizer(tmp_path / "siglip")
  tok = AutoTokenizer.from_pretrained(folder)
  batch = tok(["the red circle", "a dog runs"], padding="max_length", max_length=24)
  ids = batch["input_ids"][0]
  expected = _sentencepiece(folder / "spiece.model").encode("the red circle") + [1]
  assert ids[: len(expected)] == expected and set(ids[len(expected) :]) == {1}  # </s> pads
  assert tok.decode(ids, skip_special_tokens=True) == "the red circle"


def test_clip_bpe_tokenizer(tmp_path):
  tok = AutoTokenizer.from_pretrained(clip_tokenizer(tmp_path / "clip"))
  ids = tok("The red circle")["input_ids"]
  assert ids[0] == 0 and ids[-1] == 1
  assert tok.convert_ids_to_tokens(ids[1]) == "the</w>"  # the merges apply
  assert tok.decode(ids, skip_special_tokens=True).strip() == "the red circle"
  assert 1 not in tok("<image>\nÜber!")["input_ids"][1:-1]  # no unknown (the end token)


def test_qwen_tokenizer_from_its_bpe_files(tmp_path):
  tok = AutoTokenizer.from_pretrained(qwen_tokenizer(tmp_path / "qwen"))
  assert type(tok).__name__ == "Qwen2Tokenizer" and tok.bos_token is None
  ids = tok("<|im_start|>user\nWhat color?<|im_end|>\n")["input_ids"]
  assert tok.convert_ids_to_tokens(ids) == [
    "<|im_start|>",
    "user",
    "Ċ",
    "What",
    "Ġcolor",
    "?",
    "<|im_end|>",
    "Ċ",
  ]
  assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
