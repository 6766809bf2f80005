"""The SFT input pipeline's throughput for 32-frame videos, with 0, 1 and 2 Grain workers,
decoding the videos or reading them from a media store (``data.sft.store``, uint8 and JPEG).

Each sample is the whole per-sample work of training: decode a video (H.264, 320x240,
96 frames; ``--video WxHxN`` for another) and sample 32 frames the original's training
way, resize them to the 336 x 336 tower square and normalise, render and tokenize the
conversation (pieces, as the original), tokenize the scorer text, and collate batches of
4 into ``TrainBatch``es. From a store, the decoding and resizing are replaced by reading
the video's row (64 frames kept at 336 px, built first and timed) and taking 32 of them.
Each (source, worker count) runs in a fresh process (``common.run_worker``), all in one
run; the first batch (worker start-up, imports) is timed apart, the rest give samples/s,
and each store row gives its ratio to decoding at the same worker count. Beside them,
what the step consumes: forward, backward and AdamW of the tiny PPLLaVA below (random
weights, all parameters trained, f32) on one of these batches, in samples/s. Also timed,
in the parent: validating ``--records`` annotation records (``annotations.load_mixture``).

  python benchmarks/data_loader.py [--batches 6] [--records 1000000] [--video 320x240x96]
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import common
import numpy as np

FRAMES, BATCH, KEPT = 32, 4, 64
SOURCES = ("decode", "uint8", "jpeg")  # videos decoded, or read from a store of that format


def write_video(path: Path, frames: int = 96, size=(240, 320)) -> None:
  rng = np.random.default_rng(0)
  from ppllava_jax.data.media.video import write_video

  base_hwc = rng.integers(0, 255, (*size, 3), np.uint8)
  write_video(path, (np.roll(base_hwc, 4 * i, axis=1) for i in range(frames)), rate=24)


def model_config():
  """The real geometry (CLIP-336/14, 24 x 24 patches, (2, 3, 3) pooling, 248 scorer
  positions) at tiny widths: only the config is needed, no weights."""
  from ppllava_jax.data.text.tokenizer import char_tokenizer
  from ppllava_jax.models.tiny import TinyConfig

  return TinyConfig().model_config(len(char_tokenizer()))


def iter_batches(workers: int, folder: Path, store: str | None = None):
  from ppllava_jax.data.sft.annotations import CorpusConfig, MixtureConfig
  from ppllava_jax.data.sft.batches import BatchConfig
  from ppllava_jax.data.sft.pipeline import DataConfig, make_train_iterator
  from ppllava_jax.data.sft.samples import SampleConfig
  from ppllava_jax.data.text.tokenizer import char_tokenizer

  model = model_config()
  tok = char_tokenizer()
  cfg = DataConfig(
    MixtureConfig(
      (CorpusConfig("videos", str(folder / "ann.json"), str(folder), "video", num_frames=FRAMES),)
    ),
    sample=SampleConfig(max_length=2048, media_store=store),
    batch=BatchConfig(batch_size=BATCH, seq_buckets=(2048,), num_frames=FRAMES),
    num_workers=workers,
    worker_buffer_size=2,
    num_epochs=None,
  )
  return make_train_iterator(
    cfg, tokenizer=tok, model=model, scorer_tokenizer=tok, block=0, blocks=1
  )


def build_stores(folder: Path) -> dict:
  """A uint8 and a JPEG store of the benchmark's videos: {format: (path, build seconds)}."""
  from ppllava_jax.data.sft.annotations import CorpusConfig
  from ppllava_jax.data.sft.store import StoreConfig, build_store

  corpus = CorpusConfig("videos", str(folder / "ann.json"), str(folder))
  stores = {}
  for fmt in SOURCES[1:]:
    start = time.perf_counter()
    path = build_store(
      [corpus], folder / f"store-{fmt}", StoreConfig(KEPT, 336, format=fmt), progress=False
    )
    stores[fmt] = (str(path), time.perf_counter() - start)
  return stores


def worker(workers: int, batches: int, folder: Path, source: str, store: str | None) -> dict:
  start = time.perf_counter()
  it = iter_batches(workers, folder, store)
  next(it)
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(batches):
    batch = next(it)
  elapsed = time.perf_counter() - start
  it.close()
  assert batch.videos.shape == (BATCH, FRAMES, 3, 336, 336)
  return dict(
    source=source,
    workers=workers,
    first_batch_s=first,
    samples_per_s=batches * BATCH / elapsed,
    peak_mib=common.status_kib("VmHWM") / 1024,
  )


def step_rate(steps: int, folder: Path) -> dict:
  """Samples/s of a jitted forward + backward + AdamW step of the tiny model on one
  pipeline batch: what the loader has to keep up with on this machine."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from ppllava_jax.models.ppllava import PPLLaVA
  from ppllava_jax.train.core import losses
  from ppllava_jax.train.core.inputs import embed_batch

  model_cfg = model_config()
  it = iter_batches(0, folder)
  batch = jax.tree.map(jnp.asarray, next(it))
  it.close()
  graphdef, params, rest = nnx.split(PPLLaVA(model_cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
  tx = optax.adamw(2e-5)

  def loss(params, batch):
    model = nnx.merge(graphdef, params, rest)
    hidden, _ = model.language_model.hidden_states(
      inputs_embeds=embed_batch(model, batch),
      attention_mask=batch.attention_mask,
      position_ids=batch.position_ids,
    )
    total, count = losses.cross_entropy(hidden, model.language_model.head_dv, batch.labels)
    return total / jnp.maximum(count, 1)

  @jax.jit
  def step(params, opt_state, batch):
    value, grads = jax.value_and_grad(loss)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  opt_state = tx.init(params)
  params, opt_state, value = jax.block_until_ready(step(params, opt_state, batch))  # compiles
  start = time.perf_counter()
  for _ in range(steps):
    params, opt_state, value = step(params, opt_state, batch)
  jax.block_until_ready(value)
  elapsed = time.perf_counter() - start
  return dict(
    samples_per_s=steps * BATCH / elapsed,
    step_s=elapsed / steps,
    tokens=int(batch.input_ids.shape[1]),
  )


def validation_time(records: int, folder: Path) -> dict:
  from ppllava_jax.data.sft.annotations import CorpusConfig, MixtureConfig, load_mixture

  rows = []
  for i in range(records):
    kind = i % 3
    if kind == 0:
      rows.append(
        {
          "video": f"v/{i}.mp4",
          "QA": [{"q": "Describe the video in detail.", "a": "A man walks a dog in the park."}],
        }
      )
    elif kind == 1:
      rows.append(
        {
          "id": i,
          "image": f"coco/{i}.jpg",
          "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the image?"},
            {"from": "gpt", "value": "A cat on a mat."},
            {"from": "human", "value": "What color is it?"},
            {"from": "gpt", "value": "Black."},
          ],
        }
      )
    else:
      rows.append(
        {
          "multi-image": [f"m/{i}a.jpg", f"m/{i}b.jpg"],
          "QA": [{"q": "<image><image>Compare them.", "a": "The first is darker."}],
        }
      )
  qa = [r for r in rows if "QA" in r]
  llava = [r for r in rows if "conversations" in r]
  (folder / "qa.json").write_text(json.dumps(qa))
  (folder / "llava.jsonl").write_text("\n".join(json.dumps(r) for r in llava))
  mix = MixtureConfig(
    (
      CorpusConfig("qa", str(folder / "qa.json"), "/data"),
      CorpusConfig("llava", str(folder / "llava.jsonl"), "/data", format="llava"),
    )
  )
  start = time.perf_counter()
  aset = load_mixture(mix)
  total = time.perf_counter() - start
  assert len(aset) == records
  # the share of JSON parsing alone (with the collector off, as load_mixture runs)
  gc.disable()
  start = time.perf_counter()
  parsed = [json.loads((folder / "qa.json").read_text())]
  parsed += [json.loads(line) for line in (folder / "llava.jsonl").read_text().splitlines()]
  parse = time.perf_counter() - start
  del parsed
  gc.enable()
  return dict(records=records, total_s=total, json_parse_s=parse, checks_s=total - parse)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=int, default=6, help="timed batches of 4 after the first")
  parser.add_argument("--records", type=int, default=1_000_000, help="annotations to validate")
  parser.add_argument("--steps", type=int, default=3, help="timed train steps after the first")
  parser.add_argument("--video", default="320x240x96", help="the video: width x height x frames")
  parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--folder", help=argparse.SUPPRESS)
  parser.add_argument("--source", default="decode", help=argparse.SUPPRESS)
  parser.add_argument("--store", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker is None:
    print(common.machine())  # the line each figure is read with
  if args.worker is not None:
    result = (
      step_rate(args.steps, Path(args.folder))
      if args.worker < 0
      else worker(args.worker, args.batches, Path(args.folder), args.source, args.store)
    )
    print(json.dumps(result))
    return
  with tempfile.TemporaryDirectory() as tmp:
    folder = Path(tmp)
    width, height, count = (int(n) for n in args.video.split("x"))
    write_video(folder / "v.mp4", count, (height, width))
    records = [
      {
        "video": "v.mp4",
        "QA": [{"q": "Describe the video.", "a": f"Answer {i}: a patterned strip moves right."}],
      }
      for i in range(64)
    ]
    (folder / "ann.json").write_text(json.dumps(records))
    stores = build_stores(folder)
    results = {}
    for w in (0, 1, 2):
      for source in SOURCES:
        extra = ["--store", stores[source][0]] if source in stores else []
        results[source, w] = common.run_worker(
          __file__,
          [
            "--worker",
            str(w),
            "--batches",
            str(args.batches),
            "--folder",
            tmp,
            "--source",
            source,
            *extra,
          ],
        )
    built = ", ".join(f"{fmt} {seconds:.1f} s" for fmt, (_, seconds) in stores.items())
    print(
      f"SFT pipeline, {FRAMES}-frame videos ({width}x{height} H.264, {count} frames) -> "
      f"336 x 336, batches of {BATCH}, {args.batches} timed batches each; the stores keep "
      f"{KEPT} frames a video (built in {built}):"
    )
    print(
      f"{'source':>12} {'workers':>8} {'samples/s':>10} {'vs decode':>10} "
      f"{'first batch s':>14} {'peak MiB':>9}"
    )
    for (source, w), r in results.items():
      name = "decode" if source == "decode" else f"{source} store"
      if "error" in r:
        print(f"{name:>12} {w:>8} {r['error']}")
        continue
      base = results["decode", w].get("samples_per_s")
      ratio = f"{r['samples_per_s'] / base:.2f}x" if base else "-"
      print(
        f"{name:>12} {w:>8} {r['samples_per_s']:>10.2f} {ratio:>10} "
        f"{r['first_batch_s']:>14.1f} {r['peak_mib']:>9.0f}"
      )
    step = common.run_worker(
      __file__, ["--worker", "-1", "--steps", str(args.steps), "--folder", tmp]
    )
    if "error" in step:
      print(f"train step: {step['error']}")
    else:
      print(
        f"the tiny train step (forward + backward + AdamW, {step['tokens']} tokens a row) "
        f"consumes {step['samples_per_s']:.2f} samples/s ({step['step_s']:.2f} s a step)"
      )
    if args.records:
      v = validation_time(args.records, folder)
      print(
        f"validating {v['records']:,} annotation records: {v['total_s']:.1f} s "
        f"(JSON parsing {v['json_parse_s']:.1f} s, checks and storage "
        f"{v['checks_s']:.1f} s)"
      )


if __name__ == "__main__":
  main()
