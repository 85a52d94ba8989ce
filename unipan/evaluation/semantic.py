"""Semantic-segmentation quality: mIoU from a confusion matrix that adds with `+=`.

Labels are in the all-classes space of `DatasetMeta` (`class_index`: stuff first, then things),
the space of `PanopticTarget.sem_seg`. `IGNORE_LABEL` (255) in the ground truth removes a pixel
from every count (void, crowd, padding). 255 in a prediction means "no class predicted" (e.g.
void in a panoptic output): the pixel still counts as a false negative of its GT class.

Per class c: IoU = TP / (TP + FP + FN), with FP counted on non-ignored GT pixels only.

mIoU is the mean of the per-class IoUs over the classes **present in the ground truth or in the
prediction** (TP + FP + FN > 0) of the evaluated images. A class absent from both has IoU 0/0:
it carries no information and is left out, as mmsegmentation's nan-mean does. (detectron2's
SemSegEvaluator averages over classes present in the ground truth only; a class that is only
ever predicted, wrongly, then does not lower its mIoU.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from unipan.structures import IGNORE_LABEL, DatasetMeta


def _as_tensor(x: Tensor | np.ndarray) -> Tensor:
    return x if isinstance(x, Tensor) else torch.from_numpy(np.ascontiguousarray(x))


class SemSegStat:
    """Confusion matrix of semantic labels, summed over images; adds with `+=`; picklable.

    Attributes:
        num_classes: C, the size of the class-index space.
        confusion: LongTensor[C, C + 1] on the CPU; row = GT class, column = predicted class,
            column C = "no class predicted" (prediction IGNORE_LABEL).
    """

    def __init__(self, num_classes: int, ignore_label: int = IGNORE_LABEL) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_label < num_classes:
            raise ValueError(f"ignore_label {ignore_label} lies inside the class range [0, {num_classes})")
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        self.confusion = torch.zeros((num_classes, num_classes + 1), dtype=torch.int64)

    def update(self, gt: Tensor | np.ndarray, pred: Tensor | np.ndarray, image_id: str = "") -> None:
        """Add one image (or a batch) of labels.

        Args:
            gt: int[..., H, W] GT class indices, `ignore_label` where not evaluated.
            pred: int[..., H, W] predicted class indices (same shape, any device), `ignore_label`
                where nothing is predicted.
            image_id: names the image in error messages.

        Raises:
            ValueError: naming the image for mismatched shapes, non-integer labels, or labels
                outside [0, C) other than `ignore_label`.
        """
        gt_t, pred_t = _as_tensor(gt), _as_tensor(pred)
        where = f"image {image_id!r}"
        if gt_t.shape != pred_t.shape:
            raise ValueError(f"{where}: prediction shape {tuple(pred_t.shape)} != ground truth {tuple(gt_t.shape)}")
        for name, t in (("ground truth", gt_t), ("prediction", pred_t)):
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise ValueError(f"{where}: {name} labels must be integers, got {t.dtype}")
        c = self.num_classes
        gt_t = gt_t.reshape(-1).long()
        pred_t = pred_t.to(gt_t.device).reshape(-1).long()
        keep = gt_t != self.ignore_label
        gt_t, pred_t = gt_t[keep], pred_t[keep]
        if gt_t.numel() and (int(gt_t.min()) < 0 or int(gt_t.max()) >= c):
            bad = torch.unique(gt_t[(gt_t < 0) | (gt_t >= c)])[:10].tolist()
            raise ValueError(f"{where}: ground-truth labels {bad} outside [0, {c}) and not {self.ignore_label}")
        no_pred = pred_t == self.ignore_label
        pred_t = torch.where(no_pred, torch.full_like(pred_t, c), pred_t)
        if pred_t.numel() and (int(pred_t.min()) < 0 or int(pred_t.max()) > c):
            bad = torch.unique(pred_t[(pred_t < 0) | (pred_t > c)])[:10].tolist()
            raise ValueError(f"{where}: predicted labels {bad} outside [0, {c}) and not {self.ignore_label}")
        counts = torch.bincount(gt_t * (c + 1) + pred_t, minlength=c * (c + 1))
        self.confusion += counts.reshape(c, c + 1).cpu()

    def _check_compatible(self, other: SemSegStat) -> None:
        if not isinstance(other, SemSegStat):
            raise TypeError(f"cannot add {type(other).__name__} to SemSegStat")
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot add stats of {other.num_classes} classes to stats of {self.num_classes}")

    def __iadd__(self, other: SemSegStat) -> SemSegStat:
        self._check_compatible(other)
        self.confusion += other.confusion
        return self

    def __add__(self, other: SemSegStat) -> SemSegStat:
        self._check_compatible(other)
        out = SemSegStat(self.num_classes, self.ignore_label)
        out.confusion = self.confusion + other.confusion
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SemSegStat):
            return NotImplemented
        return self.num_classes == other.num_classes and bool(torch.equal(self.confusion, other.confusion))

    __hash__ = None  # type: ignore[assignment]  # mutable

    def to_tensor(self) -> Tensor:
        """LongTensor[C, C + 1]: a copy of the confusion matrix (for all-reduce)."""
        return self.confusion.clone()

    @classmethod
    def from_tensor(cls, t: Tensor, ignore_label: int = IGNORE_LABEL) -> SemSegStat:
        """Inverse of `to_tensor`."""
        if t.ndim != 2 or t.shape[1] != t.shape[0] + 1:
            raise ValueError(f"expected a [C, C + 1] confusion matrix, got shape {tuple(t.shape)}")
        out = cls(int(t.shape[0]), ignore_label)
        out.confusion = t.detach().to("cpu", torch.int64).clone()
        return out

    def all_reduce(self) -> SemSegStat:
        """The sum over all `torch.distributed` ranks (self when no process group is initialised)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        t = self.to_tensor()
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return SemSegStat.from_tensor(t.cpu(), self.ignore_label)

    def result(self, meta: DatasetMeta | Sequence[str] | None = None) -> SemSegResult:
        """Per-class IoU and accuracy, mIoU over present classes, pixel accuracy.

        Args:
            meta: names the classes (class index -> category) and splits things/stuff; or a list
                of C class names; or None (names "0", "1", ...).
        """
        c = self.num_classes
        names, isthing, category_ids = _class_info(meta, c)
        conf = self.confusion.to(torch.float64)
        tp = torch.diagonal(conf[:, :c])
        gt_pixels = conf.sum(dim=1)  # includes pixels where nothing was predicted
        pred_pixels = conf[:, :c].sum(dim=0)
        union = gt_pixels + pred_pixels - tp
        present = union > 0
        iou = torch.where(present, tp / union.clamp(min=1), torch.zeros_like(tp))
        acc = torch.where(gt_pixels > 0, tp / gt_pixels.clamp(min=1), torch.zeros_like(tp))
        total = float(gt_pixels.sum())

        def mean(mask: Tensor) -> float:
            m = present & mask
            return float(iou[m].mean()) if bool(m.any()) else 0.0

        thing_mask = (
            torch.tensor(isthing, dtype=torch.bool) if isthing is not None else torch.zeros(c, dtype=torch.bool)
        )
        per_class = [
            SemSegClassResult(
                class_index=k,
                name=names[k],
                category_id=category_ids[k] if category_ids is not None else None,
                isthing=isthing[k] if isthing is not None else None,
                iou=float(iou[k]),
                accuracy=float(acc[k]),
                present=bool(present[k]),
                gt_pixels=int(gt_pixels[k]),
                pred_pixels=int(pred_pixels[k]),
            )
            for k in range(c)
        ]
        has_gt = gt_pixels > 0
        return SemSegResult(
            miou=mean(torch.ones(c, dtype=torch.bool)),
            miou_things=mean(thing_mask) if isthing is not None else None,
            miou_stuff=mean(~thing_mask) if isthing is not None else None,
            pixel_accuracy=float(tp.sum()) / total if total else 0.0,
            mean_accuracy=float(acc[has_gt].mean()) if bool(has_gt.any()) else 0.0,
            num_present=int(present.sum()),
            per_class=per_class,
        )


def _class_info(
    meta: DatasetMeta | Sequence[str] | None, c: int
) -> tuple[list[str], list[bool] | None, list[int] | None]:
    if meta is None:
        return [str(k) for k in range(c)], None, None
    if isinstance(meta, DatasetMeta):
        if meta.num_classes != c:
            raise ValueError(f"DatasetMeta has {meta.num_classes} classes, the stats {c}")
        ids = meta.class_index_to_dataset_id
        return [meta.category(i).name for i in ids], [meta.isthing(i) for i in ids], list(ids)
    names = [str(n) for n in meta]
    if len(names) != c:
        raise ValueError(f"{len(names)} class names given for {c} classes")
    return names, None, None


@dataclass(frozen=True)
class SemSegClassResult:
    """One class: IoU and accuracy (fractions), and its pixel counts."""

    class_index: int
    name: str
    category_id: int | None
    isthing: bool | None
    iou: float
    accuracy: float
    present: bool  # in the ground truth or the prediction: enters mIoU
    gt_pixels: int
    pred_pixels: int


@dataclass(frozen=True)
class SemSegResult:
    """Semantic-segmentation metrics (fractions 0..1).

    Attributes:
        miou: mean IoU over the classes present in GT or prediction (0 when none is).
        miou_things, miou_stuff: the same over thing / stuff classes (None without DatasetMeta).
        pixel_accuracy: correctly labelled / all non-ignored GT pixels.
        mean_accuracy: mean per-class accuracy over classes present in the GT.
        num_present: classes entering mIoU.
        per_class: one entry per class index.
    """

    miou: float
    miou_things: float | None
    miou_stuff: float | None
    pixel_accuracy: float
    mean_accuracy: float
    num_present: int
    per_class: list[SemSegClassResult]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the summary numbers and per-class IoU keyed by dataset category id (or class index)."""
        return {
            "miou": self.miou,
            "miou_things": self.miou_things,
            "miou_stuff": self.miou_stuff,
            "pixel_accuracy": self.pixel_accuracy,
            "mean_accuracy": self.mean_accuracy,
            "num_present": self.num_present,
            "per_class": {
                (r.category_id if r.category_id is not None else r.class_index): {
                    "iou": r.iou,
                    "accuracy": r.accuracy,
                    "present": r.present,
                }
                for r in self.per_class
            },
        }

    def table(self) -> str:
        """Human-readable summary (percent) and per-class table; '-' marks classes left out of mIoU."""
        lines = [f"mIoU {100 * self.miou:6.2f}  over {self.num_present} classes"]
        if self.miou_things is not None and self.miou_stuff is not None:
            lines.append(f"mIoU things {100 * self.miou_things:6.2f}  stuff {100 * self.miou_stuff:6.2f}")
        lines.append(f"pixel accuracy {100 * self.pixel_accuracy:6.2f}  mean accuracy {100 * self.mean_accuracy:6.2f}")
        width = max([8, *(len(r.name) for r in self.per_class)])
        lines += ["", f"{'class':>5s}  {'name':{width}s}  {'IoU':>6s} {'Acc':>6s}", "-" * (5 + 2 + width + 2 + 13)]
        for r in self.per_class:
            iou = f"{100 * r.iou:6.2f}" if r.present else f"{'-':>6s}"
            acc = f"{100 * r.accuracy:6.2f}" if r.gt_pixels else f"{'-':>6s}"
            lines.append(f"{r.class_index:5d}  {r.name:{width}s}  {iou} {acc}")
        return "\n".join(lines)


def miou(
    gt: Tensor | np.ndarray, pred: Tensor | np.ndarray, num_classes: int, ignore_label: int = IGNORE_LABEL
) -> float:
    """MIoU of one pair of label maps (convenience for tests and notebooks)."""
    stat = SemSegStat(num_classes, ignore_label)
    stat.update(gt, pred)
    return stat.result().miou
