"""Train PPLLaVA (SFT or DPO) from a config file, resuming where the run in the workdir stopped.

  python train.py --config configs/sft_tiny.py --workdir out/tiny [--set steps=20 ...]
  python train.py --config configs/dpo_tiny.py --workdir out/dpo [--set model.checkpoint=EXPORT]
  python train.py export --workdir out/tiny --out out/tiny/hf [--step N]

Several hosts: start one process per host with the same command and --coordinator /
--num-processes / --process-id (or their JAX_* variables), or let JAX detect the cluster
(srun steps and GKE TPU slices by themselves, a Cloud TPU VM slice with
--cluster-detection auto): see ppllava_jax.distributed and scripts/.

The config's get_config() returns a train.run.config.RunConfig; each --set a.b=value
overrides one field, parsed with its type (steps=20, train.optim.lr=3e-4,
data.mixture.corpora.videos.annotation=FILE: a corpus by its name). The workdir holds
checkpoints/ (Orbax: state, data cursor, config), metrics.jsonl, tensorboard/ and
loss.png. Rerunning the same command resumes from the latest intact checkpoint, and
refuses a config that changes what the run computes (--set resume=KEYS allows named
changes); SIGTERM / Ctrl-C save one first and exit with 128 + the signal's number. export
writes a complete transformers folder (weights, config with the pooling, both tokenizers,
generation config) that eval.py --checkpoint, train.py (model.checkpoint) and
PPLLaVA.from_pretrained read with no other flag.
"""

import argparse
import sys

from ppllava_jax import cli, distributed
from ppllava_jax.signals import exit_code


def build_parser() -> argparse.ArgumentParser:
  description, epilog = __doc__.split("\n\n", 1)
  parser = argparse.ArgumentParser(
    prog="train.py",
    description=description,
    epilog=epilog.strip("\n"),
    formatter_class=argparse.RawDescriptionHelpFormatter,
    usage="%(prog)s --config FILE --workdir DIR [--set KEY=VALUE ...] [multi-process flags] "
    "[--debug]\n       %(prog)s export --workdir DIR --out DIR [--step N] [--debug]",
  )
  parser.add_argument(
    "--config",
    required=True,
    help="The run's config: a Python file whose get_config() returns a RunConfig.",
  )
  parser.add_argument(
    "--workdir",
    required=True,
    help="The run's folder: created, or resumed from its latest checkpoint; "
    "checkpoints, metrics.jsonl, tensorboard/ and loss.png go there.",
  )
  parser.add_argument(
    "--set",
    dest="overrides",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="Override one config field, e.g. steps=50 or train.optim.lr=3e-4 (repeatable).",
  )
  distributed.add_flags(parser)
  cli.add_debug_flag(parser)
  return parser


def export_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="train.py export",
    description="Export a run's checkpoint as a complete "
    "transformers folder: weights, config.json with the pooling, "
    "the LLM's and the scorer's tokenizers, generation config.",
  )
  parser.add_argument("--workdir", required=True, help="The run's folder, as given to training.")
  parser.add_argument(
    "--out",
    required=True,
    help="The folder to write: a transformers-layout checkpoint with its "
    "tokenizers, which eval.py runs.",
  )
  parser.add_argument(
    "--step", type=int, help="The checkpoint step to export (default: the latest)."
  )
  cli.add_debug_flag(parser)
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["export"]:
    args = export_parser().parse_args(argv[1:])
    from ppllava_jax.train.run.export import export

    export(args.workdir, args.out, args.step)
    return 0
  args = build_parser().parse_args(argv)
  import logging

  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  for noisy in ("absl", "orbax", "jax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  distributed.initialize(args)  # after logging, so its "process i of n" line shows
  from ppllava_jax.config import apply_overrides, load_config
  from ppllava_jax.train.run import config as rc
  from ppllava_jax.train.run.loop import train

  cfg = apply_overrides(load_config(args.config, rc.RunConfig), args.overrides)
  summary = train(cfg, args.workdir)
  loss = "n/a" if summary["loss"] is None else f"{summary['loss']:.4f}"
  mcq = summary.get("mcq_accuracy")
  mcq = "" if mcq is None else f", multiple-choice accuracy {mcq:.2f}%"
  print(
    f"step {summary['step']}: {summary['updates']} updates, {summary['skipped']} skipped, "
    f"last logged loss {loss}{mcq}; workdir {args.workdir}"
  )
  if summary["stopped"]:
    return exit_code(summary["stopped"])
  return 0


if __name__ == "__main__":
  sys.exit(cli.run(main))
