"""A character-level tokenizer for models built in code (the demo, tests).

Real checkpoints bring their own tokenizers (``AutoTokenizer.from_pretrained``); a
model made from a config with random weights has none, and the hubs may be out of
reach. This one is a transformers ``PreTrainedTokenizerFast`` (so the processor and
the evaluation loop treat it like any other): ids 0-4 are ``<pad> <s> </s> <unk>
<image>``, then printable ASCII and the newline, one id per character; encoding
prepends ``<s>``.
"""

from __future__ import annotations

SPECIAL = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
CHARS = tuple(chr(i) for i in range(32, 127)) + ("\n",)


def char_tokenizer():
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast
  vocab = {token: i for i, token in enumerate(SPECIAL + CHARS)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
  tok.decoder = decoders.Fuse()
  tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                     special_tokens=[("<s>", vocab["<s>"])])
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>", pad_token="<pad>",
                                 extra_special_tokens=["<image>"])
