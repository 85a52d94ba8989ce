"""Box fill: the step that SpatialFlow's released fusion adds after the heuristic fusion.

The authors' `combine_to_panoptic` (their released code; the paper does not mention the step)
runs, with `using_bbox=True` and `bbox_overlap_thr=0.5`, after the things and stuff passes of the
heuristic fusion: for each detection with score >= the instance threshold, in descending score
order, the pixels of its box [int(x0), int(x1)) x [int(y0), int(y1)) that are still void join the
detection's segment when they make up at least `thresh` of the box, or a new segment of its class
when the things pass skipped the detection. Void pixels are those no thing and no kept stuff
segment took ("other" / thing-class semantic pixels outside every mask, small stuff remainders,
empty pixels of an instance's box).

Two differences from the released code, both for a valid panoptic file: a box without area is
skipped (the released code divides by zero), and a box with no void pixel is skipped (it would
write a segment without pixels); areas and bboxes are recomputed from the final map.

`heuristic_fusion_box_fill` composes `heuristic_fusion` with `box_fill`; with `box_fill_thresh`
0 it is exactly `heuristic_fusion`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from unipan.fusion.heuristic import heuristic_fusion
from unipan.segments import with_stats
from unipan.structures import VOID_ID, DatasetMeta, PanopticResult, RawPrediction, SegmentInfo

__all__ = ["box_fill", "heuristic_fusion_box_fill"]


def box_fill(
    result: PanopticResult,
    boxes: Tensor,
    labels: Tensor,
    scores: Tensor,
    segment_ids: Sequence[int],
    meta: DatasetMeta,
    thresh: float,
) -> PanopticResult:
    """Fill the still-void pixels of each detection's box (see the module docstring).

    Args:
        result: a fused result; its map is modified in a copy.
        boxes: FloatTensor[N, 4] xyxy in the pixels of `result.panoptic`, in the order to fill
            (descending score).
        labels: LongTensor[N] thing index of each detection.
        scores: FloatTensor[N] detection scores (of new segments).
        segment_ids: per detection the id of the segment it made in `result`, 0 when it made none.
        meta: the dataset's classes.
        thresh: the minimum fraction of the box that must be void (0.5 in the released configs).

    Returns:
        A new PanopticResult: filled pixels carry the detection's segment id; new segments follow
        the existing ones; segments without pixels are dropped, areas and bboxes recomputed.

    Raises:
        ValueError: when the detections' fields disagree in length.
    """
    n = int(boxes.shape[0])
    if labels.shape != (n,) or scores.shape != (n,) or len(segment_ids) != n or boxes.shape != (n, 4):
        raise ValueError(
            f"box fill: {n} boxes but labels {tuple(labels.shape)}, scores {tuple(scores.shape)} and "
            f"{len(segment_ids)} segment ids"
        )
    panoptic = result.panoptic.clone()
    h, w = panoptic.shape
    segments = list(result.segments)
    next_id = max((s.id for s in segments), default=VOID_ID) + 1
    # int() truncates like the released code; the boxes are non-negative after clipping
    corners = boxes.detach().to("cpu", torch.float64).floor().long().tolist()
    for (x0, y0, x1, y1), thing_index, score, seg_id in zip(
        corners, labels.tolist(), scores.tolist(), segment_ids, strict=True
    ):
        x0, x1 = max(x0, 0), min(x1, w)
        y0, y1 = max(y0, 0), min(y1, h)
        area = (x1 - x0) * (y1 - y0)
        if x1 <= x0 or y1 <= y0:
            continue
        window = panoptic[y0:y1, x0:x1]
        void = window == VOID_ID
        n_void = int(torch.count_nonzero(void))
        if n_void == 0 or n_void < thresh * area:
            continue
        if not seg_id:
            seg_id = next_id
            next_id += 1
            segments.append(
                SegmentInfo(
                    id=seg_id, category_id=meta.thing_dataset_id(int(thing_index)), isthing=True, score=float(score)
                )
            )
        window.masked_fill_(void, seg_id)
    updated = PanopticResult(panoptic=panoptic, segments=segments, image_id=result.image_id, raw=result.raw)
    return with_stats(updated, panoptic)


def heuristic_fusion_box_fill(
    raw: RawPrediction,
    meta: DatasetMeta,
    *,
    box_fill_thresh: float = 0.0,
    instance_score_thresh: float = 0.5,
    image_id: str = "",
    **heuristic: Any,
) -> PanopticResult:
    """`heuristic_fusion`, then `box_fill` of the detections it considered (SpatialFlow's fusion).

    Args:
        raw: the network's prediction at input size (h, w) (see `heuristic_fusion`).
        meta: the dataset's classes.
        box_fill_thresh: the void fraction of a box that box fill needs; 0 switches box fill off
            (the result is then exactly `heuristic_fusion`'s).
        instance_score_thresh: instances (and boxes) scoring below this are dropped.
        image_id: stored in the result and named in errors.
        **heuristic: the other keywords of `heuristic_fusion`, passed on (SpatialFlow COCO:
            overlap_thresh 0.37, mask_thresh 0.5, stuff_area 4900), `original_size` included: the
            heuristic measures its pixel thresholds there, and box fill works on whatever map it
            returns, with the boxes scaled to it (its threshold is a fraction, so scale-free).

    Returns:
        PanopticResult as `heuristic_fusion`'s, `raw` kept.

    Raises:
        ValueError: for a box fill threshold outside [0, 1], or what `heuristic_fusion` raises.
    """
    if not 0.0 <= box_fill_thresh <= 1.0:
        raise ValueError(f"fusion.box_fill_thresh must lie in [0, 1] (0 = off), got {box_fill_thresh}")
    if box_fill_thresh <= 0.0 or len(raw) == 0:
        return heuristic_fusion(raw, meta, instance_score_thresh=instance_score_thresh, image_id=image_id, **heuristic)

    # The instances the heuristic considers, in its order (descending score, ties in input order).
    scores_sorted, order = torch.sort(raw.scores, descending=True, stable=True)
    order = order[: int((scores_sorted >= instance_score_thresh).sum())]
    k = int(order.numel())
    # `heuristic_fusion` does not say which instance made which thing segment, but it copies each
    # instance's score into its segment: given the ranks K..1 as scores (same order, all above
    # the threshold), the score of a thing segment names its instance.
    ranked = dataclasses.replace(
        raw,
        boxes=raw.boxes[order],
        labels=raw.labels[order],
        scores=torch.arange(k, 0, -1, dtype=torch.float64).to(raw.scores.device, torch.float32),
        mask_probs=None if raw.mask_probs is None else raw.mask_probs[order],
        masks=None if raw.masks is None else raw.masks[order],
        mask_crops=None if raw.mask_crops is None else [raw.mask_crops[i] for i in order.tolist()],
    )
    fused = heuristic_fusion(ranked, meta, instance_score_thresh=0.5, image_id=image_id, **heuristic)
    true_scores = raw.scores[order].tolist()
    segment_ids = [0] * k
    segments: list[SegmentInfo] = []
    for s in fused.segments:
        if s.isthing:
            rank = k - round(s.score)
            segment_ids[rank] = s.id
            s = dataclasses.replace(s, score=float(true_scores[rank]))
        segments.append(s)
    fused = PanopticResult(panoptic=fused.panoptic, segments=segments, image_id=fused.image_id, raw=raw)

    # boxes in the pixels of the fused map (the input size, or the original size when the fusion
    # works there)
    h, w = (int(v) for v in raw.sem_logits.shape[-2:])
    out_h, out_w = fused.image_size
    boxes = ranked.boxes.detach().float()
    if (out_h, out_w) != (h, w):
        scale = torch.tensor([out_w / w, out_h / h, out_w / w, out_h / h], dtype=boxes.dtype, device=boxes.device)
        boxes = boxes * scale
    return box_fill(fused, boxes, ranked.labels, raw.scores[order], segment_ids, meta, box_fill_thresh)
