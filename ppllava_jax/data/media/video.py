"""Reading videos and folders of extracted frames into uint8 RGB arrays (T, H, W, 3);
``write_video``, the one writer of the videos the project draws (demo, synthetic sets,
tests, benchmarks).

Which frames are read follows the original PPLLaVA, as pure functions on ints:

- evaluation, ``sample="middle"``: ``middle_indices``, the original's
  ``EvalDataset.get_index`` (MVBench, VideoMME);
- training, ``sample="random"``: ``random_indices``, the original's
  ``get_frame_indices(sample="rand")``, drawing from a ``numpy.random.Generator``;
- a media store's frames (``data.sft.store``), ``sample="cover"``: ``cover_indices``, every
  frame of a short video, else ``middle_indices``;
- bounds in seconds: ``seconds_to_window``, times to frames with the average frame
  rate, as ``get_index`` does with decord's ``get_avg_fps``.

Decisions:

- Two decoders, ``backend=``: PyAV, the default, and decord, what the original used
  (optional: ``pip install decord``). Both number frames in presentation order and
  give the same frame count and frames (the tests compare them); on
  variable-frame-rate video seconds map to frames through the average rate,
  approximately, as in the original. PyAV is the default because it reads damaged
  files up to the damage (below), where decord raises, and because decord 0.6.0
  garbles some frame sizes (48x48 H.264 comes out with 4 channels and fails; such a
  file is a ``MediaError``). GIFs are always read by PyAV (decord cannot count their
  frames; the original read them with imageio).
- PyAV: the frame count comes from the container header when it has one; many (WebM, some
  MKV/AVI) report 0, and then the stream is decoded once to count. Decoding stops after
  the last frame needed, with no seeking, and only the selected frames are converted to
  RGB, once each even when an index repeats. If the stream ends before the header's
  count (a truncated file; a decoding error also ends the stream there, with a logged
  warning), the frames are picked again from the count actually decoded.
- A folder is a video of its image files in natural name order (``frame_files``). Its
  frame rate is not stored anywhere, so it is an argument, 3 fps by default: the
  original's ``read_frame`` default, the rate of MVBench's extracted TVQA frames. As in
  ``read_frame``, its files are numbered from 1 when seconds are turned into frames.
- GIFs are read by PyAV like any video, at the rate the file states (the original read
  them with imageio at a fixed 25 fps and dropped repeated indices; here an index that
  repeats gives a repeated frame, as for every other video).
- Anything unreadable raises ``MediaError("<path>: <reason>")``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal, cast

import av
import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset(
  {
    ".mp4",
    ".m4v",
    ".mov",
    ".mkv",
    ".webm",
    ".avi",
    ".flv",
    ".wmv",
    ".mpg",
    ".mpeg",
    ".3gp",
    ".ts",
    ".gif",
  }
)
FRAME_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
SAMPLE_MODES = ("middle", "random", "cover")
BACKENDS = ("pyav", "decord")
DEFAULT_FOLDER_FPS = 3.0


class MediaError(Exception):
  """A video or frame folder that cannot be read; prints as ``<path>: <reason>``."""

  def __init__(self, path: str | Path, reason: str):
    super().__init__(str(path), reason)  # both in args, so it pickles across worker processes
    self.path = str(path)
    self.reason = reason

  def __str__(self) -> str:
    return f"{self.path}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  path: str
  total_frames: int  # decodable frames, or image files for a folder
  fps: float  # average frame rate (0.0 if the file states none); folder_fps for a folder
  indices: tuple[int, ...]  # 0-based position of each returned frame


def _check_num_frames(num_frames: int) -> None:
  if num_frames < 1:
    raise ValueError(f"num_frames must be >= 1, got {num_frames}")


def middle_indices(num_frames: int, start: int, end: int) -> list[int]:
  """Evaluation sampling: the middle frame of each of ``num_frames`` segments of [start, end].

  The original's ``EvalDataset.get_index`` (ppllava/test/video_utils.py): with
  ``seg = (end - start) / num_frames``, frame ``i`` is
  ``int(start + seg / 2 + round(seg * i))``; only the offset ``seg * i`` is rounded (half
  to even), the sum is truncated. Callers pass ``end`` = the last frame's index, not one
  past it. Indices never exceed ``end``. A clip shorter than ``num_frames`` gives repeated
  indices spread over it (10 frames, 32 samples: each frame 1 to 4 times).
  """
  _check_num_frames(num_frames)
  if not 0 <= start <= end:
    raise ValueError(f"middle_indices: need 0 <= start <= end, got start={start}, end={end}")
  seg = (end - start) / num_frames
  return [int(start + seg / 2 + round(seg * i)) for i in range(num_frames)]


def random_indices(num_frames: int, start: int, stop: int, rng: np.random.Generator) -> list[int]:
  """Training sampling: one random frame from each of ``num_frames`` segments of [start, stop).

  The original's ``get_frame_indices(sample="rand")`` (ppllava/datasets/datasets/utils.py):
  over ``n = stop - start`` frames, ``k = min(num_frames, n)`` segments with edges
  ``linspace(0, n, k + 1)`` truncated to ints. Within a segment [lo, hi) the draw is
  uniform over [lo, hi - 1): the original's ``range(lo, hi - 1)`` leaves each segment's
  last frame out, kept here since the model was trained that way. If a segment is a
  single frame (so that range is empty), the original falls back to ``k`` distinct
  frames drawn at random, sorted; a clip shorter than ``num_frames`` therefore gives all
  its frames in order. Short lists are padded with the last index to ``num_frames``.
  """
  _check_num_frames(num_frames)
  if not 0 <= start < stop:
    raise ValueError(f"random_indices: need 0 <= start < stop, got start={start}, stop={stop}")
  n = stop - start
  k = min(num_frames, n)
  edges = np.linspace(0, n, k + 1).astype(int)
  low, high = edges[:-1], edges[1:] - 1
  if np.all(high > low):
    picked = rng.integers(low, high)
  else:
    picked = np.sort(rng.permutation(n)[:k])
  indices = [start + int(i) for i in picked]
  return indices + indices[-1:] * (num_frames - k)


def cover_indices(num_frames: int, start: int, stop: int) -> list[int]:
  """What a media store keeps of frames [start, stop): all of them when they are at most
  ``num_frames``, else the middle frame of each of ``num_frames`` equal segments
  (``middle_indices`` over [start, stop - 1]). Distinct and increasing either way, so that
  training can draw from the kept frames as it draws from the whole video
  (``data.sft.store``)."""
  _check_num_frames(num_frames)
  if not 0 <= start < stop:
    raise ValueError(f"cover_indices: need 0 <= start < stop, got start={start}, stop={stop}")
  if stop - start <= num_frames:
    return list(range(start, stop))
  return middle_indices(num_frames, start, stop - 1)


def seconds_to_window(
  total_frames: int,
  fps: float,
  start_sec: float | None = None,
  end_sec: float | None = None,
  *,
  first_number: int = 0,
) -> tuple[int, int]:
  """0-based frames [start, stop) covered by bounds in seconds, clamped to the video.

  Time ``t`` is frame number ``round(t * fps)`` (half to even) as in ``get_index``;
  ``first_number`` is the number of the first frame: 0 for a video, 1 for a frame folder
  (the original's ``read_frame`` numbers its files from 1). A missing bound is open.
  The window may come out empty (start >= stop) when the bounds lie outside the video.
  """
  if (start_sec is not None or end_sec is not None) and not fps > 0:
    raise ValueError(f"seconds_to_window: bounds in seconds need fps > 0, got {fps}")
  start = 0 if start_sec is None else max(0, round(start_sec * fps) - first_number)
  stop = total_frames if end_sec is None else min(total_frames, round(end_sec * fps) - first_number)
  return start, stop


def _natural_key(name: str) -> tuple[list[int | str], str]:
  # re.split with a group alternates text, number, text, ...: element types line up
  chunks = re.split(r"(\d+)", name)
  return [int(c) if i % 2 else c.lower() for i, c in enumerate(chunks)], name


def frame_files(folder: str | Path) -> list[str]:
  """Names of the frame images in ``folder``, in natural order.

  Images are files ending in one of ``FRAME_EXTENSIONS`` (any case); anything else is
  ignored, hidden files too (macOS leaves ``._0001.jpg`` companions). Natural order
  compares digit runs as numbers and the rest case-insensitively, so ``2.jpg`` precedes
  ``10.jpg`` and zero-padded names keep their plain order; names equal that way
  (``01.jpg``, ``1.jpg``) fall back to plain order.
  """
  folder = Path(folder)
  names = [
    p.name
    for p in folder.iterdir()
    if p.suffix.lower() in FRAME_EXTENSIONS and not p.name.startswith(".") and p.is_file()
  ]
  return sorted(names, key=_natural_key)


def _stack(path: Path, frames_hwc: Sequence[np.ndarray]) -> np.ndarray:
  shapes = sorted({f.shape for f in frames_hwc})
  if len(shapes) > 1:
    raise MediaError(path, f"frames differ in size: {shapes}")
  return np.stack(frames_hwc)


def _read_folder(folder: Path, names: Sequence[str], indices: Sequence[int]) -> np.ndarray:
  rgb: dict[int, np.ndarray] = {}
  for i in dict.fromkeys(indices):
    file = folder / names[i]
    try:
      with Image.open(file) as image:
        rgb[i] = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
      raise MediaError(file, f"not a readable image ({err})") from err
  return _stack(folder, [rgb[i] for i in indices])


def _open(path: Path) -> av.container.InputContainer:
  try:
    return av.open(str(path))
  except av.FFmpegError as err:
    raise MediaError(path, f"not a video or corrupt ({err.strerror or err})") from err


def _video_stream(container: av.container.InputContainer, path: Path) -> av.VideoStream:
  if not container.streams.video:
    raise MediaError(path, "no video stream")
  stream = container.streams.video[0]
  stream.thread_type = "AUTO"  # threads change speed only, not the frames
  return stream


def _decoded(
  container: av.container.InputContainer, stream: av.VideoStream, path: Path
) -> Iterator[av.VideoFrame]:
  """Frames in presentation order; a decoding error ends the video there, with a warning."""
  count = 0
  try:
    for frame in container.decode(stream):
      count += 1
      yield frame
  except av.FFmpegError as err:
    logger.warning("%s: decoding stopped after %d frames: %s", path, count, err)


def _probe(path: Path) -> tuple[int, float]:
  """(frame count, average fps): the header's count, else one decoding pass to count."""
  with _open(path) as container:
    stream = _video_stream(container, path)
    rate = stream.average_rate or stream.guessed_rate
    total = stream.frames
    if total <= 0:  # not in the header
      total = sum(1 for _ in _decoded(container, stream, path))
  return total, float(rate) if rate else 0.0


def _gather(path: Path, indices: Sequence[int]) -> tuple[np.ndarray | None, int]:
  """(frames at ``indices`` as RGB, frames decoded); None for the frames if the stream
  ended before the last index."""
  wanted, last = set(indices), max(indices)
  rgb: dict[int, np.ndarray] = {}
  decoded = 0
  with _open(path) as container:
    for frame in _decoded(container, _video_stream(container, path), path):
      if decoded in wanted:
        rgb[decoded] = frame.to_ndarray(format="rgb24")
      if decoded == last:
        return _stack(path, [rgb[i] for i in indices]), decoded + 1
      decoded += 1
  return None, decoded


def _read_video_file(
  path: Path, pick: Callable[[int, float, int], list[int]]
) -> tuple[np.ndarray, int, float, list[int]]:
  total, fps = _probe(path)
  for _ in range(2):  # a second pass only when the header over-counted
    indices = pick(total, fps, 0)
    frames_thwc, decoded = _gather(path, indices)
    if frames_thwc is not None:
      return frames_thwc, total, fps, indices
    logger.warning("%s: the header counts %d frames, %d decode", path, total, decoded)
    total = decoded
  raise MediaError(path, f"decoding ended at a different frame on each pass ({decoded})")


def _decord_module():
  """decord, or None when it is not installed."""
  try:
    import decord
  except ImportError:
    return None
  return decord


def _read_video_decord(
  decord, path: Path, pick: Callable[[int, float, int], list[int]]
) -> tuple[np.ndarray, int, float, list[int]]:
  """decord's frame count (its index), average rate and batch read, as the original."""

  def failed(err: Exception) -> MediaError:  # decord's first line, less its source location
    reason = re.sub(r"\[[\d:]+\] \S+:\d+: ", "", str(err).splitlines()[0])
    return MediaError(path, f"not a video or corrupt (decord: {reason})")

  try:
    reader = decord.VideoReader(str(path), num_threads=1)
    total, fps = len(reader), float(reader.get_avg_fps())
    indices = pick(total, fps, 0)
    return reader.get_batch(indices).asnumpy(), total, fps, indices
  except (decord.DECORDError, RuntimeError) as err:
    raise failed(err) from err


def load_video(
  path: str | Path,
  num_frames: int = 32,
  *,
  sample: Literal["middle", "random", "cover"] = "middle",
  rng: np.random.Generator | None = None,
  start_sec: float | None = None,
  end_sec: float | None = None,
  folder_fps: float = DEFAULT_FOLDER_FPS,
  backend: Literal["pyav", "decord"] = "pyav",
) -> tuple[np.ndarray, VideoInfo]:
  """``num_frames`` frames of a video file or frame folder: (uint8 (T, H, W, 3) RGB, info).

  ``sample="middle"`` (evaluation), ``"random"`` (training, needs ``rng``) or ``"cover"``
  (a media store's frames: at most ``num_frames``, fewer for a shorter video); see the
  module doc. ``start_sec`` / ``end_sec`` restrict sampling to part of the video.
  ``folder_fps`` is the frame rate of a folder of frames, used only for the bounds.
  ``backend`` decodes video files: ``"pyav"`` or ``"decord"`` (when installed).
  Raises ``MediaError`` for what cannot be read, ``ValueError`` for bad arguments.
  """
  _check_num_frames(num_frames)
  if sample not in SAMPLE_MODES:
    raise ValueError(f"sample must be one of {SAMPLE_MODES}, got {sample!r}")
  if sample == "random" and rng is None:
    raise ValueError('sample="random" needs rng, a numpy.random.Generator')
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  decord = _decord_module() if backend == "decord" else None
  if backend == "decord" and decord is None:
    raise ValueError('backend="decord" needs decord installed (pip install decord)')
  if start_sec is not None and end_sec is not None and start_sec >= end_sec:
    raise ValueError(f"start_sec must be < end_sec, got {start_sec} and {end_sec}")
  path = Path(path)

  def pick(total_frames: int, fps: float, first_number: int) -> list[int]:
    if total_frames == 0:
      raise MediaError(path, "no decodable video frames")
    if (start_sec is not None or end_sec is not None) and not fps > 0:
      raise MediaError(path, "the frame rate is unknown, so start_sec/end_sec cannot be applied")
    start, stop = seconds_to_window(
      total_frames, fps, start_sec, end_sec, first_number=first_number
    )
    if start >= stop:
      raise MediaError(
        path,
        f"bounds {start_sec}..{end_sec} s hold no frame of a "
        f"{total_frames}-frame video at {fps:g} fps",
      )
    if sample == "middle":  # get_index ends its window at the last frame, not one past it
      return middle_indices(num_frames, start, min(stop, total_frames - 1))
    if sample == "cover":
      return cover_indices(num_frames, start, stop)
    assert rng is not None  # sample="random" without rng was refused above
    return random_indices(num_frames, start, stop, rng)

  if path.is_dir():
    names = frame_files(path)
    if not names:
      raise MediaError(
        path, f"no frame images ({', '.join(sorted(FRAME_EXTENSIONS))}) in the folder"
      )
    indices = pick(len(names), folder_fps, 1)
    frames_thwc, total, fps = _read_folder(path, names, indices), len(names), float(folder_fps)
  elif not path.exists():
    raise MediaError(path, "no such file or directory")
  elif path.suffix.lower() not in VIDEO_EXTENSIONS:
    raise MediaError(
      path,
      f"unsupported extension {path.suffix!r}: expected a video "
      f"({', '.join(sorted(VIDEO_EXTENSIONS))}) or a folder of frames",
    )
  elif decord is not None and path.suffix.lower() != ".gif":  # the original read GIFs apart
    frames_thwc, total, fps, indices = _read_video_decord(decord, path, pick)
  else:
    frames_thwc, total, fps, indices = _read_video_file(path, pick)
  return frames_thwc, VideoInfo(str(path), total, fps, tuple(indices))


def write_video(
  path: str | Path,
  frames_hwc: Iterable[np.ndarray],
  rate: int = 8,
  codec: str = "libx264",
  pix_fmt: str = "yuv420p",
  bit_rate: int | None = None,
  **options: str,
) -> Path:
  """Encodes uint8 RGB frames (each (H, W, 3), all one size) as ``path``; ``options`` go to
  the codec (``crf="0"`` / ``qp="0"``: lossless H.264)."""
  path = Path(path)
  with av.open(str(path), "w") as container:
    # a video codec by the caller's contract; the stubs type a codec named by a str as any stream
    stream = cast("av.VideoStream", container.add_stream(codec, rate=rate, options=options))
    stream.pix_fmt = pix_fmt
    if bit_rate:
      stream.bit_rate = bit_rate
    for i, frame_hwc in enumerate(frames_hwc):
      if i == 0:
        stream.height, stream.width = frame_hwc.shape[:2]
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame_hwc, format="rgb24")))
    container.mux(stream.encode())
  return path
