"""The DPO issue's "done when", with real files and processes: a tiny SFT run is exported;
``train.py --config configs/dpo_tiny.py`` starts from that export on LLaVA-Hound-format
rows over frame folders, is killed with SIGKILL, resumed with the same command (its cached
reference log-probs read back, not recomputed) and ends with the parameters of an
uninterrupted run; the result is exported and evaluated with ``eval.py``. Also: on the
synthetic preference set the reward margins rise and the accuracy reaches 1; the cached
log-probs equal recomputed ones; a cache computed for other rows is refused."""

import json
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file
from support import train_runs

from ppllava_jax.config import apply_overrides, load_config
from ppllava_jax.data.dpo.pairs import PairBatch
from ppllava_jax.eval import app
from ppllava_jax.eval.records import read_records
from ppllava_jax.train.dpo.objective import reference_logps
from ppllava_jax.train.run import config as rc
from ppllava_jax.train.run import reference
from ppllava_jax.train.run.assembly import load
from ppllava_jax.train.run.export import export
from ppllava_jax.train.run.loop import prepare_data, train
from ppllava_jax.train.run.metrics import read_frames, read_metrics

DPO_CONFIG = train_runs.ROOT / "configs" / "dpo_tiny.py"
STEPS = 6  # 2 epochs of 6 pairs, 2 a batch
SMALL_DPO = (
  "synthetic.videos=6",
  "synthetic.eval_videos=2",
  "synthetic.size=56",
  "preference.batch_size=2",
  "preference.seq_buckets=(192,)",
  "preference.sample.max_length=192",
  f"steps={STEPS}",
  f"train.optim.total_steps={STEPS}",
  "log_every=1",
  "checkpoint_every=1",
  f"keep={STEPS}",
)


def dpo_command(workdir, *extra):
  sets = [a for s in SMALL_DPO + extra for a in ("--set", s)]
  return [
    sys.executable,
    str(train_runs.ROOT / "train.py"),
    "--config",
    str(DPO_CONFIG),
    "--workdir",
    str(workdir),
    *sets,
  ]


@pytest.fixture(scope="module")
def sft_export(tmp_path_factory, compile_cache):
  """An exported two-step run of configs/sft_tiny.py (56-pixel frames)."""
  root = tmp_path_factory.mktemp("sft")
  done = train_runs.run(
    train_runs.command(root / "run", "steps=2", "mcq=None", "eval_every=0"), compile_cache
  )
  assert done.returncode == 0, done.stdout + done.stderr
  return export(root / "run", root / "hf")


def tensors(folder):
  return {k: v for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}


def test_dpo_from_an_sft_export_resumes_after_sigkill_exports_and_evaluates(
  sft_export, compile_cache, tmp_path
):
  start = f"model.checkpoint={sft_export}"
  whole = train_runs.run(dpo_command(tmp_path / "whole", start, "mcq=None"), compile_cache)
  assert whole.returncode == 0, whole.stdout + whole.stderr

  workdir = tmp_path / "run"
  killed_at = train_runs.kill_after_first_checkpoint(
    dpo_command(workdir, start), compile_cache, workdir, tmp_path / "first.log"
  )
  cache = workdir / reference.CACHE
  cached_at = cache.stat().st_mtime_ns
  resumed = train_runs.run(dpo_command(workdir, start), compile_cache)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  first = (tmp_path / "first.log").read_text()
  assert "reference log-probs of 6 rows computed and cached" in first
  assert killed_at[-1] < STEPS and f"resuming from checkpoint {killed_at[-1]}" in resumed.stdout
  assert "reference log-probs of 6 rows read from" in resumed.stdout
  assert cache.stat().st_mtime_ns == cached_at
  assert f"step {STEPS}: {STEPS} updates, 0 skipped" in resumed.stdout
  want, got = train_runs.state_at(tmp_path / "whole", STEPS), train_runs.state_at(workdir, STEPS)
  assert want.keys() == got.keys()
  assert all(np.array_equal(want[k], got[k]) for k in want), "resumed != uninterrupted"

  records = [r for r in read_metrics(workdir) if "loss" in r]
  assert sorted(r["step"] for r in records) == list(range(1, STEPS + 1))
  for name in (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "ref_logps/chosen",
    "ref_logps/rejected",
  ):
    assert all(np.isfinite(r[name]) for r in records), name
  assert records[0]["pairs"] == 2 and records[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)
  events = b"".join(b for f in (workdir / "tensorboard").iterdir() for b in read_frames(f))
  assert b"rewards/margins" in events and b"logps/rejected" in events
  from PIL import Image

  # loss, multiple-choice accuracy, reward margins and accuracies
  assert Image.open(workdir / "loss.png").size == (640, 1200)

  out = export(workdir, tmp_path / "exported")
  before, after = tensors(sft_export), tensors(out)
  assert before.keys() == after.keys()
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert changed and all(k.startswith("language_model.") for k in changed)  # the LLM alone

  data = workdir / "data"
  assert (
    app.main(
      [
        "--checkpoint",
        str(out),
        "--scorer-tokenizer",
        str(out / "scorer_tokenizer"),
        "--mvbench",
        str(data / "mcq"),
        "--video-root",
        str(data / "videos"),
        "--frames",
        "4",
        "--max-new-tokens",
        "4",
        "--out",
        str(tmp_path / "eval"),
      ]
    )
    == 0
  )
  predictions = read_records(tmp_path / "eval" / "predictions.jsonl")
  assert len(predictions) == 6 and all("error" not in r for r in predictions)
  results = json.loads((tmp_path / "eval" / "results.json").read_text())
  assert results["items"] == 6 and not results["failed"]


def _config(workdir, *extra):
  cfg = apply_overrides(
    load_config(DPO_CONFIG, rc.RunConfig),
    [*SMALL_DPO, "mcq=None", "model.tiny.image_size=56", *extra],
  )
  return prepare_data(cfg, workdir)


def test_margins_rise_the_cache_equals_recomputed_log_probs_and_is_refused_for_other_rows(tmp_path):
  cfg = _config(
    tmp_path,
    "synthetic.videos=8",
    "preference.batch_size=4",
    "preference.num_epochs=None",
    "steps=12",
    "train.optim.total_steps=12",
    "train.optim.lr=3e-3",
    "checkpoint_every=12",
    "log_every=3",
  )
  summary = train(cfg, tmp_path)
  assert summary["updates"] == 12
  records = [r for r in read_metrics(tmp_path) if "loss" in r]
  first, last = records[0], records[-1]
  assert first["rewards/margins"] < 0.5 < 1.0 < last["rewards/margins"]
  assert last["rewards/accuracies"] == 1.0 and last["loss"] < 0.3 < np.log(2)

  run, start = load(cfg)  # the tiny model of the config's seed: the run's starting parameters
  table = reference.load(tmp_path / reference.CACHE, reference.fingerprint(cfg))
  fresh = reference.compute(run, cfg, start.params)
  assert len(table) == 8 and fresh.keys() == table.keys()
  np.testing.assert_allclose([fresh[k] for k in table], [table[k] for k in table], rtol=1e-6)
  # one batch by hand, in another order and epoch: frames are pinned per row
  from ppllava_jax.data.dpo import pairs
  from ppllava_jax.data.dpo.rows import read_preference_rows

  rows = read_preference_rows(cfg.preference.rows, cfg.preference.media_root).rows
  builder = pairs.make_builder(
    cfg.preference,
    rows,
    tokenizer=run.tokenizer,
    model=run.model_cfg,
    scorer_tokenizer=run.scorer_tokenizer,
    pin_frames=True,
  )
  batch: PairBatch = builder.collate([builder.build(r, 1, 0) for r in (5, 2, 7, 0)])
  logp = np.asarray(reference_logps(run.graphdef, cfg.train, start.params, run.frozen, batch))
  np.testing.assert_allclose(logp, [v for r in (5, 2, 7, 0) for v in table[rows[r].id]], rtol=1e-5)

  rows_file = tmp_path / "data" / "preference.jsonl"
  lines = rows_file.read_text().splitlines()
  rows_file.write_text("\n".join(lines[:-1]) + "\n")
  with pytest.raises(
    ValueError,
    match=r"logps\.npz holds reference log-probs for another setup "
    r"\(rows_sha256 changed\); delete it",
  ):
    train(
      apply_overrides(
        cfg, ["steps=13", "train.optim.total_steps=13", "resume=train.optim.total_steps"]
      ),
      tmp_path,
    )


def test_accumulated_micro_batches_train_as_one_batch(tmp_path):
  """3 pairs, 2 updates: batches of 2 pairs, or micro-batches of 1 pair stacked by 2, the
  last update's second micro-batch empty (the data ends inside it)."""

  def final(name, *extra):
    cfg = _config(
      tmp_path / name,
      "synthetic.videos=3",
      "preference.num_epochs=1",
      "steps=2",
      "train.optim.total_steps=2",
      "checkpoint_every=2",
      *extra,
    )
    train(cfg, tmp_path / name)
    return train_runs.state_at(tmp_path / name, 2)

  whole = final("whole", "preference.batch_size=2")
  micro = final("micro", "preference.batch_size=1", "train.optim.grad_accum=2")
  params = [k for k in whole if "params" in k]
  assert params and whole.keys() == micro.keys()
  for k in params:
    np.testing.assert_allclose(micro[k], whole[k], rtol=1e-5, atol=1e-7, err_msg=k)
