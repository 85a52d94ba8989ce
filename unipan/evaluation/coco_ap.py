"""COCO-style box and mask AP of the thing classes, computed by pycocotools' `COCOeval`.

The protocol is detectron2's `COCOEvaluator` on a Panoptic FPN / UPSNet output, the one behind
the AP columns of the panoptic papers (AUNet Table 1, REFINE Table 2, SPINet Table 1):

- Ground truth: the thing segments of each image's panoptic ground truth at its original size,
  one instance per segment: its pixels as RLE, `area` = its pixel count, `bbox` its tight box,
  `iscrowd` from the segment (COCOeval lets detections match crowd regions without counting them).
  panopticapi's `panoptic2detection_coco_format` converts panoptic ground truth the same way.
- Detections: every detection of the `RawPrediction` (all scores: COCOeval sweeps the score
  itself), the `max_detections` (100) best per image. Boxes are scaled from the network input to
  the original size and clipped; `mask_probs` are pasted into the scaled boxes at the original
  size with `unipan.fusion.paste`'s aligned geometry and binarised at >= 0.5, as detectron2's
  `detector_postprocess` + `paste_masks_in_image`; full-image `masks` (and `mask_crops`, on the
  window their box maps to) are resized by nearest neighbour.
- Mask AP ranks objects by mask area into small/medium/large and box AP by box area: the `bbox`
  is removed from the mask results (and the segmentation from the box results) before
  `COCO.loadRes`, which would otherwise take the box area for both, as detectron2 does.

Records are plain JSON-ready dicts, accumulated per image in a `CocoInstanceStat` that adds
with `+=` and is gathered across ranks, so the numbers of a distributed evaluation equal those of
one process. Image ids are the dataset's (an integer when the id is one, as COCO's are).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from unipan.structures import DatasetMeta, RawPrediction, SegmentInfo

__all__ = [
    "AP_NAMES",
    "CocoInstanceStat",
    "coco_image_id",
    "detection_records",
    "evaluate_instances",
    "gt_instance_records",
]

AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
"""The first six numbers of `COCOeval.stats`, in order (percent in unipan's metrics)."""

IOU_TYPES = {"segm": "mask", "bbox": "box"}
"""COCOeval iou type -> the prefix of its metrics (`mask_AP`, `box_AP50`, ...)."""


def coco_image_id(image_id: str | int) -> str | int:
    """The dataset's image id as COCO files hold it: an int when the id is one ("139" -> 139)."""
    if isinstance(image_id, int):
        return image_id
    return int(image_id) if image_id.isdecimal() and str(int(image_id)) == image_id else image_id


def _encode(mask: np.ndarray) -> dict[str, Any]:
    """uint8[H, W] Fortran-ordered binary mask -> COCO RLE with a str `counts` (JSON-ready)."""
    from pycocotools import mask as mask_util

    rle = mask_util.encode(mask)
    rle["counts"] = rle["counts"].decode("ascii")
    return dict(rle)


def gt_instance_records(
    ids: np.ndarray | Tensor, segments: Sequence[SegmentInfo], meta: DatasetMeta, image_id: str | int
) -> list[dict[str, Any]]:
    """COCO instance annotations of the thing segments of a panoptic ground truth.

    Args:
        ids: int[H, W] segment ids at the image's original size, 0 = void.
        segments: its segments (crowd included); stuff segments are skipped.
        meta: the dataset's classes.
        image_id: the image's id.

    Returns:
        One dict per thing segment with pixels: image_id, category_id (dataset id), segmentation
        (RLE at H x W), area (pixel count), bbox [x, y, w, h], iscrowd. No `id`: the evaluation
        numbers the annotations.
    """
    ids_np = ids.cpu().numpy() if isinstance(ids, Tensor) else np.asarray(ids)
    records: list[dict[str, Any]] = []
    image = coco_image_id(image_id)
    for seg in segments:
        if not meta.isthing(seg.category_id):
            continue
        mask = np.asfortranarray(ids_np == seg.id, dtype=np.uint8)
        area = int(mask.sum())
        if area == 0:
            continue
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        x0, y0 = int(cols[0]), int(rows[0])
        bbox = [x0, y0, int(cols[-1]) + 1 - x0, int(rows[-1]) + 1 - y0]
        records.append(
            {
                "image_id": image,
                "category_id": int(seg.category_id),
                "segmentation": _encode(mask),
                "area": area,
                "bbox": bbox,
                "iscrowd": int(bool(seg.iscrowd)),
            }
        )
    return records


def _original_masks(
    raw: RawPrediction, order: Tensor, boxes: Tensor, original_size: tuple[int, int], mask_thresh: float
) -> Iterator[tuple[Tensor, tuple[int, int, int, int]]] | None:
    """Binary masks of the detections `order` at the original size, each on its pixel window.

    One mask at a time: N full-image masks of a large image would not fit comfortably in memory.
    """
    from unipan.fusion.paste import iter_paste_masks_in_boxes
    from unipan.segments import nearest_source_index

    big_h, big_w = original_size
    if raw.mask_crops is not None:
        h, w = raw.sem_logits.shape[-2:]
        rows = nearest_source_index(big_h, int(h), raw.boxes.device)
        cols = nearest_source_index(big_w, int(w), raw.boxes.device)
        return (
            _resize_crop(raw.mask_crops[i], box, rows, cols)
            for i, box in zip(order.tolist(), raw.boxes[order], strict=True)
        )
    if raw.masks is not None:
        masks = raw.masks[order]
        rows = nearest_source_index(big_h, int(masks.shape[-2]), masks.device)
        cols = nearest_source_index(big_w, int(masks.shape[-1]), masks.device)
        return ((m.index_select(0, rows).index_select(1, cols), (0, big_h, 0, big_w)) for m in masks)
    if raw.mask_probs is None:
        return None
    pasted = iter_paste_masks_in_boxes(raw.mask_probs[order].float(), boxes, original_size)
    # detectron2 binarises pasted probabilities with ">="
    return ((values >= mask_thresh, window) for values, window in pasted)


def _resize_crop(crop: Tensor, box: Tensor, rows: Tensor, cols: Tensor) -> tuple[Tensor, tuple[int, int, int, int]]:
    """A mask crop on its input-size box -> the same mask at the original size, on its window there.

    `rows` / `cols` are the input row / column each original row / column samples (nondecreasing),
    so the original pixels that sample the box form one window.
    """
    x0, y0, x1, y1 = (int(v) for v in box.tolist())
    r0, r1 = (int(v) for v in torch.searchsorted(rows, torch.tensor([y0, y1], device=rows.device)))
    c0, c1 = (int(v) for v in torch.searchsorted(cols, torch.tensor([x0, x1], device=cols.device)))
    return crop.index_select(0, rows[r0:r1] - y0).index_select(1, cols[c0:c1] - x0), (r0, r1, c0, c1)


def detection_records(
    raw: RawPrediction,
    meta: DatasetMeta,
    image_id: str | int,
    original_size: tuple[int, int],
    max_detections: int = 100,
    mask_thresh: float = 0.5,
) -> list[dict[str, Any]]:
    """COCO instance results of a raw prediction, at the image's original size.

    Args:
        raw: the network's prediction at its input size (h, w), the size of `raw.sem_logits`:
            boxes FloatTensor[N, 4] xyxy, scores FloatTensor[N], labels LongTensor[N] (thing index),
            and masks as `raw.mask_crops`, `raw.masks` (BoolTensor[N, h, w]) or `raw.mask_probs`
            (FloatTensor[N, M, M]).
        meta: the dataset's classes (thing index -> dataset category id).
        image_id: the image's id.
        original_size: (H, W) of the image file.
        max_detections: the best-scoring detections kept (COCO's limit is 100).
        mask_thresh: probability at or above which a pasted pixel belongs to the mask.

    Returns:
        One dict per detection, by decreasing score: image_id, category_id (dataset id), bbox
        [x, y, w, h] (float, original pixels), score, and segmentation (RLE at H x W) when the
        prediction has masks.
    """
    n = len(raw)
    if n == 0:
        return []
    h, w = int(raw.sem_logits.shape[-2]), int(raw.sem_logits.shape[-1])
    big_h, big_w = int(original_size[0]), int(original_size[1])
    scores = raw.scores.detach().float().cpu()
    order = torch.argsort(scores, descending=True, stable=True)[:max_detections]
    boxes = raw.boxes.detach().float().cpu()[order] * torch.tensor([big_w / w, big_h / h, big_w / w, big_h / h])
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, big_w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, big_h)
    device_order = order.to(raw.scores.device)
    masks = _original_masks(raw, device_order, boxes.to(raw.scores.device), (big_h, big_w), mask_thresh)
    labels = raw.labels.detach().cpu()[order].tolist()
    image = coco_image_id(image_id)
    canvas = np.zeros((big_h, big_w), dtype=np.uint8, order="F")
    records: list[dict[str, Any]] = []
    for box, score, label in zip(boxes.tolist(), scores[order].tolist(), labels, strict=True):
        record: dict[str, Any] = {
            "image_id": image,
            "category_id": meta.thing_dataset_id(int(label)),
            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
            "score": float(score),
        }
        if masks is not None:
            values, (y0, y1, x0, x1) = next(masks)
            # one reused full-image canvas: RLE needs the whole image, the mask lives in its window
            canvas[y0:y1, x0:x1] = values.cpu().numpy()
            record["segmentation"] = _encode(canvas)
            canvas[y0:y1, x0:x1] = 0
        records.append(record)
    return records


@dataclass
class CocoInstanceStat:
    """Per-image ground truth and detections for COCOeval; adds with `+=`; picklable.

    Attributes:
        images: {"id", "height", "width"} per evaluated image (original size).
        gt: ground-truth instance records (`gt_instance_records`).
        dt: detection records (`detection_records`).
    """

    images: list[dict[str, Any]] = field(default_factory=list)
    gt: list[dict[str, Any]] = field(default_factory=list)
    dt: list[dict[str, Any]] = field(default_factory=list)

    def add_image(
        self,
        image_id: str | int,
        original_size: tuple[int, int],
        gt: list[dict[str, Any]],
        dt: list[dict[str, Any]],
    ) -> None:
        self.images.append(
            {"id": coco_image_id(image_id), "height": int(original_size[0]), "width": int(original_size[1])}
        )
        self.gt += gt
        self.dt += dt

    def __iadd__(self, other: CocoInstanceStat) -> CocoInstanceStat:
        self.images += other.images
        self.gt += other.gt
        self.dt += other.dt
        return self

    def all_gather(self) -> CocoInstanceStat:
        """The records of every rank, in rank order (every rank must call this together)."""
        import torch.distributed as dist

        parts: list[Any] = [self]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, self)
        merged = CocoInstanceStat()
        for part in parts:
            merged += part
        return merged

    def evaluate(self, meta: DatasetMeta) -> dict[str, dict[str, float]]:
        """{"segm": {...}, "bbox": {...}} of `evaluate_instances` on these records."""
        return evaluate_instances(self.images, self.gt, self.dt, meta)


def _thing_categories(meta: DatasetMeta) -> list[dict[str, Any]]:
    return [{"id": int(cid), "name": meta.category(cid).name} for cid in meta.thing_dataset_ids]


def evaluate_instances(
    images: list[dict[str, Any]], gt: list[dict[str, Any]], dt: list[dict[str, Any]], meta: DatasetMeta
) -> dict[str, dict[str, float]]:
    """Mask and box AP of COCOeval over the given records.

    Args:
        images: {"id", "height", "width"} of every evaluated image.
        gt: ground-truth instance records of those images.
        dt: detection records (the best 100 per image); records without "segmentation" enter
            box AP only.
        meta: the dataset's classes (the thing categories are the evaluated ones).

    Returns:
        {"segm": {name: value}, "bbox": {name: value}} for the names of `AP_NAMES`, in percent
        (0..100); NaN where COCOeval has nothing to measure (-1: no ground truth of that size).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    # COCOeval sorts image ids, and the dataset's may mix ints and strings: number them here, in an
    # order independent of the order the ranks' records were gathered in (score ties between
    # images are broken by image order)
    images = sorted(images, key=lambda img: (type(img["id"]).__name__, img["id"]))
    index = {(type(img["id"]).__name__, img["id"]): k + 1 for k, img in enumerate(images)}
    if len(index) != len(images):
        raise ValueError("an image was evaluated twice (its id appears more than once)")

    def renumbered(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for r in records:
            r = dict(r)
            r["image_id"] = index[(type(r["image_id"]).__name__, r["image_id"])]
            out.append(r)
        return out

    gt_anns = [{**r, "id": k + 1} for k, r in enumerate(renumbered(gt))]
    coco_images = [{"id": k + 1, "height": img["height"], "width": img["width"]} for k, img in enumerate(images)]
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet:
        coco_gt = COCO()
        coco_gt.dataset = {"images": coco_images, "annotations": gt_anns, "categories": _thing_categories(meta)}
        coco_gt.createIndex()
    out: dict[str, dict[str, float]] = {}
    dets = renumbered(dt)
    for iou_type in IOU_TYPES:
        drop = "bbox" if iou_type == "segm" else "segmentation"
        results = [{k: v for k, v in r.items() if k != drop} for r in dets if iou_type == "bbox" or "segmentation" in r]
        with contextlib.redirect_stdout(io.StringIO()):
            if results:
                coco_dt = coco_gt.loadRes(results)
            else:  # loadRes cannot read an empty list; no detection scores AP 0 where GT exists
                coco_dt = COCO()
                coco_dt.dataset = {"images": coco_images, "annotations": [], "categories": _thing_categories(meta)}
                coco_dt.createIndex()
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        out[iou_type] = {
            name: 100.0 * float(v) if v >= 0 else float("nan")
            for name, v in zip(AP_NAMES, evaluator.stats[: len(AP_NAMES)], strict=True)
        }
    return out
