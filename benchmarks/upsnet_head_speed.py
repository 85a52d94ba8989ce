"""Time UPSNet's parameter-free panoptic head at inference, alone, at Cityscapes size.

Setting: a 1024 x 2048 input, Cityscapes' 19 classes (11 stuff, 8 things), 100
detections with random boxes (sides log-uniform in 16..512 px) and random 28 x 28 mask logits,
scores in [0.6, 1) so all pass the score filter, NMS off so all 100 reach mask pruning (the worst
case), random semantic logits. The time covers mask pruning, the box-by-box argmax of Z, unknown
-> void, instance class assignment and the stuff area filter (`unipan.fusion.upsnet_head.
upsnet_fusion`). Median of `--runs` runs after one warm-up.

For scale: the UPSNet paper reports 236 ms for the whole network on 1024 x 2048 on a GTX 1080 Ti,
and the SPINet paper 310 ms of post-processing for UPSNet on a GPU machine.

Run: ``python benchmarks/upsnet_head_speed.py [--runs 5] [--threads 2]``
"""

from __future__ import annotations

import argparse

import torch
from _common import median_ms, random_boxes

from unipan.data.cityscapes import cityscapes_categories
from unipan.fusion.settings import PanopticHeadSettings
from unipan.fusion.upsnet_head import upsnet_fusion
from unipan.structures import DatasetMeta, RawPrediction


def make_prediction(meta: DatasetMeta, size: tuple[int, int], n: int, seed: int = 0) -> RawPrediction:
    """Random RawPrediction in the "all" space with RoI mask logits in `extras["mask_logits"]`."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    boxes = random_boxes(g, n, size)
    return RawPrediction(
        boxes=boxes,
        scores=0.6 + 0.4 * torch.rand(n, generator=g),
        labels=torch.randint(meta.num_things, (n,), generator=g),
        sem_logits=torch.randn(meta.num_classes, h, w, generator=g),
        sem_space="all",
        extras={"mask_logits": 4 * torch.randn(n, 28, 28, generator=g)},
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--instances", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    meta = DatasetMeta(cityscapes_categories(), name="cityscapes")
    raw = make_prediction(meta, (1024, 2048), args.instances)
    settings = PanopticHeadSettings(nms_thresh=1.0, score_thresh=0.6, max_detections=args.instances, stuff_area=2048)
    with torch.inference_mode():
        result = upsnet_fusion(raw, meta, settings)
        ms, times = median_ms(lambda: upsnet_fusion(raw, meta, settings), args.runs, warmup=0)
    print(
        f"UPSNet panoptic head, 1024x2048, {meta.num_classes} classes, {args.instances} detections, "
        f"{args.threads} threads: median {ms:.0f} ms over {args.runs} runs "
        f"(min {min(times):.0f} ms); {len(result.segments)} segments"
    )


if __name__ == "__main__":
    main()
