"""SPINet's Table 2 on the CPU: network and post-processing time beside UPSNet and Panoptic FPN.

Setting (the paper's Cityscapes one): one 1024 x 2048 image, 8 thing and 11 stuff classes, the
`unipan/configs/<model>/r50_cityscapes.yaml` models with random weights, 100 instances on every side
(`inference_speed.BENCH_OVERRIDES`; SPINet's 4 levels give 25 candidates each and its NMS keeps
them all), `--threads` CPU threads, median of `--runs` timed rounds after one warm-up round (the
models take turns). "Network" is `model.raw_predictions` (everything up to the RawPrediction: for
SPINet the single-shot conv, the mask-box NMS and the mask upsampling), "post" the model's fusion
on it (`model.fuse`: Panoptic FPN's heuristic for SPINet and Panoptic FPN, UPSNet's panoptic
head). The paper (TITAN XP): SPINet 171 + 30 ms, UPSNet 191 + 310 ms.

Random weights make SPINet's thing masks image-sized blobs (a random kernel is positive on about
half of a random feature), the worst case of the heuristic fusion on full-image masks (every
instance's window is the whole image); a trained model's masks are object-sized. So SPINet's
post-processing is also timed on 100 object-sized masks (ellipses in boxes of 16..512 px, as
`fusion_speed.py`'s detections) with its own semantic logits (`--post-only` runs just that).

Targets: SPINet's total below UPSNet's; SPINet's post-processing <= 0.2 x UPSNet's.

Run: ``python benchmarks/spinet_speed.py [--runs 3] [--threads 2]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import random_boxes
from inference_speed import BENCH_OVERRIDES, cityscapes_sized_meta

from unipan.app import config_dir
from unipan.config import load_config
from unipan.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from unipan.modeling.meta_arch import PanopticModel
from unipan.modeling.registry import build_model
from unipan.structures import Batch, RawPrediction, masks_to_boxes

IMAGE_SIZE = (1024, 2048)
MODELS = ("spinet", "upsnet", "panoptic_fpn")
# 4 levels x 25 = 100 candidates; random kernels give near-identical masks that the mask-box NMS
# would merge into a few: an IoU threshold of 1 keeps all 100 for the fusion, as the other models'
OVERRIDES = {"spinet": ["model.spinet.pre_topk=25", "model.spinet.nms_thresh=1.0"]}


def object_sized(raw: RawPrediction, size: tuple[int, int], n: int = 100) -> RawPrediction:
    """`raw` with `n` ellipse masks inscribed in random boxes of 16..512 px (seeded), score-ordered."""
    h, w = size
    g = torch.Generator().manual_seed(0)
    boxes = random_boxes(g, n, size)
    ys = torch.arange(h, dtype=torch.float32)[:, None]
    xs = torch.arange(w, dtype=torch.float32)[None, :]
    masks = torch.zeros((n, h, w), dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, max((x1 - x0) / 2, 1.0), max((y1 - y0) / 2, 1.0)
        iy0, iy1, ix0, ix1 = int(y0), int(y1) + 1, int(x0), int(x1) + 1
        masks[i, iy0:iy1, ix0:ix1] = ((xs[:, ix0:ix1] - cx) / rx) ** 2 + ((ys[iy0:iy1] - cy) / ry) ** 2 <= 1
    return RawPrediction(
        boxes=masks_to_boxes(masks),
        scores=torch.linspace(1.0, 0.5, n),
        labels=torch.randint(0, 8, (n,), generator=g),
        sem_logits=raw.sem_logits,
        masks=masks,
        sem_space=raw.sem_space,
        sem_pred=raw.sem_pred,
        mask_boxes_tight=True,  # as SPINet's own predictions: boxes from the masks
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="timed rounds (median is reported)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--post-only", action="store_true", help="only SPINet's post-processing on object-sized masks")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    meta = cityscapes_sized_meta()
    h, w = IMAGE_SIZE
    image = (torch.rand(3, h, w) * 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        3, 1, 1
    )
    batch = Batch(images=image[None], image_sizes=[(h, w)], image_ids=["bench"], original_sizes=[(h, w)])
    if args.post_only:
        spinet = build_model(load_config(config_dir() / "spinet" / "r50_cityscapes.yaml"), meta).eval()
        stuff = torch.randn(meta.num_stuff, h, w)
        raw = object_sized(
            RawPrediction(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0), stuff, sem_space="stuff"), (h, w)
        )
        raw.sem_pred = stuff.argmax(dim=0)
        post_ms = _median_post(spinet, raw, meta, (h, w), args.runs)
        print(f"SPINet post, 100 object-sized masks: {post_ms:.0f} ms")
        return
    models = {}
    for name in MODELS:
        cfg = load_config(
            config_dir() / name / "r50_cityscapes.yaml", [*BENCH_OVERRIDES.get(name, []), *OVERRIDES.get(name, [])]
        )
        model = build_model(cfg, meta).eval()
        assert isinstance(model, PanopticModel)
        models[name] = model
    # interleaved (one round of every model, then the next), so that a change of the machine's load
    # during the benchmark reaches every model alike; the first round is the warm-up
    net: dict[str, list[float]] = {name: [] for name in MODELS}
    post: dict[str, list[float]] = {name: [] for name in MODELS}
    counts = {}
    with torch.inference_mode():
        for _ in range(args.runs + 1):
            for name, model in models.items():
                t0 = time.perf_counter()
                (raw,) = model.raw_predictions(batch)
                t1 = time.perf_counter()
                model.fuse(raw, meta, image_id="bench", original_size=(h, w))
                t2 = time.perf_counter()
                net[name].append((t1 - t0) * 1e3)
                post[name].append((t2 - t1) * 1e3)
                counts[name] = len(raw)
                if name == "spinet":
                    spinet_raw = raw
    obj_post = _median_post(models["spinet"], object_sized(spinet_raw, (h, w)), meta, (h, w), args.runs)
    rows = {
        name: (
            statistics.median(net[name][1:]),
            statistics.median(post[name][1:]),
            counts[name],
            sum(p.numel() for p in model.parameters()),
        )
        for name, model in models.items()
    }
    print(
        f"\n{h}x{w}, 19 classes, {args.threads} threads, median of {args.runs} rounds after 1 warm-up round, "
        "random weights\n"
    )
    header = f"{'model (R50, Cityscapes config)':<32}{'network ms':>12}{'post ms':>10}{'total ms':>10}"
    print(f"{header}{'inst':>6}{'params M':>10}")
    for name, (net, post, n, params) in rows.items():
        print(f"{name:<32}{net:>12.0f}{post:>10.0f}{net + post:>10.0f}{n:>6}{params / 1e6:>10.2f}")
    s_net, s_post, _, _ = rows["spinet"]
    u_net, u_post, _, _ = rows["upsnet"]
    total_ok = s_net + s_post < u_net + u_post
    post_ratio = s_post / u_post
    total_ratio = (s_net + s_post) / (u_net + u_post)
    print(f"\nSPINet total / UPSNet total: {total_ratio:.3f} (target < 1: {'met' if total_ok else 'NOT met'})")
    print(f"SPINet post / UPSNet post:   {post_ratio:.3f} (target <= 0.2: {'met' if post_ratio <= 0.2 else 'NOT met'})")
    print(f"SPINet post on 100 object-sized masks: {obj_post:.0f} ms = {obj_post / u_post:.3f} x UPSNet's post")
    print("paper (TITAN XP): SPINet 171 + 30 = 201 ms, UPSNet 191 + 310 = 501 ms; post ratio 0.097")


def _median_post(model: PanopticModel, raw: RawPrediction, meta: object, size: tuple[int, int], runs: int) -> float:
    """Median ms of the model's fusion on `raw` over `runs` runs after one warm-up."""
    times = []
    for _ in range(runs + 1):
        t0 = time.perf_counter()
        model.fuse(raw, meta, image_id="bench", original_size=size)  # type: ignore[arg-type]
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[1:])


if __name__ == "__main__":
    main()
