"""Inference time of unipan's models against torchvision's Mask R-CNN, in one run.

Setting: one 800 x 1216 image, COCO-sized heads (80 things, 53 stuff), random weights,
the same number of detections on both sides (score threshold 0, 100 detections kept), 2 CPU
threads, median of `--runs` timed runs after one warm-up run. unipan's time is the whole
`model(batch)` call: backbone, both branches and the panoptic fusion, at the input size.
torchvision's is `maskrcnn_resnet50_fpn(...)([image])`, which pastes 100 full-image masks.

Targets: Panoptic FPN R50 <= 1.10 x Mask R-CNN R50-FPN; UPSNet R50 <= 1.15 x Panoptic FPN R50.
The fusion alone on 1024 x 2048 with 100 instances is `benchmarks/fusion_speed.py` (run here too
with --fusion).

Run: ``python benchmarks/inference_speed.py [--runs 5] [--threads 2] [--models panoptic_fpn upsnet]``
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from unipan.app import config_dir
from unipan.config import load_config
from unipan.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from unipan.modeling.registry import MODELS, build_model
from unipan.structures import Batch, DatasetMeta

IMAGE_SIZE = (800, 1216)
DETECTIONS = 100


def coco_sized_meta() -> DatasetMeta:
    """80 thing and 53 stuff categories, as COCO-panoptic (names are placeholders)."""
    cats = [{"id": i + 1, "name": f"thing{i}", "isthing": 1} for i in range(80)]
    cats += [{"id": 92 + i, "name": f"stuff{i}", "isthing": 0} for i in range(53)]
    return DatasetMeta(cats, name="coco-sized")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for name, b in model.named_buffers() if name.endswith(("weight", "bias"))
    )


def time_runs(fn: Callable[[], object], runs: int) -> tuple[float, object]:
    out = fn()  # warm-up: allocator, lazy inits
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


# Per model: the overrides that let random weights keep DETECTIONS detections, whatever keys the
# model's own detection filter uses. A registered model without an entry runs with its config as is.
BENCH_OVERRIDES: dict[str, list[str]] = {
    "panoptic_fpn": ["model.roi_heads.score_thresh=0.0", f"model.roi_heads.detections_per_img={DETECTIONS}"],
    "upsnet": [
        "model.roi_heads.score_thresh=0.0",
        f"model.roi_heads.detections_per_img={DETECTIONS}",
        # UPSNet's own inference filter (NMS 0.5, score > 0.6) would keep few random detections
        "model.fusion.score_thresh=0.0",
        "model.fusion.nms_thresh=1.0",
        f"model.fusion.max_detections={DETECTIONS}",
    ],
}


def unipan_model(name: str, meta: DatasetMeta) -> nn.Module:
    cfg = load_config(config_dir() / name / "r50_coco.yaml", BENCH_OVERRIDES.get(name, []))
    return build_model(cfg, meta).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs per model (median is reported)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--models", nargs="+", default=sorted(MODELS), help="unipan models (default: every registered one)")
    ap.add_argument("--fusion", action="store_true", help="also run benchmarks/fusion_speed.py")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    meta = coco_sized_meta()
    h, w = IMAGE_SIZE
    image01 = torch.rand(3, h, w)

    from torchvision.models.detection import maskrcnn_resnet50_fpn

    tv = maskrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=meta.num_things + 1,
        box_score_thresh=0.0,
        box_detections_per_img=DETECTIONS,
        min_size=h,
        max_size=max(h, w),
    ).eval()
    with torch.inference_mode():
        tv_s, tv_out = time_runs(lambda: tv([image01]), args.runs)
    tv_dets = len(tv_out[0]["boxes"])  # type: ignore[index]
    rows = [("torchvision maskrcnn_resnet50_fpn", tv_s, n_params(tv), tv_dets)]

    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    batch = Batch(
        images=((image01 * 255 - mean) / std)[None],
        image_sizes=[(h, w)],
        image_ids=["bench"],
        original_sizes=[(h, w)],
    )
    times: dict[str, float] = {}
    for name in args.models:
        model = unipan_model(name, meta)
        with torch.inference_mode():
            s, out = time_runs(lambda model=model: model(batch), args.runs)
        raw = out[0].raw  # type: ignore[index]
        dets = len(raw) if raw is not None else -1
        times[name] = s
        rows.append((f"unipan {name} R50", s, n_params(model), dets))

    print(f"\n{h}x{w} input, {args.threads} threads, median of {args.runs} runs after 1 warm-up, random weights\n")
    print(f"{'model':<40}{'seconds':>10}{'params (M)':>13}{'detections':>12}")
    for label, s, p, d in rows:
        print(f"{label:<40}{s:>10.2f}{p / 1e6:>13.2f}{d:>12}")
    print()
    if "panoptic_fpn" in times:
        r = times["panoptic_fpn"] / tv_s
        print(f"Panoptic FPN / Mask R-CNN: {r:.3f}  (target <= 1.10: {'met' if r <= 1.10 else 'NOT met'})")
    if "upsnet" in times and "panoptic_fpn" in times:
        r = times["upsnet"] / times["panoptic_fpn"]
        print(f"UPSNet / Panoptic FPN:     {r:.3f}  (target <= 1.15: {'met' if r <= 1.15 else 'NOT met'})")
    if args.fusion:
        here = Path(__file__).resolve().parent
        subprocess.run([sys.executable, str(here / "fusion_speed.py")], check=True)


if __name__ == "__main__":
    main()
