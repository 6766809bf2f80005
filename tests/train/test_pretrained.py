"""The issue's "done when", on real files: a llava-hf LLaVA-NeXT-Video folder (tiny, random,
safetensors, with its sentencepiece Vicuna tokenizer) and a CLIP folder for the scorer are
trained with ``train.py`` on annotation files in the original's format under the Vicuna
recipe (a fresh BT-Adapter on the CLIP tower), killed with SIGKILL, resumed with the same
command, exported, and evaluated by ``eval.py`` on a multiple-choice task."""

import json
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file
from transformers import AutoTokenizer

from ppllava_jax.eval import app
from ppllava_jax.eval.records import read_records
from ppllava_jax.train.loop import export
from ppllava_jax.train.metrics import read_metrics
from support import train_runs
from support.hf_fixtures import make_llava_next_video, make_scorer_clip
from support.tokenizers import clip_tokenizer, llama_sp_tokenizer
from support.train_data import write_video

STEPS = 4

CONFIG = '''
from ppllava_jax.data.annotations import CorpusConfig, MixtureConfig
from ppllava_jax.data.batch import BatchConfig
from ppllava_jax.data.pipeline import DataConfig
from ppllava_jax.data.sft import SampleConfig
from ppllava_jax.models.btadapter import BTAdapterConfig
from ppllava_jax.train.config import OptimConfig, TrainConfig
from ppllava_jax.train.partition import VICUNA_SFT
from ppllava_jax.train.run_config import ModelConfig, RunConfig

ROOT = {root!r}


def get_config():
  data = DataConfig(
      MixtureConfig((CorpusConfig("clips", ROOT + "/train.json", ROOT + "/videos", "video",
                                  num_frames=4),)),
      SampleConfig(template="plain_v1", max_length=128, max_pictures=1),
      BatchConfig(batch_size=2, seq_buckets=(128,), video_slots=2, image_slots=0,
                  multi_image_slots=0, num_frames=4, max_pictures=1),
      seed=0, num_epochs=None)
  model = ModelConfig(checkpoint=ROOT + "/llava", clip=ROOT + "/clip",
                      btadapter=BTAdapterConfig(depth=2, max_T=8))
  return RunConfig(data=data, model=model,
                   train=TrainConfig(optim=OptimConfig(lr=1e-3, total_steps={steps}),
                                     trainable=VICUNA_SFT),
                   steps={steps}, log_every=1, checkpoint_every=1, keep={steps})
'''


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """The starting folders, annotation files and the config file that names them."""
  root = tmp_path_factory.mktemp("pretrained")
  tokenizer = AutoTokenizer.from_pretrained(llama_sp_tokenizer(root / "llava"))
  image = tokenizer.convert_tokens_to_ids("<image>")  # then <pad>; <video> gets the next id
  make_llava_next_video(root / "llava", vocab_size=image + 3, image_token=image,
                        video_token=image + 2)
  clip_tokenizer(root / "clip")  # start, end = 0, 1 (also pad), 518 ids
  make_scorer_clip(root / "clip", openai_like=True, vocab_size=518, bos_token_id=0,
                   eos_token_id=1, pad_token_id=1)
  (root / "videos").mkdir()
  records, items = [], []
  for i in range(4):
    write_video(root / "videos" / f"{i}.mp4", num_frames=8, size=(32, 32), step=30 * i)
    shade = ("dark", "light")[i // 2]
    records.append({"video": f"{i}.mp4", "QA": [{"q": "Is the video dark or light?",
                                                "a": f"It is {shade}."}]})
    items.append({"video": f"{i}.mp4", "question": "Is the video dark or light?",
                  "candidates": ["dark", "light"], "answer": shade})
  (root / "train.json").write_text(json.dumps(records))
  (root / "mcq").mkdir()
  (root / "mcq" / "shade.json").write_text(json.dumps(items))
  config = root / "llava_sft.py"
  config.write_text(CONFIG.format(root=str(root), steps=STEPS))
  return root, config


def command(config, workdir):
  return [sys.executable, str(train_runs.ROOT / "train.py"), "--config", str(config),
          "--workdir", str(workdir)]


def test_llava_hf_folder_trains_resumes_after_sigkill_exports_and_evaluates(
    folders, compile_cache, tmp_path):
  """Killed after its first checkpoint and run again, the run ends with every update made
  once (that the result is bit-identical to an uninterrupted run is
  tests/train/test_loop.py's, on the same machinery)."""
  root, config = folders
  workdir = tmp_path / "run"
  killed_at = train_runs.kill_after_first_checkpoint(command(config, workdir), compile_cache,
                                                     workdir, tmp_path / "first.log")
  resumed = train_runs.run(command(config, workdir), compile_cache)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  assert "a fresh BT-Adapter" in (tmp_path / "first.log").read_text()
  assert killed_at[-1] < STEPS and f"resuming from checkpoint {killed_at[-1]}" in resumed.stdout
  assert f"step {STEPS}: {STEPS} updates, 0 skipped" in resumed.stdout
  losses = {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}
  assert sorted(losses) == list(range(1, STEPS + 1)) and all(np.isfinite(list(losses.values())))

  out = export(workdir, tmp_path / "exported")
  exported = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
  start = {k: v for f in (root / "llava").glob("*.safetensors") for k, v in load_file(f).items()}
  config_json = json.loads((out / "config.json").read_text())
  assert config_json["ppllava_btadapter"]["depth"] == 2
  # the Vicuna recipe: the CLIP ViT frozen (bit for bit), the LLM trained; with its adapter
  # the tower is saved as the original's CLIPVisionModel_BTAdapter (under vision_model.)
  frozen = [k for k in start if k.startswith("vision_tower.")]
  assert frozen and all(np.array_equal(exported[k.replace("vision_tower.",
                                                           "vision_tower.vision_model.")],
                                       start[k]) for k in frozen)
  lm = [k for k in start if k.startswith("language_model.") and k in exported]
  assert lm and not any(np.array_equal(exported[k], start[k]) for k in lm)
  assert any("btadapter" in k for k in exported)
  text = "USER: <image> Is the video dark or light? ASSISTANT: It is dark."
  for theirs, ours in ((root / "llava", out), (root / "clip", out / "scorer_tokenizer")):
    assert (AutoTokenizer.from_pretrained(ours)(text).input_ids
            == AutoTokenizer.from_pretrained(theirs)(text).input_ids)

  assert app.main(["--checkpoint", str(out), "--scorer-tokenizer", str(out / "scorer_tokenizer"),
                   "--mvbench", str(root / "mcq"), "--video-root", str(root / "videos"),
                   "--frames", "4", "--max-new-tokens", "4", "--out",
                   str(tmp_path / "eval")]) == 0
  records = read_records(tmp_path / "eval" / "predictions.jsonl")
  assert len(records) == 4 and all("error" not in r for r in records)
  results = json.loads((tmp_path / "eval" / "results.json").read_text())
  assert results["items"] == 4 and not results["failed"]
