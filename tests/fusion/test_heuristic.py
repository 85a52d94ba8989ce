"""Heuristic panoptic fusion and mask pasting: each rule by hand, a naive reference, and oracles.

The oracle: ground-truth instances (score 1) and one-hot ground-truth semantic logits through the
fusion must give back the ground truth, i.e. PQ 100, on real COCO-panoptic images with crowd and
void, and on the synthetic validation set.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tight_crops
from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste_masks_in_image

from unipan.fusion.heuristic import heuristic_fusion
from unipan.fusion.paste import (
    box_windows,
    iter_paste_masks_batched,
    paste_mask_in_box,
    paste_masks_in_boxes,
    paste_masks_in_image,
)
from unipan.fusion.settings import HeuristicFusionSettings
from unipan.io import read_id_png, write_id_png
from unipan.structures import (
    IGNORE_LABEL,
    DatasetMeta,
    PanopticResult,
    PanopticTarget,
    RawPrediction,
    SegmentInfo,
)

# Things and stuff interleaved, ids non-contiguous: thing index 0 = id 7, 1 = id 9; stuff index
# 0 = id 21, 1 = id 23. Code that mixes the id spaces gives wrong category ids here.
CATS = [
    {"id": 21, "name": "road", "isthing": 0},
    {"id": 7, "name": "car", "isthing": 1},
    {"id": 23, "name": "sky", "isthing": 0},
    {"id": 9, "name": "person", "isthing": 1},
]
META = DatasetMeta(CATS, name="toy")
S = META.num_stuff  # 2; the "things" channel of the stuff+things space is S
THINGS = S


# --- helpers ------------------------------------------------------------------------------------


def box_mask(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    m = torch.zeros((h, w), dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def one_hot_logits(sem: torch.Tensor, channels: int, scale: float = 20.0) -> torch.Tensor:
    """LongTensor[h, w] class map -> FloatTensor[C, h, w] logits whose argmax is `sem`."""
    return F.one_hot(sem, channels).permute(2, 0, 1).float() * scale


def raw_with_masks(
    masks: list[torch.Tensor],
    scores: list[float],
    labels: list[int],
    sem: torch.Tensor,
    sem_space: str = "stuff+things",
) -> RawPrediction:
    h, w = sem.shape
    channels = S + 1 if sem_space == "stuff+things" else S + META.num_things
    masks_t = torch.stack(masks) if masks else torch.zeros((0, h, w), dtype=torch.bool)
    return RawPrediction(
        boxes=torch.zeros((len(masks), 4)),
        scores=torch.tensor(scores, dtype=torch.float32),
        labels=torch.tensor(labels, dtype=torch.long),
        sem_logits=one_hot_logits(sem, channels),
        masks=masks_t,
        sem_space=sem_space,
    )


def check_segment_stats(result: PanopticResult) -> None:
    """area/bbox of every segment equal what the map holds; ids are 1..K; every id is listed."""
    ids = [s.id for s in result.segments]
    assert ids == list(range(1, len(ids) + 1))
    present = set(torch.unique(result.panoptic).tolist()) - {0}
    assert present == set(ids)
    for s in result.segments:
        m = result.panoptic == s.id
        ys, xs = torch.nonzero(m, as_tuple=True)
        assert s.area == int(m.sum())
        x0, y0 = int(xs.min()), int(ys.min())
        assert s.bbox == (x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0)


def reference_fusion(
    raw: RawPrediction,
    meta: DatasetMeta,
    *,
    instance_score_thresh: float = 0.5,
    overlap_thresh: float = 0.5,
    mask_thresh: float = 0.5,
    stuff_area: int = 4096,
) -> tuple[torch.Tensor, list[tuple[int, bool, float]]]:
    """Naive full-image fusion written straight from the rules (detectron2's combine function).

    Returns the id map and, per segment, (category_id, isthing, score).
    """
    h, w = raw.sem_logits.shape[-2:]
    if raw.masks is not None:
        full = raw.masks
    else:
        full = paste_masks_in_image(raw.mask_probs, raw.boxes, (h, w)) >= mask_thresh
    pan = torch.zeros((h, w), dtype=torch.int32)
    segs: list[tuple[int, bool, float]] = []
    order = sorted(range(len(raw)), key=lambda i: -float(raw.scores[i]))  # Python's sort is stable
    for i in order:
        score = float(raw.scores[i])
        if score < instance_score_thresh:
            break
        m = full[i]
        area = int(m.sum())
        if area == 0:
            continue
        if int((m & (pan > 0)).sum()) / area > overlap_thresh:
            continue
        segs.append((meta.thing_dataset_id(int(raw.labels[i])), True, score))
        pan[m & (pan == 0)] = len(segs)
    sem = raw.sem_pred if raw.sem_pred is not None else raw.sem_logits.argmax(0)
    for s in range(meta.num_stuff):
        m = (sem == s) & (pan == 0)
        if int(m.sum()) < max(stuff_area, 1):
            continue
        segs.append((meta.stuff_dataset_id(s), False, 1.0))
        pan[m] = len(segs)
    return pan, segs


# --- pasting ------------------------------------------------------------------------------------


def random_boxes(g: torch.Generator, n: int, h: int, w: int, max_side: float = 40.0) -> torch.Tensor:
    # some boxes stick out of the image, some are tiny (< 1 pixel)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 1.2, h * 1.2]) - torch.tensor([0.1 * w, 0.1 * h])
    wh = torch.rand(n, 2, generator=g) * max_side + 0.3
    return torch.cat([xy, xy + wh], dim=1)


def grid_sample_reference(masks: torch.Tensor, boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """detectron2's geometry over the full image in float64: grid_sample with zero padding."""
    x0, y0, x1, y1 = boxes.double().unbind(1)
    ys = torch.arange(h, dtype=torch.float64) + 0.5
    xs = torch.arange(w, dtype=torch.float64) + 0.5
    gy = (ys[None] - y0[:, None]) / (y1 - y0)[:, None] * 2 - 1
    gx = (xs[None] - x0[:, None]) / (x1 - x0)[:, None] * 2 - 1
    n = masks.shape[0]
    grid = torch.stack([gx[:, None, :].expand(n, h, w), gy[:, :, None].expand(n, h, w)], dim=-1)
    return F.grid_sample(masks[:, None].double(), grid, align_corners=False)[:, 0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paste_torchvision_mode_equals_torchvision(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    h, w = 50, 70
    boxes = random_boxes(g, 40, h, w)
    masks = torch.rand(40, 28, 28, generator=g)
    ours = paste_masks_in_image(masks, boxes, (h, w), mode="torchvision")
    n_crash = 0
    for i in range(40):
        try:
            theirs = tv_paste_masks_in_image(masks[i, None, None], boxes[i : i + 1], (h, w))[0, 0]
        except RuntimeError:
            # torchvision slices with negative indices for a box wholly outside the image and
            # raises; ours pastes nothing there
            n_crash += 1
            assert int(torch.count_nonzero(ours[i])) == 0
            continue
        # the same integer boxes and the same F.interpolate call: equal to the bit
        assert torch.equal(ours[i], theirs), i
    assert n_crash < 10


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paste_aligned_equals_grid_sample_reference(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    h, w = 50, 70
    boxes = random_boxes(g, 25, h, w, max_side=90.0)
    masks = torch.rand(25, 28, 28, generator=g)
    ref = grid_sample_reference(masks, boxes, h, w)
    ours = paste_masks_in_image(masks, boxes, (h, w))
    inside = torch.zeros((25, h, w), dtype=torch.bool)
    for i, (_, (y0, y1, x0, x1)) in enumerate(paste_masks_in_boxes(masks, boxes, (h, w))):
        inside[i, y0:y1, x0:x1] = True
    # separable float32 weights vs grid_sample in float64: rounding only
    assert (ours.double() - ref)[inside].abs().max() < 1e-5
    # outside the window (box + 1 pixel, detectron2's) the reference is below one half, so the
    # binary masks are the same
    assert ref[~inside].max() < 0.5
    assert torch.equal(ours >= 0.5, ref >= 0.5)


@pytest.mark.parametrize("outside", ["zero", "edge"])
def test_batched_paste_equals_the_per_box_paste(outside: str) -> None:
    """Grouped by window size and padded, each box's window holds its own paste and zeros beyond."""
    g = torch.Generator().manual_seed(5)
    h, w = 40, 56
    n = 30
    sides = torch.exp(torch.rand(n, 2, generator=g) * 3.5)  # 1..33 px, several size groups
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w + 10.0, h + 10.0]) - 5  # some cross the border
    boxes = torch.cat([xy, xy + sides], dim=1)
    boxes[3] = torch.tensor([70.0, 50.0, 80.0, 60.0])  # outside the image: empty window
    boxes[4] = torch.tensor([10.0, 10.0, 10.0, 20.0])  # degenerate
    masks = torch.rand(n, 7, 7, generator=g, dtype=torch.float64)
    single = paste_masks_in_boxes(masks, boxes, (h, w), outside=outside)  # type: ignore[arg-type]
    seen: list[int] = []
    groups = 0
    for index, pasted, windows in iter_paste_masks_batched(masks, boxes, (h, w), outside=outside):  # type: ignore[arg-type]
        groups += 1
        for j, i in enumerate(index.tolist()):
            values, window = single[i]
            assert tuple(windows[j].tolist()) == window
            y0, y1, x0, x1 = window
            torch.testing.assert_close(pasted[j, : y1 - y0, : x1 - x0], values, rtol=0, atol=1e-12)
            assert not pasted[j, y1 - y0 :].any() and not pasted[j, :, x1 - x0 :].any()
            seen.append(i)
    nonempty = [i for i, (_, (y0, y1, x0, x1)) in enumerate(single) if y1 > y0 and x1 > x0]
    assert sorted(seen) == nonempty and 3 not in seen and 4 not in seen
    assert groups > 1
    assert list(iter_paste_masks_batched(masks[:0], boxes[:0], (h, w))) == []


def test_paste_aligned_vs_torchvision_differ_only_by_snapping() -> None:
    """The two geometries agree on large boxes up to torchvision's integer snapping of the box.

    torchvision truncates the enlarged box to integer pixels, shifting the mask by up to one pixel
    and stretching it by up to (M + 2) / M pixels; the aligned paste keeps the float box. So the
    binary masks differ on a one- or two-pixel band along the boundary, not more.
    """
    g = torch.Generator().manual_seed(3)
    h, w = 200, 200
    xy = torch.rand(20, 2, generator=g) * 80
    boxes = torch.cat([xy, xy + 64 + torch.rand(20, 2, generator=g) * 50], dim=1)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="ij")
    blob = torch.sigmoid(8 * (0.7 - (yy**2 + xx**2).sqrt()))  # a smooth disc, like a real mask
    masks = blob.expand(20, 28, 28).contiguous()
    a = paste_masks_in_image(masks, boxes, (h, w)) >= 0.5
    t = paste_masks_in_image(masks, boxes, (h, w), mode="torchvision") >= 0.5
    iou = (a & t).flatten(1).sum(1) / (a | t).flatten(1).sum(1)
    assert iou.min() > 0.9
    assert not torch.equal(a, t)


def test_paste_single_equals_batched_and_edge_mode() -> None:
    g = torch.Generator().manual_seed(4)
    masks = torch.rand(3, 14, 14, generator=g)
    boxes = torch.tensor([[2.3, 4.1, 20.7, 15.2], [-5.0, -3.0, 8.0, 6.0], [10.0, 10.0, 10.0, 20.0]])
    batched = paste_masks_in_boxes(masks, boxes, (24, 30))
    for i in range(3):
        single, window = paste_mask_in_box(masks[i], boxes[i].tolist(), (24, 30))
        assert window == batched[i][1]
        assert torch.equal(single, batched[i][0])
    assert batched[2][0].numel() == 0  # a zero-width box pastes nothing
    # edge mode: a constant grid pastes exactly that constant, on the pixels whose centres lie
    # in the box ([2.3, 20.7) -> columns 2..20, [4.1, 15.2) -> rows 4..14)
    values, window = paste_mask_in_box(torch.full((14, 14), 3.0), boxes[0], (24, 30), outside="edge")
    assert window == (4, 15, 2, 21)
    assert torch.allclose(values, torch.full_like(values, 3.0))
    assert box_windows(boxes[:1], (24, 30), outside="edge").tolist() == [[4, 15, 2, 21]]


def test_paste_is_differentiable() -> None:
    # UPSNet pastes mask logits during training: gradients must reach the RoI grid
    g = torch.Generator().manual_seed(5)
    masks = torch.rand(2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor([[1.5, 2.0, 7.5, 8.0], [0.0, 0.0, 5.0, 4.0]], dtype=torch.float64)

    def f(m: torch.Tensor) -> torch.Tensor:
        return torch.cat([v.flatten() for v, _ in paste_masks_in_boxes(m, boxes, (9, 9), outside="edge")])

    assert torch.autograd.gradcheck(f, (masks,))


def test_paste_bad_input() -> None:
    with pytest.raises(ValueError, match="3 masks but 2 boxes"):
        paste_masks_in_boxes(torch.rand(3, 28, 28), torch.rand(2, 4), (10, 10))
    with pytest.raises(ValueError, match="non-finite"):
        paste_masks_in_boxes(torch.rand(1, 28, 28), torch.tensor([[0.0, 0.0, float("nan"), 3.0]]), (10, 10))
    with pytest.raises(ValueError, match="floating point"):
        paste_masks_in_boxes(torch.ones(1, 28, 28, dtype=torch.bool), torch.rand(1, 4), (10, 10))
    with pytest.raises(ValueError, match="mode"):
        paste_masks_in_boxes(torch.rand(1, 28, 28), torch.rand(1, 4), (10, 10), mode="nearest")  # type: ignore[arg-type]


# --- the rules, one by one ------------------------------------------------------------------------


def test_score_threshold_stops_at_first_low_score() -> None:
    h, w = 20, 20
    sem = torch.full((h, w), THINGS)
    masks = [box_mask(h, w, 0, 5, 0, 5), box_mask(h, w, 10, 15, 10, 15), box_mask(h, w, 0, 5, 10, 15)]
    raw = raw_with_masks(masks, [0.5, 0.49, 0.9], [0, 1, 1], sem)
    result = heuristic_fusion(raw, META, stuff_area=0)
    # 0.9 first, then 0.5 (kept: the threshold is inclusive); 0.49 dropped
    assert [(s.category_id, s.score) for s in result.segments] == [(9, pytest.approx(0.9)), (7, 0.5)]
    assert bool((result.panoptic[10:15, 10:15] == 0).all())
    check_segment_stats(result)
    raised = heuristic_fusion(raw, META, stuff_area=0, instance_score_thresh=0.95)
    assert raised.segments == [] and int(raised.panoptic.abs().sum()) == 0


def test_higher_score_wins_overlap_regardless_of_input_order() -> None:
    h, w = 20, 20
    sem = torch.full((h, w), THINGS)
    low = box_mask(h, w, 0, 10, 0, 10)  # 100 pixels
    high = box_mask(h, w, 6, 16, 6, 16)  # overlaps `low` on 16 pixels
    for masks, scores, labels in (([low, high], [0.6, 0.8], [0, 1]), ([high, low], [0.8, 0.6], [1, 0])):
        result = heuristic_fusion(raw_with_masks(masks, scores, labels, sem), META, stuff_area=0)
        first, second = result.segments
        assert (first.id, first.category_id, first.area) == (1, 9, 100)
        assert (second.id, second.category_id, second.area) == (2, 7, 84)  # its unassigned pixels
        assert bool((result.panoptic[6:10, 6:10] == 1).all())
        check_segment_stats(result)


def test_equal_scores_keep_input_order() -> None:
    h, w = 10, 10
    a, b = box_mask(h, w, 0, 6, 0, 6), box_mask(h, w, 3, 9, 3, 9)
    result = heuristic_fusion(
        raw_with_masks([a, b], [0.7, 0.7], [1, 0], torch.full((h, w), THINGS)), META, stuff_area=0
    )
    assert [s.category_id for s in result.segments] == [9, 7]


@pytest.mark.parametrize(
    ("overlap_rows", "kept"),
    [(6, False), (5, True), (4, True)],  # overlap 60 %, exactly 50 %, 40 % of the 100-pixel mask
)
def test_overlap_skip(overlap_rows: int, kept: bool) -> None:
    h, w = 30, 10
    sem = torch.full((h, w), THINGS)
    first = box_mask(h, w, 0, 10, 0, 10)
    second = box_mask(h, w, 10 - overlap_rows, 20 - overlap_rows, 0, 10)
    result = heuristic_fusion(raw_with_masks([first, second], [0.9, 0.8], [0, 1], sem), META, stuff_area=0)
    assert len(result.segments) == (2 if kept else 1)
    assert result.segments[0].area == 100  # the first instance is never touched by the second
    if kept:
        assert result.segments[1].area == 100 - overlap_rows * 10
        assert bool((result.panoptic[10 : 20 - overlap_rows] == 2).all())
    check_segment_stats(result)
    loose = heuristic_fusion(
        raw_with_masks([first, second], [0.9, 0.8], [0, 1], sem), META, stuff_area=0, overlap_thresh=0.7
    )
    assert len(loose.segments) == 2


def test_empty_masks_are_skipped_and_ids_stay_contiguous() -> None:
    h, w = 10, 10
    sem = torch.full((h, w), THINGS)
    masks = [box_mask(h, w, 0, 3, 0, 3), torch.zeros((h, w), dtype=torch.bool), box_mask(h, w, 5, 8, 5, 8)]
    result = heuristic_fusion(raw_with_masks(masks, [0.9, 0.8, 0.7], [0, 0, 1], sem), META, stuff_area=0)
    assert [(s.id, s.category_id) for s in result.segments] == [(1, 7), (2, 9)]
    check_segment_stats(result)


def test_stuff_area_threshold_counts_only_unassigned_pixels() -> None:
    h, w = 20, 20
    sem = torch.full((h, w), THINGS)
    sem[:, :10] = 0  # road: 200 pixels
    sem[:5, 10:] = 1  # sky: 50 pixels
    thing = box_mask(h, w, 0, 20, 0, 3)  # takes 60 road pixels -> 140 remain
    raw = raw_with_masks([thing], [0.9], [0], sem)
    for stuff_area, expect in (
        (140, [7, 21]),
        (141, [7]),
        (50, [7, 21, 23]),
        (51, [7, 21]),
        (0, [7, 21, 23]),
    ):
        result = heuristic_fusion(raw, META, stuff_area=stuff_area)
        assert [s.category_id for s in result.segments] == expect, stuff_area
        check_segment_stats(result)
    result = heuristic_fusion(raw, META, stuff_area=140)
    assert result.segments[1].area == 140 and result.segments[1].bbox == (3, 0, 7, 20)
    assert result.segments[1].score == 1.0
    assert bool((result.panoptic[:5, 10:] == 0).all())  # sky below the threshold stays void


def test_things_class_is_never_stuff() -> None:
    h, w = 16, 16
    sem = torch.zeros((h, w), dtype=torch.long)
    sem[4:12, 4:12] = THINGS  # predicted "things" with no instance there
    result = heuristic_fusion(raw_with_masks([], [], [], sem), META, stuff_area=0)
    assert [s.category_id for s in result.segments] == [21]
    assert bool((result.panoptic[4:12, 4:12] == 0).all()) and result.segments[0].area == 256 - 64
    # in the all-classes space, every thing class (>= S) is "things"
    sem_all = torch.zeros((h, w), dtype=torch.long)
    sem_all[:8] = S + 1  # thing class "person"
    sem_all[8:, :8] = 1  # sky
    result = heuristic_fusion(raw_with_masks([], [], [], sem_all, sem_space="all"), META, stuff_area=0)
    assert [(s.category_id, s.area) for s in result.segments] == [(21, 64), (23, 64)]
    assert bool((result.panoptic[:8] == 0).all())


def test_empty_prediction_and_no_instances() -> None:
    h, w = 12, 14
    result = heuristic_fusion(raw_with_masks([], [], [], torch.full((h, w), THINGS)), META, stuff_area=0)
    assert result.segments == [] and result.panoptic.shape == (h, w)
    assert result.panoptic.dtype == torch.int32 and int(result.panoptic.abs().sum()) == 0
    sem = torch.zeros((h, w), dtype=torch.long)
    sem[6:] = 1
    result = heuristic_fusion(raw_with_masks([], [], [], sem), META, stuff_area=10, image_id="img")
    assert [(s.id, s.category_id, s.isthing, s.area) for s in result.segments] == [
        (1, 21, False, 84),
        (2, 23, False, 84),
    ]
    assert result.image_id == "img" and result.raw is not None
    check_segment_stats(result)
    # instances below the score threshold only
    raw = raw_with_masks([box_mask(h, w, 0, 5, 0, 5)], [0.2], [0], sem)
    assert [s.category_id for s in heuristic_fusion(raw, META, stuff_area=10).segments] == [21, 23]


def test_sem_pred_is_used_when_given() -> None:
    h, w = 8, 8
    raw = raw_with_masks([], [], [], torch.zeros((h, w), dtype=torch.long))  # logits say road
    raw.sem_pred = torch.ones((h, w), dtype=torch.long)  # the model's argmax says sky
    assert [s.category_id for s in heuristic_fusion(raw, META, stuff_area=0).segments] == [23]
    assert raw.sem_pred.unique().tolist() == [1]  # not modified in place


def test_stuff_scores_are_mean_softmax_probabilities() -> None:
    g = torch.Generator().manual_seed(6)
    h, w = 16, 16
    logits = torch.randn(S + 1, h, w, generator=g) * 2
    thing = box_mask(h, w, 2, 9, 3, 12)
    raw = RawPrediction(
        boxes=torch.zeros((1, 4)),
        scores=torch.tensor([0.9]),
        labels=torch.tensor([1]),
        sem_logits=logits,
        masks=thing[None],
    )
    result = heuristic_fusion(raw, META, stuff_area=0, stuff_scores=True)
    probs = logits.softmax(0)
    stuff = [s for s in result.segments if not s.isthing]
    assert stuff
    for s in stuff:
        k = META.stuff_index(s.category_id)
        pixels = result.panoptic == s.id
        assert s.score == pytest.approx(float(probs[k][pixels].mean()), rel=1e-5)
    assert [s.score for s in heuristic_fusion(raw, META, stuff_area=0).segments if not s.isthing] == [1.0] * len(stuff)


@pytest.mark.parametrize("seed", range(6))
def test_windowed_fusion_equals_naive_reference(seed: int) -> None:
    """Random RoI masks pasted into random boxes: the same map and segments as the naive version."""
    g = torch.Generator().manual_seed(seed)
    h, w, n = 48, 64, 14
    boxes = random_boxes(g, n, h, w, max_side=30.0)
    # a smooth blob per instance plus noise, so that instances overlap by varying amounts
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="ij")
    radius = 0.4 + 0.6 * torch.rand(n, 1, 1, generator=g)
    mask_probs = torch.sigmoid(6 * (radius - (yy**2 + xx**2).sqrt())) + 0.2 * torch.rand(n, 28, 28, generator=g)
    scores = torch.rand(n, generator=g)
    scores[3] = scores[5]  # a tie
    coarse = torch.randint(S + 1, (h // 8, w // 8), generator=g)
    sem = coarse.repeat_interleave(8, 0).repeat_interleave(8, 1)
    raw = RawPrediction(
        boxes=boxes,
        scores=scores,
        labels=torch.randint(META.num_things, (n,), generator=g),
        sem_logits=one_hot_logits(sem, S + 1) + torch.rand(S + 1, h, w, generator=g),
        mask_probs=mask_probs.clamp(0, 1),
    )
    kwargs = {"instance_score_thresh": 0.3, "overlap_thresh": 0.5, "mask_thresh": 0.5, "stuff_area": 40}
    result = heuristic_fusion(raw, META, **kwargs)
    ref_map, ref_segs = reference_fusion(raw, META, **kwargs)
    assert torch.equal(result.panoptic, ref_map)
    assert [(s.category_id, s.isthing, s.score) for s in result.segments] == [
        (c, t, pytest.approx(sc)) for c, t, sc in ref_segs
    ]
    assert sum(s.isthing for s in result.segments) >= 3  # the case exercises the thing rules
    check_segment_stats(result)
    # the same prediction with the argmax handed over
    raw.sem_pred = raw.sem_logits.argmax(0)
    assert torch.equal(heuristic_fusion(raw, META, **kwargs).panoptic, ref_map)
    # full-image masks instead of RoI probabilities, or the same masks as crops on their tight
    # boxes (`mask_crops`), give the same result
    full = paste_masks_in_image(raw.mask_probs, raw.boxes, (h, w)) >= 0.5
    with_masks = dataclasses.replace(raw, masks=full, mask_probs=None)
    expected = heuristic_fusion(with_masks, META, **kwargs)
    tight, crops = tight_crops(full)
    cropped = dataclasses.replace(with_masks, boxes=tight, masks=None, mask_crops=crops)
    assert torch.equal(cropped.dense_masks(), full)
    got = heuristic_fusion(cropped, META, **kwargs)
    assert torch.equal(got.panoptic, expected.panoptic)
    assert [(s.category_id, s.score) for s in got.segments] == [(s.category_id, s.score) for s in expected.segments]
    # a crop that does not fill its box is named
    i = next(k for k, c in enumerate(crops) if c.numel())
    bad = dataclasses.replace(cropped, mask_crops=[*crops[:i], crops[i][:-1], *crops[i + 1 :]])
    with pytest.raises(ValueError, match=f"mask crop {i} of shape"):
        heuristic_fusion(bad, META, **kwargs)


def test_bad_boxes_are_reported() -> None:
    raw = RawPrediction(
        boxes=torch.tensor([[0.0, 0.0, 4.0, 4.0], [1.0, 1.0, float("inf"), 3.0]]),
        scores=torch.tensor([0.9, 0.8]),
        labels=torch.tensor([0, 1]),
        sem_logits=torch.zeros(S + 1, 8, 8),
        mask_probs=torch.ones(2, 28, 28),
    )
    with pytest.raises(ValueError, match=r"boxes \[1\] have non-finite coordinates"):
        heuristic_fusion(raw, META)


def test_fusion_bound_to_settings() -> None:
    """The settings' fields are exactly the fusion's keywords: a builder binds them with a partial."""
    settings = HeuristicFusionSettings(instance_score_thresh=0.3, overlap_thresh=0.2, mask_thresh=0.4, stuff_area=7)
    fuse = functools.partial(heuristic_fusion, **dataclasses.asdict(settings))
    assert fuse.keywords == {
        "instance_score_thresh": 0.3,
        "overlap_thresh": 0.2,
        "mask_thresh": 0.4,
        "stuff_area": 7,
    }
    sem = torch.zeros((4, 4), dtype=torch.long)
    sem[0, :2] = 1  # 2 sky pixels: below 7
    result = fuse(raw_with_masks([], [], [], sem), META, image_id="x")
    assert [s.category_id for s in result.segments] == [21] and result.image_id == "x"


def test_bad_inputs_name_the_image() -> None:
    h, w = 6, 6
    sem = torch.zeros((h, w), dtype=torch.long)
    good = raw_with_masks([box_mask(h, w, 0, 2, 0, 2)], [0.9], [1], sem)
    bad_channels = RawPrediction(**{**vars(good), "sem_logits": torch.zeros(5, h, w)})
    with pytest.raises(ValueError, match=r"image 'im1'.*5 channels, expected 3"):
        heuristic_fusion(bad_channels, META, image_id="im1")
    bad_label = RawPrediction(**{**vars(good), "labels": torch.tensor([2])})
    with pytest.raises(ValueError, match=r"image 'im2'.*labels 2..2 outside thing indices 0..1"):
        heuristic_fusion(bad_label, META, image_id="im2")
    bad_pred = RawPrediction(**{**vars(good), "sem_pred": torch.full((h, w), 3)})
    with pytest.raises(ValueError, match=r"image 'im3'.*sem_pred values 3..3 outside 0..2"):
        heuristic_fusion(bad_pred, META, image_id="im3")
    for value in (-1, 4, 100):  # 4 = C + 1 is the bin of the first thing segment
        sem_pred = torch.zeros((h, w), dtype=torch.long)
        sem_pred[5, 5] = value  # a free pixel (the instance covers rows 0..1)
        with pytest.raises(ValueError, match=rf"image 'im3'.*sem_pred values {min(value, 0)}..{max(value, 0)}"):
            heuristic_fusion(RawPrediction(**{**vars(good), "sem_pred": sem_pred}), META, image_id="im3")
    bad_masks = RawPrediction(**{**vars(good), "masks": torch.zeros((1, h, w + 1), dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"image 'im4'.*masks has shape"):
        heuristic_fusion(bad_masks, META, image_id="im4")
    no_masks = RawPrediction(**{**vars(good), "masks": None})
    with pytest.raises(ValueError, match="neither masks nor mask_probs"):
        heuristic_fusion(no_masks, META, image_id="im5")
    with pytest.raises(ValueError, match="sem_space"):
        heuristic_fusion(RawPrediction(**{**vars(good), "sem_space": "things"}), META)


# --- oracles: ground truth in, PQ 100 out ---------------------------------------------------------


def oracle_prediction(target: PanopticTarget, meta: DatasetMeta) -> RawPrediction:
    """GT instances (score 1) and one-hot GT semantics in the stuff+things space.

    Stuff pixels carry their stuff index, non-crowd thing pixels the "things" channel. Void and
    crowd pixels (IGNORE_LABEL in sem_seg) carry the "things" channel too: no instance covers them
    and the fusion never turns "things" into stuff, so they come out void. That is what PQ 100
    needs: panopticapi does not count predicted void, a GT crowd region is never a false negative,
    and a stuff class spread over void or crowd pixels would enlarge that segment (crowd pixels
    count in its IoU union).
    """
    s = meta.num_stuff
    sem = target.sem_seg.clone()
    sem[(sem >= s) | (sem == IGNORE_LABEL)] = s
    n = len(target)
    return RawPrediction(
        boxes=target.boxes,
        scores=torch.ones(n),
        labels=target.labels,
        sem_logits=one_hot_logits(sem, s + 1, scale=30.0),
        masks=target.masks,
    )


def assert_equals_ground_truth(result: PanopticResult, target: PanopticTarget) -> None:
    """The fused map is the GT up to relabelling, with void and crowd pixels void."""
    pred, gt = result.panoptic, target.panoptic
    ignored = (gt == 0) | target.crowd
    assert int(pred[ignored].abs().sum()) == 0
    keys = torch.unique(gt[~ignored].long() * 2**24 + pred[~ignored].long())  # ids are < 2**24
    pairs = torch.stack([keys // 2**24, keys % 2**24], dim=1).tolist()
    gt_to_pred = dict(pairs)
    assert len(gt_to_pred) == len(pairs), "a GT segment is split over several predicted segments"
    assert len(set(gt_to_pred.values())) == len(pairs), "predicted segments merge GT segments"
    gt_segs = {s.id: s for s in target.segments}
    pred_segs = {s.id: s for s in result.segments}
    for gt_id, pred_id in gt_to_pred.items():
        assert pred_id != 0, f"GT segment {gt_id} got no prediction"
        g, p = gt_segs[gt_id], pred_segs[pred_id]
        assert (p.category_id, p.isthing, p.area, p.bbox) == (g.category_id, g.isthing, g.area, g.bbox)
    assert len(result.segments) == len(gt_to_pred)


def pq_of(result: PanopticResult, target: PanopticTarget, meta: DatasetMeta) -> float:
    from unipan.evaluation.pq import PQResult, pq_compute_single

    stat = pq_compute_single(target.panoptic, target.segments, result.panoptic, result.segments, meta, target.image_id)
    return PQResult.from_stat(stat, meta).pq


def official_pq(tmp: Path, items: list[tuple[PanopticResult, PanopticTarget]], categories: list[dict]) -> float:
    """PQ by cocodataset/panopticapi's own per-image code over PNG + JSON files."""
    evaluation = pytest.importorskip("panopticapi.evaluation")
    gt_dir, pred_dir = tmp / "gt", tmp / "pred"
    matched = []
    for result, target in items:
        name = f"{target.image_id}.png"
        write_id_png(gt_dir / name, target.panoptic.numpy())
        write_id_png(pred_dir / name, result.panoptic.numpy())
        gt_ann = {
            "image_id": target.image_id,
            "file_name": name,
            "segments_info": [{**s.to_coco_dict(), "area": s.area} for s in target.segments],
        }
        pred_ann = {
            "image_id": target.image_id,
            "file_name": name,
            "segments_info": [s.to_coco_dict() for s in result.segments],
        }
        matched.append((gt_ann, pred_ann))
    cats = {c["id"]: c for c in categories}
    stat = evaluation.pq_compute_single_core(0, matched, str(gt_dir), str(pred_dir), cats)
    return float(stat.pq_average(cats, isthing=None)[0]["pq"])


def test_oracle_coco_fixture(shared_data: Path, tmp_path: Path) -> None:
    root = shared_data / "panopticapi" / "sample_data"
    gt_json = json.loads((root / "panoptic_examples.json").read_text())
    meta = DatasetMeta(gt_json["categories"], name="coco")
    items = []
    n_crowd = n_void = 0
    for ann in gt_json["annotations"]:
        ids = read_id_png(root / "panoptic_examples" / ann["file_name"])
        segments = [
            SegmentInfo(
                id=s["id"],
                category_id=s["category_id"],
                isthing=meta.isthing(s["category_id"]),
                iscrowd=bool(s["iscrowd"]),
                area=s["area"],
            )
            for s in ann["segments_info"]
        ]
        target = PanopticTarget.from_panoptic(torch.from_numpy(ids), segments, meta, image_id=str(ann["image_id"]))
        n_crowd += int(target.crowd.any())
        n_void += int((target.panoptic == 0).any())
        result = heuristic_fusion(oracle_prediction(target, meta), meta, stuff_area=0, image_id=target.image_id)
        assert_equals_ground_truth(result, target)
        check_segment_stats(result)
        items.append((result, target))
    assert n_crowd == 2 and n_void == 2  # the fixture exercises both
    assert official_pq(tmp_path, items, gt_json["categories"]) == 1.0
    try:
        import unipan.evaluation.pq  # noqa: F401
    except ImportError:
        pytest.skip("unipan.evaluation.pq not available yet; checked against panopticapi only")
    for result, target in items:
        assert pq_of(result, target, meta) == 1.0


def test_oracle_synthetic_val(tmp_path: Path) -> None:
    synthetic = pytest.importorskip("unipan.data.synthetic", reason="synthetic data generator not available yet")
    opts = synthetic.SynthOptions(size=(96, 128), crowd_prob=0.5, void_border=3, void_outline=0.5)
    dataset = synthetic.SyntheticPanoptic(8, seed=0, opts=opts, split="val")
    items = []
    for i in range(len(dataset)):
        target = dataset[i].target
        result = heuristic_fusion(oracle_prediction(target, dataset.meta), dataset.meta, stuff_area=0)
        assert_equals_ground_truth(result, target)
        items.append((result, target))
    assert any(bool(t.crowd.any()) for _, t in items) and all(bool((t.panoptic == 0).any()) for _, t in items)
    assert sum(len(t) for _, t in items) >= 16
    assert official_pq(tmp_path, items, dataset.meta.to_coco_categories()) == 1.0
    try:
        import unipan.evaluation.pq  # noqa: F401
    except ImportError:
        pytest.skip("unipan.evaluation.pq not available yet; checked against panopticapi only")
    for result, target in items:
        assert pq_of(result, target, dataset.meta) == 1.0


def test_oracle_breaks_when_an_instance_is_missing(shared_data: Path) -> None:
    """The oracle check can fail: dropping one GT instance loses PQ and the equality."""
    pytest.importorskip("unipan.evaluation.pq")
    root = shared_data / "panopticapi" / "sample_data"
    gt_json = json.loads((root / "panoptic_examples.json").read_text())
    meta = DatasetMeta(gt_json["categories"])
    ann = gt_json["annotations"][0]
    ids = torch.from_numpy(read_id_png(root / "panoptic_examples" / ann["file_name"]))
    segments = [
        SegmentInfo(s["id"], s["category_id"], meta.isthing(s["category_id"]), bool(s["iscrowd"]), s["area"])
        for s in ann["segments_info"]
    ]
    target = PanopticTarget.from_panoptic(ids, segments, meta, image_id="142238")
    raw = oracle_prediction(target, meta)
    raw.scores[0] = 0.1  # below the score threshold
    result = heuristic_fusion(raw, meta, stuff_area=0)
    assert pq_of(result, target, meta) < 1.0
    with pytest.raises(AssertionError):
        assert_equals_ground_truth(result, target)


def test_benchmark_inputs_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark's input maker and the fusion agree on a small version of its setting."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "fusion_speed.py"
    monkeypatch.syspath_prepend(str(path.parent))  # as when run as a script: `_common` beside it
    spec = importlib.util.spec_from_file_location("fusion_speed", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    meta = bench.bench_meta()
    raw = bench.make_prediction(meta, (128, 256), 20, seed=0)
    result = heuristic_fusion(raw, meta, stuff_area=64)
    ref_map, _ = reference_fusion(raw, meta, stuff_area=64)
    assert torch.equal(result.panoptic, ref_map)
    assert np.count_nonzero(result.panoptic.numpy()) > 0
