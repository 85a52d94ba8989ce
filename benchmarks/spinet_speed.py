"""SPINet's Table 2 on the CPU: network and post-processing time beside UPSNet and Panoptic FPN.

Setting (the paper's Cityscapes one): one 1024 x 2048 image, 8 thing and 11 stuff classes, the
`configs/<model>/r50_cityscapes.yaml` models with random weights, 100 instances on every side
(`inference_speed.BENCH_OVERRIDES`; SPINet's 4 levels give 25 candidates each and its NMS keeps
them all), `--threads` CPU threads, median of `--runs` timed rounds after one warm-up round (the
models take turns). "Network" is `model.raw_predictions` (everything up to the RawPrediction: for
SPINet the single-shot conv, the mask-box NMS and the mask upsampling), "post" the model's fusion
on it (`model.fuse`: Panoptic FPN's heuristic for SPINet and Panoptic FPN, UPSNet's panoptic
head). The paper (TITAN XP): SPINet 171 + 30 ms, UPSNet 191 + 310 ms.

Targets: SPINet's total below UPSNet's; SPINet's post-processing <= 0.2 x UPSNet's.

Run: ``python benchmarks/spinet_speed.py [--runs 3] [--threads 2]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from inference_speed import BENCH_OVERRIDES, cityscapes_sized_meta

from unipan.app import config_dir
from unipan.config import load_config
from unipan.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from unipan.modeling.meta_arch import PanopticModel
from unipan.modeling.registry import build_model
from unipan.structures import Batch

IMAGE_SIZE = (1024, 2048)
MODELS = ("spinet", "upsnet", "panoptic_fpn")
# 4 levels x 25 = 100 candidates; random kernels give near-identical masks that the mask-box NMS
# would merge into a few: an IoU threshold of 1 keeps all 100 for the fusion, as the other models'
OVERRIDES = {"spinet": ["model.spinet.pre_topk=25", "model.spinet.nms_thresh=1.0"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="timed rounds (median is reported)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    meta = cityscapes_sized_meta()
    h, w = IMAGE_SIZE
    image = (torch.rand(3, h, w) * 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        3, 1, 1
    )
    batch = Batch(images=image[None], image_sizes=[(h, w)], image_ids=["bench"], original_sizes=[(h, w)])
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
    print("paper (TITAN XP): SPINet 171 + 30 = 201 ms, UPSNet 191 + 310 = 501 ms; post ratio 0.097")


if __name__ == "__main__":
    main()
