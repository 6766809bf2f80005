"""The Vicuna journey, as a user walks it: ``configs/sft_vicuna7b.py`` and
``configs/dpo_vicuna7b.py`` run by ``train.py`` with only hub ids, data paths and batch
sizes swapped by ``--set`` for tiny folders of the same families (``support.journeys``:
llava-hf LLaVA-NeXT-Video + CLIP with their real tokenizer layouts), each stage's output
fed to the next with no extra flag: SFT (killed and resumed) -> export -> eval.py -> DPO
from the export -> export -> eval.py -> convert.py to-orbax / to-hf -> transformers."""

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import load_file
from support import journeys, train_runs
from transformers import AutoTokenizer

from ppllava_jax.train.run.metrics import read_metrics

pytestmark = pytest.mark.slow
ROOT = train_runs.ROOT
TEXT = "USER: <image> Is the video dark or light? ASSISTANT: It is dark."


def train_command(recipe: str, workdir, *sets: str) -> list[str]:
  config = ROOT / "configs" / f"{recipe}.py"
  return [
    sys.executable,
    str(ROOT / "train.py"),
    "--config",
    str(config),
    "--workdir",
    str(workdir),
    *[a for s in sets for a in ("--set", s)],
  ]


def script(name: str, *args) -> list[str]:
  return [sys.executable, str(ROOT / name), *map(str, args)]


def ok(done: subprocess.CompletedProcess) -> str:
  assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-6000:]
  return done.stdout + done.stderr


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp("journeys")
  return SimpleNamespace(
    vicuna=journeys.vicuna_start(root / "vicuna"),
    sft=journeys.sft_data(root / "data"),
    pref=journeys.preference_data(root / "pref"),
    root=root,
  )


@pytest.fixture(scope="module")
def vicuna_sft(world, compile_cache, tmp_path_factory):
  """``configs/sft_vicuna7b.py`` as ``scripts/*`` run it, SIGKILLed after its first
  checkpoint and started again with the same command."""
  tmp = tmp_path_factory.mktemp("vicuna_sft")
  workdir = tmp / "run"
  cmd = train_command(
    "sft_vicuna7b", workdir, *journeys.recipe_overrides("sft_vicuna7b", world.vicuna, world.sft)
  )
  killed = train_runs.kill_after_first_checkpoint(cmd, compile_cache, workdir, tmp / "first.log")
  resumed = train_runs.run(cmd, compile_cache)
  return SimpleNamespace(
    workdir=workdir, killed=killed, first=(tmp / "first.log").read_text(), resumed=ok(resumed)
  )


def test_vicuna_recipe_trains_and_resumes_after_sigkill(vicuna_sft):
  first, resumed = vicuna_sft.first, vicuna_sft.resumed
  assert "a fresh BT-Adapter" in first and "compiling the train step for" in first
  assert "train step compiled and run in" in first
  assert f"resuming from checkpoint {vicuna_sft.killed[-1]}" in resumed
  assert "step 2: 2 updates, 0 skipped" in resumed
  losses = {r["step"]: r["loss"] for r in read_metrics(vicuna_sft.workdir) if "loss" in r}
  assert sorted(losses) == [1, 2] and all(np.isfinite(list(losses.values())))
  assert (vicuna_sft.workdir / "loss.png").is_file()


def _tensors(folder):
  return {k: v for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}


def test_sft_export_eval_dpo_export_eval_convert_transformers(
  vicuna_sft, world, compile_cache, tmp_path
):
  env = train_runs.env(compile_cache)
  run = lambda cmd: ok(
    subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600, check=False)
  )
  # export: a complete folder, found by every next stage with no other flag
  sft = vicuna_sft.workdir / "hf"
  out = run(script("train.py", "export", "--workdir", vicuna_sft.workdir, "--out", sft))
  assert f"exported checkpoint 2 of {vicuna_sft.workdir} to {sft}" in out
  config = json.loads((sft / "config.json").read_text())
  assert config["ppllava_pooling_mode"] == "ppllava" and config["pooling_kernel"] == [2, 3, 3]
  assert config["ppllava_btadapter"]["depth"] == 2 and "ppllava_scorer" in config
  assert (sft / "tokenizer.model").is_file()  # as llava-hf ships it: sentencepiece only
  assert json.loads((sft / "generation_config.json").read_text())["eos_token_id"] == 2
  for theirs, ours in (
    (world.vicuna.checkpoint, sft),
    (world.vicuna.clip, sft / "scorer_tokenizer"),
  ):
    assert (
      AutoTokenizer.from_pretrained(ours)(TEXT).input_ids
      == AutoTokenizer.from_pretrained(theirs)(TEXT).input_ids
    )
  start, exported = _tensors(world.vicuna.checkpoint), _tensors(sft)
  frozen = [k for k in start if k.startswith("vision_tower.")]  # the recipe freezes the ViT
  assert frozen and all(
    np.array_equal(exported[k.replace("vision_tower.", "vision_tower.vision_model.")], start[k])
    for k in frozen
  )

  def evaluate(folder, name):
    eval_out = tmp_path / name
    run(
      script(
        "eval.py",
        "--checkpoint",
        folder,
        "--mvbench",
        world.sft["mcq"],
        "--video-root",
        world.sft["videos"],
        "--frames",
        journeys.FRAMES,
        "--max-new-tokens",
        4,
        "--out",
        eval_out,
      )
    )
    results = json.loads((eval_out / "results.json").read_text())
    assert results["items"] == 4 and not results["failed"], results

  evaluate(sft, "eval_sft")
  # DPO from the export, as configs/dpo_vicuna7b.py documents it
  dpo = tmp_path / "dpo"
  out = run(
    train_command(
      "dpo_vicuna7b",
      dpo,
      f"model.checkpoint={sft}",
      *journeys.recipe_overrides("dpo_vicuna7b", data=world.pref),
    )
  )
  assert "step 2: 2 updates, 0 skipped" in out
  records = [r for r in read_metrics(dpo) if "loss" in r]
  assert records and all(
    np.isfinite(r["loss"]) and np.isfinite(r["rewards/margins"]) for r in records
  )
  dpo_hf = dpo / "hf"
  run(script("train.py", "export", "--workdir", dpo, "--out", dpo_hf))
  after = _tensors(dpo_hf)
  assert all(
    np.array_equal(after[k], exported[k]) for k in exported if not k.startswith("language_model.")
  )  # DPO trains the LLM alone
  evaluate(dpo_hf, "eval_dpo")
  # convert.py both ways; transformers reads the result
  orbax, back = tmp_path / "orbax", tmp_path / "back"
  run(script("convert.py", "to-orbax", dpo_hf, orbax))
  run(script("convert.py", "to-hf", orbax, back))
  assert _tensors(back).keys() == after.keys()
  assert all(np.array_equal(_tensors(back)[k], v) for k, v in after.items())
  assert (back / "scorer_tokenizer" / "vocab.json").is_file()
  assert (back / "tokenizer.model").is_file()
  _same_llm_logits(back)


def _same_llm_logits(folder):
  """transformers' LLaVA-NeXT-Video on the folder gives our logits on a text prompt."""
  import torch
  from transformers import LlavaNextVideoForConditionalGeneration

  from ppllava_jax.models.ppllava import PPLLaVA

  ids = np.asarray([AutoTokenizer.from_pretrained(folder)("the dog runs").input_ids])
  theirs = LlavaNextVideoForConditionalGeneration.from_pretrained(folder).eval()
  with torch.no_grad():
    want = theirs(input_ids=torch.tensor(ids)).logits.numpy()
  got = np.asarray(PPLLaVA.from_pretrained(folder)(ids).logits)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
