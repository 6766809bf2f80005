"""Convert checkpoints between Hugging Face safetensors folders and Orbax, for CLIP,
SigLIP, LLaMA, Qwen2, LLaVA-NeXT(-Video), LLaVA-OneVision and PPLLaVA.

  python convert.py to-orbax   SRC_HF_FOLDER    DST_ORBAX_FOLDER
  python convert.py to-hf      SRC_ORBAX_FOLDER DST_HF_FOLDER [--max-shard-gb 5]

Output goes into the destination folder, created if needed: to-orbax writes state/
(the Orbax model state) and config.json; to-hf writes model.safetensors (or
model-0000i-of-0000n.safetensors shards with model.safetensors.index.json) and
config.json, in the layout transformers reads. Both directions copy the source's
tokenizer and processor files (tokenizer.json, tokenizer.model, preprocessor_config.json,
...) into the destination, so a folder written by to-hf runs in eval.py without
--tokenizer. Existing files of the same names are replaced. The parameter count of each
component is printed. A PPLLaVA scorer (CLIP or SigLIP) in its own folder converts with
the same commands.
"""

import argparse
import sys

from ppllava_jax import checkpoints, cli


def build_parser() -> argparse.ArgumentParser:
  description, epilog = __doc__.split("\n\n", 1)
  parser = argparse.ArgumentParser(
    description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    "direction",
    choices=["to-orbax", "to-hf"],
    help="The direction: to-orbax reads a transformers folder and writes an "
    "Orbax one; to-hf reads an Orbax folder this script wrote and writes a "
    "transformers one.",
  )
  parser.add_argument(
    "src", help="The folder to read (for to-orbax also a hub id, fetched when online)."
  )
  parser.add_argument(
    "dst",
    help="The folder the converted checkpoint is written into "
    "(created if needed; see below for its files).",
  )
  parser.add_argument(
    "--max-shard-gb",
    type=float,
    default=5.0,
    help="The largest safetensors shard to-hf writes, in GiB (default 5).",
  )
  cli.add_debug_flag(parser)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.direction == "to-orbax":
    done = checkpoints.to_orbax(args.src, args.dst, progress=True)
  else:
    done = checkpoints.to_hf(args.src, args.dst, int(args.max_shard_gb * 2**30), progress=True)
  counts = checkpoints.parameter_counts(done.model)
  print(f"{done.hf['model_type']}: {sum(counts.values()):,} parameters -> {args.dst}")
  for name, n in counts.items():
    print(f"  {name:24s}{n:>16,}")
  print(f"tokenizer / processor files copied: {', '.join(done.side_files) or 'none in the source'}")
  return 0


if __name__ == "__main__":
  sys.exit(cli.run(main))
