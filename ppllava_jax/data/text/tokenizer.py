"""Tokenizers: a model folder's, found and checked against the embeddings they feed, and a
character-level one for models built in code (the demo, tests).

Real checkpoints bring their own tokenizers (``AutoTokenizer.from_pretrained``); a
model made from a config with random weights has none, and the hubs may be out of
reach. This one is a transformers ``PreTrainedTokenizerFast`` (so the processor and
the evaluation loop treat it like any other): ids 0-4 are ``<pad> <s> </s> <unk>
<image>``, then printable ASCII and the newline, one id per character; encoding
prepends ``<s>``.

``tokenizer_folders`` finds where a model folder's tokenizers are (the LLM's and the
relevance scorer's, ``scorer_tokenizer/`` in what ``train.py export`` writes);
``check_vocab`` / ``check_ids`` keep every id inside the embedding table it indexes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ppllava_jax.models import pretrained
from ppllava_jax.models.clip import CLIPTextConfig
from ppllava_jax.models.pretrained import SCORER_TOKENIZER

SPECIAL = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
CHARS = tuple(chr(i) for i in range(32, 127)) + ("\n",)


def char_tokenizer():
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  vocab = {token: i for i, token in enumerate(SPECIAL + CHARS)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
  tok.decoder = decoders.Fuse()
  tok.post_processor = processors.TemplateProcessing(
    single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
  )
  return PreTrainedTokenizerFast(
    tokenizer_object=tok,
    bos_token="<s>",
    eos_token="</s>",
    unk_token="<unk>",
    pad_token="<pad>",
    extra_special_tokens=["<image>"],
  )


# ---- the tokenizers of a model folder ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenizerFolders:
  """Where a model's two tokenizers are read from: the LLM's, and the relevance scorer's
  (None: none found; a model without a scorer needs none)."""

  llm: Path
  scorer: Path | None


def tokenizer_folders(
  checkpoint: str | Path,
  *,
  tokenizer: str | Path | None = None,
  scorer_tokenizer: str | Path | None = None,
  clip: str | Path | None = None,
) -> TokenizerFolders:
  """The folders a model folder's tokenizers come from. LLM: ``tokenizer``, else the
  checkpoint. Scorer, first to last: ``scorer_tokenizer``; ``clip`` (the CLIP / SigLIP
  folder whose text tower scores); the checkpoint's ``scorer_tokenizer/`` (what
  ``train.py export`` and ``convert.py`` write); the folder config.json's ``clip_weight``
  names (PPLLaVA's released folders), when it is one here."""
  checkpoint = pretrained.resolve_checkpoint(checkpoint)
  llm = Path(tokenizer) if tokenizer else checkpoint
  scorer = scorer_tokenizer or clip
  if scorer_tokenizer and (Path(scorer_tokenizer) / SCORER_TOKENIZER).is_dir():
    scorer = Path(scorer_tokenizer) / SCORER_TOKENIZER  # an exported folder, named whole
  if not scorer and (checkpoint / SCORER_TOKENIZER).is_dir():
    scorer = checkpoint / SCORER_TOKENIZER
  if not scorer:
    weight = _read_json(checkpoint / "config.json").get("clip_weight")
    if weight and (checkpoint / weight).is_dir():
      scorer = checkpoint / weight
  return TokenizerFolders(llm, pretrained.resolve_checkpoint(scorer) if scorer else None)


def _read_json(path: Path) -> dict:
  import json

  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return {}  # the model's loader reports a bad config.json with its own error


def load_tokenizer(folder: str | Path, role: str):
  """``AutoTokenizer`` of ``folder``; a folder with none is an error naming the role."""
  from transformers import AutoTokenizer

  try:
    return AutoTokenizer.from_pretrained(folder)
  except (OSError, ValueError, TypeError) as err:
    raise ValueError(f"no {role} tokenizer could be read from {folder}: {err}") from None


def check_vocab(tokenizer, vocab_size: int, folder, model: str, role: str) -> None:
  """Every id ``tokenizer`` can give must index the ``vocab_size`` rows of the embedding
  it feeds (an id past the table gathers NaN on the accelerator, silently)."""
  size = len(tokenizer)
  if size > vocab_size:
    where = (
      "eval.py --scorer-tokenizer / --clip, or a run's model.scorer_tokenizer / model.clip"
      if role == "scorer"
      else "eval.py --tokenizer"
    )
    raise ValueError(
      f"the {role} tokenizer of {folder} has {size} ids, but {model}'s {role} embeds only "
      f"{vocab_size}: it is another model's tokenizer; give the {role}'s own ({where})"
    )


def check_ids(ids, vocab_size: int, what: str) -> None:
  """The ids of a batch (``what`` names them) lie in ``[-1, vocab_size)``; -1 is the video
  placeholder of checkpoints without a video token, which never reaches the table."""
  import numpy as np

  ids = np.asarray(ids)
  if ids.size and (ids.max() >= vocab_size or ids.min() < -1):
    bad = ids[(ids >= vocab_size) | (ids < -1)]
    raise ValueError(
      f"{what}: token id {int(bad.flat[0])} is outside the embedding table of "
      f"{vocab_size} rows ({bad.size} such ids): the tokenizer does not belong "
      "to this model"
    )


def model_tokenizers(cfg, folders: TokenizerFolders, model: str):
  """(LLM tokenizer, scorer tokenizer or None) of ``folders``, each checked against the
  embedding it feeds in ``cfg`` (a ``PPLLaVAConfig``; ``model`` names it in errors). A
  scored pooling mode without a scorer tokenizer is an error saying where it was looked
  for."""
  tokenizer = load_tokenizer(folders.llm, "LLM")
  check_vocab(tokenizer, cfg.text.vocab_size, folders.llm, model, "LLM")
  if cfg.scorer is None or folders.scorer is None:
    if cfg.pooling.scored:
      raise ValueError(
        f"pooling mode {cfg.pooling.mode!r} scores relevance, and {model} has "
        f"no scorer tokenizer: none given and no {SCORER_TOKENIZER}/ in it; give "
        "the CLIP / SigLIP folder (--clip or --scorer-tokenizer; in a config "
        "model.clip or model.scorer_tokenizer)"
      )
    return tokenizer, None
  scorer = load_tokenizer(folders.scorer, "scorer")
  check_vocab(scorer, cfg.scorer.text.vocab_size, folders.scorer, model, "scorer")
  check_clip_eos(scorer, cfg.scorer.text, folders.scorer, model)
  return tokenizer, scorer


def check_clip_eos(tokenizer, text_cfg, folder, model: str) -> None:
  """A CLIP text tower pools the features at its end token, found by id (legacy configs,
  ``eos_token_id == 2``: at the highest id of the row, CLIP's end token): a tokenizer
  smaller than the table (a Vicuna tokenizer's 32k ids fit CLIP's 49k rows) must end its
  texts at that id, or the tower pools the wrong position with every id in range. A
  tokenizer of exactly the table's size is the tower's own (the tiny model's char
  tokenizer pools at its highest id by design); SigLIP pools the last position whatever
  its id, so it is not checked."""
  if not isinstance(text_cfg, CLIPTextConfig) or len(tokenizer) == text_cfg.vocab_size:
    return
  eos = text_cfg.eos_token_id
  want = text_cfg.vocab_size - 1 if eos == 2 else eos
  if tokenizer.eos_token_id != want:
    raise ValueError(
      f"the scorer tokenizer of {folder} ends a text with id {tokenizer.eos_token_id}, but "
      f"{model}'s CLIP text tower pools at id {want}: it is another model's tokenizer; give "
      "the scorer's own (eval.py --scorer-tokenizer / --clip, or a run's "
      "model.scorer_tokenizer / model.clip)"
    )


def write_tokenizers(
  folder: Path, sources: TokenizerFolders | None, tokenizer, scorer_tokenizer
) -> None:
  """A model folder's tokenizers, for the next stage to find with no flag: the LLM's files
  as ``sources.llm`` had them (``tokenizer.model`` included) with its processor, chat
  template and generation config; the scorer's, from ``sources.scorer`` alone, in
  ``scorer_tokenizer/``. Without a source folder (the tiny model's char tokenizer) each is
  saved as transformers writes it."""
  if sources is not None:
    pretrained.copy_side_files(sources.llm, folder, scorer=False)
  if not pretrained.has_tokenizer(folder):
    tokenizer.save_pretrained(folder)
  if scorer_tokenizer is None:
    return
  scorer_dir = folder / SCORER_TOKENIZER
  scorer_dir.mkdir(exist_ok=True)
  if sources is not None and sources.scorer is not None:
    pretrained.copy_side_files(sources.scorer, scorer_dir, scorer=False)
  if not pretrained.has_tokenizer(scorer_dir):
    scorer_tokenizer.save_pretrained(scorer_dir)


def check_batch_ids(batch, cfg) -> None:
  """A training batch's LLM and scorer ids inside their tables (``check_ids``)."""
  check_ids(batch.input_ids, cfg.text.vocab_size, "the LLM's input ids")
  if cfg.scorer is not None:
    check_ids(batch.scorer_ids, cfg.scorer.text.vocab_size, "the scorer's input ids")
