"""RoIAlign forward + backward on the CPU: torchvision's operator against unipan's sparse backward.

Both share the forward (unipan calls torchvision's operator); the backward differs: torchvision's
`_roi_align_backward` is a serial loop over RoIs x channels x bins x points, unipan's builds the
sparse bilinear-weight matrix once and multiplies it with the channels-last output gradient
(`unipan/modeling/layers/roi_align.py`). Three cases, in the same run:

- tiny: features [8, 64, 32, 32] (stride 8 of 256 x 256 images), 256 RoIs, 14 x 14, sampling 1
- box-head-like: the same features, 512 RoIs, 7 x 7, sampling 1
- COCO-like: P2 [2, 256, 200, 304] (stride 4 of 800 x 1216), 512 RoIs, 14 x 14, sampling 2

Boxes: sides log-uniform in 16..512 px, clipped to the image (`_common.random_boxes`), spread over
the batch. Each time is the median of `--runs` runs after one warm-up: forward + backward (the
input gradient for a random output gradient), and the backward alone (graph kept). The script
also prints the largest difference between the two input gradients.

Run: ``python benchmarks/roi_align_speed.py [--runs 5] [--threads 2]``
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torchvision
from _common import median_seconds, random_boxes
from torch import Tensor

from unipan.modeling.layers.roi_align import roi_align

# name, (B, C, H, W), image (h, w), RoIs, output size, sampling ratio
CASES = [
    ("tiny", (8, 64, 32, 32), (256, 256), 256, 14, 1),
    ("box-head-like", (8, 64, 32, 32), (256, 256), 512, 7, 1),
    ("COCO-like P2", (2, 256, 200, 304), (800, 1216), 512, 14, 2),
]


def time_impl(
    fn: Callable[..., Tensor], x: Tensor, rois: Tensor, dy: Tensor, size: int, scale: float, ratio: int, runs: int
) -> tuple[float, float, Tensor]:
    """(median forward + backward seconds, median backward seconds, the input gradient) of one implementation."""

    def step() -> Tensor:
        y = fn(x, rois, size, scale, ratio)
        return torch.autograd.grad(y, x, dy)[0]

    y = fn(x, rois, size, scale, ratio)

    def backward() -> Tensor:
        return torch.autograd.grad(y, x, dy, retain_graph=True)[0]

    return median_seconds(step, runs), median_seconds(backward, runs), step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs per measurement (median is reported)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {args.threads} threads, {args.runs} runs")
    header = f"{'case':<16}{'impl':<13}{'fwd+bwd s':>11}{'bwd s':>9}"
    print(f"\n{header}{'tv/unipan fwd+bwd':>19}{'tv/unipan bwd':>15}{'max |dgrad|':>13}")
    for name, shape, image, k, size, ratio in CASES:
        g = torch.Generator().manual_seed(0)
        b = shape[0]
        scale = shape[2] / image[0]
        boxes = random_boxes(g, k, image)
        index = torch.randint(0, b, (k, 1), generator=g).float()
        rois = torch.cat([index, boxes], dim=1)
        x = torch.randn(shape, generator=g).requires_grad_()
        dy = torch.randn(k, shape[1], size, size, generator=g)
        results = {
            impl: time_impl(fn, x, rois, dy, size, scale, ratio, args.runs)
            for impl, fn in (("torchvision", torchvision.ops.roi_align), ("unipan", roi_align))
        }
        (tv_total, tv_bwd, tv_grad), (up_total, up_bwd, up_grad) = results["torchvision"], results["unipan"]
        diff = float((tv_grad - up_grad).abs().max())
        print(f"{name:<16}{'torchvision':<13}{tv_total:>11.3f}{tv_bwd:>9.3f}")
        print(
            f"{'':<16}{'unipan':<13}{up_total:>11.3f}{up_bwd:>9.3f}{tv_total / up_total:>19.2f}"
            f"{tv_bwd / up_bwd:>15.2f}{diff:>13.1e}"
        )


if __name__ == "__main__":
    main()
