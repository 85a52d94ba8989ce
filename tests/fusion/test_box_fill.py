"""Box fill (SpatialFlow's released fusion step) by hand, and its composition with the heuristic fusion."""

from __future__ import annotations

import pytest
import torch

from unipan.fusion.box_fill import box_fill, heuristic_fusion_box_fill
from unipan.fusion.heuristic import heuristic_fusion
from unipan.structures import DatasetMeta, PanopticResult, RawPrediction, SegmentInfo

# 2 things (dataset ids 1, 2), 2 stuff (ids 3, 4)
META = DatasetMeta([{"id": i + 1, "name": f"c{i}", "isthing": int(i < 2)} for i in range(4)])


def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y1]


def hand_result() -> PanopticResult:
    """10 x 10: thing segment 1 in rows 0-1, stuff segment 2 in rows 8-9, void between."""
    panoptic = torch.zeros(10, 10, dtype=torch.int32)
    panoptic[0:2, 0:4] = 1
    panoptic[8:10] = 2
    segments = [SegmentInfo(1, 1, True, area=8, bbox=(0, 0, 4, 2), score=0.9), SegmentInfo(2, 3, False, area=20)]
    return PanopticResult(panoptic=panoptic, segments=segments, image_id="hand")


def test_box_fill_by_hand() -> None:
    result = hand_result()
    boxes = torch.tensor(
        [
            box(0, 0, 4, 4),  # det 0 (segment 1): 8 of 16 pixels void -> exactly 0.5: filled into segment 1
            box(5.9, 0.7, 9.99, 4.2),  # det 1 (skipped): truncated to x 5..9, y 0..4 (16 px, all void) -> new segment
            box(0, 6, 10, 10),  # det 2 (skipped): 20 of 40 void -> filled, but only its void pixels
            box(3, 5, 3, 9),  # det 3: no area -> skipped, no error
            box(0, 8, 10, 10),  # det 4 (skipped): no void pixel -> no segment
            box(0, 4, 10, 8.0),  # det 5 (segment 1): 20 of 40 void left after det 2 -> filled
        ]
    )
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    out = box_fill(result, boxes, labels, scores, [1, 0, 0, 0, 0, 1], META, 0.5)
    expected = torch.zeros(10, 10, dtype=torch.int32)
    expected[0:4, 0:4] = 1
    expected[0:4, 5:9] = 3
    expected[6:8, :] = 4
    expected[8:10] = 2
    expected[4:6, :] = 1
    assert torch.equal(out.panoptic, expected)
    assert torch.equal(result.panoptic, hand_result().panoptic)  # the input is left alone
    by_id = {s.id: s for s in out.segments}
    assert sorted(by_id) == [1, 2, 3, 4]
    assert (by_id[1].area, by_id[1].bbox) == (36, (0, 0, 10, 6))
    assert (by_id[3].category_id, by_id[3].isthing, by_id[3].score, by_id[3].area) == (2, True, pytest.approx(0.8), 16)
    assert (by_id[4].category_id, by_id[4].score, by_id[4].area, by_id[4].bbox) == (
        1,
        pytest.approx(0.7),
        20,
        (0, 6, 10, 2),
    )
    assert by_id[2].area == 20 and not by_id[2].isthing
    for s in out.segments:
        assert s.area == int((out.panoptic == s.id).sum())


def test_box_fill_threshold_is_inclusive_and_below_it_nothing_changes() -> None:
    result = hand_result()
    half = torch.tensor([box(0, 0, 4, 4)])
    grown = box_fill(result, half, torch.tensor([0]), torch.tensor([0.9]), [1], META, 0.5)
    assert int((grown.panoptic == 1).sum()) == 16
    kept = box_fill(result, half, torch.tensor([0]), torch.tensor([0.9]), [1], META, 0.51)
    assert torch.equal(kept.panoptic, result.panoptic)


def raw_with_masks(
    masks: torch.Tensor, boxes: list[list[float]], labels: list[int], scores: list[float]
) -> RawPrediction:
    h, w = masks.shape[-2:]
    sem_logits = torch.zeros(META.num_stuff + 1, h, w)
    sem_logits[META.num_stuff] = 5.0  # "other" everywhere: no stuff segment, void outside the things
    return RawPrediction(
        boxes=torch.tensor(boxes),
        scores=torch.tensor(scores),
        labels=torch.tensor(labels),
        sem_logits=sem_logits,
        masks=masks,
    )


def test_composition_maps_each_instance_to_its_own_segment() -> None:
    """Two instances of one class and one score: the first is skipped, the second kept; each box
    fills the right segment (a map from segment score or class alone would swap them)."""
    masks = torch.zeros(3, 20, 20, dtype=torch.bool)
    masks[0, 0:10, 0:10] = True  # H: score 0.9
    masks[1, 5:9, 5:9] = True  # X: inside H -> skipped by the overlap rule
    masks[2, 0:4, 14:17] = True  # Y: kept, 12 px
    raw = raw_with_masks(masks, [box(0, 0, 10, 10), box(5, 5, 19, 19), box(14, 0, 20, 4)], [0, 1, 1], [0.9, 0.8, 0.8])
    settings = {"instance_score_thresh": 0.5, "overlap_thresh": 0.5, "stuff_area": 0}
    plain = heuristic_fusion(raw, META, **settings)  # type: ignore[arg-type]
    off = heuristic_fusion_box_fill(raw, META, box_fill_thresh=0.0, **settings)  # type: ignore[arg-type]
    assert torch.equal(off.panoptic, plain.panoptic) and off.segments == plain.segments
    assert [(s.id, s.area) for s in plain.segments] == [(1, 100), (2, 12)]

    out = heuristic_fusion_box_fill(raw, META, box_fill_thresh=0.5, image_id="x", **settings)  # type: ignore[arg-type]
    by_id = {s.id: s for s in out.segments}
    assert (by_id[1].area, by_id[1].score) == (100, pytest.approx(0.9))
    # Y's box: 12 of 24 pixels void -> joins Y's segment
    assert (by_id[2].area, by_id[2].category_id, by_id[2].score) == (24, 2, pytest.approx(0.8))
    # X's box [5, 19)^2 minus H's pixels: 196 - 25 void -> a new segment of X's class
    assert (by_id[3].area, by_id[3].category_id, by_id[3].score) == (171, 2, pytest.approx(0.8))
    assert out.raw is raw and out.image_id == "x"
    assert torch.equal(out.panoptic[0:10, 0:10], plain.panoptic[0:10, 0:10])


def test_composition_scales_boxes_to_a_result_at_another_size() -> None:
    """When the heuristic returns a map at another size (the original image), boxes are scaled to it."""
    masks = torch.zeros(1, 10, 10, dtype=torch.bool)
    masks[0, 0:2, 0:4] = True
    raw = raw_with_masks(masks, [box(0, 0, 4, 4)], [0], [0.9])
    fused = heuristic_fusion(raw, META, instance_score_thresh=0.5, stuff_area=0)
    big = PanopticResult(
        panoptic=fused.panoptic.repeat_interleave(2, 0).repeat_interleave(2, 1), segments=fused.segments
    )
    out = box_fill(big, raw.boxes * 2, raw.labels, raw.scores, [1], META, 0.5)
    assert int((out.panoptic == 1).sum()) == 64
