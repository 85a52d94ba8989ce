"""mIoU: against a naive per-class reference and hotcoco (mmsegmentation protocol), ignore handling,
statistics that add, bad input."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unipan.evaluation.semantic import SemSegStat, miou
from unipan.structures import IGNORE_LABEL, DatasetMeta

CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 2, "name": "car", "isthing": 1},
    {"id": 7, "name": "road", "isthing": 0},
    {"id": 9, "name": "sky", "isthing": 0},
]
META = DatasetMeta(CATEGORIES)  # class index: road 0, sky 1, person 2, car 3


def naive_ious(gts: list[np.ndarray], preds: list[np.ndarray], c: int) -> list[float | None]:
    """Per-class IoU by definition, pixel sets counted class by class; None when 0/0."""
    out: list[float | None] = []
    for k in range(c):
        tp = fp = fn = 0
        for gt, pred in zip(gts, preds, strict=True):
            valid = gt != IGNORE_LABEL
            tp += int(((gt == k) & (pred == k)).sum())
            fp += int((valid & (gt != k) & (pred == k)).sum())
            fn += int(((gt == k) & (pred != k)).sum())
        out.append(tp / (tp + fp + fn) if tp + fp + fn else None)
    return out


def _random_maps(rng: np.random.Generator, c: int, h: int = 9, w: int = 11) -> tuple[np.ndarray, np.ndarray]:
    gt = rng.integers(0, c, (h, w))
    pred = np.where(rng.random((h, w)) < 0.6, gt, rng.integers(0, c, (h, w)))
    gt[rng.random((h, w)) < 0.15] = IGNORE_LABEL
    pred[rng.random((h, w)) < 0.1] = IGNORE_LABEL
    return gt, pred


def test_equals_naive_reference_over_images() -> None:
    rng = np.random.default_rng(0)
    pairs = [_random_maps(rng, 4) for _ in range(5)]
    stat = SemSegStat(4)
    for gt, pred in pairs:
        stat.update(torch.from_numpy(gt), pred)
    result = stat.result(META)
    ref = naive_ious([p[0] for p in pairs], [p[1] for p in pairs], 4)
    assert [r.iou if r.present else None for r in result.per_class] == pytest.approx(ref, abs=1e-12)
    present = [v for v in ref if v is not None]
    assert result.miou == pytest.approx(sum(present) / len(present), abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    data=st.lists(st.tuples(st.integers(0, 3), st.sampled_from([0, 1, 2, 3, IGNORE_LABEL])), min_size=1, max_size=40),
    gt_ignored=st.lists(st.booleans(), min_size=40, max_size=40),
)
def test_property_equals_naive_reference(data: list[tuple[int, int]], gt_ignored: list[bool]) -> None:
    gt = np.array([g if not ig else IGNORE_LABEL for (g, _), ig in zip(data, gt_ignored, strict=False)])
    pred = np.array([p for _, p in data])
    stat = SemSegStat(4)
    stat.update(gt[None], pred[None])
    result = stat.result()
    ref = naive_ious([gt], [pred], 4)
    assert [r.iou if r.present else None for r in result.per_class] == pytest.approx(ref, abs=1e-12)
    present = [v for v in ref if v is not None]
    assert result.miou == pytest.approx(sum(present) / len(present) if present else 0.0, abs=1e-12)


def test_equals_hotcoco_mmseg_protocol() -> None:
    hotcoco_semantic = pytest.importorskip("hotcoco.semantic")
    rng = np.random.default_rng(1)
    ev = hotcoco_semantic.SemanticEval(5)
    stat = SemSegStat(5)
    for _ in range(3):
        gt, pred = _random_maps(rng, 4)
        pred[pred == IGNORE_LABEL] = 0  # hotcoco rejects "no prediction" labels
        ev.update(gt.astype(np.uint8), pred.astype(np.uint8))
        stat.update(gt, pred)
    ref = ev.results()
    result = stat.result()
    assert result.miou == pytest.approx(ref["mIoU"], abs=1e-12)
    assert result.pixel_accuracy == pytest.approx(ref["aAcc"], abs=1e-12)
    assert result.mean_accuracy == pytest.approx(ref["mAcc"], abs=1e-12)
    for ours, theirs in zip(result.per_class, ref["per_class"], strict=True):
        assert ours.iou == pytest.approx(max(theirs["IoU"], 0.0), abs=1e-12)


def test_hand_example_ignore_and_no_prediction() -> None:
    gt = np.array([[0, 0, 1, IGNORE_LABEL]])
    pred = np.array([[0, IGNORE_LABEL, 1, 1]])
    stat = SemSegStat(3)
    stat.update(gt, pred)
    r = stat.result(["a", "b", "c"])
    # class 0: TP 1, FN 1 (nothing predicted); class 1: TP 1 (prediction on ignored GT is not an FP)
    assert [c.iou for c in r.per_class] == [0.5, 1.0, 0.0]
    assert [c.present for c in r.per_class] == [True, True, False]
    assert r.miou == 0.75 and r.num_present == 2
    assert r.pixel_accuracy == pytest.approx(2 / 3)
    assert miou(gt, pred, 3) == 0.75


def test_mean_over_classes_present_in_gt_or_prediction() -> None:
    gt = np.array([[0, 0]])
    pred = np.array([[0, 2]])  # class 2 only predicted: IoU 0 and it counts; class 1 absent: left out
    r = SemSegStat(3)
    r.update(gt, pred)
    res = r.result()
    assert res.num_present == 2 and res.miou == pytest.approx((0.5 + 0.0) / 2)


def test_things_stuff_split_and_table() -> None:
    gt = np.array([[0, 1, 2, 3]])
    pred = np.array([[0, 1, 2, 0]])
    stat = SemSegStat(META.num_classes)
    stat.update(gt, pred)
    r = stat.result(META)
    assert r.miou_things == pytest.approx(0.5)  # person 1, car 0
    assert r.miou_stuff == pytest.approx(0.75)  # road 1/2, sky 1
    assert [c.category_id for c in r.per_class] == [7, 9, 1, 2]
    table = r.table()
    assert "person" in table and "mIoU" in table
    d = r.to_dict()
    assert set(d["per_class"]) == {1, 2, 7, 9} and d["miou"] == r.miou


def test_stat_adds_round_trips_and_pickles() -> None:
    rng = np.random.default_rng(2)
    stats = []
    for _ in range(4):
        s = SemSegStat(4)
        s.update(*_random_maps(rng, 4))
        stats.append(s)
    total = SemSegStat(4)
    for s in stats:
        total += s
    assert total == (stats[3] + stats[2]) + (stats[1] + stats[0])
    assert SemSegStat.from_tensor(total.to_tensor()) == total
    assert pickle.loads(pickle.dumps(total)) == total
    assert total.all_reduce() is total  # no process group
    with pytest.raises(ValueError, match="5 classes to stats of 4"):
        total += SemSegStat(5)


def test_bad_input_names_the_image() -> None:
    stat = SemSegStat(3)
    with pytest.raises(ValueError, match="image 'a'.*shape"):
        stat.update(np.zeros((2, 2), int), np.zeros((2, 3), int), image_id="a")
    with pytest.raises(ValueError, match=r"image 'b': ground-truth labels \[7\]"):
        stat.update(np.full((2, 2), 7), np.zeros((2, 2), int), image_id="b")
    with pytest.raises(ValueError, match=r"image 'c': predicted labels \[-1\]"):
        stat.update(np.zeros((2, 2), int), np.full((2, 2), -1), image_id="c")
    with pytest.raises(ValueError, match="integers"):
        stat.update(np.zeros((2, 2)), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="DatasetMeta has 4 classes"):
        stat.result(META)
    assert stat.confusion.sum() == 0  # failed updates add nothing


def test_empty_stat() -> None:
    r = SemSegStat(2).result()
    assert (r.miou, r.pixel_accuracy, r.num_present) == (0.0, 0.0, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs_match_cpu() -> None:
    rng = np.random.default_rng(3)
    gt, pred = _random_maps(rng, 4)
    a, b = SemSegStat(4), SemSegStat(4)
    a.update(gt, pred)
    b.update(torch.from_numpy(gt).cuda(), torch.from_numpy(pred).cuda())
    assert a == b
