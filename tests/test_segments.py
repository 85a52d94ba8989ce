"""unipan.segments: segment statistics against a naive loop, class spaces, result geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from unipan.segments import (
    crop_result,
    label_stats,
    nearest_source_index,
    resize_result,
    segment_stats,
    semantic_argmax,
    semantic_channels,
    stuff_mean_probs,
    to_semantic_space,
    with_stats,
)
from unipan.structures import IGNORE_LABEL, DatasetMeta, PanopticResult, PanopticTarget, SegmentInfo

META = DatasetMeta(
    [
        {"id": 21, "name": "road", "isthing": 0},
        {"id": 7, "name": "car", "isthing": 1},
        {"id": 23, "name": "sky", "isthing": 0},
        {"id": 9, "name": "person", "isthing": 1},
        {"id": 30, "name": "bus", "isthing": 1},
    ],
    name="toy",
)


def naive_stats(id_map: np.ndarray, ids: list[int]) -> tuple[list[int], list[list[int]]]:
    """Area and (x, y, w, h) of each id by a full-image comparison per segment."""
    areas, bboxes = [], []
    for seg_id in ids:
        ys, xs = np.nonzero(id_map == seg_id)
        areas.append(len(ys))
        if len(ys):
            bboxes.append([int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)])
        else:
            bboxes.append([0, 0, 0, 0])
    return areas, bboxes


# --- statistics ------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    arrays(np.int32, st.tuples(st.integers(1, 14), st.integers(1, 14)), elements=st.integers(0, 5)),
    st.sampled_from([1, 1000, 5_000_000]),
    st.booleans(),
)
def test_segment_stats_match_naive_loop(small: np.ndarray, scale: int, extra_id: bool) -> None:
    """Small ids (table lookup) and large ids (binary search), listed in any order, some absent."""
    id_map = small.astype(np.int64) * scale
    ids = sorted(set(np.unique(id_map).tolist()) - {0}, reverse=True)
    if extra_id:
        ids.append(77 * scale + 3)  # listed, absent from the map
    areas, bboxes = segment_stats(torch.from_numpy(id_map), ids)
    assert (areas.tolist(), bboxes.tolist()) == naive_stats(id_map, ids)
    areas32, bboxes32 = segment_stats(torch.from_numpy(id_map.astype(np.int32)), torch.tensor(ids))
    assert torch.equal(areas32, areas) and torch.equal(bboxes32, bboxes)


def test_segment_stats_on_a_large_realistic_map() -> None:
    g = np.random.default_rng(0)
    id_map = np.repeat(np.arange(1, 9, dtype=np.int32), 32)[:, None].repeat(300, axis=1) * 1000
    for k in range(60):  # overlapping rectangles with COCO-sized ids
        y, x = g.integers(0, 256), g.integers(0, 300)
        id_map[y : y + g.integers(1, 80), x : x + g.integers(1, 120)] = 4_000_000 + 997 * k
    id_map[g.random(id_map.shape) < 0.05] = 0
    ids = sorted(set(np.unique(id_map).tolist()) - {0})
    areas, bboxes = segment_stats(torch.from_numpy(id_map), ids)
    assert (areas.tolist(), bboxes.tolist()) == naive_stats(id_map, ids)


def test_segment_stats_errors() -> None:
    pan = torch.zeros((5, 7), dtype=torch.int32)
    pan[1:3, 2:6] = 1000
    pan[4, 0] = 5
    areas, bboxes = segment_stats(pan, [5, 1000, 77])
    assert areas.tolist() == [1, 8, 0]
    assert bboxes.tolist() == [[0, 4, 1, 1], [2, 1, 4, 2], [0, 0, 0, 0]]
    with pytest.raises(ValueError, match=r"segment ids \[5\] that have no segment info"):
        segment_stats(pan, [1000])
    with pytest.raises(ValueError, match=r"segment ids \[5, 1000\] that have no segment info"):
        segment_stats(pan, [])
    big = pan * 10_000  # ids beyond the lookup table: the binary search reports them the same way
    with pytest.raises(ValueError, match=r"segment ids \[50000\] that have no segment info"):
        segment_stats(big, [10_000_000])
    with pytest.raises(ValueError, match="repeat"):
        segment_stats(pan, [5, 5, 1000])
    with pytest.raises(ValueError, match="void"):
        segment_stats(pan, [0, 5, 1000])
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        segment_stats(pan[None], [5, 1000])
    empty_areas, empty_boxes = segment_stats(torch.zeros((0, 4), dtype=torch.int32), [3])
    assert empty_areas.tolist() == [0] and empty_boxes.tolist() == [[0, 0, 0, 0]]


def test_label_stats_counts_every_label() -> None:
    labels = torch.tensor([[0, 0, 2], [3, 3, 2]])
    areas, bboxes = label_stats(labels, 5)
    assert areas.tolist() == [2, 0, 2, 2, 0]
    assert bboxes.tolist() == [[0, 0, 2, 1], [0, 0, 0, 0], [2, 0, 1, 2], [0, 1, 2, 1], [0, 0, 0, 0]]
    assert label_stats(torch.zeros((0, 3), dtype=torch.long), 2)[0].tolist() == [0, 0]


def test_label_stats_equal_a_naive_per_label_pass() -> None:
    g = torch.Generator().manual_seed(0)
    for h, w, bins in [(1, 1, 1), (7, 13, 6), (40, 33, 30), (64, 64, 3)]:
        labels = torch.randint(0, bins, (h, w), generator=g)
        labels[: h // 2, : w // 3] = 0  # a block, so that extents differ from the whole map
        areas, bboxes = label_stats(labels.int(), bins + 2)  # two labels without pixels
        for k in range(bins + 2):
            ys, xs = torch.nonzero(labels == k, as_tuple=True)
            assert int(areas[k]) == ys.numel()
            want = [0, 0, 0, 0]
            if ys.numel():
                x0, y0 = int(xs.min()), int(ys.min())
                want = [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0]
            assert bboxes[k].tolist() == want, (h, w, k)


def test_target_stats_equal_segment_stats() -> None:
    """`PanopticTarget.from_panoptic` and `segment_stats` share one kernel and agree."""
    pan = torch.zeros((6, 8), dtype=torch.int32)
    pan[:3] = 500
    pan[3:, :5] = 600
    pan[1:5, 2:4] = 70_000
    pan[5, 7] = 80_000
    segments = [
        SegmentInfo(500, 21, False),
        SegmentInfo(600, 23, False),
        SegmentInfo(70_000, 7, True),
        SegmentInfo(80_000, 9, True, iscrowd=True),
        SegmentInfo(90_000, 30, True),  # no pixels: dropped
    ]
    target = PanopticTarget.from_panoptic(pan, segments, META)
    ids = [s.id for s in target.segments]
    areas, bboxes = segment_stats(pan, ids)
    assert [(s.area, list(s.bbox)) for s in target.segments] == list(zip(areas.tolist(), bboxes.tolist(), strict=True))
    assert ids == [500, 600, 70_000, 80_000]
    assert target.boxes.tolist() == [[2.0, 1.0, 4.0, 5.0]]


def test_instance_index_map() -> None:
    pan = torch.zeros((4, 5), dtype=torch.int32)
    pan[:2, :2] = 3
    pan[2:, 3:] = 4
    pan[0, 4] = 5
    segments = [SegmentInfo(3, 7, True), SegmentInfo(4, 9, True), SegmentInfo(5, 30, True, iscrowd=True)]
    target = PanopticTarget.from_panoptic(pan, segments, META)
    imap = target.instance_index_map()
    assert imap.dtype == torch.long
    assert imap.tolist() == [[0, 0, -1, -1, -1], [0, 0, -1, -1, -1], [-1, -1, -1, 1, 1], [-1, -1, -1, 1, 1]]


def test_with_stats_drops_vanished_segments_and_keeps_fields() -> None:
    pan = torch.tensor([[1, 1, 0], [2, 2, 2]], dtype=torch.int32)
    segs = [SegmentInfo(1, 7, True, score=0.3), SegmentInfo(2, 21, False), SegmentInfo(3, 9, True, iscrowd=True)]
    out = with_stats(PanopticResult(pan, segs, image_id="a"), pan)
    assert [(s.id, s.area, s.bbox, s.score) for s in out.segments] == [
        (1, 2, (0, 0, 2, 1), 0.3),
        (2, 3, (0, 1, 3, 1), 1.0),
    ]
    assert out.image_id == "a" and out.panoptic is pan


# --- class spaces ------------------------------------------------------------------------------------
def test_semantic_channels() -> None:
    assert semantic_channels(META, "stuff") == 2
    assert semantic_channels(META, "stuff+things") == 3
    assert semantic_channels(META, "all") == 5
    with pytest.raises(ValueError, match="sem_space"):
        semantic_channels(META, "things")  # type: ignore[arg-type]


def test_to_semantic_space() -> None:
    sem = torch.tensor([[0, 1, 2, IGNORE_LABEL], [4, 3, 1, 0]], dtype=torch.int32)
    assert to_semantic_space(sem, 2, "all").tolist() == sem.tolist()
    assert to_semantic_space(sem, 2, "all").dtype == torch.long
    assert to_semantic_space(sem, 2, "stuff+things").tolist() == [[0, 1, 2, IGNORE_LABEL], [2, 2, 1, 0]]
    assert to_semantic_space(sem, 2, "stuff").tolist() == [
        [0, 1, IGNORE_LABEL, IGNORE_LABEL],
        [IGNORE_LABEL, IGNORE_LABEL, 1, 0],
    ]
    assert to_semantic_space(sem, 0, "stuff+things").tolist() == [[0, 0, 0, IGNORE_LABEL], [0, 0, 0, 0]]
    with pytest.raises(ValueError, match="negative class index"):
        to_semantic_space(torch.tensor([-1, 0]), 2, "stuff+things")
    with pytest.raises(ValueError, match="integer"):
        to_semantic_space(torch.zeros(3), 2, "all")
    with pytest.raises(ValueError, match="sem_space"):
        to_semantic_space(sem, 2, "things")  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_semantic_argmax_equals_argmax_with_ties_and_nan(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (7, 33, 41), generator=g).to(dtype)  # values 0..2: most pixels have tied maxima
    logits[4, 0, 0] = logits[2, 0, 0] = float("nan")  # the first NaN wins, as in argmax
    logits[5, 1, 1] = float("inf")
    logits[:, 2, 2] = float("-inf")  # all equal: channel 0
    pred = semantic_argmax(logits)
    assert pred.dtype == torch.long and pred.shape == (33, 41)
    assert torch.equal(pred, logits.argmax(dim=0))
    assert (pred[0, 0], pred[1, 1], pred[2, 2]) == (2, 5, 0)
    view = logits.transpose(1, 2)  # a non-contiguous view
    assert torch.equal(semantic_argmax(view), view.argmax(dim=0))


def test_stuff_mean_probs() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 6, generator=g)
    key = torch.randint(-1, 5, (5, 6), generator=g)
    key[0, 0] = 1  # class 1 has pixels; make sure class 0 has none
    key[key == 0] = 3
    probs = logits.softmax(0)
    means = stuff_mean_probs(logits, key, 2)
    assert means.dtype == torch.float64 and means.shape == (2,)
    assert float(means[0]) == 0.0
    assert float(means[1]) == pytest.approx(float(probs[1][key == 1].mean()), rel=1e-6)


# --- geometry ----------------------------------------------------------------------------------------
def test_nearest_source_index_samples_pixel_centres() -> None:
    assert nearest_source_index(4, 2).tolist() == [0, 0, 1, 1]
    assert nearest_source_index(2, 4).tolist() == [1, 3]
    assert nearest_source_index(3, 7).tolist() == [1, 3, 5]


def test_resize_and_crop_result() -> None:
    pan = torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 3, 3]], dtype=torch.int32)
    segs = [SegmentInfo(1, 7, True, score=0.5), SegmentInfo(2, 21, False), SegmentInfo(3, 23, False)]
    result = PanopticResult(pan, segs, image_id="r")
    up = resize_result(result, (6, 8))
    assert torch.equal(up.panoptic, pan.repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert [(s.id, s.area, s.bbox, s.score) for s in up.segments] == [
        (1, 16, (0, 0, 4, 4), 0.5),
        (2, 16, (4, 0, 4, 4), 1.0),
        (3, 8, (4, 4, 4, 2), 1.0),
    ]
    cropped = crop_result(result, (2, 3))
    assert cropped.panoptic.tolist() == [[1, 1, 2], [1, 1, 2]]
    assert [(s.id, s.area, s.bbox) for s in cropped.segments] == [(1, 4, (0, 0, 2, 2)), (2, 2, (2, 0, 1, 2))]
    with pytest.raises(ValueError, match=r"image 'r': cannot resize"):
        resize_result(result, (0, 3))
    with pytest.raises(ValueError, match=r"image 'r'.*ids \[3\] that have no segment info"):
        crop_result(PanopticResult(pan, segs[:2], image_id="r"), (3, 4))
