"""Where a model folder's tokenizers are found, and the checks that keep another model's
tokenizer (or a NaN reference) from turning into silently wrong numbers."""

import dataclasses
import json

import numpy as np
import pytest
from support.tokenizers import clip_tokenizer, llama_sp_tokenizer
from support.train_data import tiny_model_config

from ppllava_jax.data.text.tokenizer import (
  check_ids,
  model_tokenizers,
  tokenizer_folders,
  write_tokenizers,
)


def _folder(path, **config):
  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps({"model_type": "llava_next", **config}))
  return path


def test_the_scorer_tokenizer_is_found_in_this_order(tmp_path):
  plain = _folder(tmp_path / "llava")
  assert tokenizer_folders(plain).scorer is None and tokenizer_folders(plain).llm == plain
  export = _folder(tmp_path / "export")
  (export / "scorer_tokenizer").mkdir()
  assert tokenizer_folders(export).scorer == export / "scorer_tokenizer"
  # an exported folder given whole as the scorer's tokenizer means its scorer_tokenizer/
  assert tokenizer_folders(plain, scorer_tokenizer=export).scorer == export / "scorer_tokenizer"
  clip = tmp_path / "clip"
  clip.mkdir()
  assert tokenizer_folders(export, clip=clip).scorer == clip
  assert tokenizer_folders(export, clip=clip, scorer_tokenizer=plain).scorer == plain
  released = _folder(tmp_path / "released", clip_weight="../clip")
  assert tokenizer_folders(released).scorer == released / "../clip"
  assert tokenizer_folders(_folder(tmp_path / "away", clip_weight="/authors/clip")).scorer is None


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("tokenizers")
  return llama_sp_tokenizer(root / "llama"), clip_tokenizer(root / "clip")


def test_each_tokenizer_must_fit_the_embedding_it_feeds(tokenizer_dirs, tmp_path):
  llama, clip = tokenizer_dirs  # 702 ids, eos 2; 518 ids, eos 1
  cfg = tiny_model_config(image_token=700)  # LLM 1000 rows; CLIP scorer 600 rows, eos 1
  folders = tokenizer_folders(_folder(tmp_path / "m"), tokenizer=llama, scorer_tokenizer=clip)
  tok, scorer = model_tokenizers(cfg, folders, "M")
  assert (len(tok), len(scorer)) == (702, 518)
  # the LLM's tokenizer given as the scorer's: more ids than the scorer's table
  swapped = dataclasses.replace(folders, scorer=llama)
  with pytest.raises(
    ValueError,
    match=f"the scorer tokenizer of {llama} has 702 ids, but M's "
    "scorer embeds only 600: it is another model's tokenizer",
  ):
    model_tokenizers(cfg, swapped, "M")
  # ... and one whose ids fit the table but end a text elsewhere: CLIP pools at its EOS
  roomy = dataclasses.replace(
    cfg,
    scorer=dataclasses.replace(
      cfg.scorer, text=dataclasses.replace(cfg.scorer.text, vocab_size=1000)
    ),
  )
  with pytest.raises(
    ValueError, match="ends a text with id 2, but M's CLIP text tower pools at id 1"
  ):
    model_tokenizers(roomy, swapped, "M")
  legacy = dataclasses.replace(
    roomy,
    scorer=dataclasses.replace(  # OpenAI CLIP's config
      roomy.scorer, text=dataclasses.replace(roomy.scorer.text, eos_token_id=2)
    ),
  )
  with pytest.raises(
    ValueError, match="ends a text with id 2, but M's CLIP text tower pools at id 999"
  ):
    model_tokenizers(legacy, swapped, "M")
  small = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=500))
  with pytest.raises(
    ValueError, match="the LLM tokenizer .* has 702 ids, but M's LLM embeds only 500"
  ):
    model_tokenizers(small, folders, "M")
  with pytest.raises(
    ValueError, match="pooling mode 'ppllava' scores relevance, and M has no scorer tokenizer"
  ):
    model_tokenizers(cfg, dataclasses.replace(folders, scorer=None), "M")


def test_ids_outside_the_table_are_refused():
  check_ids(np.array([[-1, 0, 9]]), 10, "ids")  # -1: a video placeholder, never embedded
  with pytest.raises(
    ValueError, match="ids: token id 10 is outside the embedding table of 10 rows \\(2 such ids\\)"
  ):
    check_ids(np.array([[1, 10], [10, 3]]), 10, "ids")


def test_written_tokenizers_are_the_sources_files(tokenizer_dirs, tmp_path):
  from transformers import AutoTokenizer

  llama, clip = tokenizer_dirs
  out = tmp_path / "out"
  out.mkdir()
  sources = dataclasses.replace(
    tokenizer_folders(_folder(tmp_path / "m"), tokenizer=llama), scorer=clip
  )
  tok, scorer = AutoTokenizer.from_pretrained(llama), AutoTokenizer.from_pretrained(clip)
  write_tokenizers(out, sources, tok, scorer)
  assert (out / "tokenizer.model").read_bytes() == (llama / "tokenizer.model").read_bytes()
  assert not (out / "tokenizer.json").exists()  # as the source had it: sentencepiece only
  assert sorted(p.name for p in (out / "scorer_tokenizer").iterdir()) == [
    "merges.txt",
    "tokenizer_config.json",
    "vocab.json",
  ]


def test_non_finite_reference_log_probs_are_refused_and_never_read_back(tmp_path):
  from support import train_runs

  from ppllava_jax.config import apply_overrides, load_config
  from ppllava_jax.train.run import config as rc
  from ppllava_jax.train.run import reference

  with pytest.raises(
    ValueError,
    match="the reference log-probs of 1 of 2 rows of rows.jsonl are not finite \\(e.g. row 'b'",
  ):
    reference.check_finite({"a": (-1.0, -2.0), "b": (float("nan"), -2.0)}, "rows.jsonl")
  rows = tmp_path / "rows.jsonl"
  rows.write_text("{}\n")
  cfg = apply_overrides(
    load_config(train_runs.ROOT / "configs" / "dpo_tiny.py", rc.RunConfig),
    [f"preference.rows={rows}"],
  )
  cache = tmp_path / reference.CACHE
  reference.save(cache, {"a": (-1.0, float("inf"))}, reference.fingerprint(cfg))  # older code's
  with pytest.raises(ValueError, match="are not finite"):
    reference.reference_table(None, cfg, tmp_path, lambda: pytest.fail("recomputed"))
