"""train.py's --set overrides (typed, checked, unknown keys named) and export: the folder
loads with PPLLaVA.from_pretrained, holds the trained parameters, and eval.py runs on it."""

import json

import numpy as np
import pytest
from support import train_runs

from ppllava_jax import cli
from ppllava_jax.config import apply_overrides, from_json, load_config, to_json
from ppllava_jax.train.run import config as rc


def tiny():
  return load_config(train_runs.CONFIG, rc.RunConfig)


def test_set_parses_each_value_with_its_field_type():
  cfg = apply_overrides(
    tiny(),
    [
      "steps=7",
      "checkpoint_every=3",
      "log_every=1",
      "peak_flops=2e12",
      "init_from=/x/y",
      "train.optim.lr=0.5",
      "train.optim.clip_norm=none",
      "train.compute_dtype=bfloat16",
      "data.batch.seq_buckets=(64, 256)",
      "data.num_epochs=None",
      "model.tiny.kernel=(1,2,2)",
      "data.batch.video_slots=1",
      "data.batch.batch_size=1",
      "synthetic.videos=3",
    ],
  )
  assert (cfg.steps, cfg.checkpoint_every, cfg.log_every, cfg.peak_flops) == (7, 3, 1, 2e12)
  assert cfg.init_from == "/x/y" and cfg.train.optim.lr == 0.5
  assert cfg.train.optim.clip_norm is None and cfg.train.compute_dtype == "bfloat16"
  assert cfg.data.batch.seq_buckets == (64, 256) and cfg.data.num_epochs is None
  assert cfg.model.tiny.kernel == (1, 2, 2) and cfg.data.batch.batch_size == 1
  assert cfg.synthetic.videos == 3


@pytest.mark.parametrize(
  "item, message",
  [
    (
      "stepz=3",
      "the config (RunConfig) has no field 'stepz'; valid: data, preference, dpo, model, eval_data",
    ),
    ("train.optim.lrr=1", "train.optim (OptimConfig) has no field 'lrr'; valid: lr, schedule"),
    ("steps=three", "--set steps=three: not a int"),
    ("train.optim.lr=fast", "--set train.optim.lr=fast: not a float"),
    ("data.batch.seq_buckets=(1,'a')", "data.batch.seq_buckets: expected a int"),
    ("steps", "--set takes key=value"),
    ("steps.x=1", "steps is not a config section"),
    ("steps=0", "RunConfig.steps must be >= 1"),
    ("train.optim.schedule=cosin", "OptimConfig.schedule must be one of"),
  ],
)
def test_bad_overrides_are_errors_that_name_the_problem(item, message, tmp_path, capsys):
  argv = ["--config", str(train_runs.CONFIG), "--workdir", str(tmp_path / "w"), "--set", item]
  assert cli.run(train_runs.train_main(), argv) == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / "w").exists()


def test_config_round_trips_through_json():
  cfg = apply_overrides(tiny(), ["train.optim.clip_norm=none"])
  assert from_json(rc.RunConfig, to_json(cfg)) == cfg


def test_export_loads_with_from_pretrained_and_eval_runs_on_it(reference_run, tmp_path, capsys):
  from flax import nnx

  from ppllava_jax.eval import app
  from ppllava_jax.models.ppllava import PPLLaVA
  from ppllava_jax.train.core.partition import path_name

  workdir, _ = reference_run
  out = tmp_path / "hf"
  export = ["export", "--workdir", str(workdir), "--out", str(out), "--step", "6"]
  assert cli.run(train_runs.train_main(), export) == 0
  assert "exported checkpoint 6" in capsys.readouterr().out
  model = PPLLaVA.from_pretrained(out)
  saved = train_runs.state_at(workdir, 6)
  kernel = "language_model/model/layers/0/mlp/up_proj/kernel"
  loaded = {path_name(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}
  (key,) = [k for k in saved if "params" in k and kernel.replace("/", "']['") in k]
  np.testing.assert_array_equal(loaded[kernel], saved[key])
  export = ["export", "--workdir", str(workdir), "--out", str(out), "--step", "5"]
  assert cli.run(train_runs.train_main(), export) == 2
  assert "no checkpoint 5" in capsys.readouterr().err
  # the folder is complete: eval.py finds the scorer's tokenizer in it with no flag
  assert {p.name for p in out.iterdir()} >= {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "generation_config.json",
    "scorer_tokenizer",
  }
  qa = tmp_path / "qa.jsonl"
  qa.write_text(json.dumps(dict(id="q1", video="0000.mp4", question="Which way?")) + "\n")
  argv = [
    "--checkpoint",
    str(out),
    "--video-root",
    str(workdir / "data" / "videos"),
    "--out",
    str(tmp_path / "eval"),
    "--frames",
    "4",
    "--max-new-tokens",
    "1",
    "--batch-size",
    "1",
    "--qa",
    str(qa),
  ]
  assert app.main(argv) == 0
  (line,) = (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
  assert json.loads(line)["status"] == "ok"


def test_answers_that_are_all_empty_fail_the_run(reference_run, tmp_path, capsys):
  """A model that only ever generates a special token answers "" to everything, which the
  original MVBench protocol counts as right: eval.py says so and exits 1, scoring nothing."""
  from safetensors.numpy import load_file, save_file

  from ppllava_jax.eval import app

  workdir, _ = reference_run
  out = tmp_path / "hf"
  assert (
    cli.run(train_runs.train_main(), ["export", "--workdir", str(workdir), "--out", str(out)]) == 0
  )
  tensors = load_file(out / "model.safetensors")
  # every logit 0: the greedy token is id 0, <pad>, which decoding skips
  tensors["language_model.model.norm.weight"][:] = 0
  save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
  data = workdir / "data"
  argv = [
    "--checkpoint",
    str(out),
    "--mvbench",
    str(data / "mcq"),
    "--video-root",
    str(data / "videos"),
    "--out",
    str(tmp_path / "eval"),
    "--frames",
    "4",
    "--max-new-tokens",
    "2",
    "--limit",
    "4",
  ]
  capsys.readouterr()
  assert app.main(argv) == 1
  captured = capsys.readouterr()
  assert "error: all 4 answers are empty" in captured.err
  assert not (tmp_path / "eval" / "results.json").exists()
