"""Panoptic quality (PQ, SQ, RQ) exactly as the COCO panopticapi `pq_compute` computes it, and fast.

The definition (Kirillov et al., "Panoptic Segmentation", CVPR 2019, as panopticapi implements it):

- a predicted and a ground-truth segment match when they have the same category and
  IoU > 0.5 (strictly); the union leaves out the predicted segment's pixels on GT void;
- GT crowd segments are never matched and never count as false negatives;
- an unmatched predicted segment is not a false positive when more than half of its area lies on
  GT void plus the GT crowd region of its own category;
- per category: PQ = sum IoU / (TP + FP/2 + FN/2), SQ = sum IoU / TP, RQ = TP / (TP + FP/2 + FN/2);
  All/Things/Stuff average them over the categories with at least one TP, FP or FN.

Statistics are kept per image in a `PQStat` that adds with `+=`, so the same code serves
in-memory evaluation during training (`pq_compute_single`), folders of COCO-panoptic PNGs
(`pq_compute_folders`, optionally over worker processes) and many ranks (`all_reduce_pq_stat`).

panopticapi facts reproduced for exact equality (checked against its `evaluation.py`):

- a predicted segment's area is its pixel count in the PNG (the JSON `area` is ignored);
- a GT segment's area is the JSON `area` (see `strict` below);
- with several crowd segments of one category in an image, only the last listed one is used for
  the false-positive test;
- per-category IoUs are summed in float64 and divided by counts in float64.

Where panopticapi crashes or silently mis-counts, unipan differs (`strict=True`, the default):

- GT PNG ids missing from the GT JSON, GT JSON segments absent from the PNG, a GT JSON `area`
  that differs from the pixel count, and unknown GT categories raise `PanopticEvalError` naming
  the image and segment (panopticapi ignores the first, counts the second as a false negative,
  uses the wrong area, and drops the stats of the fourth). With `strict=False` unipan does what
  panopticapi does, bit for bit.
- duplicate segment ids, segment id 0 in a GT JSON, two annotations of one image, a missing
  prediction, unreadable PNGs, PNGs that are not 8-bit RGB(A), size mismatches, and a union <= 0
  from a bogus GT area always raise `PanopticEvalError`.
- images are matched by `image_id` or its string form (1 and "1" match; panopticapi would
  report "no prediction").

A prediction JSON may list segment id 0: its 0 pixels are then that segment, not void, exactly as
in panopticapi (tensorflow/models' deeplab PQ test data relies on this).
- All/Things/Stuff with no active category report PQ = SQ = RQ = 0 with n = 0 (panopticapi
  raises ZeroDivisionError).

Speed: the pixel work is a run-length pass. Panoptic maps are piecewise constant, so the pair
(gt id, pred id) along the flattened image changes only a few thousand times in a 480x640 image;
the joint histogram is built from those runs instead of from every pixel, run ids are mapped to
segments through a 2^24-entry table, and the ids are read from the decoded RGB bytes with one
strided copy (see `_decode_png_ids`).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import struct
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import imagecodecs
import numpy as np

from unipan.io import MAX_SEGMENT_ID, load_json, save_json
from unipan.meta import VOID_ID, DatasetMeta, SegmentInfo

if TYPE_CHECKING:
    from torch import Tensor

# No module-level torch: `unipan pq` must not pay seconds for importing it. The tensor conversions
# for `torch.distributed` import it when called; id maps that are tensors can only exist when the
# caller has loaded torch already (see `_as_numpy_ids`).

# spng is the fastest PNG decoder reachable from PyPI here (`unipan.io` uses it too); png_decode is libpng
_DECODE = imagecodecs.spng_decode if imagecodecs.SPNG.available else imagecodecs.png_decode

logger = logging.getLogger(__name__)

_ID_MASK = 0xFFFFFF
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_RGB, _PNG_RGBA = 2, 6  # PNG colour types
_PNG_COLOR_NAMES = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale+alpha", 6: "RGBA"}


class PanopticEvalError(ValueError):
    """Bad evaluation input; the message names the image (and segment or file) and what is wrong."""


# --- statistics ------------------------------------------------------------------------------
@dataclass
class PQStatCat:
    """Matching statistics of one category.

    Attributes:
        iou: sum of the IoUs of the true positives.
        tp: matched (GT, prediction) pairs.
        fp: unmatched predicted segments not mostly on void/crowd.
        fn: unmatched non-crowd GT segments.
    """

    iou: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __iadd__(self, other: PQStatCat) -> PQStatCat:
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        return self

    def __add__(self, other: PQStatCat) -> PQStatCat:
        out = PQStatCat(self.iou, self.tp, self.fp, self.fn)
        out += other
        return out

    def is_empty(self) -> bool:
        return self.tp == 0 and self.fp == 0 and self.fn == 0 and self.iou == 0.0


class PQStat:
    """Per-category PQ statistics (keyed by dataset `category_id`); adds with `+=`; picklable.

    Summing the stats of disjoint image sets gives the stats of their union, so images can be
    evaluated in any order, in any process, and combined afterwards.
    """

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __init__(self, per_category: dict[int, PQStatCat] | None = None) -> None:
        self.pq_per_cat: dict[int, PQStatCat] = {} if per_category is None else dict(per_category)

    def __getitem__(self, category_id: int) -> PQStatCat:
        """The stats of `category_id`, created empty on first access (like panopticapi)."""
        cat = self.pq_per_cat.get(category_id)
        if cat is None:
            cat = self.pq_per_cat[category_id] = PQStatCat()
        return cat

    def get(self, category_id: int) -> PQStatCat:
        """The stats of `category_id` without creating an entry (a fresh empty one if absent)."""
        return self.pq_per_cat.get(category_id) or PQStatCat()

    def __contains__(self, category_id: int) -> bool:
        return category_id in self.pq_per_cat

    def __iter__(self) -> Iterator[int]:
        return iter(self.pq_per_cat)

    def __len__(self) -> int:
        return len(self.pq_per_cat)

    def items(self) -> Iterable[tuple[int, PQStatCat]]:
        return self.pq_per_cat.items()

    def __iadd__(self, other: PQStat) -> PQStat:
        if not isinstance(other, PQStat):
            return NotImplemented
        for category_id, cat in other.pq_per_cat.items():
            mine = self.pq_per_cat.get(category_id)
            if mine is None:
                self.pq_per_cat[category_id] = PQStatCat(cat.iou, cat.tp, cat.fp, cat.fn)
            else:
                mine += cat
        return self

    def __add__(self, other: PQStat) -> PQStat:
        if not isinstance(other, PQStat):
            return NotImplemented
        out = PQStat()
        out += self
        out += other
        return out

    def __radd__(self, other: Any) -> PQStat:
        # lets sum(stats) work with its default start of 0
        if isinstance(other, int) and other == 0:
            return self + PQStat()
        return NotImplemented

    def __eq__(self, other: object) -> bool:
        """Exact equality of every category's counts and IoU sum; empty entries are ignored."""
        if not isinstance(other, PQStat):
            return NotImplemented
        a = {k: v for k, v in self.pq_per_cat.items() if not v.is_empty()}
        b = {k: v for k, v in other.pq_per_cat.items() if not v.is_empty()}
        return a == b

    def __repr__(self) -> str:
        inner = ", ".join(
            f"{k}: (iou={v.iou:.4f}, tp={v.tp}, fp={v.fp}, fn={v.fn})" for k, v in sorted(self.pq_per_cat.items())
        )
        return f"PQStat({{{inner}}})"

    def to_tensor(self, category_ids: Sequence[int]) -> Tensor:
        """The stats as a tensor, for `torch.distributed.all_reduce`.

        Args:
            category_ids: the row order (every category the stats may hold, e.g. all dataset ids).

        Returns:
            DoubleTensor[K, 4]: per category (iou, tp, fp, fn). Counts are exact in float64 up to 2^53.

        Raises:
            ValueError: when the stats hold a category missing from `category_ids` (it would be lost).
        """
        row = {int(c): k for k, c in enumerate(category_ids)}
        if len(row) != len(category_ids):
            raise ValueError("category_ids has duplicates")
        lost = sorted(c for c, v in self.pq_per_cat.items() if c not in row and not v.is_empty())
        if lost:
            raise ValueError(f"PQStat holds categories {lost[:10]} that are not in category_ids")
        values = [[0.0, 0.0, 0.0, 0.0] for _ in row]
        for c, v in self.pq_per_cat.items():
            if c in row:
                values[row[c]] = [v.iou, float(v.tp), float(v.fp), float(v.fn)]
        import torch

        return torch.tensor(values, dtype=torch.float64).reshape(len(row), 4)

    @classmethod
    def from_tensor(cls, t: Tensor, category_ids: Sequence[int]) -> PQStat:
        """Inverse of `to_tensor`: DoubleTensor[K, 4] (iou, tp, fp, fn) -> PQStat (empty rows left out)."""
        if t.ndim != 2 or t.shape[1] != 4 or t.shape[0] != len(category_ids):
            raise ValueError(f"expected a [{len(category_ids)}, 4] tensor, got shape {tuple(t.shape)}")
        import torch

        rows = t.detach().to("cpu", torch.float64).tolist()
        out = cls()
        for c, (iou, tp, fp, fn) in zip(category_ids, rows, strict=True):
            if iou == 0.0 and tp == 0.0 and fp == 0.0 and fn == 0.0:
                continue
            out.pq_per_cat[int(c)] = PQStatCat(float(iou), round(tp), round(fp), round(fn))
        return out


def all_reduce_pq_stat(stat: PQStat, category_ids: Sequence[int]) -> PQStat:
    """Sum `stat` over all `torch.distributed` ranks; returns `stat` unchanged when not initialised.

    Every rank must call this with the same `category_ids`. With the NCCL backend the tensor goes
    through the current CUDA device.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stat
    t = stat.to_tensor(category_ids)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return PQStat.from_tensor(t.cpu(), category_ids)


# --- results ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class PQGroupResult:
    """PQ/SQ/RQ (fractions 0..1) averaged over the `n` active categories of a group."""

    pq: float
    sq: float
    rq: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return {"pq": self.pq, "sq": self.sq, "rq": self.rq, "n": self.n}


@dataclass(frozen=True)
class PQClassResult:
    """PQ/SQ/RQ (fractions 0..1) and counts of one category; all zero when it is inactive."""

    category_id: int
    name: str
    isthing: bool
    pq: float
    sq: float
    rq: float
    tp: int
    fp: int
    fn: int
    iou: float

    @property
    def active(self) -> bool:
        """Whether the category has a TP, FP or FN (only active categories enter the averages)."""
        return self.tp + self.fp + self.fn > 0


@dataclass
class PQResult:
    """PQ/SQ/RQ for All/Things/Stuff and per category, as panopticapi's `pq_compute` reports them.

    Attributes:
        all: the average over all active categories.
        things: the average over the active thing categories.
        stuff: the average over the active stuff categories.
        per_class: category_id -> its result, in the order of the categories list.
        stat: the statistics the result was computed from.
    """

    all: PQGroupResult
    things: PQGroupResult
    stuff: PQGroupResult
    per_class: dict[int, PQClassResult]
    stat: PQStat = field(default_factory=PQStat, repr=False)

    @property
    def pq(self) -> float:
        return self.all.pq

    @property
    def sq(self) -> float:
        return self.all.sq

    @property
    def rq(self) -> float:
        return self.all.rq

    @property
    def n(self) -> int:
        return self.all.n

    def __getitem__(self, group: str) -> PQGroupResult:
        """`result["All"]`, `["Things"]`, `["Stuff"]`, as in panopticapi's dict."""
        try:
            return {"All": self.all, "Things": self.things, "Stuff": self.stuff}[group]
        except KeyError:
            raise KeyError(f"unknown group {group!r}; use 'All', 'Things' or 'Stuff'") from None

    @classmethod
    def from_stat(cls, stat: PQStat, categories: DatasetMeta | Sequence[dict[str, Any]]) -> PQResult:
        """Average per-category stats as panopticapi's `PQStat.pq_average` does.

        Args:
            stat: summed statistics.
            categories: the dataset's categories (the GT JSON `categories` list or its DatasetMeta);
                categories absent from it are left out of every average, as in panopticapi.
        """
        meta = categories if isinstance(categories, DatasetMeta) else DatasetMeta(categories)
        per_class: dict[int, PQClassResult] = {}
        sums = {None: [0.0, 0.0, 0.0, 0], True: [0.0, 0.0, 0.0, 0], False: [0.0, 0.0, 0.0, 0]}
        for cat in meta.categories:
            s = stat.get(cat.id)
            if s.tp + s.fp + s.fn == 0:
                pq = sq = rq = 0.0
            else:
                denominator = s.tp + 0.5 * s.fp + 0.5 * s.fn
                pq = s.iou / denominator
                sq = s.iou / s.tp if s.tp != 0 else 0.0
                rq = s.tp / denominator
                for group in (None, cat.isthing):
                    acc = sums[group]
                    acc[0] += pq
                    acc[1] += sq
                    acc[2] += rq
                    acc[3] += 1
            per_class[cat.id] = PQClassResult(cat.id, cat.name, cat.isthing, pq, sq, rq, s.tp, s.fp, s.fn, s.iou)

        def average(group: bool | None) -> PQGroupResult:
            pq, sq, rq, n = sums[group]
            if n == 0:  # panopticapi divides by zero here
                return PQGroupResult(0.0, 0.0, 0.0, 0)
            return PQGroupResult(pq / n, sq / n, rq / n, int(n))

        result = cls(average(None), average(True), average(False), per_class, stat)
        if result.all.n == 0:
            logger.warning("PQ: no category has any true positive, false positive or false negative")
        return result

    def to_dict(self) -> dict[str, Any]:
        """Panopticapi's `pq_compute` return structure, per_class extended with tp/fp/fn.

        {"All": {"pq", "sq", "rq", "n"}, "Things": ..., "Stuff": ...,
        "per_class": {category_id: {"pq", "sq", "rq", "tp", "fp", "fn"}}}
        """
        return {
            "All": self.all.to_dict(),
            "Things": self.things.to_dict(),
            "Stuff": self.stuff.to_dict(),
            "per_class": {
                c.category_id: {"pq": c.pq, "sq": c.sq, "rq": c.rq, "tp": c.tp, "fp": c.fp, "fn": c.fn}
                for c in self.per_class.values()
            },
        }

    def table(self, per_class: bool = True) -> str:
        """Human-readable summary (percent): All/Things/Stuff rows, then one row per category."""
        lines = [f"{'':10s}| {'PQ':>6s} {'SQ':>6s} {'RQ':>6s} {'N':>5s}", "-" * 38]
        for name, g in (("All", self.all), ("Things", self.things), ("Stuff", self.stuff)):
            lines.append(f"{name:10s}| {100 * g.pq:6.2f} {100 * g.sq:6.2f} {100 * g.rq:6.2f} {g.n:5d}")
        if per_class and self.per_class:
            width = max(8, *(len(c.name) for c in self.per_class.values()))
            lines += [
                "",
                f"{'id':>5s}  {'category':{width}s}  {'kind':5s} {'PQ':>6s} {'SQ':>6s} {'RQ':>6s} "
                f"{'TP':>7s} {'FP':>7s} {'FN':>7s}",
                "-" * (5 + 2 + width + 2 + 6 + 3 * 7 + 3 * 8),
            ]
            for c in self.per_class.values():
                kind = "thing" if c.isthing else "stuff"
                nums = f"{100 * c.pq:6.2f} {100 * c.sq:6.2f} {100 * c.rq:6.2f}" if c.active else f"{'-':>6s} " * 3
                lines.append(
                    f"{c.category_id:5d}  {c.name:{width}s}  {kind:5s} {nums.rstrip():>20s} "
                    f"{c.tp:7d} {c.fp:7d} {c.fn:7d}"
                )
        return "\n".join(lines)


# --- segments --------------------------------------------------------------------------------
@dataclass
class _Segments:
    """One image's segments_info in array and list form, in JSON order (K segments)."""

    ids: np.ndarray  # int64[K]
    category_ids: np.ndarray  # int64[K]
    iscrowd: np.ndarray  # bool[K]
    area: np.ndarray | None  # int64[K] as the JSON states it (0 where absent); None when none does
    area_given: np.ndarray | None  # bool[K]; None when `area` is None
    category_list: list[int]
    crowd_list: list[bool]
    lists_void: bool  # id 0 is listed (predictions only): 0 pixels are that segment, not void
    max_id: int


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _as_int(value: Any, where: str, what: str) -> int:
    if _is_int(value):
        return int(value)
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return int(value)
    raise PanopticEvalError(f"{where}: {what} must be an integer, got {value!r}")


def _int_array(values: list[Any], ids: list[Any], image: str, side: str, what: str) -> np.ndarray:
    """int64[K] from JSON values; names the first segment whose value is missing or not an integer."""
    arr = np.array(values)
    if arr.dtype.kind in "iu" and arr.ndim == 1:
        return arr.astype(np.int64, copy=False)
    checked: list[int] = []
    for n, (value, seg_id) in enumerate(zip(values, ids, strict=True)):
        where = f"{image}, {side} segment {seg_id!r}" if what != "id" else f"{image}, {side} segments_info[{n}]"
        if value is None:
            raise PanopticEvalError(f"{where}: needs '{what}'")
        checked.append(_as_int(value, where, what))
    return np.array(checked, dtype=np.int64).reshape(len(values))


def _parse_segments(segments: Sequence[SegmentInfo | dict[str, Any]], image: str, side: str, is_gt: bool) -> _Segments:
    """Check and convert one image's segments.

    Args:
        segments: SegmentInfo objects or COCO `segments_info` dicts.
        image: "image 'id'" prefix for error messages.
        side: "ground-truth" or "prediction".
        is_gt: ground truth: dicts must state `iscrowd` (panopticapi reads it for every GT
            segment) and id 0 is refused. A prediction may list id 0: its 0 pixels are then that
            segment, as in panopticapi (tensorflow/models' deeplab PQ test data does this).
    """
    # comprehensions over all segments at once: per-field Python checks would cost more than the pixels
    if all(type(seg) is dict for seg in segments):
        records: Sequence[dict[str, Any]] = segments  # type: ignore[assignment]
    else:
        records = []
        for n, seg in enumerate(segments):
            if isinstance(seg, dict):
                records.append(seg)
            elif isinstance(seg, SegmentInfo):
                record = {"id": seg.id, "category_id": seg.category_id, "iscrowd": int(seg.iscrowd)}
                if seg.area != 0:  # SegmentInfo.area defaults to 0 = "not computed"
                    record["area"] = seg.area
                records.append(record)
            else:
                raise PanopticEvalError(
                    f"{image}, {side} segments_info[{n}]: expected a dict or SegmentInfo, got {type(seg).__name__}"
                )
    k = len(records)
    raw_ids = [seg.get("id") for seg in records]
    ids = _int_array(raw_ids, raw_ids, image, side, "id")
    category_ids = _int_array([seg.get("category_id") for seg in records], raw_ids, image, side, "category_id")
    raw_crowd = [seg.get("iscrowd", None if is_gt else 0) for seg in records]
    if is_gt and None in raw_crowd:
        n = raw_crowd.index(None)
        raise PanopticEvalError(f"{image}, {side} segment {raw_ids[n]!r}: ground-truth segments need 'iscrowd'")
    crowd_list = [c == 1 for c in raw_crowd]  # panopticapi tests `== 1`
    area = area_given = None
    if is_gt:  # a predicted segment's area is always its pixel count
        raw_area = [seg.get("area") for seg in records]
        if any(a is not None for a in raw_area):
            area_given = np.array([a is not None for a in raw_area], dtype=bool).reshape(k)
            area = _int_array([0 if a is None else a for a in raw_area], raw_ids, image, side, "area")
    id_list = ids.tolist()
    lists_void = VOID_ID in id_list
    if is_gt and lists_void:
        # panopticapi would treat GT void pixels both as void and as this segment
        raise PanopticEvalError(f"{image}: {side} segment id 0 is reserved for void pixels")
    if k and min(id_list) < 0:
        raise PanopticEvalError(f"{image}: negative {side} segment id {min(id_list)}")
    if len(set(id_list)) != k:
        repeated = sorted({i for i in id_list if id_list.count(i) > 1})
        raise PanopticEvalError(f"{image}: duplicate {side} segment ids {repeated[:10]}")
    return _Segments(
        ids=ids,
        category_ids=category_ids,
        iscrowd=np.array(crowd_list, dtype=bool).reshape(k),
        area=area,
        area_given=area_given,
        category_list=category_ids.tolist(),
        crowd_list=crowd_list,
        lists_void=lists_void,
        max_id=max(id_list, default=0),
    )


class _Categories:
    """The set of known category ids, from a DatasetMeta or a COCO categories list."""

    def __init__(self, categories: DatasetMeta | Sequence[dict[str, Any]] | _Categories) -> None:
        if isinstance(categories, _Categories):
            self.ids: frozenset[int] = categories.ids
        elif isinstance(categories, DatasetMeta):
            self.ids = frozenset(c.id for c in categories.categories)
        else:
            try:
                self.ids = frozenset(int(c["id"]) for c in categories)
            except (KeyError, TypeError, ValueError) as e:
                raise PanopticEvalError(f"bad categories list: {e}") from e

    def unknown(self, category_ids: list[int]) -> list[int]:
        return sorted(set(category_ids) - self.ids)


# --- pixel statistics ------------------------------------------------------------------------
class _Workspace(threading.local):
    """Per-thread reusable buffers, so a 480x640 image costs no fresh page faults."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, int], np.ndarray] = {}

    def get(self, name: str, size: int, dtype: Any) -> np.ndarray:
        buf = self.buffers.get((name, size))
        if buf is None or buf.dtype != dtype:
            if len(self.buffers) > 16:  # a stream of odd sizes must not hoard memory
                self.buffers.clear()
            buf = self.buffers[(name, size)] = np.empty(size, dtype=dtype)
        return buf

    def lut(self) -> np.ndarray:
        """uint16[2^24] of zeros (lazily mapped by the OS: only touched pages cost memory)."""
        table = getattr(self, "_lut", None)
        if table is None:
            table = self._lut = np.zeros(MAX_SEGMENT_ID + 1, dtype=np.uint16)
        return table


_WS = _Workspace()
_LUT_CAPACITY = 2**16 - 2  # uint16 entries hold position + 1 of up to this many segments


def _pair_runs(gt_flat: np.ndarray, pred_flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run-length encode the sequence of (gt, pred) value pairs of two flat maps.

    Args:
        gt_flat, pred_flat: int[N] maps (any integer dtype; equal lengths).

    Returns:
        (gt value, pred value, length) of each run: int[R], int[R], int64[R]; every pixel lies in
        exactly one run and a run's pixels share both values.
    """
    n = gt_flat.size
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return gt_flat[:0], pred_flat[:0], empty
    change = _WS.get("change", n - 1, np.bool_)
    change_pred = _WS.get("change_pred", n - 1, np.bool_)
    np.not_equal(gt_flat[1:], gt_flat[:-1], out=change)
    np.not_equal(pred_flat[1:], pred_flat[:-1], out=change_pred)
    np.logical_or(change, change_pred, out=change)
    inner = np.flatnonzero(change)
    starts = np.empty(inner.size + 1, dtype=np.intp)
    starts[0] = 0
    np.add(inner, 1, out=starts[1:])
    lengths = np.diff(starts, append=n)
    return gt_flat[starts], pred_flat[starts], lengths


def _compact_index(values: np.ndarray, segments: _Segments, values_in_range: bool) -> np.ndarray:
    """Position of each value among the segments, counted from 1; void (0) -> 0 unless listed.

    Args:
        values: int[R] segment ids read from a map (run values).
        segments: the image's segments (distinct ids).
        values_in_range: the caller guarantees 0 <= values <= MAX_SEGMENT_ID (ids from a PNG).

    Returns:
        int64[R]: 1 + the segment's JSON position, 0 for void, -1 for ids the JSON does not list.
    """
    ids = segments.ids
    if (
        ids.size < _LUT_CAPACITY
        and segments.max_id <= MAX_SEGMENT_ID
        and (values_in_range or values.size == 0 or (int(values.min()) >= 0 and int(values.max()) <= MAX_SEGMENT_ID))
    ):
        # a table over all 2^24 ids: one gather instead of a binary search per value; only the
        # entries of this image are set, and they are cleared again before returning
        lut = _WS.lut()
        if not segments.lists_void:
            lut[VOID_ID] = 1
        lut[ids] = np.arange(2, ids.size + 2, dtype=np.uint16)
        try:
            index = lut[values].astype(np.int64)
        finally:
            lut[ids] = 0
            lut[VOID_ID] = 0
        index -= 1
        return index
    # ids beyond 2^24 or negative (in-memory maps): binary search
    if segments.lists_void:
        table, position = ids, np.arange(1, ids.size + 1)
    else:
        table, position = np.concatenate(([VOID_ID], ids)), np.arange(ids.size + 1)
    order = np.argsort(table, kind="stable")
    sorted_ids = table[order]
    pos = np.searchsorted(sorted_ids, values)
    np.minimum(pos, sorted_ids.size - 1, out=pos)
    index = position[order[pos]]
    index[sorted_ids[pos] != values] = -1
    return index


def _image_stat(  # noqa: C901 - one pass over the run-length pairs, kept whole for speed
    gt_values: np.ndarray,
    pred_values: np.ndarray,
    lengths: np.ndarray,
    gt: _Segments,
    pred: _Segments,
    categories: _Categories,
    image: str,
    strict: bool,
    values_in_range: bool = False,
    gt_source: str = "id map",
    pred_source: str = "id map",
) -> PQStat:
    """PQ statistics of one image from the runs of its (gt id, pred id) pairs.

    Args:
        gt_values, pred_values: int[R] the ids of each run; lengths: int64[R] its pixel count.
        gt, pred: the image's segments.
        categories: the known category ids.
        image: "image 'id'" for error messages; gt_source, pred_source: "id map" or "PNG <path>",
            for the same.
        strict: GT consistency checks (module docstring).
        values_in_range: the ids are known to lie in [0, 2^24).
    """
    num_gt, num_pred = gt.ids.size, pred.ids.size
    gt_index = _compact_index(gt_values, gt, values_in_range)
    pred_index = _compact_index(pred_values, pred, values_in_range)
    if pred_index.size and int(pred_index.min()) < 0:
        unknown = np.unique(pred_values[pred_index < 0])[:10].tolist()
        raise PanopticEvalError(
            f"{image}: prediction {pred_source} has segment ids {unknown} that its JSON does not list"
        )
    if gt_index.size and int(gt_index.min()) < 0:
        if strict:
            unknown = np.unique(gt_values[gt_index < 0])[:10].tolist()
            raise PanopticEvalError(
                f"{image}: ground-truth {gt_source} has segment ids {unknown} that its JSON does not list "
                "(panopticapi ignores them; pass strict=False / --lenient to do the same)"
            )
        # panopticapi skips unknown GT ids: they are neither void nor any segment
        gt_index[gt_index < 0] = num_gt + 1
    # rows: 0 void, 1..G GT segments (JSON order), G+1 unknown GT ids; columns: 0 void, 1..P
    rows, cols = num_gt + 2, num_pred + 1
    pair = gt_index * cols
    pair += pred_index
    counts = np.bincount(pair, weights=lengths, minlength=rows * cols).astype(np.int64).reshape(rows, cols)

    pred_area = counts.sum(axis=0)[1:]
    if num_pred and int(pred_area.min()) == 0:
        missing = pred.ids[pred_area == 0][:10].tolist()
        raise PanopticEvalError(
            f"{image}: prediction segments {missing} are listed in its JSON but absent from its {pred_source}"
        )
    unknown_categories = categories.unknown(pred.category_list)
    if unknown_categories:
        bad = [i for i, c in zip(pred.ids.tolist(), pred.category_list, strict=True) if c in unknown_categories]
        raise PanopticEvalError(
            f"{image}: prediction segments {bad[:10]} have unknown category ids {unknown_categories[:10]}"
        )
    gt_png_area = counts[1 : num_gt + 1].sum(axis=1)
    if strict:
        if num_gt and int(gt_png_area.min()) == 0:
            absent = gt.ids[gt_png_area == 0][:10].tolist()
            raise PanopticEvalError(
                f"{image}: ground-truth segments {absent} are listed in its JSON but absent from its {gt_source} "
                "(panopticapi counts them as false negatives; strict=False does too)"
            )
        if gt.area is not None:
            wrong = (gt.area != gt_png_area) & gt.area_given
            if wrong.any():
                k = int(np.flatnonzero(wrong)[0])
                raise PanopticEvalError(
                    f"{image}, ground-truth segment {int(gt.ids[k])}: JSON area {int(gt.area[k])} differs from "
                    f"its {int(gt_png_area[k])} pixels (panopticapi uses the JSON area; strict=False does too)"
                )
        unknown_categories = categories.unknown(gt.category_list)
        if unknown_categories:
            bad = [i for i, c in zip(gt.ids.tolist(), gt.category_list, strict=True) if c in unknown_categories]
            raise PanopticEvalError(
                f"{image}: ground-truth segments {bad[:10]} have unknown category ids {unknown_categories[:10]}"
            )
        gt_area = gt_png_area
        gt_counted = [True] * num_gt
    else:
        if num_gt and (gt.area is None or gt.area_given is None or not gt.area_given.all()):
            k = 0 if gt.area_given is None else int(np.flatnonzero(~gt.area_given)[0])
            raise PanopticEvalError(
                f"{image}, ground-truth segment {int(gt.ids[k])}: needs 'area' (strict=False reads GT areas "
                "from the JSON, as panopticapi does)"
            )
        gt_area = gt.area if gt.area is not None else gt_png_area
        # panopticapi counts false negatives of unknown categories where no average sees them
        gt_counted = [c in categories.ids for c in gt.category_list]

    stat = PQStat()
    inter = counts[1 : num_gt + 1, 1:]  # G x P pixel intersections
    void_pred = counts[0, 1:]  # each predicted segment's pixels on GT void
    gt_matched = [False] * num_gt
    pred_matched = [False] * num_pred
    if num_gt and num_pred:
        candidate = inter > 0
        candidate &= gt.category_ids[:, None] == pred.category_ids
        candidate[gt.iscrowd] = False
        g_idx, p_idx = np.nonzero(candidate)
        if g_idx.size:
            intersection = inter[g_idx, p_idx]
            union = pred_area[p_idx] + gt_area[g_idx] - intersection - void_pred[p_idx]
            if int(union.min()) <= 0:  # only reachable with a bogus JSON area (strict=False)
                k = int(np.flatnonzero(union <= 0)[0])
                raise PanopticEvalError(
                    f"{image}, ground-truth segment {int(gt.ids[g_idx[k]])}: JSON area {int(gt_area[g_idx[k]])} "
                    f"gives a union of {int(union[k])} pixels with prediction segment {int(pred.ids[p_idx[k]])}"
                )
            iou = intersection / union
            match = iou > 0.5
            # each pair above 0.5 counts, as in panopticapi (one per segment when areas are right)
            for g, p, value in zip(g_idx[match].tolist(), p_idx[match].tolist(), iou[match].tolist(), strict=True):
                cat = stat[gt.category_list[g]]
                cat.tp += 1
                cat.iou += value
                gt_matched[g] = True
                pred_matched[p] = True

    crowd_row_of_category: dict[int, int] = {}
    for g, (category_id, crowd) in enumerate(zip(gt.category_list, gt.crowd_list, strict=True)):
        if crowd:
            crowd_row_of_category[category_id] = g  # the last crowd segment of a category wins
        elif not gt_matched[g] and gt_counted[g]:
            stat[category_id].fn += 1
    void_list, area_list = void_pred.tolist(), pred_area.tolist()
    for p, category_id in enumerate(pred.category_list):
        if pred_matched[p]:
            continue
        ignored = void_list[p]
        crowd_row = crowd_row_of_category.get(category_id)
        if crowd_row is not None:
            ignored += int(inter[crowd_row, p])
        if ignored / area_list[p] > 0.5:
            continue
        stat[category_id].fp += 1
    return stat


def _as_numpy_ids(ids: np.ndarray | Tensor, image: str, side: str) -> np.ndarray:
    # a tensor exists only if its caller imported torch: never import it here for a numpy map
    if not isinstance(ids, np.ndarray) and "torch" in sys.modules:
        import torch

        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise PanopticEvalError(f"{image}: {side} id map must be H x W, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise PanopticEvalError(f"{image}: {side} id map must hold integers, got {ids.dtype}")
    return ids


def pq_compute_single(
    gt_ids: np.ndarray | Tensor,
    gt_segments: Sequence[SegmentInfo | dict[str, Any]],
    pred_ids: np.ndarray | Tensor,
    pred_segments: Sequence[SegmentInfo | dict[str, Any]],
    categories: DatasetMeta | Sequence[dict[str, Any]],
    image_id: str | int = "",
    *,
    strict: bool = True,
) -> PQStat:
    """PQ statistics of one image from id maps already decoded (training-time evaluation).

    Args:
        gt_ids: int[H, W] GT segment ids (numpy or IntTensor, any integer dtype), 0 = void;
            e.g. `PanopticTarget.panoptic`.
        gt_segments: the GT segments (crowd included), e.g. `PanopticTarget.segments`. A
            SegmentInfo area of 0 means "not stated".
        pred_ids: int[H, W] predicted segment ids, 0 = void; e.g. `PanopticResult.panoptic`.
        pred_segments: one entry per id of `pred_ids`, e.g. `PanopticResult.segments`.
        categories: the dataset's categories.
        image_id: names the image in error messages.
        strict: GT consistency checks (see the module docstring); False = panopticapi's behaviour.

    Returns:
        The image's PQStat.

    Raises:
        PanopticEvalError: naming the image (and segment) for inconsistent inputs.
    """
    image = f"image {image_id!r}"
    gt_map = _as_numpy_ids(gt_ids, image, "ground-truth")
    pred_map = _as_numpy_ids(pred_ids, image, "prediction")
    if gt_map.shape != pred_map.shape:
        raise PanopticEvalError(
            f"{image}: prediction is {pred_map.shape[0]}x{pred_map.shape[1]}, "
            f"ground truth {gt_map.shape[0]}x{gt_map.shape[1]}"
        )
    gt = _parse_segments(gt_segments, image, "ground-truth", is_gt=True)
    pred = _parse_segments(pred_segments, image, "prediction", is_gt=False)
    gt_values, pred_values, lengths = _pair_runs(gt_map.reshape(-1), pred_map.reshape(-1))
    return _image_stat(gt_values, pred_values, lengths, gt, pred, _Categories(categories), image, strict)


# --- PNG decoding ----------------------------------------------------------------------------
def _png_size(data: bytes, where: str) -> tuple[int, int, int]:
    """(height, width, channels) from a PNG's IHDR, for an 8-bit RGB or RGBA PNG."""
    if len(data) < 33 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise PanopticEvalError(f"{where}: not a PNG file")
    width, height = struct.unpack(">II", data[16:24])
    bit_depth, color_type = data[24], data[25]
    if color_type not in (_PNG_RGB, _PNG_RGBA) or bit_depth != 8:
        kind = _PNG_COLOR_NAMES.get(color_type, f"colour type {color_type}")
        raise PanopticEvalError(f"{where}: a panoptic PNG must be 8-bit RGB or RGBA, got {bit_depth}-bit {kind}")
    return height, width, 3 if color_type == _PNG_RGB else 4


def _decode_png_ids(path: Path, slot: str, where: str) -> tuple[np.ndarray, tuple[int, int]]:
    """Read a panoptic PNG -> flat uint32[H*W] segment ids (R + 256 G + 256^2 B).

    The decoded bytes are read as overlapping little-endian 4-byte words (stride 3 for RGB, 4
    for RGBA) and the top byte is masked off: one strided pass instead of combining three colour
    planes in int32.

    The returned array is a per-thread buffer named `slot`, valid until the next call with it.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PanopticEvalError(f"{where}: file not found") from None
    except OSError as e:
        raise PanopticEvalError(f"{where}: cannot read ({e.strerror or e})") from None
    height, width, channels = _png_size(data, where)
    n = height * width
    raw = _WS.get(f"raw_{channels}", channels * n + 1, np.uint8)
    raw[-1] = 0  # the last pixel's word reads one byte past the image
    try:
        _DECODE(data, out=raw[:-1].reshape(height, width, channels))
    except Exception:
        # e.g. an RGB PNG with a tRNS chunk decodes to RGBA: decode into a fresh array instead
        try:
            decoded = np.asarray(_DECODE(data))
        except Exception as e:
            raise PanopticEvalError(f"{where}: cannot decode PNG ({type(e).__name__}: {e})") from None
        if decoded.dtype != np.uint8 or decoded.shape[:2] != (height, width) or decoded.ndim != 3:
            raise PanopticEvalError(
                f"{where}: decodes to {decoded.dtype} {decoded.shape}, expected {height}x{width} RGB(A)"
            ) from None
        channels = decoded.shape[2]
        if channels not in (3, 4):
            raise PanopticEvalError(f"{where}: decodes to {channels} channels, expected RGB or RGBA") from None
        raw = _WS.get(f"raw_{channels}", channels * n + 1, np.uint8)
        raw[-1] = 0
        raw[:-1] = decoded.reshape(-1)
    words = np.ndarray(shape=(n,), dtype="<u4", buffer=raw, strides=(channels,))
    out = _WS.get(slot, n, np.uint32)
    np.bitwise_and(words, _ID_MASK, out=out)
    return out, (height, width)


def pq_compute_png(
    gt_png: str | os.PathLike[str],
    gt_segments: Sequence[SegmentInfo | dict[str, Any]],
    pred_png: str | os.PathLike[str],
    pred_segments: Sequence[SegmentInfo | dict[str, Any]],
    categories: DatasetMeta | Sequence[dict[str, Any]],
    image_id: str | int = "",
    *,
    strict: bool = True,
) -> PQStat:
    """PQ statistics of one image from its GT and predicted COCO-panoptic PNG files.

    Args:
        gt_png, pred_png: the panoptic PNGs (8-bit RGB or RGBA, id = R + 256 G + 256^2 B).
        gt_segments, pred_segments, categories, image_id, strict: as in `pq_compute_single`.

    Raises:
        PanopticEvalError: naming the image (and file or segment) for bad inputs.
    """
    return _png_stat(
        Path(gt_png), gt_segments, Path(pred_png), pred_segments, _Categories(categories), image_id, strict
    )


def _png_stat(
    gt_path: Path,
    gt_segments: Sequence[SegmentInfo | dict[str, Any]],
    pred_path: Path,
    pred_segments: Sequence[SegmentInfo | dict[str, Any]],
    categories: _Categories,
    image_id: str | int,
    strict: bool,
) -> PQStat:
    image = f"image {image_id!r}"
    gt = _parse_segments(gt_segments, image, "ground-truth", is_gt=True)
    pred = _parse_segments(pred_segments, image, "prediction", is_gt=False)
    gt_words, gt_size = _decode_png_ids(gt_path, "gt", f"{image}: ground-truth PNG {gt_path}")
    pred_words, pred_size = _decode_png_ids(pred_path, "pred", f"{image}: prediction PNG {pred_path}")
    if gt_size != pred_size:
        raise PanopticEvalError(
            f"{image}: prediction PNG {pred_path} is {pred_size[0]}x{pred_size[1]}, ground-truth PNG is "
            f"{gt_size[0]}x{gt_size[1]}"
        )
    gt_values, pred_values, lengths = _pair_runs(gt_words, pred_words)
    return _image_stat(
        gt_values,
        pred_values,
        lengths,
        gt,
        pred,
        categories,
        image,
        strict,
        values_in_range=True,
        gt_source=f"PNG {gt_path}",
        pred_source=f"PNG {pred_path}",
    )


# --- folders ---------------------------------------------------------------------------------
def _load_annotations(path: Path, side: str) -> dict[str, Any]:
    try:
        d = load_json(path)
    except FileNotFoundError:
        raise PanopticEvalError(f"{side} JSON {path}: file not found") from None
    except ValueError as e:
        raise PanopticEvalError(str(e)) from None
    if not isinstance(d, dict) or not isinstance(d.get("annotations"), list):
        raise PanopticEvalError(f"{side} JSON {path}: needs an object with an 'annotations' list")
    for k, ann in enumerate(d["annotations"]):
        if not isinstance(ann, dict) or not {"image_id", "file_name", "segments_info"} <= set(ann):
            keys = sorted(ann) if isinstance(ann, dict) else type(ann).__name__
            raise PanopticEvalError(
                f"{side} JSON {path}: annotations[{k}] needs image_id, file_name and segments_info; has {keys}"
            )
        if not isinstance(ann["segments_info"], list):
            raise PanopticEvalError(f"{side} JSON {path}: image {ann['image_id']!r}: segments_info must be a list")
    return d


_Task = tuple[Any, str, list[dict[str, Any]], str, list[dict[str, Any]]]
"""(image_id, GT file name, GT segments, prediction file name, prediction segments)."""

# set by _init_worker in each pool worker: under fork the task list is inherited, not pickled
_WORKER_ARGS: dict[str, Any] = {}


def _init_worker(tasks: list[_Task], gt_dir: Path, pred_dir: Path, categories: _Categories, strict: bool) -> None:
    _WORKER_ARGS.update(tasks=tasks, gt_dir=gt_dir, pred_dir=pred_dir, categories=categories, strict=strict)
    # a worker is one core's worth of numpy work; intra-op threads (of a parent that loaded torch,
    # e.g. evaluation during training) would only compete
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(1)


def _evaluate_tasks(
    tasks: Sequence[_Task], gt_dir: Path, pred_dir: Path, categories: _Categories, strict: bool
) -> PQStat:
    stat = PQStat()
    for image_id, gt_file, gt_segments, pred_file, pred_segments in tasks:
        stat += _png_stat(
            gt_dir / gt_file, gt_segments, pred_dir / pred_file, pred_segments, categories, image_id, strict
        )
    return stat


def _worker_evaluate(span: tuple[int, int]) -> PQStat:
    a = _WORKER_ARGS
    return _evaluate_tasks(a["tasks"][span[0] : span[1]], a["gt_dir"], a["pred_dir"], a["categories"], a["strict"])


def _spans(num_tasks: int, workers: int) -> list[tuple[int, int]]:
    # several spans per worker balance uneven images; not too many, each returns a PQStat
    size = -(-num_tasks // min(num_tasks, workers * 8))
    return [(i, min(i + size, num_tasks)) for i in range(0, num_tasks, size)]


def _mp_context() -> multiprocessing.context.BaseContext:
    # fork starts workers in milliseconds and shares the parsed JSON; spawn elsewhere
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods and sys.platform != "darwin" else "spawn")


def pq_compute_folders(
    gt_json: str | os.PathLike[str],
    gt_dir: str | os.PathLike[str],
    pred_json: str | os.PathLike[str],
    pred_dir: str | os.PathLike[str],
    workers: int = 1,
    *,
    strict: bool = True,
) -> PQResult:
    """PQ of a COCO-panoptic prediction folder against a GT folder, as panopticapi's `pq_compute`.

    Images are matched by `image_id` (an int and its string form match); each annotation's
    `file_name` is read from its folder. The categories are the GT JSON's `categories`.
    Predictions for images absent from the GT are ignored (logged), as in panopticapi.

    Args:
        gt_json: GT COCO-panoptic JSON (annotations with segments_info incl. iscrowd/area, categories).
        gt_dir: folder of GT panoptic PNGs.
        pred_json: prediction JSON (annotations with segments_info: id, category_id).
        pred_dir: folder of predicted panoptic PNGs.
        workers: processes; 1 evaluates in this process.
        strict: GT consistency checks (see the module docstring); False = panopticapi's behaviour.

    Raises:
        PanopticEvalError: naming the image (and file, segment) for any bad input: missing
            prediction, missing/unreadable PNG, size mismatch, PNG ids not in the JSON, JSON
            segments not in the PNG, unknown category ids, duplicate ids.
    """
    gt_json, pred_json = Path(gt_json), Path(pred_json)
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    if workers < 1:
        raise PanopticEvalError(f"workers must be >= 1, got {workers}")
    for folder, side in ((gt_dir, "ground-truth"), (pred_dir, "prediction")):
        if not folder.is_dir():
            raise PanopticEvalError(f"{side} folder {folder} does not exist")
    gt_d = _load_annotations(gt_json, "ground-truth")
    pred_d = _load_annotations(pred_json, "prediction")
    categories = gt_d.get("categories")
    if not isinstance(categories, list) or not all(isinstance(c, dict) for c in categories):
        raise PanopticEvalError(f"ground-truth JSON {gt_json}: needs a 'categories' list of objects")
    try:
        meta = DatasetMeta(categories, name=gt_json.stem)
    except ValueError as e:
        raise PanopticEvalError(f"ground-truth JSON {gt_json}: {e}") from None

    pred_by_image: dict[str, dict[str, Any]] = {}
    for ann in pred_d["annotations"]:
        key = str(ann["image_id"])
        if key in pred_by_image:
            raise PanopticEvalError(f"prediction JSON {pred_json}: image {ann['image_id']!r} has two annotations")
        pred_by_image[key] = ann
    tasks: list[_Task] = []
    seen: set[str] = set()
    for ann in gt_d["annotations"]:
        image_id = ann["image_id"]
        key = str(image_id)
        if key in seen:
            raise PanopticEvalError(f"ground-truth JSON {gt_json}: image {image_id!r} has two annotations")
        seen.add(key)
        pred_ann = pred_by_image.get(key)
        if pred_ann is None:
            raise PanopticEvalError(f"image {image_id!r}: no prediction in {pred_json}")
        tasks.append(
            (
                image_id,
                str(ann["file_name"]),
                ann["segments_info"],
                str(pred_ann["file_name"]),
                pred_ann["segments_info"],
            )
        )
    extra = len(pred_by_image) - len(tasks)
    if extra:
        logger.info("PQ: ignored %d predictions of images that are not in the ground truth", extra)

    cats = _Categories(meta)
    stat = PQStat()
    if workers == 1 or len(tasks) <= 1:
        stat += _evaluate_tasks(tasks, gt_dir, pred_dir, cats, strict)
    else:
        spans = _spans(len(tasks), workers)
        with _mp_context().Pool(
            processes=min(workers, len(spans)),
            initializer=_init_worker,
            initargs=(tasks, gt_dir, pred_dir, cats, strict),
        ) as pool:
            for part in pool.imap_unordered(_worker_evaluate, spans):
                stat += part
    return PQResult.from_stat(stat, meta)


# --- command line ----------------------------------------------------------------------------
def add_pq_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `unipan pq` (also `python -m unipan.evaluation.pq`)."""
    parser.add_argument("--gt-json", required=True, type=Path, help="ground-truth COCO-panoptic JSON")
    parser.add_argument(
        "--gt-dir", type=Path, default=None, help="folder of GT panoptic PNGs (default: the JSON path without .json)"
    )
    parser.add_argument("--pred-json", required=True, type=Path, help="prediction COCO-panoptic JSON")
    parser.add_argument(
        "--pred-dir",
        type=Path,
        default=None,
        help="folder of predicted panoptic PNGs (default: the JSON path without .json)",
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="write the result as panopticapi pq_compute's dict (+ tp/fp/fn per class)",
    )
    parser.add_argument(
        "--lenient",
        action="store_true",
        help="accept GT inconsistencies as panopticapi does (ids missing from the JSON, "
        "JSON segments missing from the PNG, JSON areas that differ from the PNG)",
    )


def run_pq(args: argparse.Namespace) -> int:
    """Evaluate the folders named by `add_pq_arguments`' options; print the table, write --json."""
    gt_dir = args.gt_dir if args.gt_dir is not None else args.gt_json.with_suffix("")
    pred_dir = args.pred_dir if args.pred_dir is not None else args.pred_json.with_suffix("")
    result = pq_compute_folders(
        args.gt_json, gt_dir, args.pred_json, pred_dir, workers=args.workers, strict=not args.lenient
    )
    print(result.table())
    if args.json is not None:
        save_json(args.json, result.to_dict(), indent=2)
    return 0


def pq_main(argv: Sequence[str] | None = None) -> int:
    """`python -m unipan.evaluation.pq ...`: print the table, optionally write JSON; 2 on bad input."""
    parser = argparse.ArgumentParser(prog="unipan pq", description=pq_compute_folders.__doc__.splitlines()[0])
    add_pq_arguments(parser)
    try:
        return run_pq(parser.parse_args(argv))
    except PanopticEvalError as e:
        print(f"unipan pq: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pq_main())
