"""Training media read as the original's training loaders read them: images as RGB, frame
folders numbered from 1, videos and frame folders by the random training draw (or the
evenly covering one a media store keeps). Shared by SFT samples, DPO rows and the media
store; evaluation's reading is ``video.load_video`` with the evaluation rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ppllava_jax.data.media import video

NOT_STORED = "not in the media store"  # a MediaError's reason for a video a store lacks


def open_image(path: str | Path) -> Image.Image:
  """A PIL image (lazily decoded), or ``MediaError``."""
  path = Path(path)
  if not path.is_file():
    raise video.MediaError(path, "no such file or directory")
  try:
    return Image.open(path)  # reads the header (the size) only
  except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
    raise video.MediaError(path, f"not a readable image ({err})") from err


def load_rgb(path: str | Path, image: Image.Image | None = None) -> Image.Image:
  """The RGB pixels of ``path`` (or of ``image``, opened from it), or ``MediaError``."""
  image = image if image is not None else open_image(path)
  try:
    return image.convert("RGB")  # the original's Image.open(...).convert("RGB")
  except (OSError, ValueError, Image.DecompressionBombError) as err:
    raise video.MediaError(path, f"not a readable image ({err})") from err


def load_numbered_frames(
  folder: str | Path,
  total_frames: int,
  num_frames: int,
  rng: np.random.Generator | None = None,
  *,
  sample: str = "random",
) -> tuple[np.ndarray, tuple[int, ...]]:
  """Training frames of a ``{:06d}.jpg`` folder numbered from 1 (``total_frames`` given):
  the original's ``read_frames_rawframes`` with ``max_num_frames``: random indices over
  ``total_frames`` (``sample="cover"``: ``video.cover_indices``, a media store's), frame
  ``i`` read from ``{i+1:06d}.jpg`` or, when that is missing, ``{i+2:06d}.jpg``."""
  folder = Path(folder)
  if not folder.is_dir():
    raise video.MediaError(folder, "no such file or directory")
  # the caller gives rng for random sampling (the default), none for "cover"
  indices = (
    video.cover_indices(num_frames, 0, total_frames)
    if sample == "cover"
    else video.random_indices(num_frames, 0, total_frames, rng)  # type: ignore[arg-type]
  )
  frames: dict[int, np.ndarray] = {}
  for i in dict.fromkeys(indices):
    path = folder / f"{i + 1:06d}.jpg"
    if not path.is_file():
      path = folder / f"{i + 2:06d}.jpg"
    frames[i] = np.asarray(load_rgb(path))
  shapes = {f.shape for f in frames.values()}
  if len(shapes) > 1:
    raise video.MediaError(folder, f"frames differ in size: {sorted(shapes)}")
  return np.stack([frames[i] for i in indices]), tuple(indices)


def read_video(
  path: str | Path,
  num_frames: int,
  rng: np.random.Generator | None = None,
  *,
  sample: str = "random",
  reader: str = "auto",
  backend: str = "pyav",
  folder_fps: float = video.DEFAULT_FOLDER_FPS,
  total_frames: int | None = None,
) -> tuple[np.ndarray, tuple[int, ...], int]:
  """(frames (T, H, W, 3) uint8, their indices, the video's frame count) of a video file
  or a frame folder: ``num_frames`` by the original's random sampling, or with
  ``sample="cover"`` the frames a media store keeps (``video.cover_indices``). ``reader``
  as ``CorpusConfig.reader`` (``"decord"`` / ``"pyav"`` override ``backend``); with
  ``total_frames`` a folder is a ``{:06d}.jpg`` folder numbered from 1
  (``load_numbered_frames``)."""
  path = Path(path)
  if total_frames is not None and reader in ("auto", "frames") and path.is_dir():
    frames, indices = load_numbered_frames(path, total_frames, num_frames, rng, sample=sample)
    return frames, indices, total_frames
  if reader == "frames" and not path.is_dir():
    raise video.MediaError(
      path, "no such file or directory" if not path.exists() else "not a folder of frames"
    )
  backend = reader if reader in video.BACKENDS else backend
  frames, info = video.load_video(
    path,
    num_frames,
    sample=sample,  # type: ignore[arg-type]  # a config string; load_video checks it
    rng=rng,
    folder_fps=folder_fps,
    backend=backend,  # type: ignore[arg-type]  # a config string; load_video checks it
  )
  return frames, info.indices, info.total_frames


def load_training_video(
  path: str | Path,
  num_frames: int,
  rng: np.random.Generator,
  *,
  reader: str = "auto",
  backend: str = "pyav",
  folder_fps: float = video.DEFAULT_FOLDER_FPS,
  total_frames: int | None = None,
) -> tuple[np.ndarray, tuple[int, ...]]:
  """(frames (T, H, W, 3) uint8, their indices): ``read_video``'s random sampling."""
  frames, indices, _ = read_video(
    path,
    num_frames,
    rng,
    reader=reader,
    backend=backend,
    folder_fps=folder_fps,
    total_frames=total_frames,
  )
  return frames, indices
