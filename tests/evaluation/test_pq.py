"""PQ/SQ/RQ: equality with the official panopticapi (and hotcoco), goldens, edge cases, bad input."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unipan.evaluation.pq import (
    PanopticEvalError,
    PQResult,
    PQStat,
    PQStatCat,
    all_reduce_pq_stat,
    pq_compute_folders,
    pq_compute_png,
    pq_compute_single,
    pq_main,
)
from unipan.io import id2rgb, write_id_png
from unipan.structures import DatasetMeta, PanopticTarget, SegmentInfo

panopticapi_eval = pytest.importorskip("panopticapi.evaluation")

CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1, "color": [220, 20, 60]},
    {"id": 2, "name": "car", "isthing": 1, "color": [0, 0, 142]},
    {"id": 5, "name": "dog", "isthing": 1, "color": [100, 80, 0]},
    {"id": 7, "name": "road", "isthing": 0, "color": [128, 64, 128]},
    {"id": 9, "name": "sky", "isthing": 0, "color": [70, 130, 180]},
    {"id": 12, "name": "grass", "isthing": 0, "color": [0, 200, 0]},
]
THINGS = [c["id"] for c in CATEGORIES if c["isthing"]]
STUFF = [c["id"] for c in CATEGORIES if not c["isthing"]]
TOL = 1e-9


# --- corpus ----------------------------------------------------------------------------------
@dataclass
class Image:
    """One evaluation image: GT and prediction id maps with their segments_info lists."""

    image_id: Any
    gt: np.ndarray
    gt_segments: list[dict[str, Any]]
    pred: np.ndarray
    pred_segments: list[dict[str, Any]]


def _fresh_ids(rng: np.random.Generator, n: int, taken: set[int]) -> list[int]:
    out: list[int] = []
    while len(out) < n:
        v = int(rng.integers(1, 256**3))
        if v not in taken:
            taken.add(v)
            out.append(v)
    return out


def _box(rng: np.random.Generator, h: int, w: int) -> tuple[slice, slice]:
    y0, x0 = int(rng.integers(0, h - 2)), int(rng.integers(0, w - 2))
    y1, x1 = int(rng.integers(y0 + 2, min(h, y0 + h // 2) + 1)), int(rng.integers(x0 + 2, min(w, x0 + w // 2) + 1))
    return slice(y0, y1), slice(x0, x1)


def _segments_of(ids: np.ndarray, info: dict[int, tuple[int, int]], with_gt_fields: bool) -> list[dict[str, Any]]:
    """segments_info (in id-assignment order) of the ids present in `ids`; info: id -> (category, crowd)."""
    present, counts = np.unique(ids, return_counts=True)
    area = dict(zip(present.tolist(), counts.tolist(), strict=True))
    out = []
    for seg_id, (category_id, crowd) in info.items():
        if seg_id not in area:
            continue
        d = {"id": seg_id, "category_id": category_id}
        if with_gt_fields:
            d.update(iscrowd=crowd, area=area[seg_id], bbox=[0, 0, 1, 1])
        out.append(d)
    return out


def random_image(rng: np.random.Generator, image_id: Any, h: int = 40, w: int = 56) -> Image:
    """GT with stuff, things, crowd (sometimes two of one class) and void; a prediction with shifted
    boundaries, missed, spurious, split and class-swapped segments."""
    taken: set[int] = set()
    gt = np.zeros((h, w), np.int64)
    info: dict[int, tuple[int, int]] = {}
    # stuff in horizontal bands
    cuts = sorted(rng.choice(np.arange(4, h - 4), size=2, replace=False).tolist())
    for (a, b), seg_id in zip(zip([0, *cuts], [*cuts, h], strict=True), _fresh_ids(rng, 3, taken), strict=True):
        gt[a:b] = seg_id
        info[seg_id] = (int(rng.choice(STUFF)), 0)
    for seg_id in _fresh_ids(rng, int(rng.integers(2, 8)), taken):
        ys, xs = _box(rng, h, w)
        gt[ys, xs] = seg_id
        info[seg_id] = (int(rng.choice(THINGS)), 0)
    if rng.random() < 0.7:
        crowd_category = int(rng.choice(THINGS))
        for seg_id in _fresh_ids(rng, int(rng.integers(1, 3)), taken):
            ys, xs = _box(rng, h, w)
            gt[ys, xs] = seg_id
            category_id = crowd_category if rng.random() < 0.6 else int(rng.choice(THINGS))
            info[seg_id] = (category_id, 1)
    for _ in range(int(rng.integers(0, 3))):  # void
        ys, xs = _box(rng, h, w)
        gt[ys, xs] = 0
    gt_segments = _segments_of(gt, info, with_gt_fields=True)

    # prediction: relabel every GT segment, then perturb
    pred = np.zeros_like(gt)
    pred_info: dict[int, tuple[int, int]] = {}
    for seg in gt_segments:
        mask = gt == seg["id"]
        fate = rng.random()
        if fate < 0.12:
            continue  # missed: left void
        (new_id,) = _fresh_ids(rng, 1, taken)
        category_id = seg["category_id"]
        if fate < 0.22:  # class swapped, sometimes across things/stuff
            category_id = int(rng.choice([c["id"] for c in CATEGORIES if c["id"] != category_id]))
        pred[mask] = new_id
        pred_info[new_id] = (category_id, 0)
        if 0.22 <= fate < 0.32:  # split in two along a random row
            ys = np.nonzero(mask.any(axis=1))[0]
            cut = int(rng.integers(ys[0], ys[-1] + 1))
            (second,) = _fresh_ids(rng, 1, taken)
            part = mask.copy()
            part[:cut] = False
            pred[part] = second
            pred_info[second] = (category_id, 0)
    pred = np.roll(pred, (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(0, 1))
    for seg_id in _fresh_ids(rng, int(rng.integers(0, 4)), taken):  # spurious
        ys, xs = _box(rng, h, w)
        pred[ys, xs] = seg_id
        pred_info[seg_id] = (int(rng.choice([c["id"] for c in CATEGORIES])), 0)
    if rng.random() < 0.5:
        ys, xs = _box(rng, h, w)
        pred[ys, xs] = 0
    order = list(pred_info.items())
    rng.shuffle(order)  # JSON order must not matter for predictions
    pred_segments = _segments_of(pred, dict(order), with_gt_fields=False)
    return Image(image_id, gt, gt_segments, pred, pred_segments)


def write_corpus(root: Path, images: list[Image], categories: list[dict[str, Any]] = CATEGORIES) -> dict[str, Path]:
    """GT and prediction COCO-panoptic JSON + PNG folders under root."""
    paths = {
        "gt_json": root / "gt.json",
        "gt_dir": root / "gt",
        "pred_json": root / "pred.json",
        "pred_dir": root / "pred",
    }
    gt_anns, pred_anns = [], []
    for im in images:
        name = f"{im.image_id}.png"
        write_id_png(paths["gt_dir"] / name, im.gt)
        write_id_png(paths["pred_dir"] / name, im.pred)
        gt_anns.append({"image_id": im.image_id, "file_name": name, "segments_info": im.gt_segments})
        pred_anns.append({"image_id": im.image_id, "file_name": name, "segments_info": im.pred_segments})
    images_list = [{"id": im.image_id, "file_name": f"{im.image_id}.jpg"} for im in images]
    for key, anns in (("gt_json", gt_anns), ("pred_json", pred_anns)):
        paths[key].write_text(json.dumps({"images": images_list, "annotations": anns, "categories": categories}))
    return paths


def reference(paths: dict[str, Path]) -> tuple[Any, dict[str, Any]]:
    """panopticapi's PQStat and results (groups without active class -> ZeroDivisionError object)."""
    gt_d = json.loads(paths["gt_json"].read_text())
    pred_d = json.loads(paths["pred_json"].read_text())
    categories = {c["id"]: c for c in gt_d["categories"]}
    pred_by_id = {a["image_id"]: a for a in pred_d["annotations"]}
    matched = [(a, pred_by_id[a["image_id"]]) for a in gt_d["annotations"]]
    with contextlib.redirect_stdout(io.StringIO()):
        stat = panopticapi_eval.pq_compute_single_core(
            0, copy.deepcopy(matched), str(paths["gt_dir"]), str(paths["pred_dir"]), categories
        )
    results: dict[str, Any] = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        try:
            results[name], per_class = stat.pq_average(categories, isthing=isthing)
        except ZeroDivisionError as e:
            results[name], per_class = e, None
        if name == "All" and per_class is not None:
            results["per_class"] = per_class
    return stat, results


def assert_stat_equal(ours: PQStat, ref: Any) -> None:
    keys = {k for k, v in ref.pq_per_cat.items() if v.tp + v.fp + v.fn} | {
        k for k, v in ours.items() if v.tp + v.fp + v.fn
    }
    for k in keys:
        a, b = ours.get(k), ref.pq_per_cat[k]
        assert (a.tp, a.fp, a.fn) == (b.tp, b.fp, b.fn), f"category {k}: {a} vs tp={b.tp} fp={b.fp} fn={b.fn}"
        assert a.iou == pytest.approx(b.iou, abs=TOL), f"category {k}"


def assert_result_equal(ours: PQResult, ref: dict[str, Any]) -> None:
    d = ours.to_dict()
    for name in ("All", "Things", "Stuff"):
        if isinstance(ref[name], ZeroDivisionError):
            assert d[name] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}
            continue
        assert d[name]["n"] == ref[name]["n"]
        for key in ("pq", "sq", "rq"):
            assert d[name][key] == pytest.approx(ref[name][key], abs=TOL), (name, key)
    if "per_class" in ref:
        assert set(d["per_class"]) == set(ref["per_class"])
        for k, v in ref["per_class"].items():
            for key in ("pq", "sq", "rq"):
                assert d["per_class"][k][key] == pytest.approx(v[key], abs=TOL), (k, key)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Image], dict[str, Path]]:
    rng = np.random.default_rng(2024)
    images = [random_image(rng, image_id) for image_id in range(1, 25)]
    return images, write_corpus(tmp_path_factory.mktemp("corpus"), images)


def _folders(paths: dict[str, Path], **kw: Any) -> PQResult:
    return pq_compute_folders(paths["gt_json"], paths["gt_dir"], paths["pred_json"], paths["pred_dir"], **kw)


# --- equality with panopticapi ---------------------------------------------------------------
def test_generated_corpus_equals_panopticapi(corpus: tuple[list[Image], dict[str, Path]]) -> None:
    images, paths = corpus
    ref_stat, ref_results = reference(paths)
    # the corpus must exercise every rule, or equality would prove little
    totals = [sum(getattr(v, f) for v in ref_stat.pq_per_cat.values()) for f in ("tp", "fp", "fn")]
    assert min(totals) > 5, totals
    assert any(s["iscrowd"] for im in images for s in im.gt_segments)
    for strict in (True, False):
        result = _folders(paths, strict=strict)
        assert_stat_equal(result.stat, ref_stat)
        assert_result_equal(result, ref_results)


def test_two_workers_equal_one(corpus: tuple[list[Image], dict[str, Path]]) -> None:
    _, paths = corpus
    one = _folders(paths, workers=1)
    two = _folders(paths, workers=2)
    assert_stat_equal(two.stat, _as_ref(one.stat))
    for k, v in one.to_dict()["per_class"].items():
        assert two.to_dict()["per_class"][k] == pytest.approx(v, abs=1e-12)


def _as_ref(stat: PQStat) -> Any:
    ref = panopticapi_eval.PQStat()
    for k, v in stat.items():
        c = ref[k]
        c.iou, c.tp, c.fp, c.fn = v.iou, v.tp, v.fp, v.fn
    return ref


def test_in_memory_equals_folders(corpus: tuple[list[Image], dict[str, Path]]) -> None:
    images, paths = corpus
    meta = DatasetMeta(CATEGORIES)
    total = PQStat()
    for im in images:
        # numpy int64 maps, int32 tensors and SegmentInfo lists all go through the same path
        gt_segments = [
            SegmentInfo(s["id"], s["category_id"], meta.isthing(s["category_id"]), bool(s["iscrowd"]), s["area"])
            for s in im.gt_segments
        ]
        pred = torch.from_numpy(im.pred.astype(np.int32))
        total += pq_compute_single(im.gt, gt_segments, pred, im.pred_segments, meta, image_id=im.image_id)
    assert_stat_equal(total, reference(paths)[0])


def test_png_per_image_equals_panopticapi(corpus: tuple[list[Image], dict[str, Path]], tmp_path: Path) -> None:
    images, paths = corpus
    im = images[3]
    sub = write_corpus(tmp_path, [im])
    stat = pq_compute_png(
        paths["gt_dir"] / "4.png", im.gt_segments, paths["pred_dir"] / "4.png", im.pred_segments, CATEGORIES, image_id=4
    )
    assert_stat_equal(stat, reference(sub)[0])


def test_generated_corpus_equals_hotcoco(corpus: tuple[list[Image], dict[str, Path]]) -> None:
    hotcoco_panoptic = pytest.importorskip("hotcoco.panoptic")
    _, paths = corpus
    with contextlib.redirect_stdout(io.StringIO()):
        ref = hotcoco_panoptic.pq_compute(
            str(paths["gt_json"]), str(paths["pred_json"]), str(paths["gt_dir"]), str(paths["pred_dir"])
        )
    d = _folders(paths).to_dict()
    for name in ("All", "Things", "Stuff"):
        assert d[name]["n"] == ref[name]["n"]
        for key in ("pq", "sq", "rq"):
            assert d[name][key] == pytest.approx(ref[name][key], abs=TOL)


@st.composite
def tiny_image(draw: st.DrawFn) -> Image:
    """Small maps of painted rectangles: GT ids (some crowd, some void), and a prediction that
    relabels them (0 = missed; two GT ids to one = merged) and paints a few rectangles over it."""
    h, w = draw(st.integers(1, 8)), draw(st.integers(1, 8))

    def paint(ids: np.ndarray, seg_id: int) -> None:
        y0, y1 = sorted(draw(st.lists(st.integers(0, h), min_size=2, max_size=2)))
        x0, x1 = sorted(draw(st.lists(st.integers(0, w), min_size=2, max_size=2)))
        ids[y0 : y1 + 1, x0 : x1 + 1] = seg_id

    category = st.sampled_from([1, 1, 2, 7, 9])  # few categories, so that classes meet often
    gt = np.zeros((h, w), np.int64)
    for seg_id in draw(st.lists(st.sampled_from([3, 70, 256, 65541, 9000, 16777215]), max_size=5, unique=True)):
        paint(gt, seg_id)
    pred_pool = st.sampled_from([0, 3, 11, 257, 300000, 16777214])
    relabel = {seg_id: draw(pred_pool) for seg_id in np.unique(gt).tolist() if seg_id}
    pred = np.vectorize(lambda v: relabel.get(v, 0), otypes=[np.int64])(gt) if gt.size else gt.copy()
    for _ in range(draw(st.integers(0, 2))):
        paint(pred, draw(pred_pool))
    gt_segments = []
    for seg_id in np.unique(gt).tolist():
        if seg_id:
            crowd = draw(st.integers(0, 3)) == 0
            area = int((gt == seg_id).sum())
            gt_segments.append({"id": seg_id, "category_id": draw(category), "iscrowd": int(crowd), "area": area})
    gt_segments = list(draw(st.permutations(gt_segments)))
    pred_segments = [{"id": s, "category_id": draw(category)} for s in np.unique(pred).tolist() if s]
    return Image("tiny", gt, gt_segments, pred, pred_segments)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(images=st.lists(tiny_image(), min_size=1, max_size=3))
def test_property_equals_panopticapi(images: list[Image]) -> None:
    for k, im in enumerate(images):
        im.image_id = k
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_corpus(Path(tmp), images)
        ref_stat, ref_results = reference(paths)
        result = _folders(paths)
    assert_stat_equal(result.stat, ref_stat)
    assert_result_equal(result, ref_results)
    per_image = sum(
        (pq_compute_single(im.gt, im.gt_segments, im.pred, im.pred_segments, CATEGORIES) for im in images),
        PQStat(),
    )
    assert_stat_equal(per_image, ref_stat)


def test_crowd_last_listed_and_crowd_of_other_class(tmp_path: Path) -> None:
    """Two crowd regions of one class: panopticapi only uses the last listed one for the FP test."""
    gt = np.zeros((4, 12), np.int64)
    gt[:, 0:6] = 10  # crowd person A
    gt[:, 6:12] = 20  # crowd person B
    pred = np.zeros_like(gt)
    pred[:, 0:4] = 30  # person on crowd A only -> FP, because B is the one listed last
    pred[:, 8:12] = 31  # person on crowd B -> ignored
    pred[:, 4:8] = 32  # car on persons' crowd -> FP (crowd of another class does not excuse it)
    gt_segments = [
        {"id": 10, "category_id": 1, "iscrowd": 1, "area": 24},
        {"id": 20, "category_id": 1, "iscrowd": 1, "area": 24},
    ]
    pred_segments = [{"id": 30, "category_id": 1}, {"id": 31, "category_id": 1}, {"id": 32, "category_id": 2}]
    im = Image(1, gt, gt_segments, pred, pred_segments)
    paths = write_corpus(tmp_path, [im])
    stat = _folders(paths).stat
    assert (stat[1].fp, stat[1].fn, stat[2].fp) == (1, 0, 1)
    assert_stat_equal(stat, reference(paths)[0])


def test_iou_threshold_is_strict_and_union_excludes_void() -> None:
    gt = np.zeros((1, 10), np.int64)
    gt[0, :4] = 1  # GT: 4 pixels
    pred = np.zeros_like(gt)
    pred[0, 2:6] = 7  # 2 px overlap, 2 px on GT void: union = 4 + 4 - 2 - 2 = 4 -> IoU 0.5, no match
    gts = [{"id": 1, "category_id": 1, "iscrowd": 0, "area": 4}]
    preds = [{"id": 7, "category_id": 1}]
    s = pq_compute_single(gt, gts, pred, preds, CATEGORIES)
    assert (s[1].tp, s[1].fp, s[1].fn) == (0, 1, 1)
    pred[0, 1] = 7  # 3 px overlap: union 5 - 2 void... = 4 + 5 - 3 - 2 = 4 -> IoU 0.75
    s = pq_compute_single(gt, gts, pred, preds, CATEGORIES)
    assert (s[1].tp, s[1].fp, s[1].fn, s[1].iou) == (1, 0, 0, 0.75)


# --- golden data -----------------------------------------------------------------------------
GOLDEN_PER_CLASS_PQ = {1: 0.676088, 2: 0.0, 3: 0.745353, 4: 0.857678, 5: 0.991069, 6: 0.774105}


def test_golden_tf_models_deeplab(shared_data: Path) -> None:
    root = shared_data / "tf-models-deeplab" / "evaluation" / "testdata"
    paths = {
        "gt_json": root / "coco_gt.json",
        "gt_dir": root / "coco_gt",
        "pred_json": root / "coco_pred.json",
        "pred_dir": root / "coco_pred",
    }
    result = _folders(paths)
    d = result.to_dict()
    assert d["All"] == pytest.approx({"pq": 0.674049, "sq": 0.683439, "rq": 0.820513, "n": 6}, abs=1e-6)
    assert d["Things"] == pytest.approx({"pq": 0.576968, "sq": 0.591053, "rq": 0.730769, "n": 4}, abs=1e-6)
    assert d["Stuff"] == pytest.approx({"pq": 0.868211, "sq": 0.868211, "rq": 1.0, "n": 2}, abs=1e-6)
    assert {k: v["pq"] for k, v in d["per_class"].items()} == pytest.approx(GOLDEN_PER_CLASS_PQ, abs=1e-6)
    ref_stat, ref_results = reference(paths)
    assert_stat_equal(result.stat, ref_stat)
    assert_result_equal(result, ref_results)


def test_oracle_on_real_coco_gt(shared_data: Path, tmp_path: Path) -> None:
    """Prediction = GT (crowd segments predicted as ordinary segments) gives PQ 1 on real COCO PNGs."""
    root = shared_data / "panopticapi"
    gt_json = root / "sample_data" / "panoptic_examples.json"
    gt = json.loads(gt_json.read_text())
    pred = {
        "annotations": [
            {
                "image_id": a["image_id"],
                "file_name": a["file_name"],
                "segments_info": [{"id": s["id"], "category_id": s["category_id"]} for s in a["segments_info"]],
            }
            for a in gt["annotations"]
        ]
    }
    (tmp_path / "pred.json").write_text(json.dumps(pred))
    gt_dir = root / "sample_data" / "panoptic_examples"
    result = pq_compute_folders(gt_json, gt_dir, tmp_path / "pred.json", gt_dir)
    assert (result.pq, result.sq, result.rq) == (1.0, 1.0, 1.0)
    assert result.n == len(
        {s["category_id"] for a in gt["annotations"] for s in a["segments_info"] if not s["iscrowd"]}
    )
    assert all(c.fp == 0 and c.fn == 0 for c in result.per_class.values())


def test_oracle_from_panoptic_target() -> None:
    rng = np.random.default_rng(5)
    meta = DatasetMeta(CATEGORIES)
    im = random_image(rng, "x")
    segs = [
        SegmentInfo(s["id"], s["category_id"], meta.isthing(s["category_id"]), bool(s["iscrowd"]))
        for s in im.gt_segments
    ]
    target = PanopticTarget.from_panoptic(torch.from_numpy(im.gt.astype(np.int32)), segs, meta, image_id="x")
    stat = pq_compute_single(target.panoptic, target.segments, target.panoptic, target.segments, meta)
    result = PQResult.from_stat(stat, meta)
    assert result.pq == 1.0 and result.n > 0


# --- edge cases ------------------------------------------------------------------------------
def test_no_segments_anywhere(tmp_path: Path) -> None:
    """panopticapi divides by zero; unipan reports 0 with n = 0."""
    empty = Image(1, np.zeros((5, 6), np.int64), [], np.zeros((5, 6), np.int64), [])
    paths = write_corpus(tmp_path, [empty])
    _, ref = reference(paths)
    assert all(isinstance(ref[k], ZeroDivisionError) for k in ("All", "Things", "Stuff"))
    result = _folders(paths)
    assert result.to_dict()["All"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}
    assert all(
        v == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "tp": 0, "fp": 0, "fn": 0}
        for v in result.to_dict()["per_class"].values()
    )
    assert "All" in result.table()


def test_zero_sized_in_memory_image() -> None:
    z = np.zeros((0, 7), np.int32)
    assert len(pq_compute_single(z, [], z, [], CATEGORIES)) == 0


def _single_segment_image(category_id: int, image_id: int) -> Image:
    gt = np.zeros((4, 5), np.int64)
    gt[1:, 1:] = 9
    pred = np.zeros_like(gt)
    pred[1:, 2:] = 4  # 9 of the GT's 12 pixels
    return Image(
        image_id,
        gt,
        [{"id": 9, "category_id": category_id, "iscrowd": 0, "area": 12}],
        pred,
        [{"id": 4, "category_id": category_id}],
    )


@pytest.mark.parametrize(("category_id", "empty_group"), [(7, "Things"), (1, "Stuff")])
def test_only_stuff_or_only_things(tmp_path: Path, category_id: int, empty_group: str) -> None:
    paths = write_corpus(tmp_path, [_single_segment_image(category_id, 1)])
    ref_stat, ref = reference(paths)
    assert isinstance(ref[empty_group], ZeroDivisionError)
    result = _folders(paths)
    assert_stat_equal(result.stat, ref_stat)
    assert_result_equal(result, ref)
    assert result[empty_group].n == 0 and result.all.n == 1
    assert result.pq == pytest.approx(0.75)  # IoU 9/12, one TP


def test_all_void_prediction_counts_false_negatives() -> None:
    im = _single_segment_image(1, 1)
    s = pq_compute_single(im.gt, im.gt_segments, np.zeros_like(im.pred), [], CATEGORIES)
    assert (s[1].tp, s[1].fp, s[1].fn) == (0, 0, 1)


def test_rgba_png_equals_rgb(tmp_path: Path) -> None:
    from PIL import Image as PILImage

    im = random_image(np.random.default_rng(1), 1)
    rgba = np.concatenate([id2rgb(im.pred), np.full((*im.pred.shape, 1), 200, np.uint8)], axis=2)
    write_id_png(tmp_path / "gt.png", im.gt)
    PILImage.fromarray(rgba, mode="RGBA").save(tmp_path / "pred.png")
    a = pq_compute_png(tmp_path / "gt.png", im.gt_segments, tmp_path / "pred.png", im.pred_segments, CATEGORIES)
    b = pq_compute_single(im.gt, im.gt_segments, im.pred, im.pred_segments, CATEGORIES)
    assert a == b and len(a) > 0


def test_png_decoded_without_out_buffer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When decoding into the reused buffer fails (e.g. a PNG that decodes to another layout), the
    PNG is decoded into a fresh array: here an RGB file that the decoder returns as RGBA."""
    import unipan.evaluation.pq as pq_module

    real = pq_module._DECODE

    def decode(data: bytes, out: np.ndarray | None = None) -> np.ndarray:
        if out is not None:
            raise ValueError("invalid out shape")
        rgb = np.asarray(real(data))
        return np.concatenate([rgb, np.zeros((*rgb.shape[:2], 1), np.uint8)], axis=2)

    im = random_image(np.random.default_rng(2), 1)
    write_id_png(tmp_path / "gt.png", im.gt)
    write_id_png(tmp_path / "pred.png", im.pred)
    expected = pq_compute_single(im.gt, im.gt_segments, im.pred, im.pred_segments, CATEGORIES)
    monkeypatch.setattr(pq_module, "_DECODE", decode)
    got = pq_compute_png(tmp_path / "gt.png", im.gt_segments, tmp_path / "pred.png", im.pred_segments, CATEGORIES)
    assert got == expected


# --- panopticapi's silent behaviours: error in strict mode, reproduced with strict=False ----
def _quirk_corpus(tmp_path: Path, change: str) -> dict[str, Path]:
    im = random_image(np.random.default_rng(11), 1)
    if change == "gt_id_not_in_json":
        gone = next(s for s in im.gt_segments if not s["iscrowd"])
        im.gt_segments.remove(gone)
    elif change == "gt_json_segment_not_in_png":
        im.gt_segments.append({"id": 123, "category_id": 1, "iscrowd": 0, "area": 40})
    elif change == "gt_area_differs":
        for s in im.gt_segments:
            s["area"] = s["area"] + 3 if s["id"] % 2 else max(1, s["area"] // 2)
    elif change == "unknown_gt_category":
        im.gt_segments[-1]["category_id"] = 99
    return write_corpus(tmp_path, [im])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("gt_id_not_in_json", "that its JSON does not list"),
        ("gt_json_segment_not_in_png", "absent from its PNG"),
        ("gt_area_differs", "differs from"),
        ("unknown_gt_category", "unknown category ids [99]"),
    ],
)
def test_gt_inconsistency_strict_error_lenient_equal(tmp_path: Path, change: str, message: str) -> None:
    paths = _quirk_corpus(tmp_path, change)
    with pytest.raises(PanopticEvalError, match="image 1") as e:
        _folders(paths)
    assert message in str(e.value)
    ref_stat, ref_results = reference(paths)
    lenient = _folders(paths, strict=False)
    assert_stat_equal(lenient.stat, ref_stat)
    assert_result_equal(lenient, ref_results)


# --- bad input -------------------------------------------------------------------------------
def _bad_corpus(tmp_path: Path, change: str) -> dict[str, Path]:
    rng = np.random.default_rng(3)
    images = [random_image(rng, 1), random_image(rng, "img-2")]
    bad = images[1]
    if change == "pred_id_not_in_json":
        bad.pred_segments.pop()
    elif change == "pred_json_segment_not_in_png":
        bad.pred_segments.append({"id": 4242, "category_id": 1})
    elif change == "unknown_pred_category":
        bad.pred_segments[0]["category_id"] = 77
    elif change == "duplicate_pred_id":
        bad.pred_segments.append(dict(bad.pred_segments[0]))
    elif change == "duplicate_gt_id":
        bad.gt_segments.append(dict(bad.gt_segments[0]))
    elif change == "gt_id_zero":
        bad.gt_segments.append({"id": 0, "category_id": 1, "iscrowd": 0, "area": 1})
    elif change == "missing_iscrowd":
        del bad.gt_segments[0]["iscrowd"]
    elif change == "float_id":
        bad.pred_segments[0]["id"] = 1.5
    paths = write_corpus(tmp_path, images)
    name = "img-2.png"
    if change == "missing_prediction":
        d = json.loads(paths["pred_json"].read_text())
        d["annotations"].pop()
        paths["pred_json"].write_text(json.dumps(d))
    elif change == "missing_png":
        (paths["pred_dir"] / name).unlink()
    elif change == "corrupt_png":
        data = (paths["pred_dir"] / name).read_bytes()
        (paths["pred_dir"] / name).write_bytes(data[: len(data) // 2])
    elif change == "not_png":
        (paths["gt_dir"] / name).write_bytes(b"GIF89a" + bytes(100))
    elif change == "size_mismatch":
        write_id_png(paths["pred_dir"] / name, bad.pred[:-1])
    elif change == "grayscale_png":
        from PIL import Image as PILImage

        PILImage.fromarray(np.zeros((4, 4), np.uint8)).save(paths["pred_dir"] / name)
    return paths


BAD_CASES = [
    ("missing_prediction", "no prediction"),
    ("missing_png", "file not found"),
    ("corrupt_png", "cannot decode PNG"),
    ("not_png", "not a PNG file"),
    ("size_mismatch", "is 39x56, ground-truth PNG is 40x56"),
    ("grayscale_png", "must be 8-bit RGB or RGBA, got 8-bit grayscale"),
    ("pred_id_not_in_json", "that its JSON does not list"),
    ("pred_json_segment_not_in_png", "prediction segments [4242] are listed in its JSON but absent"),
    ("unknown_pred_category", "unknown category ids [77]"),
    ("duplicate_pred_id", "duplicate prediction segment ids"),
    ("duplicate_gt_id", "duplicate ground-truth segment ids"),
    ("gt_id_zero", "id 0 is reserved"),
    ("missing_iscrowd", "need 'iscrowd'"),
    ("float_id", "id must be an integer, got 1.5"),
]


@pytest.mark.parametrize(("change", "message"), BAD_CASES)
def test_bad_input_names_the_image(tmp_path: Path, change: str, message: str) -> None:
    paths = _bad_corpus(tmp_path, change)
    for strict in (True, False):
        with pytest.raises(PanopticEvalError) as e:
            _folders(paths, strict=strict)
        assert "'img-2'" in str(e.value) and message in str(e.value), str(e.value)
        assert "\n" not in str(e.value)


def test_bad_input_in_worker_process(tmp_path: Path) -> None:
    paths = _bad_corpus(tmp_path, "pred_id_not_in_json")
    with pytest.raises(PanopticEvalError, match="image 'img-2'"):
        _folders(paths, workers=2)


def test_bad_input_in_memory() -> None:
    im = random_image(np.random.default_rng(0), 1)
    with pytest.raises(PanopticEvalError, match="image 'a': prediction is 40x55, ground truth 40x56"):
        pq_compute_single(im.gt, im.gt_segments, im.pred[:, 1:], im.pred_segments, CATEGORIES, image_id="a")
    with pytest.raises(PanopticEvalError, match="must hold integers"):
        pq_compute_single(im.gt.astype(float), im.gt_segments, im.pred, im.pred_segments, CATEGORIES)
    gt_segments = [SegmentInfo(s["id"], s["category_id"], True, bool(s["iscrowd"]), 5) for s in im.gt_segments]
    with pytest.raises(PanopticEvalError, match="JSON area 5 differs"):
        pq_compute_single(im.gt, gt_segments, im.pred, im.pred_segments, CATEGORIES)


def test_bogus_area_lenient_union_error() -> None:
    gt = np.ones((2, 2), np.int64)
    pred = np.full((2, 2), 5, np.int64)
    gts = [{"id": 1, "category_id": 1, "iscrowd": 0, "area": -10}]
    with pytest.raises(PanopticEvalError, match="gives a union of"):
        pq_compute_single(gt, gts, pred, [{"id": 5, "category_id": 1}], CATEGORIES, strict=False)


# --- statistics ------------------------------------------------------------------------------
def _per_image_stats(images: list[Image]) -> list[PQStat]:
    return [pq_compute_single(im.gt, im.gt_segments, im.pred, im.pred_segments, CATEGORIES) for im in images]


def _close(a: PQStat, b: PQStat) -> bool:
    keys = set(a) | set(b)
    return all(
        (a.get(k).tp, a.get(k).fp, a.get(k).fn) == (b.get(k).tp, b.get(k).fp, b.get(k).fn)
        and abs(a.get(k).iou - b.get(k).iou) < 1e-12
        for k in keys
    )


def test_stat_addition_is_associative_and_commutative(corpus: tuple[list[Image], dict[str, Path]]) -> None:
    stats = _per_image_stats(corpus[0][:10])
    forward = PQStat()
    for s in stats:
        forward += s
    backward = sum(reversed(stats), PQStat())
    grouped = (stats[0] + stats[1] + stats[2]) + (stats[3] + (stats[4] + stats[5])) + sum(stats[6:])
    assert _close(forward, backward) and _close(forward, grouped)
    assert _close(stats[0] + stats[1], stats[1] + stats[0])
    before = copy.deepcopy(stats[0])
    _ = stats[0] + stats[1]
    assert stats[0] == before  # `+` leaves its operands alone
    cat = PQStatCat(0.5, 1, 2, 3)
    cat += PQStatCat(0.25, 1, 0, 1)
    assert cat == PQStatCat(0.75, 2, 2, 4)


def test_stat_tensor_round_trip_and_pickle(corpus: tuple[list[Image], dict[str, Path]]) -> None:
    total = sum(_per_image_stats(corpus[0][:6]), PQStat())
    ids = [c["id"] for c in CATEGORIES]
    t = total.to_tensor(ids)
    assert t.dtype == torch.float64 and t.shape == (len(ids), 4)
    assert PQStat.from_tensor(t, ids) == total
    assert pickle.loads(pickle.dumps(total)) == total
    with pytest.raises(ValueError, match="not in category_ids"):
        total.to_tensor(ids[:2])
    with pytest.raises(ValueError, match="shape"):
        PQStat.from_tensor(t[:, :3], ids)


def test_all_reduce_is_identity_without_process_group(corpus: tuple[list[Image], dict[str, Path]]) -> None:
    stat = _per_image_stats(corpus[0][:2])[0]
    assert all_reduce_pq_stat(stat, [c["id"] for c in CATEGORIES]) is stat


def _all_reduce_worker(rank: int, world: int, init_file: str, stats: list[PQStat], out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        reduced = all_reduce_pq_stat(stats[rank], [c["id"] for c in CATEGORIES])
        if rank == 0:
            Path(out).write_bytes(pickle.dumps(reduced))
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_ranks(corpus: tuple[list[Image], dict[str, Path]], tmp_path: Path) -> None:
    import torch.multiprocessing as tmp_mp

    stats = _per_image_stats(corpus[0][:4])
    parts = [stats[0] + stats[1], stats[2] + stats[3]]
    out = tmp_path / "reduced.pkl"
    tmp_mp.start_processes(
        _all_reduce_worker, args=(2, str(tmp_path / "init"), parts, str(out)), nprocs=2, start_method="fork"
    )
    assert _close(pickle.loads(out.read_bytes()), parts[0] + parts[1])


def test_result_structure_and_table(corpus: tuple[list[Image], dict[str, Path]]) -> None:
    result = _folders(corpus[1])
    d = result.to_dict()
    assert set(d) == {"All", "Things", "Stuff", "per_class"}
    assert set(d["All"]) == {"pq", "sq", "rq", "n"}
    assert list(d["per_class"]) == [c["id"] for c in CATEGORIES]
    assert all(set(v) == {"pq", "sq", "rq", "tp", "fp", "fn"} for v in d["per_class"].values())
    assert result["Things"] is result.things and result.pq == d["All"]["pq"]
    table = result.table()
    for name in ("All", "Things", "Stuff", "person", "grass"):
        assert name in table
    assert f"{100 * result.pq:6.2f}" in table
    with pytest.raises(KeyError, match="unknown group"):
        result["things"]


# --- command line ----------------------------------------------------------------------------
def _argv(paths: dict[str, Path]) -> list[str]:
    return [
        "--gt-json",
        str(paths["gt_json"]),
        "--gt-dir",
        str(paths["gt_dir"]),
        "--pred-json",
        str(paths["pred_json"]),
        "--pred-dir",
        str(paths["pred_dir"]),
    ]


def test_cli_json_output(
    corpus: tuple[list[Image], dict[str, Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, paths = corpus
    out = tmp_path / "pq.json"
    assert pq_main([*_argv(paths), "--json", str(out), "--workers", "2"]) == 0
    written = json.loads(out.read_text())
    _, ref = reference(paths)
    assert written["All"] == pytest.approx(ref["All"], abs=TOL)
    assert {int(k): v["pq"] for k, v in written["per_class"].items()} == pytest.approx(
        {k: v["pq"] for k, v in ref["per_class"].items()}, abs=TOL
    )
    assert "Things" in capsys.readouterr().out


@pytest.mark.parametrize("entry", ["pq_main", "unipan"])
def test_cli_bad_input_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], entry: str) -> None:
    paths = _bad_corpus(tmp_path, "pred_id_not_in_json")
    if entry == "pq_main":
        code = pq_main(_argv(paths))
    else:
        cli = pytest.importorskip("unipan.cli")
        code = cli.main(["pq", *_argv(paths)])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and "image 'img-2'" in err, err


def test_cli_lenient(tmp_path: Path) -> None:
    paths = _quirk_corpus(tmp_path, "gt_area_differs")
    assert pq_main(_argv(paths)) == 2
    assert pq_main([*_argv(paths), "--lenient"]) == 0
