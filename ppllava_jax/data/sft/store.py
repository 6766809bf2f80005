"""The media store: every training video decoded once into ArrayRecord shards of frames at
the tower's square, read back by key in place of decoding (``SampleConfig.media_store``).

Building (``build_store``, or ``python -m ppllava_jax.data.sft.store build``): the video records
of one or more annotation files (validated as training validates them) -> one row per
distinct video, keyed by its path relative to the corpus's media root (absolute paths stay
as written): ``key``, ``frames`` (uint8 (K, S, S, 3), or K JPEG images), ``frame_indices``
(the video frames kept), ``total_frames`` (the video's frame count) and ``conversations``
(JSON: annotation file, record index, system text and turns of every record of the
video). A missing or unreadable video fails the build, naming it and its records; two
videos under one key (corpora with different media roots) fail it too.

Which frames are kept (``video.cover_indices``): every frame of a video of at most K
frames, else the middle frame of each of K equal segments (the evaluation rule
``middle_indices``, so K evenly spread frames). Each is resized to the tower's square as
``preprocess.video_pixels`` resizes (bicubic straight to S x S; SigLIP towers
letterboxed), so a ``"uint8"`` store holds exactly the decode path's frames before
normalisation, and ``"jpeg"`` those frames as JPEG (4:4:4 chroma, ``quality`` 95 by
default: on the tests' 24 px frames with sharp edges, 1.1 grey levels off on average and
15 at worst).

Training from a store (``MediaStore.training_frames``): the decode path's draw,
``video.random_indices(T, 0, total_frames, rng)`` with the same generator, each index
then taken to the nearest kept frame (the earlier on a tie). A video of at most K frames
is kept whole, so its sample equals the decoded one (tested, token ids and pixels); a
longer one draws the same segments at the resolution of K frames. K >= T is required
(``MediaStore.check_frames``); choose K >= 2T (64 for 32-frame training): with K = T
every draw of a long video gives the same frames. One documented difference: a file
whose header over-counts its frames draws twice when decoded (``video.load_video``
re-picks from the frames it found) and once from the store.

Why tensorflow-datasets this way: a ``GeneratorBasedBuilder`` with
``file_format="array_record"`` builds and reads without TensorFlow when its features are
``Tensor`` / ``Scalar`` / ``Text`` (``Image`` / ``Video`` need TensorFlow), so the frames
are a uint8 ``Tensor`` stored as raw bytes (``Encoding.BYTES``: with the default int64
list a 64-frame 336 px row took 0.8 s to parse here, with bytes 0.07 s) or a sequence of
JPEG bytes. ``disable_shuffling`` keeps the rows in key order; the keys are also listed in
the dataset's ``metadata.json``, and each read checks the row's key against it. The
folder reads with ``tfds.data_source("media_store", data_dir=<store>)`` as well.

``MediaStore`` pickles as its path and opens the shards lazily, in each Grain worker.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import multiprocessing
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image
from tqdm import tqdm

from ppllava_jax import cli
from ppllava_jax.data.media import frames as media_frames
from ppllava_jax.data.media import preprocess, video
from ppllava_jax.data.sft.annotations import FORMATS as ANNOTATION_FORMATS
from ppllava_jax.data.sft.annotations import READERS, CorpusConfig, Record, load_corpus

NAME, VERSION = "media_store", "1.0.0"
FORMATS = ("uint8", "jpeg")


class StoreError(ValueError):
  """A media store that cannot be built or read: names the store, the video, the records."""


@dataclasses.dataclass(frozen=True)
class StoreConfig:
  """What a store keeps of each video and how it decodes them."""

  frames: int = 64  # K: frames kept per video (cover_indices); >= T, 2T recommended
  size: int = 336  # the tower's square
  letterbox: bool = False  # SigLIP towers: fitted and padded, as preprocess.video_pixels
  format: str = "jpeg"  # "jpeg" | "uint8" (exactly the decode path's frames)
  quality: int = 95  # JPEG quality (4:4:4 chroma)
  backend: str = "pyav"  # decoder of video files, as SampleConfig.video_backend
  folder_fps: float = video.DEFAULT_FOLDER_FPS
  workers: int = 1  # decoding processes

  def __post_init__(self):
    if self.format not in FORMATS:
      raise ValueError(f"StoreConfig.format must be one of {FORMATS}, got {self.format!r}")
    if self.backend not in video.BACKENDS:
      raise ValueError(f"StoreConfig.backend must be one of {video.BACKENDS}, got {self.backend!r}")
    if self.frames < 1 or self.size < 1 or self.workers < 1:
      raise ValueError(
        f"StoreConfig: frames, size and workers must be >= 1, got "
        f"{self.frames}, {self.size}, {self.workers}"
      )
    if not 1 <= self.quality <= 100:
      raise ValueError(f"StoreConfig.quality must be in 1..100, got {self.quality}")


def media_key(path: str, media_root: str) -> str:
  """A video's key: ``path`` (a record's, already joined with the root) relative to
  ``media_root``, as the annotation wrote it."""
  root = media_root.rstrip("/") + "/" if media_root else ""
  return path[len(root) :] if root and path.startswith(root) else path


def nearest(kept: np.ndarray, wanted: Sequence[int]) -> np.ndarray:
  """Positions in the increasing ``kept`` of the frame nearest each ``wanted`` index (the
  earlier on a tie)."""
  wanted = np.asarray(wanted, np.int64)  # type: ignore[assignment]  # as an int64 array
  if len(kept) == 1:
    return np.zeros(len(wanted), np.int64)
  hi = np.clip(np.searchsorted(kept, wanted), 1, len(kept) - 1)
  lo = hi - 1
  return np.where(wanted - kept[lo] <= kept[hi] - wanted, lo, hi)


# ---- building -------------------------------------------------------------------------


@dataclasses.dataclass
class _Video:
  """One distinct video of the annotations and the records that use it."""

  key: str
  path: str
  reader: str
  total_frames: int | None  # a {:06d}.jpg folder's count, from its records
  records: list[dict]

  def where(self) -> str:
    refs = [f"{r['annotation']} record {r['record']}" for r in self.records[:3]]
    more = f" and {len(self.records) - 3} more" if len(self.records) > 3 else ""
    return ", ".join(refs) + more


def _conversation(record: Record, annotation: str) -> dict:
  return {
    "annotation": annotation,
    "record": record.source,
    "system": record.system,
    "turns": [[t.question, t.answer] for t in record.turns],
  }


def _collect_videos(corpora: Sequence[CorpusConfig]) -> list[_Video]:
  """The distinct videos of ``corpora``'s video records, in key order (``StoreError`` on a
  key that two paths share, or one video given two frame counts). Videos given as lists
  of frame files are left out: training reads them from their files."""
  videos: dict[str, _Video] = {}
  for c, corpus in enumerate(corpora):
    for record in load_corpus(corpus, c):
      if record.kind != "video" or record.frame_list:
        continue
      key = media_key(record.media[0], corpus.media_root)
      seen = videos.setdefault(
        key, _Video(key, record.media[0], corpus.reader, record.total_frames, [])
      )
      seen.records.append(_conversation(record, corpus.annotation))
      if seen.path != record.media[0]:
        raise StoreError(
          f"key {key!r} is two videos, {seen.path} and {record.media[0]} "
          f"({seen.where()}): a store keys videos by their path under the "
          "media root; build one store per media root"
        )
      if seen.total_frames != record.total_frames:
        raise StoreError(
          f"{record.media[0]}: total_frames {seen.total_frames} and "
          f"{record.total_frames} in its records ({seen.where()})"
        )
  return [videos[k] for k in sorted(videos)]


def _example(job: tuple[_Video, StoreConfig]) -> dict:
  """One row: the kept frames of one video, squared and encoded (runs in the workers)."""
  v, cfg = job
  try:
    frames_thwc, indices, total = media_frames.read_video(
      v.path,
      cfg.frames,
      sample="cover",
      reader=v.reader,
      backend=cfg.backend,
      folder_fps=cfg.folder_fps,
      total_frames=v.total_frames,
    )
  except video.MediaError as err:
    raise StoreError(f"{err} (used by {v.where()}): the store needs every video readable") from None
  # preprocess.video_pixels' resize, so that normalising a row gives its pixels exactly
  squares = [
    preprocess._square(preprocess.to_rgb(f), cfg.size, cfg.letterbox, preprocess.BICUBIC)
    for f in frames_thwc
  ]
  frames: np.ndarray | list[bytes]  # the uint8 frames, or each one's JPEG
  if cfg.format == "uint8":
    frames = np.stack(squares)
  else:
    frames = []
    for square_hwc in squares:
      buffer = io.BytesIO()
      Image.fromarray(square_hwc).save(buffer, "JPEG", quality=cfg.quality, subsampling=0)
      frames.append(buffer.getvalue())
  return {
    "key": v.key,
    "frames": frames,
    "frame_indices": np.asarray(indices, np.int32),
    "total_frames": total,
    "conversations": json.dumps(v.records),
  }


def _features(cfg: StoreConfig) -> tfds.features.FeaturesDict:
  s = cfg.size
  if cfg.format == "uint8":  # raw bytes: the default int64 list parses ~10x slower
    frames = tfds.features.Tensor(
      shape=(None, s, s, 3), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
    )
  else:
    frames = tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_))
  return tfds.features.FeaturesDict(
    {
      "key": tfds.features.Text(),
      "frames": frames,
      "frame_indices": tfds.features.Tensor(shape=(None,), dtype=np.int32),
      "total_frames": tfds.features.Scalar(dtype=np.int64),
      "conversations": tfds.features.Text(),
    }
  )


# tfds's builders take skip_registration in __init_subclass__; its stubs do not say so
class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):  # type: ignore[call-arg]
  """The store's tfds builder: one row per video, in key order (rows come from ``rows``)."""

  name = NAME
  VERSION = tfds.core.Version(VERSION)
  # tfds looks for a download-checksums file beside a builder's code, through the
  # importlib_resources backport it does not install; this builder downloads nothing
  code_path = None

  def __init__(self, *, config: StoreConfig, keys: Sequence[str], rows: Iterator[dict], **kw):
    self.store_config, self.keys, self.rows = config, list(keys), rows
    super().__init__(**kw)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Video frames at the tower's square (ppllava_jax.data.sft.store).",
      features=_features(self.store_config),
      disable_shuffling=True,
      metadata=tfds.core.MetadataDict(store=dataclasses.asdict(self.store_config), keys=self.keys),
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, row in enumerate(self.rows):
      yield f"{i:012d}", row  # zero-padded: tfds' key order is the generation order


def _rows(videos: Sequence[_Video], cfg: StoreConfig, progress: bool) -> Iterator[dict]:
  jobs = [(v, cfg) for v in videos]
  pool = multiprocessing.get_context("spawn").Pool(cfg.workers) if cfg.workers > 1 else None
  try:
    rows = pool.imap(_example, jobs) if pool else map(_example, jobs)
    yield from tqdm(rows, total=len(jobs), desc="media store", unit="video", disable=not progress)
  finally:
    if pool:
      pool.terminate()


def build_store(
  corpora: Sequence[CorpusConfig],
  out: str | Path,
  config: StoreConfig = StoreConfig(),
  *,
  progress: bool = True,
) -> Path:
  """Builds a store of ``corpora``'s videos in the folder ``out`` (module doc); returns it.
  ``StoreError`` before any decoding for missing videos, an ``out`` that holds a store, or
  annotations without videos; during it for a video that cannot be read."""
  out = Path(out)
  if (out / NAME / VERSION / "dataset_info.json").exists():
    raise StoreError(
      f"{out} already holds a media store ({out / NAME}): remove it or choose another folder"
    )
  videos = _collect_videos(corpora)
  if not videos:
    raise StoreError(f"no video records in {[c.annotation for c in corpora]}")
  missing = [v for v in videos if not Path(v.path).exists()]
  if missing:
    listed = "; ".join(f"{v.path} ({v.where()})" for v in missing[:5])
    raise StoreError(f"{len(missing)} of {len(videos)} videos do not exist: {listed}")
  out.mkdir(parents=True, exist_ok=True)
  builder = _Builder(
    config=config,
    keys=[v.key for v in videos],
    rows=_rows(videos, config, progress),
    data_dir=str(out),
    file_format="array_record",
  )
  with tempfile.TemporaryDirectory() as downloads:  # tfds makes one; nothing is downloaded
    builder.download_and_prepare(download_dir=downloads)
  return out


# ---- reading --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StoredVideo:
  """One row of a store."""

  key: str
  frame_indices: np.ndarray  # (K,) the video frames kept, increasing
  total_frames: int  # the video's frames
  frames: np.ndarray | list[bytes]  # uint8 (K, S, S, 3), or K JPEG images
  conversations: str  # JSON, module doc

  def pixels(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
    """uint8 (len(positions), S, S, 3): the kept frames at ``positions`` (each JPEG
    decoded once)."""
    if isinstance(self.frames, np.ndarray):
      return self.frames[np.asarray(positions, np.int64)]
    decoded = {}
    for p in dict.fromkeys(int(p) for p in positions):
      with Image.open(io.BytesIO(self.frames[p])) as image:
        decoded[p] = np.asarray(image.convert("RGB"))
    return np.stack([decoded[int(p)] for p in positions])


class MediaStore:
  """A built store (the folder given to ``build_store``): rows by position (a grain
  random-access source) or by key. Pickles as its path; opens its shards lazily."""

  def __init__(self, path: str | Path):
    self.path = str(path)
    self._open()  # fail here, in the main process, on a folder that is not a store

  def __getstate__(self):
    return {"path": self.path}

  def __setstate__(self, state):
    self.path, self._source = state["path"], None

  def _open(self) -> None:
    folder = Path(self.path) / NAME / VERSION
    if not (folder / "dataset_info.json").is_file():
      raise StoreError(
        f"{self.path}: not a media store (no {NAME}/{VERSION}/dataset_info.json"
        "); build one with python -m ppllava_jax.data.sft.store build"
      )
    builder = tfds.builder_from_directory(str(folder))
    meta = builder.info.metadata
    self.config = StoreConfig(**meta["store"])
    self.keys = list(meta["keys"])
    self._rows = {k: i for i, k in enumerate(self.keys)}
    self._source = builder.as_data_source(split="train")
    if len(self._source) != len(self.keys):
      raise StoreError(f"{self.path}: {len(self._source)} rows for {len(self.keys)} keys")

  def _opened(self):
    if self._source is None:
      self._open()
    return self._source

  def __len__(self) -> int:
    return len(self._opened())

  def __getitem__(self, i: int) -> StoredVideo:
    row = self._opened()[int(i)]
    return StoredVideo(
      row["key"].decode(),
      np.asarray(row["frame_indices"], np.int64),
      int(row["total_frames"]),
      row["frames"],
      row["conversations"].decode(),
    )

  def check_geometry(self, size: int, letterbox: bool) -> None:
    """``ValueError`` unless the store holds frames for this tower's square."""
    found = (self.config.size, self.config.letterbox)
    if found != (size, letterbox):
      raise ValueError(
        f"media store {self.path} holds {found[0]} px frames (letterbox "
        f"{found[1]}); the model's tower takes {size} px (letterbox "
        f"{letterbox}): build a store for it"
      )

  def check_frames(self, num_frames: int) -> None:
    """``ValueError`` unless the store keeps at least ``num_frames`` (T) frames a video:
    what it enforces is K >= T; K >= 2T is the recommendation (module doc)."""
    self._opened()  # the config, after unpickling
    if num_frames > self.config.frames:
      raise ValueError(
        f"media store {self.path} keeps {self.config.frames} frames a video; "
        f"training samples {num_frames}: the store's frames must be >= "
        f"{num_frames} (>= {2 * num_frames} recommended), rebuild it with "
        f"--frames {2 * num_frames}"
      )

  def lookup(self, key: str) -> StoredVideo | None:
    """The row of ``key``, or None when the store lacks it."""
    self._opened()
    i = self._rows.get(key)
    if i is None:
      return None
    row = self[i]
    if row.key != key:
      raise StoreError(
        f"{self.path}: row {i} holds {row.key!r}, the key list says {key!r}: "
        "the store is damaged, rebuild it"
      )
    return row

  def training_frames(
    self, path: str, media_root: str, num_frames: int, rng: np.random.Generator
  ) -> tuple[np.ndarray, tuple[int, ...]]:
    """(uint8 (T, S, S, 3), the video frame of each) for a record's video ``path``: the
    decode path's draw taken to the nearest kept frames (module doc). A video the store
    lacks is a ``MediaError`` naming it and the store. ``check_frames`` runs per sample:
    the ``SampleBuilder`` that opens the store does not know the corpora's frame counts."""
    self.check_frames(num_frames)
    key = media_key(path, media_root)
    row = self.lookup(key)
    if row is None:
      raise video.MediaError(path, f"{media_frames.NOT_STORED} {self.path} (key {key!r})")
    drawn = video.random_indices(num_frames, 0, row.total_frames, rng)
    positions = nearest(row.frame_indices, drawn)
    return row.pixels(positions), tuple(int(i) for i in row.frame_indices[positions])


# ---- command line ---------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m ppllava_jax.data.sft.store",
    description=" ".join(__doc__.split("\n\n")[0].split()),
  )
  commands = parser.add_subparsers(dest="command", required=True)
  build = commands.add_parser("build", help="decode the videos of annotation files into a store")
  build.add_argument("--annotations", nargs="+", required=True, help="JSON / JSONL files")
  build.add_argument("--media-root", default="", help="joined before each media path")
  build.add_argument("--out", required=True, help="a new folder for the store")
  build.add_argument("--annotation-format", choices=ANNOTATION_FORMATS, default="qa")
  build.add_argument("--reader", choices=READERS, default="auto")
  defaults = StoreConfig()
  build.add_argument("--frames", type=int, default=defaults.frames, help="frames kept a video")
  build.add_argument("--size", type=int, default=defaults.size, help="the tower's square")
  build.add_argument("--letterbox", action="store_true", help="SigLIP towers")
  build.add_argument("--format", choices=FORMATS, default=defaults.format)
  build.add_argument("--quality", type=int, default=defaults.quality, help="JPEG quality")
  build.add_argument("--backend", choices=video.BACKENDS, default=defaults.backend)
  build.add_argument("--folder-fps", type=float, default=defaults.folder_fps)
  build.add_argument("--workers", type=int, default=defaults.workers, help="decoding processes")
  cli.add_debug_flag(build)
  args = parser.parse_args(argv)
  corpora = [
    CorpusConfig(
      f"annotations {i}", a, args.media_root, "auto", args.annotation_format, args.reader
    )
    for i, a in enumerate(args.annotations)
  ]
  config = StoreConfig(
    args.frames,
    args.size,
    args.letterbox,
    args.format,
    args.quality,
    args.backend,
    args.folder_fps,
    args.workers,
  )
  tfds.disable_progress_bar()  # the one bar is ours, per video
  out = build_store(corpora, args.out, config)
  print(
    f"{out}: {len(MediaStore(out))} videos, up to {config.frames} frames each at "
    f"{config.size} px ({config.format}); train with SampleConfig(media_store={str(out)!r})"
  )
  return 0


if __name__ == "__main__":
  sys.exit(cli.run(main))
