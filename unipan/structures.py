"""The types that cross module lines: class metadata, targets, batches, predictions, results.

Id spaces (never mix them without a map from `DatasetMeta`):

- dataset category id (`category_id`): the id of the COCO-panoptic `categories` list (COCO: 1..200).
- thing index (`thing_index`): contiguous 0..T-1 over the thing categories, in list order.
- stuff index (`stuff_index`): contiguous 0..S-1 over the stuff categories, in list order.
- class index (`class_index`): the all-classes space used by `sem_seg`: stuff first (0..S-1),
  then things (S..S+T-1). `IGNORE_LABEL` (255) marks void and crowd pixels.
- segment id: the value of a pixel in a panoptic id map (`R + 256 G + 256^2 B`); 0 is void.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

# torch-free; defined in unipan.meta so the light command-line verbs need no torch, re-exported here
from unipan.meta import IGNORE_LABEL as IGNORE_LABEL
from unipan.meta import VOID_ID as VOID_ID
from unipan.meta import CategoryInfo as CategoryInfo
from unipan.meta import DatasetMeta as DatasetMeta
from unipan.meta import SegmentInfo as SegmentInfo

SemSpace = Literal["stuff", "stuff+things", "all"]
"""Class space of a semantic prediction or target, for S stuff and T thing classes:

- "stuff": C = S, stuff indices only (things are left to the instance branch);
- "stuff+things": C = S + 1, stuff indices, then one "things" class (Panoptic FPN);
- "all": C = S + T, the class index space (stuff first, then things; UPSNet).

`unipan.segments.semantic_channels` gives C, `unipan.segments.to_semantic_space` maps targets.
"""


@dataclass
class PanopticTarget:
    """The canonical ground truth of one image; every model derives its own loss targets from it.

    All spatial fields share the image's size H x W (after transforms).

    Attributes:
        image_id: the image's id (COCO `image_id`, or file stem).
        panoptic: IntTensor[H, W] (int32) segment ids; 0 = void.
        segments: the segments of `panoptic`, crowd included.
        sem_seg: LongTensor[H, W] class index (stuff first, then things); 255 on void and crowd.
        boxes: FloatTensor[N, 4] xyxy pixel boxes of the non-crowd thing instances (x1, y1
            exclusive, i.e. tight box of the mask's pixels is [x0, y0, x1+1, y1+1]).
        labels: LongTensor[N] thing index of each instance.
        masks: BoolTensor[N, H, W] instance masks.
        crowd: BoolTensor[H, W] pixels of crowd segments.
        instance_ids: LongTensor[N] the segment id of each instance in `panoptic`.
    """

    image_id: str
    panoptic: Tensor
    segments: list[SegmentInfo]
    sem_seg: Tensor
    boxes: Tensor
    labels: Tensor
    masks: Tensor
    crowd: Tensor
    instance_ids: Tensor

    @property
    def image_size(self) -> tuple[int, int]:
        return (int(self.panoptic.shape[-2]), int(self.panoptic.shape[-1]))

    def __len__(self) -> int:
        return int(self.labels.numel())

    def to(self, device: torch.device | str) -> PanopticTarget:
        return replace(
            self,
            panoptic=self.panoptic.to(device),
            sem_seg=self.sem_seg.to(device),
            boxes=self.boxes.to(device),
            labels=self.labels.to(device),
            masks=self.masks.to(device),
            crowd=self.crowd.to(device),
            instance_ids=self.instance_ids.to(device),
        )

    @classmethod
    def from_panoptic(
        cls,
        panoptic: Tensor,
        segments: Sequence[SegmentInfo],
        meta: DatasetMeta,
        image_id: str = "",
    ) -> PanopticTarget:
        """Derive every field from an id map and its segments.

        Transforms act on the image and the id map only and call this afterwards, so sem_seg,
        masks, boxes and crowd can never drift apart. Segments whose pixels were all cropped away
        are dropped; `area` and `bbox` of the rest are recomputed.

        Args:
            panoptic: IntTensor[H, W] segment ids, 0 = void.
            segments: segment infos; an id of `panoptic` missing here raises ValueError.
            meta: class information (category ids must be known to it).
            image_id: for error messages and bookkeeping.
        """
        panoptic = panoptic.to(torch.int32)
        if panoptic.ndim != 2:
            raise ValueError(f"image {image_id!r}: panoptic map must be H x W, got {tuple(panoptic.shape)}")
        # One pass over the pixels: each pixel's position in the sorted list of known ids, then
        # per-position lookup tables. (A loop of full-image comparisons per segment is much
        # slower on a COCO image, and sorting the pixels as unique() does is slower still.)
        seg_by_id: dict[int, SegmentInfo] = {}
        for seg in segments:
            if seg.id in seg_by_id:
                raise ValueError(f"image {image_id!r}: segment id {seg.id} is listed twice")
            seg_by_id[seg.id] = seg
        known = np.array(sorted({VOID_ID, *seg_by_id}), dtype=np.int64)
        pan_np = panoptic.numpy()
        dense_np = np.searchsorted(known, pan_np).astype(np.int32)
        np.minimum(dense_np, len(known) - 1, out=dense_np)
        stray = known[dense_np] != pan_np
        if stray.any():
            unknown = sorted(set(np.unique(pan_np[stray]).tolist()))
            raise ValueError(f"image {image_id!r}: panoptic ids {unknown[:10]} have no segment info")
        present_ids = known.tolist()
        areas_t, bboxes_t = _label_stats(torch.from_numpy(dense_np), len(known))
        areas = areas_t.tolist()
        bboxes = bboxes_t.tolist()
        label_of = {seg_id: k for k, seg_id in enumerate(present_ids) if areas[k] > 0}

        class_lut = np.full((len(present_ids),), IGNORE_LABEL, dtype=np.int64)
        crowd_lut = np.zeros((len(present_ids),), dtype=bool)
        kept: list[SegmentInfo] = []
        thing_labels: list[int] = []  # dense label of each instance
        labels: list[int] = []
        instance_ids: list[int] = []
        boxes: list[tuple[int, int, int, int]] = []
        for seg in segments:
            k = label_of.get(seg.id)
            if k is None or seg.id == VOID_ID:
                continue  # cropped away (or a bogus void entry, which owns no pixels)
            if seg.category_id not in meta:
                raise ValueError(f"image {image_id!r}, segment {seg.id}: unknown category {seg.category_id}")
            x0, y0, bw, bh = bboxes[k]
            x1, y1 = x0 + bw, y0 + bh
            kept.append(replace(seg, area=int(areas[k]), bbox=(x0, y0, bw, bh)))
            if seg.iscrowd:
                crowd_lut[k] = True
                continue
            class_lut[k] = meta.class_index(seg.category_id)
            if meta.isthing(seg.category_id):
                thing_labels.append(k)
                labels.append(meta.thing_index(seg.category_id))
                instance_ids.append(seg.id)
                boxes.append((x0, y0, x1, y1))
        # numpy: these gathers and compares run several times faster than torch's on CPU
        masks_np = dense_np[None] == np.array(thing_labels, dtype=np.int32).reshape(-1, 1, 1)
        return cls(
            image_id=image_id,
            panoptic=panoptic,
            segments=kept,
            sem_seg=torch.from_numpy(class_lut[dense_np]),
            boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            labels=torch.tensor(labels, dtype=torch.long),
            masks=torch.from_numpy(masks_np),
            crowd=torch.from_numpy(crowd_lut[dense_np]),
            instance_ids=torch.tensor(instance_ids, dtype=torch.long),
        )

    def instance_index_map(self) -> Tensor:
        """LongTensor[H, W]: the index (0..N-1) of the instance of `masks` at each pixel, -1 elsewhere.

        Instances of panoptic ground truth do not overlap; where `masks` of a hand-made target do,
        the later instance wins. Crowd pixels are -1 (crowd regions are not instances).
        """
        n, h, w = self.masks.shape
        out = torch.full((h, w), -1, dtype=torch.long, device=self.masks.device)
        for i in range(n):
            out.masked_fill_(self.masks[i], i)
        return out

    def sem_seg_with_crowd(self, meta: DatasetMeta) -> Tensor:
        """LongTensor[H, W]: `sem_seg` with crowd pixels labelled with their crowd segment's class.

        `sem_seg` ignores crowd regions; semantic losses of the reference implementations
        (detectron2's Panoptic FPN, official UPSNet) train crowd pixels as their class instead.
        Void stays IGNORE_LABEL.

        Args:
            meta: the dataset's classes (crowd category ids -> class indices).
        """
        crowd = [s for s in self.segments if s.iscrowd]
        if not crowd:
            return self.sem_seg
        out = self.sem_seg.clone()
        for seg in crowd:
            out[(self.panoptic == seg.id) & self.crowd] = meta.class_index(seg.category_id)
        return out


def _label_stats(labels: Tensor, bins: int) -> tuple[Tensor, Tensor]:
    """Pixel count and COCO bbox of every label of a label map: the one area/bbox kernel.

    Public as `unipan.segments.label_stats`; it lives here because `PanopticTarget.from_panoptic`
    needs it and `structures` must not import `segments` (which imports `structures`).

    Why two scatter-adds: one counts the pixels of every label in each row (H x bins), the other
    in each column (bins x W); the rows and columns with a non-zero count give both extents, and
    the row counts summed give the area. Both tables stay in cache. This replaced per-row
    scatter-reduces of the column index (first and last column), which cost twice a scatter-add
    each, and before them `np.bincount` + `scipy.ndimage.find_objects`, a flat `scatter_reduce` per
    coordinate and `np.unique`-based counting (which sorts the pixels), all slower on 1024 x 2048
    maps with about 100 segments.

    Args:
        labels: IntTensor or LongTensor[H, W] with values in 0..bins-1 (a value outside raises
            RuntimeError or IndexError from the scatter).
        bins: number of labels.

    Returns:
        areas LongTensor[bins] and bboxes LongTensor[bins, 4] as (x, y, w, h), pixel edges
        (x + w is one past the last column); zeros for labels without pixels. On `labels`' device.
    """
    h, w = labels.shape
    device = labels.device
    if h == 0 or w == 0:
        return torch.zeros(bins, dtype=torch.long, device=device), torch.zeros(
            (bins, 4), dtype=torch.long, device=device
        )
    labels = labels.long()  # scatter indices must be int64
    ones = torch.ones((1, 1), dtype=torch.int32, device=device).expand(h, w)
    row_counts = torch.zeros((h, bins), dtype=torch.int32, device=device).scatter_add_(1, labels, ones)
    col_counts = torch.zeros((bins, w), dtype=torch.int32, device=device).scatter_add_(0, labels, ones)
    areas = row_counts.sum(dim=0, dtype=torch.long)
    row_has = row_counts > 0  # [h, bins]
    rows = torch.arange(h, device=device)[:, None]
    y_first = torch.where(row_has, rows, h).amin(dim=0)
    y_last = torch.where(row_has, rows, -1).amax(dim=0) + 1
    col_has = col_counts > 0  # [bins, w]
    columns = torch.arange(w, device=device)[None, :]
    x_first = torch.where(col_has, columns, w).amin(dim=1)
    x_last = torch.where(col_has, columns, -1).amax(dim=1) + 1
    bboxes = torch.stack([x_first, y_first, x_last - x_first, y_last - y_first], dim=1)
    return areas, bboxes.masked_fill_((areas == 0)[:, None], 0)


def masks_to_boxes(masks: Tensor) -> Tensor:
    """BoolTensor[N, H, W] -> FloatTensor[N, 4] tight xyxy boxes, x1/y1 exclusive (pixel edges).

    An empty mask gives the box (0, 0, 0, 0).
    """
    if masks.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32, device=masks.device)
    return _extents_to_boxes(masks.any(dim=2), masks.any(dim=1))


def logit_boxes(logits: Tensor, thresh: float) -> Tensor:
    """FloatTensor[N, H, W] -> the `masks_to_boxes` boxes of `logits >= thresh`.

    A row (column) holds a pixel of the mask iff its largest value reaches `thresh`, so two max
    reductions over the float maps replace the bool map and its two `any` reductions (cheaper on
    the CPU: no map is written, and the float reductions are vectorised).
    """
    if logits.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32, device=logits.device)
    return _extents_to_boxes(logits.amax(dim=2) >= thresh, logits.amax(dim=1) >= thresh)


def _extents_to_boxes(rows: Tensor, cols: Tensor) -> Tensor:
    """BoolTensor[N, H] (row holds a mask pixel) and [N, W] (column does) -> FloatTensor[N, 4] boxes."""
    h, w = rows.shape[1], cols.shape[1]
    ar_h = torch.arange(h, device=rows.device)
    ar_w = torch.arange(w, device=rows.device)
    big = max(h, w) + 1
    y0 = torch.where(rows, ar_h, big).amin(dim=1)
    y1 = torch.where(rows, ar_h, -1).amax(dim=1) + 1
    x0 = torch.where(cols, ar_w, big).amin(dim=1)
    x1 = torch.where(cols, ar_w, -1).amax(dim=1) + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    boxes[~rows.any(dim=1)] = 0.0
    return boxes


@dataclass
class Sample:
    """One dataset item after transforms (what a Dataset's __getitem__ returns).

    Attributes:
        image: FloatTensor[3, h, w] normalised image (RGB).
        target: ground truth at (h, w).
        image_id: the image's id.
        original_size: (H, W) of the file before any resizing.
    """

    image: Tensor
    target: PanopticTarget
    image_id: str
    original_size: tuple[int, int]


@dataclass
class Batch:
    """A padded batch of images with what the model needs to undo the padding.

    Attributes:
        images: FloatTensor[B, 3, Hp, Wp], normalised, zero-padded at bottom/right so Hp and Wp
            are multiples of the collate's size divisibility.
        image_sizes: per image (h, w) before padding: the network input size of that image.
        image_ids: per image id.
        targets: per image ground truth at (h, w), or None at inference.
        original_sizes: per image (h, w) of the file before resizing (for predictions written at
            original size); equals image_sizes when nothing resized.
    """

    images: Tensor
    image_sizes: list[tuple[int, int]]
    image_ids: list[str]
    targets: list[PanopticTarget] | None = None
    original_sizes: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        return replace(
            self,
            images=self.images.to(device, non_blocking=True),
            targets=None if self.targets is None else [t.to(device) for t in self.targets],
        )

    def padded_sem_seg(self, crowd_meta: DatasetMeta | None = None) -> Tensor:
        """LongTensor[B, Hp, Wp] of the targets' sem_seg, IGNORE_LABEL in the padding.

        Args:
            crowd_meta: when given, crowd pixels carry their class (`sem_seg_with_crowd`) instead
                of IGNORE_LABEL.
        """
        if self.targets is None:
            raise ValueError("batch has no targets")
        b, _, hp, wp = self.images.shape
        out = torch.full((b, hp, wp), IGNORE_LABEL, dtype=torch.long, device=self.images.device)
        for i, t in enumerate(self.targets):
            h, w = t.sem_seg.shape
            out[i, :h, :w] = t.sem_seg if crowd_meta is None else t.sem_seg_with_crowd(crowd_meta)
        return out


@dataclass
class RawPrediction:
    """What a network predicts for one image before fusion, at its input size (h, w).

    Attributes:
        boxes: FloatTensor[N, 4] xyxy in input pixels.
        scores: FloatTensor[N] detection scores.
        labels: LongTensor[N] thing index.
        mask_probs: FloatTensor[N, M, M] RoI mask probabilities of each instance's own class
            (M = 28 for Mask R-CNN heads), to be pasted into `boxes`; or None.
        masks: BoolTensor[N, h, w] full-image binary masks; when given, fusion uses them instead
            of pasting `mask_probs` (oracle inputs, models with full-resolution masks).
        mask_crops: the same full-image binary masks without their zeros: per instance a
            BoolTensor[y1 - y0, x1 - x0] on its tight box `boxes[i]` (integral, x1/y1 exclusive, as
            `masks_to_boxes`; an empty mask has a zero box and a 0 x 0 crop). Models whose masks
            come at full resolution hand these over (SPINet: 100 masks of a 1024 x 2048 image are
            200 MB as `masks`); `dense_masks()` gives the [N, h, w] stack where one is needed.
        sem_logits: FloatTensor[C, h, w] semantic logits (the model's own class space; see
            `sem_space`).
        sem_space: the class space of `sem_logits` (`SemSpace`): "stuff": C = S; "stuff+things":
            C = S + 1 (stuff, then one "things" class, Panoptic FPN); "all": C = S + T (stuff
            first, then things, UPSNet/REFINE).
        sem_pred: LongTensor[h, w] argmax of `sem_logits` when the model already computed it
            (on its device, where it is cheap); fusion computes it otherwise.
        extras: model-specific outputs (e.g. mask logits for UPSNet's panoptic head).
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    sem_logits: Tensor
    mask_probs: Tensor | None = None
    masks: Tensor | None = None
    sem_space: SemSpace = "stuff+things"
    sem_pred: Tensor | None = None
    mask_crops: list[Tensor] | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.scores.numel())

    def dense_masks(self) -> Tensor | None:
        """BoolTensor[N, h, w] full-image masks (`masks`, or `mask_crops` placed on their boxes), or None."""
        if self.masks is not None or self.mask_crops is None:
            return self.masks
        h, w = self.sem_logits.shape[-2:]
        out = torch.zeros((len(self.mask_crops), h, w), dtype=torch.bool, device=self.sem_logits.device)
        for mask, crop, (x0, y0, x1, y1) in zip(out, self.mask_crops, self.boxes.long().tolist(), strict=True):
            mask[y0:y1, x0:x1] = crop
        return out


@dataclass
class PanopticResult:
    """The panoptic prediction of one image.

    Attributes:
        panoptic: IntTensor[H, W] (int32) segment ids, 0 = void.
        segments: one SegmentInfo per id present in `panoptic` (category_id is a dataset id;
            `score` is the detection score for things; for stuff 1.0, or the mean softmax
            probability of its class when the fusion ran with `stuff_scores=True`).
        image_id: the image's id.
        raw: the RawPrediction it came from (kept for mask AP / mIoU), or None.
    """

    panoptic: Tensor
    segments: list[SegmentInfo]
    image_id: str = ""
    raw: RawPrediction | None = None

    @property
    def image_size(self) -> tuple[int, int]:
        return (int(self.panoptic.shape[-2]), int(self.panoptic.shape[-1]))
