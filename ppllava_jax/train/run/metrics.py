"""What a run reports: ``metrics.jsonl``, TensorBoard event files, a loss-curve PNG.

- ``WORKDIR/metrics.jsonl``: one JSON object per logged step, one per loss evaluation
  (``eval_loss``) and one per multiple-choice evaluation (``mcq_accuracy``; ``train.run.loop``).
  On resume a torn last line (a run killed mid-write) is cut off, with a warning, and the
  lines past the restored step are dropped (a killed run logged steps it will redo).
- ``WORKDIR/tensorboard/events.out.tfevents.*``: scalar summaries in TensorBoard's
  event format, written here without TensorFlow: TFRecord framing (length, masked
  CRC-32C of the length, the ``Event`` proto bytes, masked CRC-32C of them) around
  hand-encoded ``Event{wall_time, step, summary{value{tag, simple_value}}}`` protos.
- ``WORKDIR/loss.png``: drawn with Pillow at the end of a run, one panel per ``PANELS``
  entry the records hold, stacked on one step axis, each with a title, axis labels, a
  legend and light grid lines at nice ticks (``linear_ticks``, ``log_ticks``): the training
  loss and the held-out loss (``eval_loss``, dots) on a log axis (1-2-5 ticks over
  decades, finer within one; linear when a value is <= 0), so the late part of a run is
  not a flat line; the multiple-choice accuracy on 0-100% (with a dashed chance level when
  the records hold ``mcq_chance``); for DPO the reward margins (the zero line darker) and
  accuracies. Drawn at twice the size and shrunk, for smooth lines and text.

``mfu(flops, seconds, peak)``: model FLOPs utilisation, the compiled step's FLOPs
(XLA's cost analysis of the lowered step) over ``seconds * peak``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import struct
import time
from pathlib import Path

from ppllava_jax.files import cut_torn_last_line, read_jsonl

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


def event(
  wall_time: float,
  step: int = 0,
  *,
  file_version: str | None = None,
  scalars: dict[str, float] | None = None,
) -> bytes:
  """An ``Event`` proto: wall_time (1, double), step (2, int64), file_version (3) or
  summary (5: Summary{value (1): {tag (1), simple_value (2, float)}})."""
  out = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(step)
  if file_version is not None:
    out += _bytes(3, file_version.encode())
  if scalars:
    values = b"".join(
      _bytes(1, _bytes(1, tag.encode()) + _field(2, 5) + struct.pack("<f", v))
      for tag, v in scalars.items()
    )
    out += _bytes(5, values)
  return out


def frame(record: bytes) -> bytes:
  length = struct.pack("<Q", len(record))
  return (
    length + struct.pack("<I", masked_crc(length)) + record + struct.pack("<I", masked_crc(record))
  )


def read_frames(path: str | Path) -> list[bytes]:
  """The records of a TFRecord file, each CRC checked (tests, debugging)."""
  data, out, i = Path(path).read_bytes(), [], 0
  while i < len(data):
    length = data[i : i + 8]
    (n,) = struct.unpack("<Q", length)
    if struct.unpack("<I", data[i + 8 : i + 12])[0] != masked_crc(length):
      raise ValueError(f"{path}: bad length CRC at byte {i}")
    record = data[i + 12 : i + 12 + n]
    if struct.unpack("<I", data[i + 12 + n : i + 16 + n])[0] != masked_crc(record):
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
    if self.jsonl.is_file():  # a run killed mid-write: its half line would block the read
      cut_torn_last_line(self.jsonl)
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
    self.events.scalars(
      record["step"],
      {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
    )

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


# ---- loss.png: panels of series against the step ------------------------------------------

Colour = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Series:
  """The finite values of ``key`` in the records, drawn as a line; with ``markers`` a dot
  per record too (sparse series: evaluations)."""

  key: str
  label: str
  colour: Colour
  markers: bool = False


@dataclasses.dataclass(frozen=True)
class Panel:
  """One plot of ``loss.png``, drawn when a record holds one of its ``series``. ``log``: a
  log value axis when every value is positive; ``limits``: a fixed value range;
  ``reference``: a dashed level at the last value of its key, when a record holds one (its
  label a format string of the value)."""

  title: str
  y_label: str
  series: tuple[Series, ...]
  log: bool = False
  limits: tuple[float, float] | None = None
  reference: Series | None = None


PANELS = (
  Panel(
    "Loss",
    "loss",
    (
      Series("loss", "training", (31, 119, 180)),
      Series("eval_loss", "held-out", (255, 127, 14), markers=True),
    ),
    log=True,
  ),
  Panel(
    "Multiple-choice accuracy",
    "accuracy (%)",
    (Series("mcq_accuracy", "accuracy", (44, 160, 44), markers=True),),
    limits=(0, 100),
    reference=Series("mcq_chance", "chance {:.3g}%", (110, 110, 110)),
  ),
  Panel(
    "DPO reward margin",
    "chosen - rejected",
    (Series("rewards/margins", "reward margin", (148, 103, 189)),),
  ),
  Panel(
    "DPO reward accuracy",
    "fraction chosen > rejected",
    (Series("rewards/accuracies", "reward accuracy", (214, 39, 40)),),
    limits=(0, 1),
  ),
)


# ---- ticks: pure maths ---------------------------------------------------------------------


def _clean(x: float) -> float:
  """``x`` rounded to 12 digits (3 * 0.1 is 0.30000000000000004), without a negative zero."""
  return float(f"{x:.12g}") + 0.0


def _inside(x: float, lo: float, hi: float) -> bool:
  """``lo <= x <= hi``, up to rounding (a tick computed as 3 * 0.1 at an end 0.3)."""
  return lo - 1e-9 * abs(lo) <= x <= hi + 1e-9 * abs(hi)


def nice_step(span: float, count: int) -> float:
  """The smallest 1, 2 or 5 times a power of ten that cuts ``span`` into at most ``count``
  steps."""
  if not span > 0 or count < 1:
    raise ValueError(f"no step cuts a span of {span} into {count} steps")
  raw = span / count
  power = 10.0 ** math.floor(math.log10(raw))
  return next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))


def linear_ticks(lo: float, hi: float, count: int = 5, least: float = 0.0) -> list[float]:
  """Nice ticks covering [lo, hi]: the multiples of ``nice_step(hi - lo, count)`` (at least
  ``least``) from the last at or below ``lo`` to the first at or above ``hi`` (the axis
  spans them)."""
  if not hi > lo:
    raise ValueError(f"ticks need a range with hi > lo, got [{lo}, {hi}]")
  step = max(nice_step(hi - lo, count), least)
  first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
  return [_clean(k * step) for k in range(first, last + 1)]


_MANTISSAS = (1, 5, 2, 3, 4, 6, 8, 7, 9)  # of a decade's ticks, the roundest first


def log_ticks(lo: float, hi: float, most: int = 12) -> list[float]:
  """Ticks inside [lo, hi] for a log axis: 1, 5, 2, 3, 4, 6, 8, 7, 9 times the powers of
  ten, the roundest first, each kept when at least 1/``most`` of the axis from those kept
  (1-2-5 over three decades, every k-th power of ten over many, more within one); unless
  the nice linear ticks inside [lo, hi] leave a shorter stretch of the axis bare (0.8..1.5
  gets 0.8, 1, 1.2, 1.4, not 0.8, 0.9, 1)."""
  if not 0 < lo < hi:
    raise ValueError(f"a log axis needs 0 < lo < hi, got [{lo}, {hi}]")
  gap = math.log10(hi / lo) / most * (1 - 1e-9)
  exponents = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
  kept: list[float] = []
  for tick in (_clean(m * 10.0**e) for m in _MANTISSAS for e in exponents):
    if _inside(tick, lo, hi) and all(abs(math.log10(tick / k)) >= gap for k in kept):
      kept.append(tick)
  decades = sorted(kept)
  linear = [t for t in linear_ticks(lo, hi) if _inside(t, lo, hi)]
  return linear if _bare(linear, lo, hi) < _bare(decades, lo, hi) else decades


def _bare(ticks: list[float], lo: float, hi: float) -> float:
  """The longest stretch of [lo, hi] (in decades) without a tick."""
  edges = [math.log10(v) for v in [lo, *ticks, hi]]
  return max(b - a for a, b in zip(edges, edges[1:]))


@dataclasses.dataclass(frozen=True)
class Axis:
  """A range drawn from ``lo`` to ``hi``, log10-spaced when ``log``, with ``ticks``."""

  lo: float
  hi: float
  ticks: tuple[float, ...]
  log: bool = False

  def fraction(self, value: float) -> float:
    """Where ``value`` lies from ``lo`` (0) to ``hi`` (1)."""
    f = math.log10 if self.log else float
    return (f(value) - f(self.lo)) / (f(self.hi) - f(self.lo))


def step_axis(steps: list[float]) -> Axis:
  """Whole nice ticks covering the steps (a lone step in the middle of three)."""
  lo, hi = min(steps), max(steps)
  ticks = linear_ticks(lo, hi, count=6, least=1) if hi > lo else [lo - 1, lo, lo + 1]
  return Axis(ticks[0], ticks[-1], tuple(ticks))


def value_axis(
  values: list[float], log: bool = False, limits: tuple[float, float] | None = None
) -> Axis:
  """A panel's value axis: ``limits`` when given; else log when asked for and every value is
  positive (a loss falls over decades: on a linear axis all but its start is a flat line);
  else linear, spanning its nice ticks. A little wider than the values: none on the frame."""
  if limits is not None:
    return Axis(*limits, tuple(linear_ticks(*limits)))
  lo, hi = min(values), max(values)
  if log and lo > 0:
    lo, hi = (10.0**v for v in _widen(math.log10(lo), math.log10(hi)))
    return Axis(lo, hi, tuple(log_ticks(lo, hi)), log=True)
  ticks = linear_ticks(*_widen(lo, hi))
  return Axis(ticks[0], ticks[-1], tuple(ticks))


def _widen(lo: float, hi: float, margin: float = 0.05) -> tuple[float, float]:
  pad = margin * (hi - lo if hi > lo else max(abs(lo), 1.0))
  return lo - pad, hi + pad


def tick_label(value: float) -> str:
  return f"{value:g}"


# ---- drawing (Pillow) ----------------------------------------------------------------------

_SCALE = 2  # drawn at twice the size, then shrunk: smooth lines and text
_INK, _GRID, _FRAME, _ZERO = (30, 30, 30), (226, 226, 226), (110, 110, 110), (150, 150, 150)


def loss_curve(
  records: list[dict], path: str | Path, width: int = 640, panel_height: int = 300
) -> Path | None:
  """A PNG (Pillow) of the ``PANELS`` that ``records`` hold a series of, stacked, on one
  step axis: the training and held-out loss, the multiple-choice accuracy, DPO's reward
  margins and accuracies. None: nothing to draw."""
  from PIL import Image

  panels = [(p, {s.key: _points(records, s.key) for s in p.series}) for p in PANELS]
  panels = [(p, series) for p, series in panels if any(series.values())]
  if not panels:
    return None
  x_axis = step_axis([s for _, series in panels for points in series.values() for s, _ in points])
  k = _SCALE
  image = Image.new("RGB", (width * k, panel_height * len(panels) * k), "white")
  for i, (panel, series) in enumerate(panels):
    box = (0, i * panel_height * k, width * k, (i + 1) * panel_height * k)
    _panel(image, panel, series, _last(records, panel.reference), x_axis, box)
  path = Path(path)
  # Image.LANCZOS: set at import from Image.Resampling, which the stubs do not see
  image.resize((width, panel_height * len(panels)), Image.LANCZOS).save(path)  # type: ignore[attr-defined]
  return path


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _points(records: list[dict], key: str) -> list[tuple[float, float]]:
  """(step, value) of the records with a finite ``key`` (a skipped update logs NaN)."""
  return [(r["step"], r[key]) for r in records if _number(r.get(key)) and _number(r.get("step"))]


def _last(records: list[dict], series: Series | None) -> float | None:
  values = [v for _, v in _points(records, series.key)] if series else []
  return values[-1] if values else None


def _font(size: int):
  from PIL import ImageFont

  return ImageFont.load_default(size=size * _SCALE)  # Pillow >= 10.1


def _panel(
  image,
  panel: Panel,
  series: dict[str, list],
  reference: float | None,
  x_axis: Axis,
  box: tuple[int, int, int, int],
) -> None:
  """``panel`` in ``box`` of ``image``: title and legend above the plot, value ticks and
  label left of it, step ticks and label below."""
  from PIL import ImageDraw

  draw, k = ImageDraw.Draw(image), _SCALE
  x0, y0, x1, y1 = box
  plot = (x0 + 70 * k, y0 + 36 * k, x1 - 18 * k, y1 - 44 * k)
  values = [v for points in series.values() for _, v in points]
  y_axis = value_axis(values, panel.log, panel.limits)
  _grid(draw, plot, x_axis, y_axis)
  if reference is not None:
    assert panel.reference is not None  # reference is panel.reference's last value
    _dashed(draw, plot, _y(plot, y_axis, reference), panel.reference.colour)
  for spec in panel.series:
    _draw_series(draw, [_xy(plot, x_axis, y_axis, s, v) for s, v in series[spec.key]], spec)
  draw.rectangle(plot, outline=_FRAME, width=k)
  y_label = panel.y_label + (" (log scale)" if y_axis.log else "")
  _labels(image, draw, box, plot, panel.title, y_label)
  entries = [
    (s.label, s.colour, "markers" if s.markers else "line") for s in panel.series if series[s.key]
  ]
  if reference is not None:
    assert panel.reference is not None  # as above
    entries.append((panel.reference.label.format(reference), panel.reference.colour, "dashed"))
  _legend(draw, (plot[2], y0 + 18 * k), entries)


def _x(plot, axis: Axis, step: float) -> float:
  left, _, right, _ = plot
  return left + min(max(axis.fraction(step), 0.0), 1.0) * (right - left)


def _y(plot, axis: Axis, value: float) -> float:
  _, top, _, bottom = plot
  return bottom - min(max(axis.fraction(value), 0.0), 1.0) * (bottom - top)  # clipped


def _xy(plot, x_axis: Axis, y_axis: Axis, step: float, value: float) -> tuple[float, float]:
  return _x(plot, x_axis, step), _y(plot, y_axis, value)


def _grid(draw, plot, x_axis: Axis, y_axis: Axis) -> None:
  """Light lines and labels at the ticks; the zero line darker (a margin above it prefers
  the chosen answers)."""
  left, top, right, bottom = plot
  k, font = _SCALE, _font(11)
  for t in y_axis.ticks:
    y = _y(plot, y_axis, t)
    draw.line([(left, y), (right, y)], fill=_ZERO if t == 0 else _GRID, width=k)
    draw.text((left - 6 * k, y), tick_label(t), fill=_INK, font=font, anchor="rm")
  for t in x_axis.ticks:
    x = _x(plot, x_axis, t)
    draw.line([(x, top), (x, bottom)], fill=_GRID, width=k)
    draw.text((x, bottom + 6 * k), tick_label(t), fill=_INK, font=font, anchor="mt")


def _draw_series(draw, xy: list[tuple[float, float]], spec: Series) -> None:
  k = _SCALE
  if len(xy) > 1:
    draw.line(xy, fill=spec.colour, width=2 * k, joint="curve")
  if spec.markers or len(xy) == 1:  # a lone point would not show as a line
    for x, y in xy:
      _dot(draw, x, y, spec.colour)


def _dot(draw, x: float, y: float, colour: Colour) -> None:
  r, k = 3.5 * _SCALE, _SCALE
  draw.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline="white", width=k)


def _dashed(draw, plot, y: float, colour: Colour) -> None:
  left, _, right, _ = plot
  dash, gap = 7 * _SCALE, 5 * _SCALE
  for x in range(int(left), int(right), dash + gap):
    draw.line([(x, y), (min(x + dash, right), y)], fill=colour, width=2 * _SCALE)


def _labels(image, draw, box, plot, title: str, y_label: str) -> None:
  x0, y0, _, y1 = box
  left, top, right, bottom = plot
  k = _SCALE
  draw.text((left, y0 + 18 * k), title, fill=_INK, font=_font(15), anchor="lm")
  draw.text(((left + right) / 2, y1 - 8 * k), "step", fill=_INK, font=_font(12), anchor="md")
  _vertical_text(image, (x0 + 14 * k, (top + bottom) / 2), y_label, _font(12))


def _vertical_text(image, centre: tuple[float, float], text: str, font) -> None:
  """``text`` turned a quarter left (reading upwards), centred on ``centre``."""
  from PIL import Image, ImageDraw

  _, _, right, bottom = font.getbbox(text)
  label = Image.new("L", (right + 2, bottom + 2), 0)
  ImageDraw.Draw(label).text((0, 0), text, fill=255, font=font)
  label = label.rotate(90, expand=True)
  x, y = int(centre[0] - label.width / 2), int(centre[1] - label.height / 2)
  image.paste(_INK, (x, y, x + label.width, y + label.height), label)


def _legend(draw, anchor: tuple[float, float], entries: list[tuple[str, Colour, str]]) -> None:
  """Swatches and labels in one row ending at ``anchor`` (right, middle): above the plot,
  they never hide the data."""
  k, font = _SCALE, _font(12)
  swatch, pad, space = 22 * k, 5 * k, 16 * k
  widths = [swatch + pad + draw.textlength(label, font=font) for label, _, _ in entries]
  x, y = anchor[0] - sum(widths) - space * (len(entries) - 1), anchor[1]
  for (label, colour, style), w in zip(entries, widths):
    if style == "dashed":
      for dx in (0, 9 * k, 18 * k):
        draw.line([(x + dx, y), (x + min(dx + 5 * k, swatch), y)], fill=colour, width=2 * k)
    else:
      draw.line([(x, y), (x + swatch, y)], fill=colour, width=2 * k)
    if style == "markers":
      _dot(draw, x + swatch / 2, y, colour)
    draw.text((x + swatch + pad, y), label, fill=_INK, font=font, anchor="lm")
    x += w + space
