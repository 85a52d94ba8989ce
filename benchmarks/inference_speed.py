"""Inference time of unipan's models against torchvision's Mask R-CNN, in one run.

Setting: one 800 x 1216 image, COCO-sized heads (80 things, 53 stuff), random weights (the
parts a model shares with Panoptic FPN take Panoptic FPN's, so both keep the same detections),
the same number of detections on both sides (score threshold 0, 100 detections kept), 2 CPU
threads, median of `--runs` timed runs after one warm-up run. unipan's time is the whole
`model(batch)` call: backbone, both branches and the panoptic fusion, at the input size.
torchvision's is `maskrcnn_resnet50_fpn(...)([image])`, which pastes 100 full-image masks.

Targets: Panoptic FPN R50 <= 1.10 x Mask R-CNN R50-FPN; UPSNet R50 <= 1.15 x Panoptic FPN R50;
AUNet R50 <= 1.10 x Panoptic FPN R50 (MACs beside it: --macs --models aunet).
REFINE R50 <= 1.80 x Panoptic FPN R50 (the paper's 10.0 / 5.5 FPS; MACs: --macs --models refine).
The fusion alone on 1024 x 2048 with 100 instances is `benchmarks/fusion_speed.py` (run here too
with --fusion).

Parameter counts against the papers (UPSNet R50: 46.1M on COCO, 44.5M on Cityscapes, SPINet's
Table 2) are printed first; ``--params-only`` prints just them (models built on the meta device,
no weights allocated, no timing).

Run: ``python benchmarks/inference_speed.py [--runs 5] [--threads 2] [--models panoptic_fpn upsnet]``
or ``python benchmarks/inference_speed.py --params-only``
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


def cityscapes_sized_meta() -> DatasetMeta:
    """8 thing and 11 stuff categories, as Cityscapes-panoptic (names are placeholders)."""
    cats = [{"id": 24 + i, "name": f"thing{i}", "isthing": 1} for i in range(8)]
    cats += [{"id": 7 + i, "name": f"stuff{i}", "isthing": 0} for i in range(11)]
    return DatasetMeta(cats, name="cityscapes-sized")


# (model, config under unipan/configs/<model>/, dataset-sized meta, the paper's count, its source)
PAPER_PARAMS: list[tuple[str, str, Callable[[], DatasetMeta], float, str]] = [
    ("upsnet", "r50_coco", coco_sized_meta, 46.1e6, "UPSNet R50 COCO, SPINet Table 2"),
    ("upsnet", "r50_cityscapes", cityscapes_sized_meta, 44.5e6, "UPSNet R50 Cityscapes, SPINet Table 2"),
    ("spinet", "r50_cityscapes", cityscapes_sized_meta, 42.2e6, "SPINet R50 Cityscapes, SPINet Table 2"),
]


def param_counts(model_name: str, config: str, meta: DatasetMeta) -> tuple[int, int]:
    """(nn.Parameters, nn.Parameters + frozen-BN affine buffers) of a paper config's model.

    Built on the meta device: shapes only, no memory, no initialisation cost. The first number is
    the one the papers report (46.08M for UPSNet R50 COCO); `n_params`, the timing table's count,
    adds the frozen BatchNorm's weight and bias, which are buffers here and in torchvision.
    """
    cfg = load_config(config_dir() / model_name / f"{config}.yaml")
    with torch.device("meta"):
        model = build_model(cfg, meta)
    return sum(p.numel() for p in model.parameters()), n_params(model)


def print_paper_params() -> None:
    """The PAPER_PARAMS block: ours against the papers' parameter counts."""
    print(f"{'model (config)':<32}{'params (M)':>12}{'+frozen BN (M)':>16}{'paper (M)':>11}  source")
    for model_name, config, make_meta, paper, source in PAPER_PARAMS:
        params, with_bn = param_counts(model_name, config, make_meta())
        label = f"{model_name} ({config})"
        print(f"{label:<32}{params / 1e6:>12.2f}{with_bn / 1e6:>16.2f}{paper / 1e6:>11.1f}  {source}")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for name, b in model.named_buffers() if name.endswith(("weight", "bias"))
    )


def _sync() -> None:
    """Wait for queued CUDA work (a no-op on the CPU), so that a timing covers the kernels."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_runs(fn: Callable[[], object], runs: int) -> tuple[float, object]:
    out = fn()  # warm-up: allocator, lazy inits
    times = []
    for _ in range(runs):
        _sync()
        t0 = time.perf_counter()
        out = fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


# Per model: the overrides that let random weights keep DETECTIONS detections, whatever keys the
# model's own detection filter uses. A registered model without an entry runs with its config as is.
BENCH_OVERRIDES: dict[str, list[str]] = {
    # Untrained class scores sit at the prior (0.01): a threshold of 0 lets every location yield a
    # filter; 20 candidates per level (5 levels on COCO) bound the single-shot conv at 100 thing
    # kernels before the mask-box NMS, the count the other models keep
    "spinet": [
        "model.spinet.score_thresh=0.0",
        "model.spinet.pre_topk=20",
        f"model.spinet.max_detections={DETECTIONS}",
        "model.fusion.instance_score_thresh=0.0",
    ],
    "refine": [
        "model.roi_heads.score_thresh=0.0",
        f"model.roi_heads.detections_per_img={DETECTIONS}",
        # every detection goes through IBPP, the occlusion head's candidate pairs and the fusion
        "model.fusion.instance_score_thresh=0.0",
    ],
    "aunet": [
        "model.roi_heads.score_thresh=0.0",
        f"model.roi_heads.detections_per_img={DETECTIONS}",
        # MAM on all DETECTIONS (trained: those above the fusion's 0.5, which random scores never
        # reach); the fusion itself stays Panoptic FPN's
        "model.aunet.mam_score_thresh=0.0",
    ],
    "panoptic_fpn": ["model.roi_heads.score_thresh=0.0", f"model.roi_heads.detections_per_img={DETECTIONS}"],
    "upsnet": [
        "model.roi_heads.score_thresh=0.0",
        f"model.roi_heads.detections_per_img={DETECTIONS}",
        # UPSNet's own inference filter (NMS 0.5, score > 0.6) would keep few random detections
        "model.fusion.score_thresh=0.0",
        "model.fusion.nms_thresh=1.0",
        f"model.fusion.max_detections={DETECTIONS}",
    ],
    # Untrained sigmoid scores sit at the prior (0.01), under the 0.05 score threshold. At a threshold
    # of 0 every (anchor, class) pair reaches the class-wise NMS: 5 levels x 1000 anchors x 80
    # classes = 400k candidates, where Panoptic FPN's box head gives 1000 x 80 = 80k; 200 anchors
    # per level give the same 80k (a trained model's 0.05 threshold keeps far fewer than either).
    "spatialflow": [
        "model.spatialflow.score_thresh=0.0",
        f"model.spatialflow.max_detections={DETECTIONS}",
        "model.spatialflow.nms_pre=200",
    ],
}


def unipan_model(name: str, meta: DatasetMeta) -> nn.Module:
    cfg = load_config(config_dir() / name / "r50_coco.yaml", BENCH_OVERRIDES.get(name, []))
    return build_model(cfg, meta).eval()


def share_weights(model: nn.Module, base: nn.Module) -> int:
    """Copy into `model` every parameter and buffer of `base` with the same name and shape.

    AUNet and REFINE extend Panoptic FPN under the same names: with its weights for the shared
    parts, both see the same proposals and detections, so a time ratio measures the added
    modules, not two random draws that happen to keep different detections. Returns how many
    tensors were copied.
    """
    mine = model.state_dict()
    shared = {k: v for k, v in base.state_dict().items() if k in mine and mine[k].shape == v.shape}
    model.load_state_dict(shared, strict=False)
    return len(shared)


MAC_SIZES = ((800, 1216), (600, 1000))


def count_macs(fn: Callable[[], object]) -> int:
    """Multiply-accumulates of one call, as `torch.utils.flop_counter` counts them (FLOPs / 2).

    Convolutions and matrix products are counted; RoIAlign, NMS, grid sampling and element-wise
    ops are not (they are a small part of these models).
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() // 2


def mac_comparison(names: list[str], runs: int, device: torch.device) -> None:
    """Time, parameters and MACs of each model beside Panoptic FPN R50 at each of `MAC_SIZES`.

    The target of a model whose heads cost more than Panoptic FPN's (SpatialFlow): its time ratio
    to Panoptic FPN within 1.1 x its MAC ratio, i.e. no time spent beyond the compute it needs.
    The models' runs alternate (A, B, A, B, ...), so that a change of load hits both alike; the
    process CPU time (all threads) is printed beside the wall time: on a shared machine it is the
    steadier measure of the work done.
    """
    meta = coco_sized_meta()
    names = ["panoptic_fpn", *[n for n in names if n != "panoptic_fpn"]]
    models = {name: unipan_model(name, meta).to(device) for name in names}
    for name, model in models.items():
        if name != "panoptic_fpn":
            share_weights(model, models["panoptic_fpn"])
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
    for h, w in MAC_SIZES:
        image01 = torch.rand(3, h, w, device=device)
        # padded to the models' multiple of 32 (600 x 1000 -> 608 x 1024), as a collated batch is
        hp, wp = -(-h // 32) * 32, -(-w // 32) * 32
        images = torch.zeros(1, 3, hp, wp, device=device)
        images[0, :, :h, :w] = (image01 * 255 - mean) / std
        batch = Batch(images=images, image_sizes=[(h, w)], image_ids=["bench"], original_sizes=[(h, w)])
        wall: dict[str, list[float]] = {name: [] for name in models}
        cpu: dict[str, list[float]] = {name: [] for name in models}
        dets: dict[str, int] = {}
        with torch.inference_mode():
            for name, model in models.items():
                raw = model(batch)[0].raw  # warm-up
                dets[name] = len(raw) if raw is not None else -1
            for _ in range(runs):
                for name, model in models.items():
                    _sync()
                    t0, c0 = time.perf_counter(), time.process_time()
                    model(batch)
                    _sync()
                    wall[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
        macs = {}
        with torch.no_grad():
            for name, model in models.items():
                macs[name] = count_macs(lambda model=model, batch=batch: model(batch))
        print(f"\n{h}x{w} input, median of {runs} alternating runs after 1 warm-up, random weights")
        header = f"{'model':<16}{'wall s':>8}{'CPU s':>8}{'params (M)':>12}{'GMACs':>8}{'dets':>6}"
        print(f"{header}{'wall ratio':>12}{'CPU ratio':>11}{'MAC ratio':>11}")
        base = "panoptic_fpn"
        for name in models:
            w_s, c_s = statistics.median(wall[name]), statistics.median(cpu[name])
            print(
                f"{name:<16}{w_s:>8.2f}{c_s:>8.2f}{n_params(models[name]) / 1e6:>12.2f}{macs[name] / 1e9:>8.1f}"
                f"{dets[name]:>6}{w_s / statistics.median(wall[base]):>12.3f}"
                f"{c_s / statistics.median(cpu[base]):>11.3f}{macs[name] / macs[base]:>11.3f}"
            )
        for name in models:
            if name == base:
                continue
            mac_ratio = macs[name] / macs[base]
            for label, times in (("wall", wall), ("CPU", cpu)):
                r = statistics.median(times[name]) / statistics.median(times[base]) / mac_ratio
                verdict = "met" if r <= 1.10 else "NOT met"
                print(f"{name}: {label} time ratio / MAC ratio = {r:.3f}  (target <= 1.10: {verdict})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs per model (median is reported)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--models", nargs="+", default=sorted(MODELS), help="unipan models (default: every registered one)")
    ap.add_argument("--fusion", action="store_true", help="also run benchmarks/fusion_speed.py")
    ap.add_argument("--params-only", action="store_true", help="print the parameter counts against the papers only")
    ap.add_argument("--device", default="cpu", help="cpu (default) | cuda (benchmarks/gpu_check.sh)")
    ap.add_argument(
        "--macs",
        action="store_true",
        help="time, parameters and MACs of --models beside Panoptic FPN at 800x1216 and 600x1000, then exit",
    )
    args = ap.parse_args()
    if args.macs:
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        mac_comparison(args.models, args.runs, torch.device(args.device))
        return
    print_paper_params()
    if args.params_only:
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    meta = coco_sized_meta()
    h, w = IMAGE_SIZE
    device = torch.device(args.device)
    image01 = torch.rand(3, h, w).to(device)

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
    tv.to(device)
    with torch.inference_mode():
        tv_s, tv_out = time_runs(lambda: tv([image01]), args.runs)
    tv_dets = len(tv_out[0]["boxes"])  # type: ignore[index]
    rows = [("torchvision maskrcnn_resnet50_fpn", tv_s, n_params(tv), tv_dets)]

    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
    batch = Batch(
        images=((image01 * 255 - mean) / std)[None],
        image_sizes=[(h, w)],
        image_ids=["bench"],
        original_sizes=[(h, w)],
    )
    times: dict[str, float] = {}
    base_model = unipan_model("panoptic_fpn", meta).to(device) if "panoptic_fpn" in args.models else None
    for name in args.models:
        model = base_model if name == "panoptic_fpn" else unipan_model(name, meta).to(device)
        if base_model is not None and name != "panoptic_fpn":
            share_weights(model, base_model)
        with torch.inference_mode():
            s, out = time_runs(lambda model=model: model(batch), args.runs)
        raw = out[0].raw  # type: ignore[index]
        dets = len(raw) if raw is not None else -1
        times[name] = s
        rows.append((f"unipan {name} R50", s, n_params(model), dets))

    where = f"{args.threads} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"\n{h}x{w} input, {where}, median of {args.runs} runs after 1 warm-up, random weights\n")
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
    if "refine" in times and "panoptic_fpn" in times:
        # the paper's REFINE R101-DCN vs Panoptic FPN R101: 10.0 / 5.5 FPS (Table 2)
        r = times["refine"] / times["panoptic_fpn"]
        print(f"REFINE / Panoptic FPN:     {r:.3f}  (target <= 1.80: {'met' if r <= 1.80 else 'NOT met'})")
    if "aunet" in times and "panoptic_fpn" in times:
        r = times["aunet"] / times["panoptic_fpn"]
        print(f"AUNet / Panoptic FPN:      {r:.3f}  (target <= 1.10: {'met' if r <= 1.10 else 'NOT met'})")
    if args.fusion:
        here = Path(__file__).resolve().parent
        subprocess.run([sys.executable, str(here / "fusion_speed.py")], check=True)


if __name__ == "__main__":
    main()
