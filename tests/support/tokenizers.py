"""Tiny tokenizer folders in the forms real checkpoints ship, built in the test run
(nothing downloaded). Each builder writes into ``folder`` (created) and returns it; load
it with ``AutoTokenizer.from_pretrained(folder)``, which picks the real tokenizer class.

- ``llama_sp_tokenizer``: llava-hf's Vicuna (LLaMA) tokenizer: a sentencepiece
  ``tokenizer.model`` only, in the legacy SentencePiece form.
- ``siglip_tokenizer``: SigLIP's ``spiece.model``, the Qwen model's scorer tokenizer.
- ``clip_tokenizer``: CLIP's byte-level BPE ``vocab.json`` + ``merges.txt``, the
  Vicuna models' scorer tokenizer.
- ``qwen_tokenizer``: Qwen2's byte-level BPE ``vocab.json`` + ``merges.txt`` with the
  ChatML special tokens, the Qwen model's LLM tokenizer.

All are trained on (or, for CLIP, merge words of) ``TEXT``, so its words are mostly one
token each and expected token lists stay readable.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

TEXT = (
  "what does the red circle do in the video",
  "the blue square falls from the top to the bottom",
  "a dog runs across the grass and jumps over a log",
  "Question: which object moves first? Options: (A) circle (B) square",
  "Only give the best option. Best option: (A)",
  "the man opens the door, walks in and sits down at 3 pm",
  # the training-data tests' conversations
  "You are a helpful assistant. USER: Describe the video. ASSISTANT: A man walks a dog.",
  "USER: What color is the ball? ASSISTANT: The ball is red.",
  "Compare the two pictures. The first is darker.",
  "Answer briefly. Yes no and then it says",
)


def _added(tokens: dict[int, str]) -> dict:
  """tokenizer_config.json's ``added_tokens_decoder`` for special ``tokens`` by id."""
  return {
    str(i): dict(
      content=t, special=True, lstrip=False, rstrip=False, normalized=False, single_word=False
    )
    for i, t in tokens.items()
  }


def _write(folder: Path, files: dict[str, bytes | str | dict]) -> Path:
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  for name, content in files.items():
    if isinstance(content, dict):
      content = json.dumps(content, indent=2)
    (folder / name).write_bytes(content.encode() if isinstance(content, str) else content)
  return folder


def _sentencepiece(model_type: str, vocab_size: int, **options) -> bytes:
  import sentencepiece as spm

  out = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(TEXT),
    model_writer=out,
    model_type=model_type,
    vocab_size=vocab_size,
    character_coverage=1.0,
    hard_vocab_limit=False,
    minloglevel=2,
    **options,
  )
  return out.getvalue()


def llama_sp_tokenizer(folder: Path, vocab_size: int = 700) -> Path:
  """llava-hf's Vicuna folder without ``tokenizer.json`` (transformers converts the model).

  LLaMA's trainer spec: BPE, ``<unk> <s> </s>`` = 0 1 2, then the 256 byte-fallback
  tokens (a newline is ``<0x0A>``), identity normalization, spaces kept, the dummy prefix
  on; llava-hf's ``<image>`` and ``<pad>`` come right after the pieces. ``legacy=True``:
  transformers' LlamaTokenizer (5.x: its own ``Metaspace(prepend_scheme="always")``, the
  model's ``add_dummy_prefix`` unread) then prefixes ``▁`` to every text segment, also
  to one that follows a special token, as sentencepiece encoding each segment does.
  """
  import sentencepiece as spm

  model = _sentencepiece(
    "bpe",
    vocab_size,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    split_digits=True,
  )
  n = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
  return _write(
    folder,
    {
      "tokenizer.model": model,
      "tokenizer_config.json": dict(
        tokenizer_class="LlamaTokenizer",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,
        add_eos_token=False,
        legacy=True,
        added_tokens_decoder=_added({n: "<image>", n + 1: "<pad>"}),
      ),
    },
  )


def siglip_tokenizer(folder: Path, vocab_size: int = 99) -> Path:
  """SigLIP's layout: unigram with ``<pad> </s> <unk>`` = 0 1 2, in ``spiece.model``."""
  model = _sentencepiece("unigram", vocab_size, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
  return _write(
    folder,
    {
      "spiece.model": model,
      "tokenizer_config.json": dict(
        tokenizer_class="SiglipTokenizer",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        model_max_length=64,
        do_lower_case=True,
      ),
    },
  )


def _bpe_files(vocab: list[str], merges: list[tuple[str, str]]) -> dict[str, str]:
  return {
    "vocab.json": json.dumps({t: i for i, t in enumerate(vocab)}),
    "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
  }


def clip_tokenizer(folder: Path) -> Path:
  """CLIP's layout: ids 0 and 1 the start and end tokens (also unk and pad), then every
  byte's character and its word-final ``</w>`` form (so any text encodes without
  unknowns), then a few merges (``the</w>`` among them)."""
  from tokenizers import pre_tokenizers

  chars = sorted(pre_tokenizers.ByteLevel.alphabet())
  merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n")]
  vocab = [
    "<|startoftext|>",
    "<|endoftext|>",
    *chars,
    *(c + "</w>" for c in chars),
    *("".join(m) for m in merges),
  ]
  return _write(
    folder,
    {
      **_bpe_files(vocab, merges),
      "tokenizer_config.json": dict(
        tokenizer_class="CLIPTokenizer",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=77,
      ),
    },
  )


def qwen_tokenizer(folder: Path, vocab_size: int = 600) -> Path:
  """Qwen2-Instruct's layout: byte-level BPE with no BOS, then the added
  ``<|endoftext|>`` (the pad), ``<|im_start|>``, ``<|im_end|>`` (the EOS) and the
  LLaVA-OneVision ``<image>``. Trained with ``TEXT``'s lines and the words that follow a
  ChatML newline on their own, so those are one bare token too."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.train_from_iterator(
    [*TEXT, "What", "The", "user", "assistant"],
    trainers.BpeTrainer(
      vocab_size=vocab_size,
      show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    ),
  )
  model = json.loads(tok.to_str())["model"]
  vocab = sorted(model["vocab"], key=model["vocab"].get)
  n = len(vocab)
  return _write(
    folder,
    {
      **_bpe_files(vocab, [tuple(m) for m in model["merges"]]),
      "tokenizer_config.json": dict(
        tokenizer_class="Qwen2Tokenizer",
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        added_tokens_decoder=_added(
          {n: "<|endoftext|>", n + 1: "<|im_start|>", n + 2: "<|im_end|>", n + 3: "<image>"}
        ),
      ),
    },
  )
