"""Heuristic panoptic fusion of instance and semantic predictions (Panoptic FPN, Kirillov et al. 2019).

The rules are those of detectron2's ``combine_semantic_and_instance_outputs``, the reference
implementation of Panoptic FPN:

1. Things: instances in order of descending score (ties keep their input order); stop at the
   first score below `instance_score_thresh`. An instance whose mask is empty, or whose overlap
   with pixels already taken exceeds `overlap_thresh` of its mask area, is skipped; otherwise it
   takes its still-unassigned pixels and becomes a segment.
2. Stuff: each stuff class of the semantic argmax (never the "things" class) becomes a segment
   over its still-unassigned pixels when at least `stuff_area` of them remain (COCO 4096,
   Cityscapes 2048). Smaller remainders stay void. `stuff_area` is in pixels of the original
   image, as in detectron2 (which fuses at the original size); see "Original-size areas" below.

Segment ids are 1..K in order of creation (things by score, then stuff by stuff index).

Why it is fast enough for 100 instances at 1024 x 2048 (`benchmarks/fusion_speed.py`):

- masks are pasted and compared only inside each box's pixel window (`unipan.fusion.paste`), never
  as N full-image masks;
- one int64 map holds the semantic class of unassigned pixels and C + segment id of thing pixels,
  so a few whole-image passes finish the job: one `unipan.segments.label_stats` call gives the
  area and bbox of every stuff class and thing segment at once (the stuff area threshold and
  every `area` / `bbox` come from it, i.e. from the final map), and one table lookup writes the
  final ids.

Original-size areas: the fusion runs at the network input size (h, w) and compares each stuff
remainder with `stuff_area * (h * w) / (H * W)` for an image file of H x W pixels
(`unipan.segments.area_at_input_size`), then the caller resizes the result to H x W by nearest
neighbour. detectron2 instead resizes the logits bilinearly to H x W and fuses there. Both were
measured (`benchmarks/fusion_resolution.py`: COCO val images of 640 x 360..480 fused from
800 x 1067-like inputs, noisy predictions): the two outputs agree on 99.2% of the pixels (UPSNet's
head: 99.4%), keep the same stuff segments, and their PQ differs by 0.1 (30.1 vs 30.2; UPSNet 50.4
vs 50.5). Fusing at the file size was cheaper for these files (a COCO file has fewer pixels than
its input) but dearer with UPSNet's 133-channel logits, and its cost and memory grow with the file
instead of being bounded by the test-time resize: C x H x W logits of a 12-megapixel photo are
gigabytes.
Scaling the threshold also keeps every model's `PanopticResult` at its input size, the contract
the predictor and the evaluator rely on. So the threshold is scaled.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from unipan.fusion.paste import iter_paste_masks_in_boxes
from unipan.segments import (
    area_at_input_size,
    label_stats,
    semantic_argmax,
    semantic_channels,
    stuff_mean_probs,
)
from unipan.structures import DatasetMeta, PanopticResult, RawPrediction, SegmentInfo, masks_to_boxes

__all__ = ["heuristic_fusion"]


def _validate(raw: RawPrediction, meta: DatasetMeta, image_id: str) -> tuple[int, int, int]:  # noqa: C901
    """Check shapes, dtypes and value ranges; return (h, w, C) (C from `raw.sem_space`)."""
    where = f"image {image_id!r}" if image_id else "prediction"
    channels = semantic_channels(meta, raw.sem_space)
    if raw.sem_logits.dim() != 3:
        raise ValueError(f"{where}: sem_logits must be FloatTensor[C, h, w], got shape {tuple(raw.sem_logits.shape)}")
    if raw.sem_logits.shape[0] != channels:
        raise ValueError(
            f"{where}: sem_logits has {raw.sem_logits.shape[0]} channels, expected {channels} for "
            f"sem_space={raw.sem_space!r} with {meta.num_stuff} stuff / {meta.num_things} thing classes"
        )
    h, w = int(raw.sem_logits.shape[1]), int(raw.sem_logits.shape[2])
    if raw.sem_pred is not None:
        if tuple(raw.sem_pred.shape) != (h, w):
            raise ValueError(f"{where}: sem_pred has shape {tuple(raw.sem_pred.shape)}, sem_logits is {h} x {w}")
        if raw.sem_pred.dtype.is_floating_point or raw.sem_pred.dtype == torch.bool:
            raise ValueError(f"{where}: sem_pred must be an integer tensor (argmax), got {raw.sem_pred.dtype}")
        # its value range is checked after the fusion's own counts (`_check_sem_pred`), which
        # saves a pass over the image
    n = raw.scores.numel()
    if raw.scores.dim() != 1:
        raise ValueError(f"{where}: scores must be FloatTensor[N], got shape {tuple(raw.scores.shape)}")
    if tuple(raw.labels.shape) != (n,):
        raise ValueError(f"{where}: {n} scores but labels of shape {tuple(raw.labels.shape)}")
    if tuple(raw.boxes.shape) != (n, 4):
        raise ValueError(f"{where}: {n} scores but boxes of shape {tuple(raw.boxes.shape)} (expected [{n}, 4])")
    if n and torch.isnan(raw.scores).any():
        raise ValueError(f"{where}: instance scores contain NaN")
    if n:
        lo_label, hi_label = int(raw.labels.min()), int(raw.labels.max())
        if lo_label < 0 or hi_label >= meta.num_things:
            raise ValueError(
                f"{where}: instance labels {lo_label}..{hi_label} outside thing indices 0..{meta.num_things - 1}"
            )
    if raw.mask_crops is not None:
        _validate_crops(raw, (h, w), where)
    elif raw.masks is not None:
        if tuple(raw.masks.shape) != (n, h, w):
            raise ValueError(f"{where}: masks has shape {tuple(raw.masks.shape)}, expected [{n}, {h}, {w}]")
        if raw.masks.dtype != torch.bool:
            raise ValueError(f"{where}: masks must be a BoolTensor, got {raw.masks.dtype}")
    elif n:
        if raw.mask_probs is None:
            raise ValueError(f"{where}: {n} instances but neither masks nor mask_probs")
        if raw.mask_probs.dim() != 3 or raw.mask_probs.shape[0] != n:
            raise ValueError(
                f"{where}: mask_probs must be FloatTensor[{n}, M, M], got shape {tuple(raw.mask_probs.shape)}"
            )
    return h, w, channels


def _validate_crops(raw: RawPrediction, image_size: tuple[int, int], where: str) -> None:
    """Raise unless `raw.mask_crops` are one BoolTensor per instance, each the size of its box inside the image."""
    assert raw.mask_crops is not None
    h, w = image_size
    if len(raw.mask_crops) != len(raw):
        raise ValueError(f"{where}: {len(raw.mask_crops)} mask crops for {len(raw)} instances")
    for i, (crop, (x0, y0, x1, y1)) in enumerate(zip(raw.mask_crops, raw.boxes.tolist(), strict=True)):
        if crop.dtype != torch.bool:
            raise ValueError(f"{where}: mask crop {i} must be a BoolTensor, got {crop.dtype}")
        if not (0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h) or tuple(crop.shape) != (y1 - y0, x1 - x0):
            raise ValueError(
                f"{where}: mask crop {i} of shape {tuple(crop.shape)} does not fill its box "
                f"{[x0, y0, x1, y1]} inside the {h}x{w} image"
            )


def _instance_windows(
    raw: RawPrediction, order: Tensor, image_size: tuple[int, int], mask_thresh: float
) -> Iterator[tuple[Tensor, int, tuple[int, int, int, int]]]:
    """Binary mask, its pixel count and its window (y0, y1, x0, x1), per instance of `order`.

    The masks are BoolTensor[y1 - y0, x1 - x0]: `raw.mask_crops` on their tight boxes, crops of
    `raw.masks` to their tight boxes, or `raw.mask_probs` pasted into `raw.boxes` and binarised at
    `mask_thresh`.
    """
    if raw.mask_crops is not None:
        boxes = raw.boxes[order].long().tolist()
        for i, (x0, y0, x1, y1) in zip(order.tolist(), boxes, strict=True):
            mask = raw.mask_crops[i]
            yield mask, int(torch.count_nonzero(mask)), (y0, y1, x0, x1)
        return
    if raw.masks is not None:
        # the tight boxes (x1/y1 exclusive) are the windows: each mask is a view of its window
        boxes = masks_to_boxes(raw.masks[order]).long().tolist()
        for i, (x0, y0, x1, y1) in zip(order.tolist(), boxes, strict=True):
            mask = raw.masks[i, y0:y1, x0:x1]
            yield mask, int(torch.count_nonzero(mask)), (y0, y1, x0, x1)
        return
    assert raw.mask_probs is not None
    for values, window in iter_paste_masks_in_boxes(raw.mask_probs[order], raw.boxes[order], image_size):
        mask = values >= mask_thresh  # detectron2 binarises pasted probabilities with ">="
        yield mask, int(torch.count_nonzero(mask)), window


def _check_sem_pred(raw: RawPrediction, channels: int, image_id: str) -> None:
    """Raise the error that explains an out-of-range `sem_pred` (called when counts disagree)."""
    assert raw.sem_pred is not None, "argmax of sem_logits is always in range"
    lo, hi = (int(v) for v in torch.aminmax(raw.sem_pred))
    where = f"image {image_id!r}" if image_id else "prediction"
    raise ValueError(f"{where}: sem_pred values {lo}..{hi} outside 0..{channels - 1}")


def heuristic_fusion(
    raw: RawPrediction,
    meta: DatasetMeta,
    *,
    instance_score_thresh: float = 0.5,
    overlap_thresh: float = 0.5,
    mask_thresh: float = 0.5,
    stuff_area: int = 4096,
    image_id: str = "",
    stuff_scores: bool = False,
    original_size: tuple[int, int] | None = None,
) -> PanopticResult:
    """Merge instances and semantic segmentation into a panoptic map (see the module docstring).

    Args:
        raw: the network's prediction at input size (h, w). Instance masks come from
            `raw.mask_crops` or `raw.masks` (BoolTensor[N, h, w]) when given, else from `raw.mask_probs`
            (FloatTensor[N, M, M]) pasted into `raw.boxes` (detectron2 geometry) and
            binarised at `mask_thresh`. The semantic argmax is `raw.sem_pred` when given, else
            `semantic_argmax(raw.sem_logits)`; values >= S (the "things" channel, or thing classes in
            the "all" space) are never stuff.
        meta: the dataset's classes (labels are thing indices, semantic channels < S are stuff
            indices).
        instance_score_thresh: instances scoring below this are dropped (and all after them).
        overlap_thresh: an instance is skipped when more than this fraction of its mask is taken.
        mask_thresh: probability at or above which a pasted pixel belongs to the instance.
        stuff_area: minimum number of unassigned pixels for a stuff segment, in pixels of the
            original image (0 or 1: any); compared at the input size after scaling by
            `original_size` (see the module docstring).
        image_id: stored in the result and named in error messages.
        stuff_scores: when True, a stuff segment's score is the mean softmax probability of its
            class over its pixels (`unipan.segments.stuff_mean_probs`: a log-sum-exp over all
            C x h x w logits, which costs far more than the rest of the fusion); when False
            (default) it is 1.0: stuff has no detection score, and nothing downstream (PQ,
            COCO-panoptic files) reads it.
        original_size: (H, W) of the image file the input was resized from; None = the input size.

    Returns:
        PanopticResult at (h, w): panoptic IntTensor[h, w] with ids 1..K (0 = void); segments with
        dataset `category_id`, `isthing`, `score` (detection score for things), and `area` /
        `bbox` of their pixels in the map; `raw` is kept.

    Raises:
        ValueError: naming `image_id` on inconsistent shapes, dtypes or out-of-range labels.
    """
    h, w, channels = _validate(raw, meta, image_id)
    device = raw.sem_logits.device

    # --- things ---------------------------------------------------------------------------------
    n = raw.scores.numel()
    order = torch.zeros(0, dtype=torch.long)
    if n:
        scores_sorted, order = torch.sort(raw.scores, descending=True, stable=True)
        order = order[: int((scores_sorted >= instance_score_thresh).sum())]
    windows = _instance_windows(raw, order, (h, w), mask_thresh) if order.numel() else iter(())

    # `work` holds, per pixel, the semantic class (0..C-1) while unassigned and C + segment id once
    # a thing takes it, so at the end one set of row-wise passes measures every stuff class and
    # every thing segment together, and one table lookup writes the final ids.
    if raw.sem_pred is not None:
        work = raw.sem_pred.to(device=device, dtype=torch.long, copy=True)  # written below
    else:
        work = semantic_argmax(raw.sem_logits)
    things: list[tuple[int, float]] = []  # (thing_index, score) per placed instance, id = position + 1
    thing_areas: list[int] = []
    if order.numel():
        scores_kept = raw.scores[order].tolist()
        labels_kept = raw.labels[order].tolist()
        # pixels taken by things so far; a bool map is cheaper to test than `work`'s int64 values
        taken = torch.zeros((h, w), dtype=torch.bool, device=device)
        instances = zip(windows, scores_kept, labels_kept, strict=True)
        for (mask, area, (y0, y1, x0, x1)), score, thing_index in instances:
            if area == 0:  # also every empty window
                continue
            taken_region = taken[y0:y1, x0:x1]
            if things:
                free = mask > taken_region  # in the mask and not taken
                kept_area = int(torch.count_nonzero(free))
            else:
                free, kept_area = mask, area  # nothing is taken before the first instance
            if (area - kept_area) / area > overlap_thresh:
                continue
            things.append((thing_index, float(score)))
            thing_areas.append(kept_area)
            work[y0:y1, x0:x1].masked_fill_(free, channels + len(things))
            taken_region.logical_or_(mask)

    # --- stuff, and the statistics of every segment ----------------------------------------------
    bins = channels + 1 + len(things)
    if h == 0 or w == 0:
        return PanopticResult(torch.zeros((h, w), dtype=torch.int32, device=device), [], image_id, raw)
    try:
        areas, bboxes = label_stats(work, bins)
    except (RuntimeError, IndexError):  # a sem_pred value beyond the bins
        _check_sem_pred(raw, channels, image_id)
        raise
    # A sem_pred value in C..bins-1 on a free pixel would be counted as a thing; these counts
    # catch it (on a thing's pixels it was overwritten, so it did no harm).
    if int(areas[channels]) != 0 or areas[channels + 1 :].tolist() != thing_areas:
        _check_sem_pred(raw, channels, image_id)
    min_area = max(area_at_input_size(stuff_area, (h, w), original_size), 1.0)
    stuff_kept = torch.nonzero(areas[: meta.num_stuff] >= min_area).flatten()
    labels = torch.cat([torch.arange(channels + 1, bins, device=device), stuff_kept])  # in id order
    lut = torch.zeros(bins, dtype=torch.int32, device=device)
    lut[labels] = torch.arange(1, labels.numel() + 1, dtype=torch.int32, device=device)
    # pixels of things and of kept stuff classes get their segment id; the rest (small stuff, the
    # "things" class where no instance is) stays void
    panoptic = lut.index_select(0, work.reshape(-1)).reshape(h, w)

    # `work` is a valid stuff key: stuff classes are 0..S-1, every other value is >= S
    stuff_score_list = (
        stuff_mean_probs(raw.sem_logits, work, meta.num_stuff)[stuff_kept].tolist()
        if stuff_scores and stuff_kept.numel()
        else [1.0] * stuff_kept.numel()
    )
    kinds = [(True, t, score) for t, score in things] + [
        (False, k, score) for k, score in zip(stuff_kept.tolist(), stuff_score_list, strict=True)
    ]
    stats = zip(areas[labels].tolist(), bboxes[labels].tolist(), strict=True)
    segments = [
        SegmentInfo(
            id=segment_id,
            category_id=meta.thing_dataset_id(index) if isthing else meta.stuff_dataset_id(index),
            isthing=isthing,
            area=int(area),
            bbox=(bx, by, bw, bh),
            score=score,
        )
        for segment_id, ((isthing, index, score), (area, (bx, by, bw, bh))) in enumerate(
            zip(kinds, stats, strict=True), start=1
        )
    ]
    return PanopticResult(panoptic=panoptic, segments=segments, image_id=image_id, raw=raw)
