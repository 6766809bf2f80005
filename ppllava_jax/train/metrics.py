"""What a run reports: ``metrics.jsonl``, TensorBoard event files, a loss-curve PNG.

- ``WORKDIR/metrics.jsonl``: one JSON object per logged step, one per loss evaluation
  (``eval_loss``) and one per multiple-choice evaluation (``mcq_accuracy``; ``train.loop``).
  On resume the lines past the restored step are dropped (a killed run logged steps it
  will redo).
- ``WORKDIR/tensorboard/events.out.tfevents.*``: scalar summaries in TensorBoard's
  event format, written here without TensorFlow: TFRecord framing (length, masked
  CRC-32C of the length, the ``Event`` proto bytes, masked CRC-32C of them) around
  hand-encoded ``Event{wall_time, step, summary{value{tag, simple_value}}}`` protos.
- ``WORKDIR/loss.png``: the loss against the step, drawn with Pillow at the end; a DPO
  run's adds panels of the reward margins and accuracies (``CURVES``).

``mfu(flops, seconds, peak)``: model FLOPs utilisation, the compiled step's FLOPs
(XLA's cost analysis of the lowered step) over ``seconds * peak``.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from pathlib import Path

from ppllava_jax.files import read_jsonl

# ---- CRC-32C (Castagnoli), as TFRecord frames use ---------------------------------------

def _table():
  poly, table = 0x82F63B78, []
  for n in range(256):
    c = n
    for _ in range(8):
      c = (c >> 1) ^ poly if c & 1 else c >> 1
    table.append(c)
  return table


_CRC = _table()


def crc32c(data: bytes) -> int:
  c = 0xFFFFFFFF
  for b in data:
    c = _CRC[(c ^ b) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
  c = crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---- protobuf wire format, the few fields an Event needs --------------------------------

def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    b, n = n & 0x7F, n >> 7
    out.append(b | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number: int, wire: int) -> bytes:
  return _varint(number << 3 | wire)


def _bytes(number: int, payload: bytes) -> bytes:
  return _field(number, 2) + _varint(len(payload)) + payload


def event(wall_time: float, step: int = 0, *, file_version: str | None = None,
          scalars: dict[str, float] | None = None) -> bytes:
  """An ``Event`` proto: wall_time (1, double), step (2, int64), file_version (3) or
  summary (5: Summary{value (1): {tag (1), simple_value (2, float)}})."""
  out = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(step)
  if file_version is not None:
    out += _bytes(3, file_version.encode())
  if scalars:
    values = b"".join(_bytes(1, _bytes(1, tag.encode()) + _field(2, 5) + struct.pack("<f", v))
                      for tag, v in scalars.items())
    out += _bytes(5, values)
  return out


def frame(record: bytes) -> bytes:
  length = struct.pack("<Q", len(record))
  return length + struct.pack("<I", masked_crc(length)) + record + struct.pack(
      "<I", masked_crc(record))


def read_frames(path: str | Path) -> list[bytes]:
  """The records of a TFRecord file, each CRC checked (tests, debugging)."""
  data, out, i = Path(path).read_bytes(), [], 0
  while i < len(data):
    length = data[i:i + 8]
    (n,) = struct.unpack("<Q", length)
    if struct.unpack("<I", data[i + 8:i + 12])[0] != masked_crc(length):
      raise ValueError(f"{path}: bad length CRC at byte {i}")
    record = data[i + 12:i + 12 + n]
    if struct.unpack("<I", data[i + 12 + n:i + 16 + n])[0] != masked_crc(record):
      raise ValueError(f"{path}: bad record CRC at byte {i}")
    out.append(record)
    i += 16 + n
  return out


class EventWriter:
  """Scalars to a new TensorBoard event file in ``folder``, opened at the first write, so
  a rerun of a finished run (which logs nothing) leaves no empty file behind."""

  def __init__(self, folder: str | Path):
    self.folder = Path(folder)
    self._f = None

  def _open(self):
    self.folder.mkdir(parents=True, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self._f = open(self.folder / name, "ab")
    self._f.write(frame(event(time.time(), file_version="brain.Event:2")))
    return self._f

  def scalars(self, step: int, values: dict[str, float]) -> None:
    finite = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}
    f = self._f or self._open()
    f.write(frame(event(time.time(), step, scalars=finite)))
    f.flush()

  def close(self) -> None:
    if self._f is not None:
      self._f.close()


class MetricsWriter:
  """``metrics.jsonl`` and the event file of one run (module doc)."""

  def __init__(self, workdir: str | Path, resume_step: int = 0):
    self.workdir = Path(workdir)
    self.jsonl = self.workdir / "metrics.jsonl"
    self._drop_after(resume_step)
    self._f = open(self.jsonl, "a")
    self.events = EventWriter(self.workdir / "tensorboard")

  def _drop_after(self, step: int) -> None:
    if self.jsonl.is_file():
      keep = [r for r in read_metrics(self.workdir) if r["step"] <= step]
      self.jsonl.write_text("".join(_line(r) for r in keep))

  def write(self, record: dict) -> None:
    self._f.write(_line(record))
    self._f.flush()
    self.events.scalars(record["step"], {k: v for k, v in record.items()
                                         if k != "step" and isinstance(v, (int, float))})

  def close(self) -> None:
    self._f.close()
    self.events.close()


class NoMetrics:
  """What a process other than the primary writes: nothing (``ppllava_jax.distributed``)."""

  def write(self, record: dict) -> None:
    pass

  def close(self) -> None:
    pass


def _line(record: dict) -> str:
  return json.dumps(record, sort_keys=True) + "\n"


def read_metrics(workdir: str | Path) -> list[dict]:
  """The records of ``workdir/metrics.jsonl`` in order (none when there is no file)."""
  path = Path(workdir) / "metrics.jsonl"
  return [record for _, record in read_jsonl(path, expect=dict)] if path.is_file() else []


def cost_flops(cost) -> float | None:
  """The FLOPs of a lowered or compiled program's ``cost_analysis()`` (a dict, or a list of
  one per program in some JAX versions); None when it has none."""
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def mfu(flops: float | None, seconds: float, peak: float) -> float | None:
  if not flops or seconds <= 0:
    return None
  return flops / (seconds * peak)


CURVES = (("loss", "training loss"), ("rewards/margins", "reward margin (chosen - rejected)"),
          ("rewards/accuracies", "reward accuracy (chosen > rejected)"))


def loss_curve(records: list[dict], path: str | Path, width: int = 640,
               panel_height: int = 300) -> Path | None:
  """A PNG (Pillow) of each ``CURVES`` metric that ``records`` hold against the step, one
  panel each, stacked: the loss, and for DPO the reward margins and accuracies. None:
  nothing to draw."""
  from PIL import Image, ImageDraw
  panels = []
  for key, title in CURVES:
    points = [(r["step"], r[key]) for r in records
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    if points:
      panels.append((title, points))
  if not panels:
    return None
  image = Image.new("RGB", (width, panel_height * len(panels)), "white")
  draw = ImageDraw.Draw(image)
  for i, (title, points) in enumerate(panels):
    _panel(draw, points, title, (0, i * panel_height, width, (i + 1) * panel_height))
  path = Path(path)
  image.save(path)
  return path


def _panel(draw, points: list[tuple[int, float]], title: str, box: tuple[int, int, int, int]):
  x0, y0, x1, y1 = box
  left, right, top, bottom = x0 + 60, x1 - 20, y0 + 30, y1 - 40
  s0, s1 = min(p[0] for p in points), max(p[0] for p in points)
  v0, v1 = min(p[1] for p in points), max(p[1] for p in points)
  s1, v1 = (s1 if s1 > s0 else s0 + 1), (v1 if v1 > v0 else v0 + 1e-6)
  xy = [(left + (s - s0) / (s1 - s0) * (right - left),
         top + (v1 - v) / (v1 - v0) * (bottom - top)) for s, v in points]
  draw.rectangle([left, top, right, bottom], outline="black")
  if v0 < 0 < v1:  # the zero line: a margin above it prefers the chosen answers
    zero = top + v1 / (v1 - v0) * (bottom - top)
    draw.line([(left, zero), (right, zero)], fill=(170, 170, 170))
  if len(xy) > 1:
    draw.line(xy, fill=(30, 60, 220), width=2)
  for x, y in xy:
    draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(30, 60, 220))
  draw.text((left, y0 + 8), title, fill="black")
  draw.text((x0 + 4, top), f"{v1:.3g}", fill="black")
  draw.text((x0 + 4, bottom - 10), f"{v0:.3g}", fill="black")
  draw.text((left, bottom + 8), f"step {s0}", fill="black")
  draw.text((right - 70, bottom + 8), f"step {s1}", fill="black")
