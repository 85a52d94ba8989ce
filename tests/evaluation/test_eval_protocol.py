"""The evaluation protocol: every number at each image's original size, as the reference tools give it.

- `evaluate` equals `unipan pq` over the predictions `unipan eval --out` writes (1e-9), on the
  synthetic set behind a test-time resize and on the COCO sample of panopticapi;
- its mask and box AP equal pycocotools' COCOeval run by the test on the instance results JSON it
  writes, against ground truth the test converts from the panoptic files itself;
- the semantic head's mIoU and the panoptic output's mIoU are reported under distinct names.

The model is a test double: ground truth at the input size made noisy (blurred noise on the
semantic logits, jittered boxes, RoI mask grids, random scores), through the real heuristic fusion.
"""

from __future__ import annotations

import functools
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from unipan.config import load_config
from unipan.data.build import build_dataset
from unipan.data.coco_panoptic import CocoPanopticDataset
from unipan.data.transforms import Compose, Normalize, ResizeShortestEdge
from unipan.engine.evaluator import evaluate
from unipan.evaluation.pq import pq_main
from unipan.fusion.heuristic import heuristic_fusion
from unipan.fusion.oracle import oracle_raw_prediction
from unipan.io import load_json, read_id_png
from unipan.modeling.meta_arch import PanopticModel
from unipan.structures import Batch, DatasetMeta, RawPrediction

COCO_SAMPLE = Path("/work/shared/data/panopticapi/sample_data")


class NoisyOracle(PanopticModel):
    """Ground truth at the input size, made imperfect in a way that depends on the image only."""

    needs_targets_at_inference = True

    def __init__(self, meta: DatasetMeta, noise: float = 5.0, stuff_area: int = 64) -> None:
        fuse = functools.partial(heuristic_fusion, stuff_area=stuff_area, instance_score_thresh=0.3)
        super().__init__(meta=meta, size_divisibility=8, fuse=fuse)
        self.noise = noise

    def raw_predictions(self, batch: Batch) -> list[RawPrediction]:
        assert batch.targets is not None
        out = []
        for image_id, target in zip(batch.image_ids, batch.targets, strict=True):
            g = torch.Generator().manual_seed(zlib.crc32(image_id.encode()))
            oracle = oracle_raw_prediction(target, self.meta)
            c, h, w = oracle.sem_logits.shape
            coarse = torch.randn(1, c, max(h // 8, 1), max(w // 8, 1), generator=g)
            blurred = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
            n = len(oracle)
            boxes = oracle.boxes + 2.0 * torch.randn(n, 4, generator=g)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            assert oracle.masks is not None
            # RoI i samples mask i: boxes as [K, 5] rows (batch index, x0, y0, x1, y1)
            rois = torch.cat([torch.arange(n, dtype=boxes.dtype)[:, None], boxes], dim=1)
            grids = roi_align(oracle.masks[:, None].float(), rois, output_size=28, sampling_ratio=2, aligned=True)
            out.append(
                RawPrediction(
                    boxes=boxes,
                    scores=torch.rand(n, generator=g),
                    labels=oracle.labels,
                    sem_logits=oracle.sem_logits + self.noise * blurred,
                    mask_probs=grids[:, 0].clamp(0, 1),
                    sem_space="all",
                )
            )
        return out


def run_unipan_pq(gt_json: Path, gt_dir: Path, pred_dir: Path, tmp_path: Path) -> dict:
    """`unipan pq` over the written predictions (its in-process entry point), as a dict."""
    out = tmp_path / "pq_cli.json"
    args = ["--gt-json", str(gt_json), "--gt-dir", str(gt_dir), "--pred-json", str(pred_dir / "predictions.json")]
    assert pq_main([*args, "--pred-dir", str(pred_dir / "panoptic"), "--json", str(out)]) == 0
    return load_json(out)


def assert_same_pq(a: dict, b: dict, tol: float = 1e-9) -> None:
    for group in ("All", "Things", "Stuff"):
        for key in ("pq", "sq", "rq", "n"):
            assert a[group][key] == pytest.approx(b[group][key], abs=tol), (group, key)
    assert {int(k) for k in a["per_class"]} == {int(k) for k in b["per_class"]}
    per_b = {int(k): v for k, v in b["per_class"].items()}
    for k, v in a["per_class"].items():
        for key in ("pq", "sq", "rq", "tp", "fp", "fn"):
            assert v[key] == pytest.approx(per_b[int(k)][key], abs=tol), (k, key)


def independent_coco_ap(gt_json: Path, gt_dir: Path, results_json: Path, meta: DatasetMeta) -> dict[str, list[float]]:
    """COCOeval run here: GT instances converted from the panoptic files, detections from the JSON."""
    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    panoptic = load_json(gt_json)
    images, anns = [], []
    for ann in panoptic["annotations"]:
        ids = read_id_png(gt_dir / ann["file_name"])
        images.append({"id": ann["image_id"], "height": ids.shape[0], "width": ids.shape[1]})
        for seg in ann["segments_info"]:
            if not meta.isthing(seg["category_id"]):
                continue
            mask = np.asfortranarray((ids == seg["id"]).astype(np.uint8))
            rle = mask_util.encode(mask)
            rle["counts"] = rle["counts"].decode()
            ys, xs = np.nonzero(mask)
            bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": ann["image_id"],
                    "category_id": seg["category_id"],
                    "segmentation": rle,
                    "area": int(mask.sum()),
                    "bbox": bbox,
                    "iscrowd": seg.get("iscrowd", 0),
                }
            )
    cats = [{"id": c} for c in meta.thing_dataset_ids]
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": cats}
    gt.createIndex()
    dets = json.loads(results_json.read_text())
    stats = {}
    for iou_type, drop in (("segm", "bbox"), ("bbox", "segmentation")):
        # detectron2's protocol: mask AP sizes objects by mask area, box AP by box area
        dt = gt.loadRes([{k: v for k, v in d.items() if k != drop} for d in dets])
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        stats[iou_type] = [100 * float(v) if v >= 0 else float("nan") for v in ev.stats[:6]]
    return stats


def check_ap(result_metrics: dict[str, float], reference: dict[str, list[float]]) -> None:
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    for iou_type, prefix in (("segm", "mask"), ("bbox", "box")):
        got = [result_metrics[f"{prefix}_{n}"] for n in names]
        assert got == pytest.approx(reference[iou_type], abs=1e-12, nan_ok=True), iou_type


def test_evaluate_equals_unipan_pq_and_cocoeval_behind_a_test_resize(tmp_path: Path) -> None:
    root = tmp_path / "synth"
    cfg = load_config(
        overrides=[
            f"data.synth_root={root}",
            "data.synth_val=4",
            "data.synth_size=[48,64]",
            "data.min_size_test=80",  # input 80 x 107: every item is resized
            "data.max_size_test=200",
        ]
    )
    val = build_dataset(cfg.data, "val", is_train=False)
    sample = val[0]
    assert tuple(sample.image.shape[-2:]) == (80, 107) and sample.original_size == (48, 64)
    meta = val.meta  # type: ignore[attr-defined]
    out = tmp_path / "eval"
    result = evaluate(NoisyOracle(meta), val, meta, "cpu", batch_size=2, out_dir=out)
    assert 20.0 < result.metrics["PQ"] < 95.0  # imperfect, so the comparison means something
    gt_json = root / "val" / "panoptic.json"
    assert_same_pq(result.pq.to_dict(), run_unipan_pq(gt_json, root / "val" / "panoptic", out, tmp_path))

    # instance results at the original size, scored exactly as COCOeval scores the written file
    dets = json.loads((out / "instances_results.json").read_text())
    assert result.instances_json == out / "instances_results.json" and dets
    assert {tuple(d["segmentation"]["size"]) for d in dets} == {(48, 64)}
    assert {type(d["image_id"]) for d in dets} == {type(load_json(gt_json)["annotations"][0]["image_id"])}
    check_ap(
        result.metrics, independent_coco_ap(gt_json, root / "val" / "panoptic", out / "instances_results.json", meta)
    )
    assert 0.0 < result.metrics["mask_AP"] < 100.0

    # two mIoUs under distinct names: the head's ("all" space here) and the panoptic output's
    assert result.sem_space == "all"
    assert result.metrics["mIoU_sem"] == pytest.approx(100 * result.miou_sem)
    assert result.metrics["mIoU_pan"] == pytest.approx(100 * result.miou_pan)
    assert result.metrics["mIoU_sem"] != result.metrics["mIoU_pan"]
    assert "mIoU (semantic head, all classes)" in result.summary() and "mask" in result.summary()


@pytest.mark.skipif(not COCO_SAMPLE.is_dir(), reason="panopticapi's COCO sample is not available")
def test_evaluate_equals_unipan_pq_on_the_coco_sample(tmp_path: Path) -> None:
    gt_json = COCO_SAMPLE / "panoptic_examples.json"
    gt_dir = COCO_SAMPLE / "panoptic_examples"
    transform = Compose([ResizeShortestEdge(200, 400), Normalize()])
    val = CocoPanopticDataset(COCO_SAMPLE / "input_images", gt_dir, gt_json, transform=transform)
    assert tuple(val[0].image.shape[-2:]) != val[0].original_size
    out = tmp_path / "eval"
    result = evaluate(NoisyOracle(val.meta, noise=6.0, stuff_area=4096), val, val.meta, "cpu", out_dir=out)
    assert_same_pq(result.pq.to_dict(), run_unipan_pq(gt_json, gt_dir, out, tmp_path))
    check_ap(result.metrics, independent_coco_ap(gt_json, gt_dir, out / "instances_results.json", val.meta))


def test_datasets_give_their_untransformed_ground_truth(tmp_path: Path) -> None:
    from unipan.data.common import HasOriginalPanoptic
    from unipan.data.synthetic import SyntheticPanoptic, SynthOptions

    synth = SyntheticPanoptic(2, opts=SynthOptions(size=(32, 48)), transform=Compose([ResizeShortestEdge(64, 200)]))
    assert isinstance(synth, HasOriginalPanoptic)
    ids, segments = synth.original_panoptic(1)
    _, raw_ids, raw_segments, _ = synth.load_raw(1)
    assert ids.shape == synth[1].original_size == (32, 48) and np.array_equal(ids, raw_ids)
    assert segments == raw_segments
    if COCO_SAMPLE.is_dir():
        coco = CocoPanopticDataset(
            COCO_SAMPLE / "input_images", COCO_SAMPLE / "panoptic_examples", COCO_SAMPLE / "panoptic_examples.json"
        )
        ids, segments = coco.original_panoptic(0)
        assert ids.shape == coco[0].original_size and segments == coco.annotations[0].segments
