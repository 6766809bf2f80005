"""Convert checkpoints: Hugging Face safetensors folder <-> Orbax, for CLIP, SigLIP, LLaMA,
Qwen2 and llava-hf LLaVA-NeXT(-Video).

  python convert.py to-orbax   SRC_HF_FOLDER  DST_ORBAX_FOLDER
  python convert.py to-hf      SRC_ORBAX_FOLDER DST_HF_FOLDER [--max-shard-gb 5]

Prints the parameter count of each component. A PPLLaVA scorer CLIP is its own
folder: convert it with the same command.
"""

import argparse
import sys

from ppllava_jax import checkpoints


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(__doc__.splitlines()[2:]))
  parser.add_argument("direction", choices=["to-orbax", "to-hf"])
  parser.add_argument("src")
  parser.add_argument("dst")
  parser.add_argument("--max-shard-gb", type=float, default=5.0,
                      help="to-hf: largest safetensors shard (GiB)")
  args = parser.parse_args(argv)
  if args.direction == "to-orbax":
    model, hf = checkpoints.load_hf(args.src, progress=True)
    written = checkpoints.save_orbax(model, hf, args.dst)
  else:
    model, hf = checkpoints.load_orbax(args.src)
    checkpoints.save_hf(model, hf, args.dst, int(args.max_shard_gb * 2**30), progress=True)
    written = args.dst
  counts = checkpoints.parameter_counts(model)
  print(f"{hf['model_type']}: {sum(counts.values()):,} parameters -> {written}")
  for name, n in counts.items():
    print(f"  {name:24s}{n:>16,}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
