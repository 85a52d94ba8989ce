"""COCO mask and box AP of the thing classes (`unipan.evaluation.coco_ap`).

The reference is pycocotools' COCOeval run here on JSON files the test writes itself (ground truth
from its own masks, detections from its own boxes, scores and masks), with detectron2's
protocol: mask results without `bbox` (objects sized by mask area), box results without
`segmentation`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tight_crops
from torch import Tensor
from torch.utils.data import Dataset

from unipan.data.common import make_sample
from unipan.engine.evaluator import evaluate
from unipan.evaluation.coco_ap import (
    AP_NAMES,
    CocoInstanceStat,
    coco_image_id,
    detection_records,
    evaluate_instances,
    gt_instance_records,
)
from unipan.modeling.meta_arch import PanopticModel
from unipan.structures import Batch, DatasetMeta, PanopticResult, RawPrediction, Sample, SegmentInfo


def meta() -> DatasetMeta:
    cats = [
        {"id": 3, "name": "car", "isthing": 1},
        {"id": 1, "name": "person", "isthing": 1},
        {"id": 20, "name": "sky", "isthing": 0},
    ]
    return DatasetMeta(cats, name="ap")


def scene(seed: int, h: int = 60, w: int = 80) -> tuple[np.ndarray, list[SegmentInfo]]:
    """Sky, then 3-5 thing ellipses (one of them crowd in even scenes), later ones on top."""
    rng = np.random.default_rng(seed)
    ids = np.full((h, w), 100, dtype=np.int32)
    segments = [SegmentInfo(id=100, category_id=20, isthing=False)]
    yy, xx = np.mgrid[:h, :w]
    for k in range(int(rng.integers(3, 6))):
        cy, cx = rng.uniform(5, h - 5), rng.uniform(5, w - 5)
        ry, rx = rng.uniform(3, 18), rng.uniform(3, 25)
        ids[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = k + 1
        crowd = k == 1 and seed % 2 == 0
        segments.append(SegmentInfo(id=k + 1, category_id=int(rng.choice([1, 3])), isthing=True, iscrowd=crowd))
    present = set(np.unique(ids).tolist())
    return ids, [s for s in segments if s.id in present]


def noisy_detections(
    ids: np.ndarray, segments: list[SegmentInfo], seed: int
) -> list[tuple[Tensor, float, int, Tensor]]:
    """(mask BoolTensor[H, W], score, category id, box xyxy) per detection: shifted GT, a wrong
    class, a duplicate and a false positive."""
    rng = np.random.default_rng(seed + 1000)
    out = []
    for seg in segments:
        if not seg.isthing:
            continue
        mask = np.roll(ids == seg.id, shift=(int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(0, 1))
        cat = seg.category_id if rng.random() > 0.2 else (1 if seg.category_id == 3 else 3)
        out.append((mask, float(rng.random()), cat))
        if rng.random() < 0.3:
            out.append((mask, float(rng.random()) * 0.5, cat))  # a duplicate
    fp = np.zeros_like(ids, dtype=bool)
    fp[5:15, 5:30] = True
    out.append((fp, 0.9, 1))
    result = []
    for mask, score, cat in out:
        ys, xs = np.nonzero(mask)
        box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        result.append((torch.from_numpy(mask), score, cat, box))
    return result


def raw_of(dets: list[tuple[Tensor, float, int, Tensor]], m: DatasetMeta, size: tuple[int, int]) -> RawPrediction:
    return RawPrediction(
        boxes=torch.stack([d[3] for d in dets]),
        scores=torch.tensor([d[1] for d in dets]),
        labels=torch.tensor([m.thing_index(d[2]) for d in dets]),
        sem_logits=torch.zeros(m.num_stuff + 1, *size),
        masks=torch.stack([d[0] for d in dets]),
    )


def rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_util

    out = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    out["counts"] = out["counts"].decode()
    return out


def cocoeval_on_files(gt_path: Path, dt_path: Path) -> dict[str, list[float]]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(str(gt_path))
    dets = json.loads(dt_path.read_text())
    out = {}
    for iou_type, drop in (("segm", "bbox"), ("bbox", "segmentation")):
        ev = COCOeval(gt, gt.loadRes([{k: v for k, v in d.items() if k != drop} for d in dets]), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        out[iou_type] = [100 * float(v) if v >= 0 else math.nan for v in ev.stats[:6]]
    return out


def test_ap_equals_cocoeval_on_files_the_test_writes(tmp_path: Path) -> None:
    m = meta()
    images, gt_anns, dt_json = [], [], []
    stat = CocoInstanceStat()
    for seed in range(6):
        ids, segments = scene(seed)
        image_id = str(seed + 1)
        images.append({"id": seed + 1, "height": ids.shape[0], "width": ids.shape[1]})
        for seg in segments:
            if seg.isthing:
                mask = ids == seg.id
                ys, xs = np.nonzero(mask)
                gt_anns.append(
                    {
                        "id": len(gt_anns) + 1,
                        "image_id": seed + 1,
                        "category_id": seg.category_id,
                        "segmentation": rle(mask),
                        "area": int(mask.sum()),
                        "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1],
                        "iscrowd": int(seg.iscrowd),
                    }
                )
        dets = noisy_detections(ids, segments, seed)
        for mask, score, cat, box in dets:
            x0, y0, x1, y1 = box.tolist()
            dt_json.append(
                {
                    "image_id": seed + 1,
                    "category_id": cat,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": score,
                    "segmentation": rle(mask.numpy()),
                }
            )
        records = detection_records(raw_of(dets, m, ids.shape), m, image_id, ids.shape)
        stat.add_image(image_id, ids.shape, gt_instance_records(ids, segments, m, image_id), records)
    categories = [{"id": c, "name": m.category(c).name} for c in m.thing_dataset_ids]
    gt_path, dt_path = tmp_path / "gt.json", tmp_path / "dt.json"
    gt_path.write_text(json.dumps({"images": images, "annotations": gt_anns, "categories": categories}))
    dt_path.write_text(json.dumps(dt_json))
    reference = cocoeval_on_files(gt_path, dt_path)
    got = stat.evaluate(m)
    for iou_type in ("segm", "bbox"):
        values = [got[iou_type][name] for name in AP_NAMES]
        assert values == pytest.approx(reference[iou_type], abs=1e-12, nan_ok=True), iou_type
    assert 10.0 < got["segm"]["AP"] < 95.0  # neither trivial nor perfect

    # ranks' records merge to the same numbers (what a distributed evaluation gathers)
    half_a, half_b = CocoInstanceStat(), CocoInstanceStat()
    for img in stat.images:
        part = half_a if img["id"] % 2 else half_b
        part.add_image(
            img["id"],
            (img["height"], img["width"]),
            [r for r in stat.gt if r["image_id"] == img["id"]],
            [r for r in stat.dt if r["image_id"] == img["id"]],
        )
    half_b += half_a
    assert str(half_b.evaluate(m)) == str(got)


# pycocotools' decode trips numpy 2's copy-keyword deprecation inside its own code
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_detections_are_scaled_and_pasted_at_the_original_size() -> None:
    m = meta()
    # an input 2x the original: box (10, 20)-(30, 60) there is (5, 10)-(15, 30) in the file
    mask_probs = torch.ones(1, 28, 28)
    raw = RawPrediction(
        boxes=torch.tensor([[10.0, 20.0, 30.0, 60.0]]),
        scores=torch.tensor([0.7]),
        labels=torch.tensor([1]),
        sem_logits=torch.zeros(2, 100, 120),
        mask_probs=mask_probs,
    )
    (det,) = detection_records(raw, m, "42", (50, 60))
    assert det["image_id"] == 42 and det["category_id"] == 1 and det["score"] == pytest.approx(0.7)
    assert det["bbox"] == pytest.approx([5.0, 10.0, 10.0, 20.0])
    from pycocotools import mask as mask_util

    decoded = mask_util.decode(det["segmentation"])
    assert decoded.shape == (50, 60)
    ys, xs = np.nonzero(decoded)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (5, 14, 10, 29)  # the box's pixels
    # the best 100 by score, every score kept
    many = RawPrediction(
        boxes=torch.tensor([[0.0, 0.0, 4.0, 4.0]]).repeat(120, 1),
        scores=torch.linspace(0.01, 1.0, 120),
        labels=torch.zeros(120, dtype=torch.long),
        sem_logits=torch.zeros(2, 8, 8),
        mask_probs=torch.ones(120, 28, 28),
    )
    recs = detection_records(many, m, "x", (8, 8))
    assert len(recs) == 100 and recs[0]["score"] == pytest.approx(1.0) and recs[0]["image_id"] == "x"
    assert coco_image_id("007") == "007" and coco_image_id("139") == 139


def test_no_detections_give_ap_0_and_no_ground_truth_nan() -> None:
    m = meta()
    ids, segments = scene(3)
    gt = gt_instance_records(ids, segments, m, "1")
    image = [{"id": 1, "height": ids.shape[0], "width": ids.shape[1]}]
    empty = evaluate_instances(image, gt, [], m)
    assert empty["segm"]["AP"] == 0.0 and empty["bbox"]["AP50"] == 0.0
    nothing = evaluate_instances(image, [], [], m)
    assert all(math.isnan(v) for v in nothing["segm"].values())


# --- through `evaluate`: perfect predictions give AP 100 ----------------------------------------------
class Scenes(Dataset[Sample]):
    """`scene`s; with `upscale` the test-time input is 2x the file (nearest), so sizes differ."""

    def __init__(self, n: int, upscale: bool) -> None:
        self.n, self.upscale, self.meta = n, upscale, meta()

    def __len__(self) -> int:
        return self.n

    def original_panoptic(self, i: int) -> tuple[np.ndarray, list[SegmentInfo]]:
        return scene(i)

    def __getitem__(self, i: int) -> Sample:
        ids, segments = scene(i)
        image = np.zeros((*ids.shape, 3), dtype=np.uint8)
        return make_sample(image, ids, segments, self.meta, str(i), transform=self._transform)

    def _transform(self, image: Tensor, panoptic: Tensor) -> tuple[Tensor, Tensor]:
        if self.upscale:
            image = image.repeat_interleave(2, 1).repeat_interleave(2, 2)
            panoptic = panoptic.repeat_interleave(2, 0).repeat_interleave(2, 1)
        return image, panoptic


def gt_fusion(
    raw: RawPrediction, m: DatasetMeta, *, image_id: str = "", original_size: tuple[int, int] | None = None
) -> PanopticResult:
    return PanopticResult(raw.extras["panoptic"], raw.extras["segments"], image_id)


class PerfectDetector(PanopticModel):
    """Every GT instance (crowd excluded) as a detection with its exact mask and box."""

    needs_targets_at_inference = True

    def __init__(self, m: DatasetMeta) -> None:
        super().__init__(meta=m, size_divisibility=8, fuse=gt_fusion)

    def raw_predictions(self, batch: Batch) -> list[RawPrediction]:
        assert batch.targets is not None
        out = []
        for t in batch.targets:
            n = len(t)
            panoptic = torch.where(t.crowd, 0, t.panoptic)  # crowd regions are not predicted
            out.append(
                RawPrediction(
                    boxes=t.boxes,
                    scores=torch.linspace(1.0, 0.5, n),
                    labels=t.labels,
                    sem_logits=torch.zeros(self.meta.num_stuff + 1, *t.image_size),
                    masks=t.masks,
                    extras={"panoptic": panoptic, "segments": [s for s in t.segments if not s.iscrowd]},
                )
            )
        return out


@pytest.mark.parametrize("upscale", [False, True])
def test_perfect_predictions_give_ap_100(upscale: bool, tmp_path: Path) -> None:
    data = Scenes(4, upscale)
    result = evaluate(PerfectDetector(data.meta), data, data.meta, "cpu", batch_size=2, out_dir=tmp_path)
    for prefix in ("mask", "box"):
        assert result.metrics[f"{prefix}_AP"] == pytest.approx(100.0), prefix
        assert result.metrics[f"{prefix}_AP50"] == pytest.approx(100.0), prefix
    assert result.metrics["PQ"] == pytest.approx(100.0)
    assert result.metrics["mIoU_pan"] == pytest.approx(100.0)
    assert json.loads((tmp_path / "instances_results.json").read_text())


@pytest.mark.parametrize("original_size", [(37, 45), (80, 96), (40, 48)])
def test_mask_crops_give_the_records_of_their_full_masks(original_size: tuple[int, int]) -> None:
    """`mask_crops` on tight boxes (SPINet) resize to the original size exactly as the full masks."""
    m = meta()
    g = torch.Generator().manual_seed(0)
    full = torch.rand(5, 40, 48, generator=g) > 0.97
    full[:, 10:20, 5:30] |= torch.rand(5, 10, 25, generator=g) > 0.3
    full[4] = False  # an empty mask: zero box, 0 x 0 crop
    boxes, crops = tight_crops(full)
    common = {"boxes": boxes, "scores": torch.rand(5, generator=g), "labels": torch.tensor([0, 1, 0, 1, 0])}
    sem = torch.zeros(m.num_stuff + 1, 40, 48)
    dense = detection_records(RawPrediction(**common, sem_logits=sem, masks=full), m, "1", original_size)
    cropped = detection_records(RawPrediction(**common, sem_logits=sem, mask_crops=crops), m, "1", original_size)
    assert dense == cropped
    from pycocotools import mask as mask_util

    assert [int(mask_util.area(d["segmentation"]) > 0) for d in cropped].count(1) == 4
