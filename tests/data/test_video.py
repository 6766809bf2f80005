"""Frame sampling against the original's rules worked by hand, and load_video on tiny real files.

Every test video is written here with PyAV: frame ``i`` is a flat grey of level
``STEP * i``, so after lossy coding its mean red channel still tells which frame it was
(coding errors stay under 0.2 * STEP; the tests allow 0.4 * STEP).
"""

import pickle

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ppllava_jax.data.media.video import (
  MediaError,
  frame_files,
  load_video,
  middle_indices,
  random_indices,
  seconds_to_window,
)
from ppllava_jax.data.media.video import write_video as encode

STEP = 6


def write_video(
  path, num_frames=40, rate=10, codec="libx264", pix_fmt="yuv420p", step=STEP, **options
):
  # mpeg4 has no lossless mode: a bit rate high enough for flat frames
  return encode(
    path,
    (np.full((48, 64, 3), step * i, np.uint8) for i in range(num_frames)),
    rate,
    codec,
    pix_fmt,
    4_000_000 if codec == "mpeg4" else None,
    **options,
  )


def assert_frames_are(frames_thwc, indices, step=STEP):
  assert frames_thwc.dtype == np.uint8 and frames_thwc.shape[1:] == (48, 64, 3)
  assert len(frames_thwc) == len(indices)
  levels = frames_thwc[..., 0].mean(axis=(1, 2)) / step
  np.testing.assert_allclose(levels, indices, atol=0.4)


def decode_count(path):
  with av.open(str(path)) as container:
    return sum(1 for _ in container.decode(video=0))


# ---- sampling rules, pure ints ----------------------------------------------------------


def test_middle_indices_by_hand():
  # get_index: seg = (end - start) / N, int(start + seg / 2 + round(seg * i))
  # 39 / 4 = 9.75: offsets round(0, 9.75, 19.5, 29.25) = 0, 10, 20, 29, plus 4.875
  assert middle_indices(4, 0, 39) == [4, 14, 24, 33]
  # seg 2.5: round(2.5) = 2 and round(7.5) = 8 (half to even); half-up would give 4 and 11
  assert middle_indices(4, 0, 10) == [1, 3, 6, 9]
  assert middle_indices(4, 10, 20) == [11, 13, 16, 19]
  # fewer frames than samples: repeats; seg 0.5625, offsets round(0.5625 * i)
  assert middle_indices(16, 0, 9) == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 6, 6, 7, 7, 8, 8]
  # seg 0.375: round(0.375 * 7) = 3 reaches the last index itself
  assert middle_indices(8, 0, 3) == [0, 0, 1, 1, 2, 2, 2, 3]
  assert middle_indices(5, 0, 0) == [0] * 5  # a one-frame video


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64), st.integers(0, 500), st.integers(0, 2000))
def test_middle_indices_properties(num_frames, start, length):
  end = start + length
  indices = middle_indices(num_frames, start, end)
  assert len(indices) == num_frames
  assert start <= indices[0] and indices[-1] <= end
  assert all(a <= b for a, b in zip(indices, indices[1:]))
  if length >= num_frames:  # segments at least a frame long: no repeats
    assert len(set(indices)) == num_frames


def test_random_indices_segments_and_the_left_out_last_frame():
  # 40 frames, 8 segments of 5: each draw from the segment's first 4 frames (range(lo, hi - 1))
  rng = np.random.default_rng(0)
  draws = np.array([random_indices(8, 0, 40, rng) for _ in range(300)])
  lows = np.arange(8) * 5
  assert ((draws >= lows) & (draws < lows + 4)).all()
  assert all(set(draws[:, s] - lows[s]) == {0, 1, 2, 3} for s in range(8))  # uniform support
  shifted = random_indices(8, 100, 140, np.random.default_rng(1))
  assert shifted == [100 + i for i in random_indices(8, 0, 40, np.random.default_rng(1))]


def test_random_indices_fallback_and_short_clips():
  rng = np.random.default_rng(0)
  # 12 frames in 8 segments: some are one frame long -> 8 distinct random frames, sorted
  for _ in range(50):
    indices = random_indices(8, 0, 12, rng)
    assert indices == sorted(set(indices)) and len(indices) == 8 and indices[-1] < 12
  # fewer frames than samples: every frame once, then the last repeated
  assert random_indices(8, 0, 5, rng) == [0, 1, 2, 3, 4, 4, 4, 4]
  assert random_indices(3, 7, 8, rng) == [7, 7, 7]


def test_seconds_to_window():
  # 10 fps: 1.25 s -> round(12.5) = 12 (half to even), 3.35 s -> round(33.5) = 34
  assert seconds_to_window(100, 10.0, 1.25, 3.35) == (12, 34)
  assert seconds_to_window(100, 10.0, 1.25, 3.35, first_number=1) == (11, 33)
  assert seconds_to_window(100, 10.0) == (0, 100)
  assert seconds_to_window(100, 10.0, -5.0, 99.0) == (0, 100)  # clamped
  assert seconds_to_window(100, 10.0, 20.0, None) == (200, 100)  # empty: caller reports it
  with pytest.raises(ValueError, match="fps"):
    seconds_to_window(100, 0.0, 1.0, 2.0)


def test_bad_sampling_arguments():
  with pytest.raises(ValueError):
    middle_indices(0, 0, 10)
  with pytest.raises(ValueError):
    middle_indices(4, 5, 3)
  with pytest.raises(ValueError):
    random_indices(4, 3, 3, np.random.default_rng(0))


# ---- load_video on real files -----------------------------------------------------------


@pytest.mark.parametrize(
  "name, codec, pix_fmt, options",
  [
    ("clip.mp4", "libx264", "yuv420p", {"crf": "0"}),  # header has the frame count
    ("clip.webm", "libvpx-vp9", "yuv420p", {"lossless": "1"}),  # header says 0 frames
    ("clip.gif", "gif", "rgb8", {}),
  ],
)
def test_load_video_middle(tmp_path, name, codec, pix_fmt, options):
  path = write_video(tmp_path / name, codec=codec, pix_fmt=pix_fmt, **options)
  frames_thwc, info = load_video(path, 8)
  # evaluation window: frames 0 .. 39 with end = the last index, as get_index
  assert info.indices == tuple(middle_indices(8, 0, 39)) == (2, 7, 12, 17, 22, 26, 31, 36)
  assert (info.total_frames, info.fps, info.path) == (40, 10.0, str(path))
  assert_frames_are(frames_thwc, info.indices)


def test_load_video_random_is_the_rng_draw(tmp_path):
  path = write_video(tmp_path / "clip.webm", codec="libvpx-vp9", lossless="1")
  frames_thwc, info = load_video(path, 8, sample="random", rng=np.random.default_rng(3))
  assert info.indices == tuple(random_indices(8, 0, 40, np.random.default_rng(3)))
  assert_frames_are(frames_thwc, info.indices)


def test_load_video_bounds(tmp_path):
  path = write_video(tmp_path / "clip.mp4", crf="0")
  frames_thwc, info = load_video(path, 4, start_sec=1.0, end_sec=2.5)  # 10 fps: frames 10 .. 25
  assert info.indices == tuple(middle_indices(4, 10, 25))
  assert_frames_are(frames_thwc, info.indices)
  # an end past the video is clamped to its last frame
  assert load_video(path, 4, start_sec=3.0, end_sec=60.0)[1].indices == tuple(
    middle_indices(4, 30, 39)
  )
  frames_thwc, info = load_video(
    path, 4, sample="random", rng=np.random.default_rng(0), start_sec=1.0, end_sec=2.5
  )
  assert all(10 <= i < 25 for i in info.indices)
  assert_frames_are(frames_thwc, info.indices)
  with pytest.raises(MediaError, match="hold no frame"):
    load_video(path, 4, start_sec=5.0, end_sec=9.0)


def test_load_video_shorter_than_num_frames(tmp_path):
  path = write_video(tmp_path / "short.mp4", num_frames=5, crf="0")
  frames_thwc, info = load_video(path, 8)
  assert info.indices == (0, 0, 1, 2, 2, 2, 3, 4)  # middle_indices(8, 0, 4): repeats
  assert_frames_are(frames_thwc, info.indices)
  frames_thwc, info = load_video(path, 8, sample="random", rng=np.random.default_rng(0))
  assert info.indices == (0, 1, 2, 3, 4, 4, 4, 4)  # all frames, then the last repeated
  assert_frames_are(frames_thwc, info.indices)


def test_load_video_header_overcounts(tmp_path, caplog):
  # An AVI cut short keeps its header's count (40) but decodes fewer frames.
  step = 12
  path = write_video(tmp_path / "full.avi", num_frames=20, codec="mpeg4", step=step)
  data = path.read_bytes()
  cut = tmp_path / "cut.avi"
  cut.write_bytes(data[: (data.find(b"movi") + data.find(b"idx1")) // 2])
  with av.open(str(cut)) as container:
    assert container.streams.video[0].frames == 20
  decodable = decode_count(cut)
  assert 1 < decodable < 20
  frames_thwc, info = load_video(cut, 4)
  assert f"the header counts 20 frames, {decodable} decode" in caplog.text
  assert info.total_frames == decodable
  assert info.indices == tuple(middle_indices(4, 0, decodable - 1))
  assert_frames_are(frames_thwc, info.indices, step=step)


def test_load_video_damaged_middle(tmp_path, caplog):
  # garbage over the middle of an MP4: decoding fails there; what came before is the video
  path = write_video(tmp_path / "clip.mp4", crf="0")
  data = bytearray(path.read_bytes())
  start, stop = int(len(data) * 0.3), int(len(data) * 0.6)
  data[start:stop] = np.random.default_rng(0).bytes(stop - start)
  path.write_bytes(data)
  decodable = 0
  with av.open(str(path)) as container, pytest.raises(av.FFmpegError):
    for _ in container.decode(video=0):
      decodable += 1
  assert 1 < decodable < 40
  frames_thwc, info = load_video(path, 8)
  assert "decoding stopped after" in caplog.text
  assert info.total_frames == decodable
  assert info.indices == tuple(middle_indices(8, 0, decodable - 1))
  assert_frames_are(frames_thwc, info.indices)


def test_load_frame_folder(tmp_path):
  folder = tmp_path / "frames"
  folder.mkdir()
  for i in range(12):  # unpadded numbers: a plain sort would put 10.png before 2.png
    Image.fromarray(np.full((48, 64, 3), STEP * i, np.uint8)).save(folder / f"{i + 1}.png")
  (folder / "notes.txt").write_text("not a frame")
  assert frame_files(folder) == [f"{i}.png" for i in range(1, 13)]
  frames_thwc, info = load_video(folder, 4)
  assert (info.total_frames, info.fps) == (12, 3.0)
  assert info.indices == tuple(middle_indices(4, 0, 11))
  assert_frames_are(frames_thwc, info.indices)
  # bounds on files numbered from 1 at 3 fps (read_frame): 1 s -> file 3, 3 s -> file 9,
  # i.e. positions 2 .. 8
  frames_thwc, info = load_video(folder, 4, start_sec=1.0, end_sec=3.0)
  assert info.indices == tuple(middle_indices(4, 2, 8))
  assert_frames_are(frames_thwc, info.indices)
  assert load_video(folder, 4, start_sec=1.0, end_sec=3.0, folder_fps=2.0)[1].indices == tuple(
    middle_indices(4, 1, 5)
  )


def test_frame_files_natural_order(tmp_path):
  names = [
    "img_10.JPG",
    "img_2.jpg",
    "img_1.jpeg",
    "clip2_frame1.png",
    "clip10_frame1.png",
    "img_02.jpg",
    "readme.md",
    "._img_1.jpeg",
  ]
  for name in names:
    (tmp_path / name).write_bytes(b"")
  # digit runs as numbers, case ignored; img_02 and img_2 tie, then plain order
  assert frame_files(tmp_path) == [
    "clip2_frame1.png",
    "clip10_frame1.png",
    "img_1.jpeg",
    "img_02.jpg",
    "img_2.jpg",
    "img_10.JPG",
  ]


# ---- errors ---------------------------------------------------------------------------


def zero_frame_webm(tmp_path):
  # a WebM cut just inside its first cluster: a valid header, a video stream, no frames
  data = write_video(tmp_path / "full.webm", codec="libvpx-vp9", lossless="1").read_bytes()
  path = tmp_path / "empty.webm"
  path.write_bytes(data[: data.find(bytes.fromhex("1F43B675")) + 12])
  assert decode_count(path) == 0
  return path


def test_media_errors_name_the_file_and_reason(tmp_path):
  (tmp_path / "notes.txt").write_text("hello")
  (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
  (tmp_path / "empty").mkdir()
  (tmp_path / "text_only").mkdir()
  (tmp_path / "text_only" / "a.txt").write_text("x")
  (tmp_path / "bad_frames").mkdir()
  (tmp_path / "bad_frames" / "1.jpg").write_bytes(b"not a jpeg")
  cases = {
    tmp_path / "missing.mp4": "no such file",
    tmp_path / "notes.txt": "unsupported extension '.txt'",
    tmp_path / "noise.mp4": "not a video or corrupt",
    zero_frame_webm(tmp_path): "no decodable video frames",
    tmp_path / "empty": "no frame images",
    tmp_path / "text_only": "no frame images",
    tmp_path / "bad_frames": "not a readable image",
  }
  for path, reason in cases.items():
    with pytest.raises(MediaError) as caught:
      load_video(path, 4)
    assert str(caught.value).startswith(str(path)) and reason in str(caught.value), path
  again = pickle.loads(pickle.dumps(caught.value))  # crosses worker processes intact
  assert str(again) == str(caught.value) and again.reason == caught.value.reason


def test_frames_of_different_sizes(tmp_path):
  for i, size in enumerate([(64, 48), (32, 32), (64, 48), (64, 48)]):
    Image.new("RGB", size).save(tmp_path / f"{i}.png")
  with pytest.raises(MediaError, match="differ in size"):
    load_video(tmp_path, 4)  # frames 0, 1, 2, 2


def test_bad_load_arguments(tmp_path):
  path = write_video(tmp_path / "clip.mp4", num_frames=4, crf="0")
  for kwargs in [
    dict(sample="uniform"),
    dict(sample="random"),
    dict(num_frames=0),
    dict(start_sec=2.0, end_sec=1.0),
  ]:
    with pytest.raises(ValueError):
      load_video(path, **kwargs)


# ---- decord, the original's decoder (optional backend) ----------------------------------


@pytest.mark.parametrize(
  "name, codec, pix_fmt, options",
  [
    ("clip.mp4", "libx264", "yuv420p", {"crf": "0"}),
    ("clip.webm", "libvpx-vp9", "yuv420p", {"lossless": "1"}),
    ("lossy.mp4", "libx264", "yuv420p", {}),
    ("clip.avi", "mpeg4", "yuv420p", {}),
  ],
)
def test_decord_reads_what_pyav_reads(tmp_path, name, codec, pix_fmt, options):
  path = write_video(tmp_path / name, codec=codec, pix_fmt=pix_fmt, **options)
  for kwargs in [
    dict(),
    dict(start_sec=1.0, end_sec=2.5),
    dict(sample="random", rng=np.random.default_rng(5)),
  ]:
    want_thwc, want = load_video(path, 8, backend="pyav", **kwargs)
    if "rng" in kwargs:
      kwargs["rng"] = np.random.default_rng(5)
    got_thwc, got = load_video(path, 8, backend="decord", **kwargs)
    assert got == want  # frame count, rate, path and the sampled indices
    np.testing.assert_array_equal(got_thwc, want_thwc)


def test_decord_failures_are_media_errors(tmp_path):
  (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
  damaged = write_video(tmp_path / "damaged.mp4", crf="0")
  data = bytearray(damaged.read_bytes())
  data[len(data) // 3 : len(data) // 2] = bytes(len(data) // 2 - len(data) // 3)
  damaged.write_bytes(data)
  for path in (tmp_path / "noise.mp4", zero_frame_webm(tmp_path), damaged):
    with pytest.raises(MediaError) as caught:
      load_video(path, 4, backend="decord")
    assert str(caught.value).startswith(f"{path}: not a video or corrupt (decord: ")
  assert load_video(damaged, 4)[1].total_frames > 1  # PyAV keeps what precedes the damage


def test_decord_backend_reads_gifs_with_pyav_and_checks_its_name(tmp_path):
  path = write_video(tmp_path / "clip.gif", codec="gif", pix_fmt="rgb8")
  frames_thwc, info = load_video(path, 8, backend="decord")  # decord cannot count GIF frames
  assert info.total_frames == 40
  assert_frames_are(frames_thwc, info.indices)
  with pytest.raises(ValueError, match="backend must be one of"):
    load_video(path, 8, backend="opencv")
