"""``make demo``: the whole story on the CPU in a few minutes: data, training, evaluation.

1. Draws a small synthetic video-QA set (``train.run.synthetic``: one coloured shape moving
   across a grey field; colour, shape and direction questions whose answers only the
   pixels give), with the held-out questions as MVBench task files.
2. Trains a tiny PPLLaVA on it from random weights with the real trainer
   (``train.run.loop.train`` on ``configs/sft_tiny.py`` with ``DemoConfig``'s ``--set``
   overrides; its progress bar, metrics and ``loss.png``), and exports it
   (``train.run.export``) as a transformers folder.
3. Evaluates the held-out questions with ``eval.py`` itself (``eval.app.main``, in
   this process), as a converted real checkpoint is evaluated on MVBench.
4. Copies eval.py's relevance heat-map of one held-out question (the trained scorer, with
   its colour scale) and prints a summary: what was trained, the losses, accuracy per
   question type beside chance, where the pictures are, and the ``train.py`` /
   ``eval.py`` commands that redo each stage.

It starts afresh each time: ``train/``, ``model/`` and ``eval/`` under ``--out`` are
replaced.

  python -m ppllava_jax.demo [--config configs/demo.py] [--out out/demo]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import shutil
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from ppllava_jax.config import apply_overrides, load_config
from ppllava_jax.eval import app, mcq
from ppllava_jax.models.ppllava import PPLLaVA
from ppllava_jax.train.run import config as rc
from ppllava_jax.train.run import export, loop
from ppllava_jax.train.run.metrics import read_metrics
from ppllava_jax.train.run.synthetic import generate

ROOT = Path(__file__).resolve().parents[1]  # the checkout: configs/ and train.py


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """base: the training config (relative to the checkout) the other fields override;
  steps, lr: the run's batches and peak learning rate (cosine schedule); videos /
  eval_videos: drawn for training / held out (24 combinations of colour, shape and
  direction: a multiple of 24 is balanced); train_vision: the vision tower trains too
  (it starts random here, not as a pretrained CLIP); llm_layers: the decoder's depth;
  max_new_tokens, eval_batch_size: eval.py's; seed: data and initialisation."""

  base: str = "configs/sft_tiny.py"
  steps: int = 600
  lr: float = 1e-3
  videos: int = 96
  eval_videos: int = 24
  train_vision: bool = False
  llm_layers: int = 1
  max_new_tokens: int = 10
  eval_batch_size: int = 8
  seed: int = 0


def overrides(cfg: DemoConfig) -> list[str]:
  """The ``train.py --set`` values that turn ``cfg.base`` into the demo's run."""
  sets = [
    f"steps={cfg.steps}",
    f"train.optim.total_steps={cfg.steps}",
    f"train.optim.lr={cfg.lr}",
    f"synthetic.videos={cfg.videos}",
    f"synthetic.eval_videos={cfg.eval_videos}",
    f"synthetic.seed={cfg.seed}",
    f"train.seed={cfg.seed}",
    f"model.tiny.seed={cfg.seed}",
    f"model.tiny.llm_layers={cfg.llm_layers}",
    # the loss of every held-out question (one epoch ends sooner) once, at the end;
    # eval.py gives the accuracy afterwards
    f"eval_every={cfg.steps}",
    f"eval_batches={3 * cfg.eval_videos}",
    "mcq=None",
    f"checkpoint_every={cfg.steps}",
    "log_every=10",
    # a worker process builds the next batches while the step runs
    "data.num_workers=1",
  ]
  if cfg.train_vision:
    sets.append("train.trainable=(('.*', True),)")
  return sets


def eval_args(cfg: DemoConfig, frames: int, data: Path, model: Path, out: Path) -> list[str]:
  """``eval.py``'s arguments for the held-out questions (``train.run.synthetic``'s layout),
  at the ``frames`` the model was trained on."""
  return [
    "--checkpoint",
    str(model),
    "--mvbench",
    str(data / "mcq"),
    "--video-root",
    str(data / "videos"),
    "--frames",
    str(frames),
    "--max-new-tokens",
    str(cfg.max_new_tokens),
    "--batch-size",
    str(cfg.eval_batch_size),
    "--out",
    str(out),
    "--visualize",
    str(out / "maps"),
  ]


def baselines(items: list[mcq.MVBenchItem]) -> dict[str, tuple[float, float]]:
  """Per task: (chance: the mean of 1 / candidates, in %; the best constant answer's %)."""
  by_task = collections.defaultdict(list)
  for item in items:
    by_task[item.task].append(item)
  return {
    task: (
      100 * float(np.mean([1 / len(i.candidates) for i in group])),
      100 * max(collections.Counter(i.answer for i in group).values()) / len(group),
    )
    for task, group in by_task.items()
  }


def above_chance(accuracy: float, chance: float, n: int) -> bool:
  """More than two standard errors of a guesser's accuracy (in %) above ``chance``."""
  return accuracy > chance + 2 * 100 * np.sqrt(chance / 100 * (1 - chance / 100) / n)


def run(cfg: DemoConfig, out: Path) -> dict:
  """The four stages (module doc); returns what the summary prints."""
  workdir, model_dir, eval_dir = out / "train", out / "model", out / "eval"
  for folder in (workdir, model_dir, eval_dir):
    shutil.rmtree(folder, ignore_errors=True)
  run_cfg = apply_overrides(load_config(ROOT / cfg.base, rc.RunConfig), overrides(cfg))
  data = workdir / "data"
  start = time.perf_counter()
  generate(run_cfg.synthetic, data)
  times = {"data": time.perf_counter() - start}
  start = time.perf_counter()
  trained = loop.train(run_cfg, workdir)
  times["train"] = time.perf_counter() - start
  export.export(workdir, model_dir)
  start = time.perf_counter()
  args = eval_args(cfg, run_cfg.model.tiny.frames, data, model_dir, eval_dir)
  if app.main(args) != 0:
    raise RuntimeError(f"eval.py failed: python eval.py {' '.join(args)}")
  times["eval"] = time.perf_counter() - start
  model = PPLLaVA.from_pretrained(model_dir)
  items = mcq.load_mvbench(data / "mcq")
  heatmap = Path(shutil.copy(min((eval_dir / "maps").glob("*.png")), out / "relevance.png"))
  results = json.loads((eval_dir / "results.json").read_text())
  metrics = read_metrics(workdir)
  losses = [(r["step"], r["loss"]) for r in metrics if "loss" in r]
  return dict(
    run_cfg=run_cfg,
    trained=trained,
    times=times,
    losses=losses,
    parameters=sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))),
    eval_loss=[r["eval_loss"] for r in metrics if "eval_loss" in r][-1],
    accuracy={t["name"]: t for t in results["groups"]["task"]},
    baselines=baselines(items),
    items=len(items),
    heatmap=heatmap,
    workdir=workdir,
    model_dir=model_dir,
    eval_args=args,
  )


def summary(cfg: DemoConfig, s: dict) -> str:
  tiny, synthetic, times = s["run_cfg"].model.tiny, s["run_cfg"].synthetic, s["times"]
  g = tiny.image_size // tiny.patch_size
  trainable = (
    "all of it"
    if cfg.train_vision
    else "all but the vision tower and the scorer's text tower, as the recipe"
  )
  (first_step, first), (last_step, last) = s["losses"][0], s["losses"][-1]
  lines = [
    "",
    "=" * 88,
    f"Trained: a tiny PPLLaVA of {s['parameters']:,} parameters from random weights "
    f"(vision {tiny.vision_layers}x{tiny.vision_width}, LLM {tiny.llm_layers}x"
    f"{tiny.llm_width}, scorer text {tiny.text_layers}x{tiny.text_width}; {trainable}), "
    f"{s['trained']['updates']} updates of {s['run_cfg'].data.batch.batch_size} questions, "
    f"{times['train'] / 60:.1f} min on {jax.default_backend()} with compilation.",
    f"Data: {synthetic.videos} drawn videos x 3 questions to train on, {synthetic.eval_videos} "
    f"other videos x 3 held out (drawn in {times['data']:.0f} s); {tiny.frames} of "
    f"{synthetic.frames} frames, {tiny.image_size} px, {g}x{g} patches pooled {tiny.kernel} "
    f"to {tiny.frames // tiny.kernel[0]}x{g // tiny.kernel[1]}x{g // tiny.kernel[2]} tokens.",
    f"Training loss (token mean over the answer text): {first:.3f} at step {first_step} -> "
    f"{last:.3f} at step {last_step}; held-out loss {s['eval_loss']:.3f}.",
    f"Held-out accuracy by eval.py --mvbench (original protocol, {s['items']} questions, "
    f"{times['eval']:.0f} s):",
    f"  {'question':<10} {'accuracy':>9} {'chance':>7} {'any constant answer':>20}",
  ]
  above = []
  for task, (chance, constant) in s["baselines"].items():
    t = s["accuracy"][task]
    verdict = above_chance(t["accuracy"], chance, t["counted"])
    above += [task] if verdict else []
    lines.append(
      f"  {task:<10} {t['accuracy']:>8.1f}% {chance:>6.1f}% {constant:>19.1f}%   "
      f"{t['correct']}/{t['counted']}, "
      + ("above chance" if verdict else "within 2 standard errors of chance")
    )
  lines += [
    f"What this says: above chance on {', '.join(above) or 'nothing'}. The model is tiny, "
    "trained for minutes on drawn shapes, and is asked about videos it never saw; "
    "accuracy above chance shows that the pipeline (data, prompt-guided pooling, "
    "training, export, evaluation) learns from the pixels. It says nothing about real "
    "videos or real benchmarks.",
    f"Loss curve: {s['trained']['loss_curve']}",
    f"Relevance heat-map (the trained scorer, one held-out question, with its colour "
    f"scale): {s['heatmap']}; eval.py's per-question maps: {s['eval_args'][-1]}",
    "Each stage again:",
    f"  python train.py --config {cfg.base} --workdir {s['workdir']} "
    + " ".join(f'--set "{x}"' for x in overrides(cfg)),
    f"  python train.py export --workdir {s['workdir']} --out {s['model_dir']}",
    "  python eval.py " + " ".join(s["eval_args"]),
    "=" * 88,
  ]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--config",
    help="a Python file whose get_config() returns a DemoConfig "
    "(default: the embedded DemoConfig())",
  )
  parser.add_argument(
    "--out", default="out/demo", help="the demo's folder; its train/, model/ and eval/ are replaced"
  )
  args = parser.parse_args(argv)
  cfg = load_config(args.config, DemoConfig) if args.config else DemoConfig()
  print(summary(cfg, run(cfg, Path(args.out))))


if __name__ == "__main__":
  # Run the imported module's main, not this __main__ copy's: config files import
  # DemoConfig from ppllava_jax.demo, and main must check against that same class.
  from ppllava_jax import demo

  demo.main()
