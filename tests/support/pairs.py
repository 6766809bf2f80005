"""Hand-built DPO pairs for the train tests: ``PreferenceSample``s of random token ids
around one video's placeholders, and their ``PairBatch`` (``data.dpo.pairs.collate_pairs``).

Ids 0-4 are the char tokenizer's specials (pad, bos, eos, unk, <image>); text ids are drawn
from 5 up. A completion of ``n`` tokens is ``n - 1`` random ids then eos (2), all
supervised, as ``PreferenceBuilder`` makes them.
"""

from __future__ import annotations

import numpy as np

from ppllava_jax.data.dpo.pairs import PairBatch, PreferenceDataConfig, collate_pairs
from ppllava_jax.data.dpo.rows import PreferenceConfig, PreferenceSample
from ppllava_jax.models.ppllava_config import PPLLaVAConfig

BOS, EOS = 1, 2


def make_pair(
  rng,
  cfg: PPLLaVAConfig,
  frames: int,
  prompt: int,
  chosen: int,
  rejected: int,
  scorer_length: int = 0,
) -> PreferenceSample:
  """A pair: bos, 2 text ids, the video's placeholders, ``prompt`` text ids; completions
  of ``chosen`` / ``rejected`` tokens (eos included); a random (frames, 3, S, S) video and,
  with ``scorer_length``, a scorer question of random ids padded to it."""
  vocab, size = cfg.text.vocab_size, cfg.vision.image_size
  text = lambda n: rng.integers(5, vocab, n)
  run = cfg.video_tokens(frames)
  prompt_ids = np.concatenate([[BOS], text(2), np.full(run, cfg.video_token_index), text(prompt)])
  side = lambda n: np.concatenate([text(n - 1), [EOS]]).astype(np.int32)
  scorer_ids = scorer_mask = None
  if scorer_length:
    n = int(rng.integers(3, scorer_length))
    scorer_ids = np.zeros(scorer_length, np.int32)
    scorer_ids[:n] = np.concatenate([[BOS], text(n - 2), [EOS]])
    scorer_mask = (np.arange(scorer_length) < n).astype(np.int32)
  video = rng.normal(size=(frames, 3, size, size)).astype(np.float32)
  return PreferenceSample(
    prompt_ids.astype(np.int32),
    side(chosen),
    side(rejected),
    video,
    tuple(range(frames)),
    run,
    scorer_ids,
    scorer_mask,
  )


def pair_batch(
  samples,
  cfg: PPLLaVAConfig,
  batch_size: int,
  length: int,
  frames: int,
  scorer_length: int = 0,
  ref_logps=None,
) -> PairBatch:
  """``samples`` (None: an empty pair) as a ``PairBatch`` of ``batch_size`` pairs, rows of
  ``length`` tokens (the one bucket)."""
  config = PreferenceDataConfig(
    "unused.jsonl",
    sample=PreferenceConfig(num_frames=frames, max_length=length),
    batch_size=batch_size,
    seq_buckets=(length,),
  )
  return collate_pairs(samples, cfg, config, ref_logps, pad_id=0, scorer_length=scorer_length)
