"""SFT's fixed-shape batches: the typed ``TrainBatch``, the batch plan and collation.

One jitted train step compiles once per batch shape, so shapes come from a few
buckets: the sequence length is rounded up to one of ``BatchConfig.seq_buckets`` and
the media layout is fixed by the config, whatever mix of samples a batch holds.

Layout of one ``TrainBatch`` (B rows, L tokens; every field an array, nothing static):

- text, right-padded: ``input_ids`` (pad id after the text), ``attention_mask``,
  ``position_ids`` (0..n-1 on real tokens, 0 on padding), ``labels`` (the ids where
  supervised, else -100, aligned with ``input_ids`` as in transformers: the loss pairs
  the logits at t with ``labels[t + 1]``), ``loss_mask`` (``labels != -100``),
  ``row_mask`` (B,) (False: an empty row, a skipped sample or a short last batch);
  ``scorer_ids`` / ``scorer_mask`` (B, C), the scorer's text per row.
- videos, ``V = video_slots`` slots: ``videos`` (V, T, 3, S, S), ``video_mask`` (V,),
  ``video_row`` (V,) (the row whose scorer text and placeholders it belongs to),
  ``video_frame_mask`` (V, T) (a corpus with fewer frames than T fills a prefix), and
  ``video_token_mask`` (V, video_tokens(T)): which of a slot's pooled tokens are real
  (a prefix, ``video_tokens(T_v)``). Flattened row-major, the real tokens of the filled
  slots are the video placeholders' tokens in (row, position) order: ``ops.merge_media``
  with ``video_token_mask.reshape(-1)`` as its mask.
- anyres images, ``I = image_slots`` slots: ``images`` (I, K, 3, S, S), K the most tiles
  a pinpoint gives (1 + R*C), ``image_mask`` (I,), ``image_row`` (I,), ``image_tile_mask``
  (I, K) (the tiles that exist; they share one relevance softmax).
- multi-image items, ``M = multi_image_slots`` slots of ``P = max_pictures`` pictures:
  ``pictures`` (M, P, 3, S, S), ``picture_item_mask`` (M,), ``multi_image_row`` (M,),
  ``picture_mask`` (M, P). An item is pooled like a video of P frames with the image
  kernel (1, 3, 3) (one relevance softmax over its real pictures), giving (P, s, s)
  tokens, s = 8 for a 24-grid: picture p's s*s tokens, row-major, no newline.
- ``image_gather`` (N,) / ``image_gather_mask`` (N,): the tokens of every ``<image>``
  placeholder (anyres images and multi-image pictures share the placeholder id, as in
  the original), in (row, position) order, as row indices into one table the model
  builds from the pooled features:
  ``table = concat([image_feats.reshape(I*K*s*s, D), picture_feats.reshape(M*P*s*s, D),
  image_newline[None]])``; image slot i, tile t, feature r (row-major in s x s) is
  row ``(i*K + t)*s*s + r``, picture p of item m is ``I*K*s*s + (m*P + p)*s*s + r``, the
  newline the last row. ``table[image_gather]`` with ``image_gather_mask`` is the
  media buffer of ``ops.merge_media`` for ``image_token_index``. The anyres packing
  (base tile, unpadding on the pooled grid, a newline after every row) is thus host
  arithmetic (``anyres_gather_indices``), so images of any sizes run through one
  compiled program; it equals ``ops.pack_image_features`` (tested).

The batch plan (``plan_batches``): consecutive samples of the stream go into one batch
until it has ``batch_size`` rows or the next sample's media would not fit the slots;
only the record kinds decide, so the plan is known before any sample is built. Rows
never change order, so a batch's composition is a function of the sample stream alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.struct
import jax
import numpy as np

from ppllava_jax.data.batching import IGNORE, PIXEL_DTYPES, check_batching, seq_bucket, shape_key
from ppllava_jax.data.sft.annotations import KIND_CODES
from ppllava_jax.data.sft.samples import Sample, picture_tokens
from ppllava_jax.models.pooling_modes import MODES
from ppllava_jax.models.ppllava_config import PPLLaVAConfig
from ppllava_jax.ops.anyres import _packed_geometry

_VIDEO, _IMAGE, _MULTI = KIND_CODES["video"], KIND_CODES["image"], KIND_CODES["multi-image"]


@dataclasses.dataclass(frozen=True)
class BatchConfig:
  batch_size: int = 8  # rows per process
  seq_buckets: tuple[int, ...] = (1024, 2048, 4096)  # the largest >= SampleConfig.max_length
  video_slots: int | None = None  # None: batch_size (every row may be a video)
  image_slots: int | None = None
  multi_image_slots: int | None = None
  num_frames: int = 32  # T of a video slot: the most frames any corpus samples
  max_pictures: int = 16  # P of a multi-image slot (SampleConfig.max_pictures)
  pixel_dtype: str = "float32"  # or "bfloat16": half the host memory and transfer

  def __post_init__(self):
    check_batching(self)
    for name in ("video_slots", "image_slots", "multi_image_slots"):
      v = getattr(self, name)
      if v is not None and not 0 <= v <= self.batch_size:
        raise ValueError(f"BatchConfig.{name} must be in [0, batch_size], got {v}")

  def slots(self) -> tuple[int, int, int]:
    """(video, image, multi-image) slots."""
    d = self.batch_size
    return tuple(  # type: ignore[return-value]  # tuple() of 3 items: mypy sees tuple[int, ...]
      d if v is None else v for v in (self.video_slots, self.image_slots, self.multi_image_slots)
    )

  def bucket(self, length: int) -> int:
    return seq_bucket(self.seq_buckets, length, "SampleConfig.max_length")


@flax.struct.dataclass
class TrainBatch:
  """One training batch; every field an array (module doc for the layout)."""

  input_ids: jax.Array | np.ndarray  # (B, L) int32
  attention_mask: jax.Array | np.ndarray  # (B, L) int32
  position_ids: jax.Array | np.ndarray  # (B, L) int32
  labels: jax.Array | np.ndarray  # (B, L) int32, -100 unsupervised
  loss_mask: jax.Array | np.ndarray  # (B, L) bool
  row_mask: jax.Array | np.ndarray  # (B,) bool
  scorer_ids: jax.Array | np.ndarray  # (B, C) int32
  scorer_mask: jax.Array | np.ndarray  # (B, C) int32
  videos: jax.Array | np.ndarray  # (V, T, 3, S, S)
  video_mask: jax.Array | np.ndarray  # (V,) bool
  video_row: jax.Array | np.ndarray  # (V,) int32
  video_frame_mask: jax.Array | np.ndarray  # (V, T) bool
  video_token_mask: jax.Array | np.ndarray  # (V, video_tokens(T)) bool
  images: jax.Array | np.ndarray  # (I, K, 3, S, S)
  image_mask: jax.Array | np.ndarray  # (I,) bool
  image_row: jax.Array | np.ndarray  # (I,) int32
  image_tile_mask: jax.Array | np.ndarray  # (I, K) bool
  pictures: jax.Array | np.ndarray  # (M, P, 3, S, S)
  picture_item_mask: jax.Array | np.ndarray  # (M,) bool
  multi_image_row: jax.Array | np.ndarray  # (M,) int32
  picture_mask: jax.Array | np.ndarray  # (M, P) bool
  image_gather: jax.Array | np.ndarray  # (N,) int32 rows of the image-token table
  image_gather_mask: jax.Array | np.ndarray  # (N,) bool

  @property
  def sample_mask(self):
    """The real samples (rows): what the loop counts."""
    return self.row_mask

  shape_key = shape_key


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Static sizes of one run's batches, from the model and batch configs."""

  tile: int  # S, the tower's square
  side: int  # s, pooled features per side of an image tile / picture
  max_tiles: int  # K
  video_tokens: int  # per video slot of T frames
  max_image_tokens: int  # the most tokens one anyres image can take
  picture_tokens: int  # s*s

  @classmethod
  def of(cls, model: PPLLaVAConfig, cfg: BatchConfig) -> Geometry:
    _gather_pool(model)  # refuses a mode whose images a gather cannot pack
    tile = model.vision.image_size
    s = int(round(picture_tokens(model) ** 0.5))
    pins = [(h // tile, w // tile) for h, w in model.grid_pinpoints]
    return cls(
      tile,
      s,
      1 + max(r * c for r, c in pins),
      model.video_tokens(cfg.num_frames),
      max(s * s + r * s * c * s + r * s for r, c in pins),
      s * s,
    )

  def gather_budget(self, cfg: BatchConfig) -> int:
    _, images, multi = cfg.slots()
    return images * self.max_image_tokens + multi * cfg.max_pictures * self.picture_tokens

  def table_rows(self, cfg: BatchConfig) -> int:
    """Rows of the image-token table, newline included."""
    _, images, multi = cfg.slots()
    return (images * self.max_tiles + multi * cfg.max_pictures) * self.picture_tokens + 1


def _gather_pool(model: PPLLaVAConfig) -> int:
  """The image windows' side of the anyres packing, which host gathers reproduce; a mode
  whose images take the anyres_max downscale (a resize) is refused."""
  if MODES[model.pooling.mode].anyres_max:
    raise ValueError(
      f"training batches do not support pooling mode {model.pooling.mode!r}: "
      "its anyres_max downscale is a resize, not a gather"
    )
  pool, _ = model.image_packing()
  return pool


def anyres_gather_indices(
  size_hw: Sequence[int], model: PPLLaVAConfig, base: int = 0, newline: int = -1
) -> np.ndarray:
  """Rows of one anyres image's packed tokens in its tile features.

  The image's features are (1 + R*C, s*s) rows starting at ``base`` (tile t, feature r
  at ``base + t*s*s + r``); ``newline`` is the row of ``image_newline``. Returns
  int32 (image_tokens(size),): the base tile's s*s rows, then the kept rows of the
  (R*s, C*s) grid after unpadding, each followed by ``newline``, which is what
  ``ops.pack_image_features`` concatenates.
  """
  (rows, cols), s, (cut_h, cut_w) = _packed_geometry(
    tuple(size_hw),
    model.grid_pinpoints,
    model.vision.image_size,
    model.vision.patch_size,
    _gather_pool(model),
  )
  y = np.arange(cut_h, rows * s - cut_h)
  x = np.arange(cut_w, cols * s - cut_w)
  tile = 1 + (y[:, None] // s) * cols + (x[None, :] // s)
  grid = base + tile * s * s + (y[:, None] % s) * s + (x[None, :] % s)
  grid = np.concatenate([grid, np.full((len(y), 1), newline)], axis=1)
  return np.concatenate([base + np.arange(s * s), grid.reshape(-1)]).astype(np.int32)


def plan_batches(kinds: np.ndarray, cfg: BatchConfig) -> list[int]:
  """Where batches end in a stream of samples of ``kinds`` (``KIND_CODES``): the list of
  end offsets (exclusive), greedily as the module doc says."""
  v_slots, i_slots, m_slots = cfg.slots()
  limit = {_VIDEO: v_slots, _IMAGE: i_slots, _MULTI: m_slots}
  for code, n in limit.items():
    if n == 0 and np.any(kinds == code):
      raise ValueError(
        f"the stream has {list(KIND_CODES)[code]} samples but the batch layout gives them no slot"
      )
  ends, rows, used = [], 0, {_VIDEO: 0, _IMAGE: 0, _MULTI: 0}
  for i, k in enumerate(kinds.tolist()):
    if rows == cfg.batch_size or (k in used and used[k] == limit[k]):
      ends.append(i)
      rows, used = 0, {_VIDEO: 0, _IMAGE: 0, _MULTI: 0}
    rows += 1
    if k in used:
      used[k] += 1
  if rows:
    ends.append(len(kinds))
  return ends


def collate(
  samples: Sequence[Sample | None],
  model: PPLLaVAConfig,
  cfg: BatchConfig,
  pad_id: int = 0,
  scorer_length: int = 0,
  scorer_pad_id: int = 0,
) -> TrainBatch:
  """``samples`` (None: an empty row) -> one ``TrainBatch`` of the config's shapes."""
  geo = Geometry.of(model, cfg)
  if len(samples) > cfg.batch_size:
    raise ValueError(f"collate: {len(samples)} samples for batch_size {cfg.batch_size}")
  length = cfg.bucket(max([x.length for x in samples if x is not None], default=1))
  batch = _empty(geo, cfg, length, pad_id, scorer_length, scorer_pad_id)
  used = dict.fromkeys(_PLACE, 0)  # slots taken, by media kind
  limits = dict(zip(_PLACE, cfg.slots()))
  n_gather = 0
  for row, x in enumerate(samples):
    if x is None:
      continue
    n = x.length
    batch.input_ids[row, :n], batch.attention_mask[row, :n] = x.input_ids, 1
    batch.labels[row, :n], batch.row_mask[row] = x.labels, True
    if scorer_length and x.scorer_ids is not None:
      batch.scorer_ids[row], batch.scorer_mask[row] = x.scorer_ids, x.scorer_mask
    if x.kind not in _PLACE:
      continue
    if used[x.kind] == limits[x.kind]:
      raise ValueError(
        f"collate: more {_PLURAL[x.kind]} than the layout's {limits[x.kind]} "
        "slots (plan the batch with plan_batches)"
      )
    piece = _PLACE[x.kind](batch, used[x.kind], row, x, model, geo, cfg)
    used[x.kind] += 1
    batch.image_gather[n_gather : n_gather + len(piece)] = piece
    batch.image_gather_mask[n_gather : n_gather + len(piece)] = True
    n_gather += len(piece)
  mask = batch.attention_mask
  # flax.struct.dataclass adds replace(); its stubs do not declare it
  return batch.replace(  # type: ignore[attr-defined]
    position_ids=np.where(mask > 0, np.cumsum(mask, axis=1) - 1, 0).astype(np.int32),
    loss_mask=batch.labels != IGNORE,
  )


def _empty(
  geo: Geometry, cfg: BatchConfig, length: int, pad_id: int, scorer_length: int, scorer_pad_id: int
) -> TrainBatch:
  """A batch of ``cfg``'s layout with no sample in it; ``position_ids`` and ``loss_mask``
  are left for ``collate`` to fill."""
  b, t, p, s, k = cfg.batch_size, cfg.num_frames, cfg.max_pictures, geo.tile, geo.max_tiles
  v, i, m = cfg.slots()
  dtype = PIXEL_DTYPES[cfg.pixel_dtype]
  budget = geo.gather_budget(cfg)
  return TrainBatch(
    input_ids=np.full((b, length), pad_id, np.int32),
    attention_mask=np.zeros((b, length), np.int32),
    position_ids=np.zeros((b, length), np.int32),
    labels=np.full((b, length), IGNORE, np.int32),
    loss_mask=np.zeros((b, length), bool),
    row_mask=np.zeros(b, bool),
    scorer_ids=np.full((b, scorer_length), scorer_pad_id, np.int32),
    scorer_mask=np.zeros((b, scorer_length), np.int32),
    videos=np.zeros((v, t, 3, s, s), dtype),
    video_mask=np.zeros(v, bool),
    video_row=np.zeros(v, np.int32),
    video_frame_mask=np.zeros((v, t), bool),
    video_token_mask=np.zeros((v, geo.video_tokens), bool),
    images=np.zeros((i, k, 3, s, s), dtype),
    image_mask=np.zeros(i, bool),
    image_row=np.zeros(i, np.int32),
    image_tile_mask=np.zeros((i, k), bool),
    pictures=np.zeros((m, p, 3, s, s), dtype),
    picture_item_mask=np.zeros(m, bool),
    multi_image_row=np.zeros(m, np.int32),
    picture_mask=np.zeros((m, p), bool),
    image_gather=np.zeros(budget, np.int32),
    image_gather_mask=np.zeros(budget, bool),
  )


# Each media kind's placement of sample x (of batch row ``row``) in its slot ``slot``;
# returns the rows of the image-token table its LLM tokens gather (none for a video,
# whose tokens the model places itself).


def _place_video(
  batch: TrainBatch,
  slot: int,
  row: int,
  x: Sample,
  model: PPLLaVAConfig,
  geo: Geometry,
  cfg: BatchConfig,
) -> np.ndarray:
  # each _place_* gets samples of its kind, whose media field is set
  frames = len(x.video)  # type: ignore[arg-type]
  if frames > cfg.num_frames:
    raise ValueError(
      f"collate: {x.source}: {frames} frames, the slots hold "
      f"BatchConfig.num_frames={cfg.num_frames}"
    )
  batch.videos[slot, :frames] = x.video
  batch.video_mask[slot], batch.video_row[slot] = True, row
  batch.video_frame_mask[slot, :frames] = True
  batch.video_token_mask[slot, : model.video_tokens(frames)] = True
  return np.zeros(0, np.int32)


def _place_image(
  batch: TrainBatch,
  slot: int,
  row: int,
  x: Sample,
  model: PPLLaVAConfig,
  geo: Geometry,
  cfg: BatchConfig,
) -> np.ndarray:
  tiles = len(x.image)  # type: ignore[arg-type]  # an image sample (as above)
  batch.images[slot, :tiles] = x.image
  batch.image_mask[slot], batch.image_row[slot] = True, row
  batch.image_tile_mask[slot, :tiles] = True
  newline = geo.table_rows(cfg) - 1
  return anyres_gather_indices(
    x.image_size,  # type: ignore[arg-type]  # an image sample (as above)
    model,
    slot * geo.max_tiles * geo.picture_tokens,
    newline,
  )


def _place_pictures(
  batch: TrainBatch,
  slot: int,
  row: int,
  x: Sample,
  model: PPLLaVAConfig,
  geo: Geometry,
  cfg: BatchConfig,
) -> np.ndarray:
  count, p = len(x.pictures), cfg.max_pictures  # type: ignore[arg-type]  # (as above)
  if count > p:
    raise ValueError(
      f"collate: {x.source}: {count} pictures, the slots hold BatchConfig.max_pictures={p}"
    )
  batch.pictures[slot, :count] = x.pictures
  batch.picture_item_mask[slot], batch.multi_image_row[slot] = True, row
  batch.picture_mask[slot, :count] = True
  _, image_slots, _ = cfg.slots()
  base = (image_slots * geo.max_tiles + slot * p) * geo.picture_tokens
  return base + np.arange(count * geo.picture_tokens, dtype=np.int32)


_PLACE = {
  "video": _place_video,
  "image": _place_image,  # in BatchConfig.slots() order
  "multi-image": _place_pictures,
}
_PLURAL = {"video": "videos", "image": "images", "multi-image": "multi-image items"}


def as_shard(batch: TrainBatch, shard: int, shards: int, picture_tokens: int) -> TrainBatch:
  """``batch`` as shard ``shard`` of ``shards`` batches of its layout that ``concat_rows``
  joins into one global batch: its slot -> row references (``video_row``, ``image_row``,
  ``multi_image_row``) offset by the rows of the shards before it, and its image gather
  indices moved into the global image-token table (module doc), whose image part holds
  every shard's image slots, then every shard's pictures, then the one newline row.
  ``picture_tokens``: s*s (``Geometry.picture_tokens``)."""
  if shards == 1:
    return batch
  rows = batch.input_ids.shape[0]
  image_rows = batch.images.shape[0] * batch.images.shape[1] * picture_tokens
  picture_rows = batch.pictures.shape[0] * batch.pictures.shape[1] * picture_tokens
  g = np.asarray(batch.image_gather)
  gather = np.where(
    g < image_rows,
    g + shard * image_rows,
    np.where(
      g < image_rows + picture_rows,
      g - image_rows + shards * image_rows + shard * picture_rows,
      shards * (image_rows + picture_rows),
    ),
  )  # the newline
  offset = lambda name: np.asarray(getattr(batch, name)) + shard * rows
  return batch.replace(  # type: ignore[attr-defined]  # flax.struct.dataclass's, not in its stubs
    video_row=offset("video_row"),
    image_row=offset("image_row"),
    multi_image_row=offset("multi_image_row"),
    image_gather=gather.astype(np.int32),
  )
