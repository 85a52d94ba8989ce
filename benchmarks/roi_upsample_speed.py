"""RoIUpsample alone: 100 RoIs of 256 x 28 x 28 mask features into P2..P5 of an 800 x 1216 image.

What AUNet's MAM does at inference on COCO-sized input: `mask_guide` RoIUpsamples every RoI into
its FPN level (200x304 .. 25x38), upsamples the four maps to stride 4 and sums them. Timed: that
whole guide (forward, and forward + backward as in training), the per-level RoIUpsample alone with
and without Eq. 6, and, as the yardstick of the same operator, torchvision's `roi_align` backward
(`normalize=False` RoIUpsample is its adjoint) and forward pooling of the same RoIs. Box sizes are
log-uniform over 16..512 px (`_common.random_boxes`: all four levels used), centres uniform over the image.

Run: ``python benchmarks/roi_upsample_speed.py [--runs 5] [--threads 2] [--rois 100] [--channels 256]``
"""

from __future__ import annotations

import argparse

import torch
from _common import median_seconds, random_boxes
from torchvision.ops import MultiScaleRoIAlign

from unipan.modeling.heads.aunet_attention import mask_guide
from unipan.modeling.layers.roi_upsample import fpn_levels, multiscale_roi_upsample

IMAGE_SIZE = (800, 1216)
LEVELS = ("p2", "p3", "p4", "p5")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs per case (median is reported)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--rois", type=int, default=100, help="RoIs")
    ap.add_argument("--channels", type=int, default=256, help="mask feature channels C_m")
    ap.add_argument("--size", type=int, default=28, help="mask feature resolution m")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    h, w = IMAGE_SIZE
    k, c, m = args.rois, args.channels, args.size
    boxes = random_boxes(g, k, (h, w))
    shapes = [(h // 2**s, w // 2**s) for s in range(2, 6)]
    y = torch.randn(k, c, m, m, generator=g)
    counts = torch.bincount(fpn_levels(boxes) - 2, minlength=4).tolist()
    print(f"{k} RoIs of {c}x{m}x{m} into {h}x{w} (P2..P5 {shapes}), RoIs per level {counts}, {args.threads} threads")

    def guide(normalize: bool = True) -> torch.Tensor:
        return mask_guide(y, [boxes], shapes, (h, w), shapes[0], sampling_ratio=2, normalize=normalize)

    y_grad = y.clone().requires_grad_()

    def guide_train() -> None:
        out = mask_guide(y_grad, [boxes], shapes, (h, w), shapes[0], sampling_ratio=2, normalize=True)
        out.sum().backward()

    feats = {n: torch.randn(1, c, *shape, generator=g) for n, shape in zip(LEVELS, shapes, strict=True)}
    pooler = MultiScaleRoIAlign(list(LEVELS), m, 2)
    leaves = {n: f.clone().requires_grad_() for n, f in feats.items()}
    pooled = pooler(leaves, [boxes], [(h, w)])
    y_pool = torch.randn(pooled.shape, generator=g)

    def roi_align_backward() -> None:
        torch.autograd.grad(pooled, list(leaves.values()), y_pool, retain_graph=True)

    rows = [
        ("MAM guide (RoIUpsample per level, to stride 4, sum)", median_seconds(lambda: guide(), args.runs)),
        ("  the same, forward + backward", median_seconds(guide_train, args.runs)),
        (
            "RoIUpsample per level, Eq. 6 (paper)",
            median_seconds(lambda: multiscale_roi_upsample(y, [boxes], shapes, (h, w), 2), args.runs),
        ),
        (
            "RoIUpsample per level, no Eq. 6 (adjoint)",
            median_seconds(lambda: multiscale_roi_upsample(y, [boxes], shapes, (h, w), 2, normalize=False), args.runs),
        ),
        ("torchvision roi_align backward (the adjoint)", median_seconds(roi_align_backward, args.runs)),
        (
            f"torchvision MultiScaleRoIAlign forward ({m}x{m})",
            median_seconds(lambda: pooler(feats, [boxes], [(h, w)]), args.runs),
        ),
    ]
    print(f"\n{'case':<56}{'seconds':>10}")
    for label, seconds in rows:
        print(f"{label:<56}{seconds:>10.3f}")


if __name__ == "__main__":
    main()
