"""Time REFINE's inference-only parts alone on a Cityscapes-sized prediction (1024 x 2048, 100 instances).

The instances are those of `benchmarks/fusion_speed.py` (random boxes of sides 16..512 px, random
28 x 28 mask probabilities, scores in [0.5, 1): every instance passes the score threshold, the
worst case). Timed, each the median of `--runs` runs after `--warmup` (min and max printed too):

- `candidate_pairs`: the overlapping pairs the occlusion head is asked about (the model runs it);
- `occlusion_fusion` with learned relations (random O for every candidate pair, Eq. 7 with
  sigma 2.5), given the semantic argmax; beside it `heuristic_fusion` on the same prediction;
- `unknown_erasing` alone (BCC-Net's threshold 0.5 and 50 dilation steps) on smooth random logits
  over 19 classes (Cityscapes: 11 stuff + 8 things) and over 54 (COCO's 53 stuff + "things");
- `occlusion_fusion` with both SOE and UE (UE's softmax over the 54 channels included).

Run: ``python benchmarks/refine_fusion_speed.py``
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from _common import median_ms
from fusion_speed import bench_meta, make_prediction

from unipan.fusion.heuristic import heuristic_fusion
from unipan.fusion.occlusion import candidate_pairs, occlusion_fusion, with_relations
from unipan.fusion.unknown_erasing import unknown_erasing


def smooth_logits(channels: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    """FloatTensor[C, h, w]: coarse random logits (one value per 64 px) upsampled, plus noise."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    coarse = torch.randn((1, channels, h // 64 + 1, w // 64 + 1), generator=g) * 2.0
    return F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)[0] + 0.3 * torch.randn(
        (channels, h, w), generator=g
    )


def report(name: str, ms: float, times: list[float]) -> None:
    print(f"{name:<58} median {ms:8.1f} ms (min {min(times):.1f}, max {max(times):.1f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=[1024, 2048], metavar=("H", "W"))
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = (args.size[0], args.size[1])
    meta = bench_meta()
    raw = make_prediction(meta, size, args.instances, args.seed)
    raw.sem_logits = smooth_logits(meta.num_stuff + 1, size, args.seed)
    raw.sem_pred = raw.sem_logits.argmax(dim=0)
    print(f"input {size[0]}x{size[1]}, {args.instances} instances, torch threads {torch.get_num_threads()}")

    ms, times = median_ms(lambda: candidate_pairs(raw), args.runs, args.warmup)
    pairs = candidate_pairs(raw)
    report(f"candidate_pairs ({pairs.shape[0]} pairs, rho 0.2)", ms, times)
    g = torch.Generator().manual_seed(args.seed)
    soe = with_relations(raw, pairs, torch.rand((pairs.shape[0], 2), generator=g))
    ms, times = median_ms(lambda: heuristic_fusion(raw, meta), args.runs, args.warmup)
    report("heuristic_fusion", ms, times)
    ms, times = median_ms(lambda: occlusion_fusion(soe, meta, unknown_erasing=False), args.runs, args.warmup)
    report("occlusion_fusion, SOE (sigma 2.5)", ms, times)

    for channels, num_stuff in ((19, 11), (54, 53)):
        logits = smooth_logits(channels, size, args.seed + channels)
        erased = unknown_erasing(logits, num_stuff)
        ms, times = median_ms(lambda logits=logits, s=num_stuff: unknown_erasing(logits, s), args.runs, args.warmup)
        report(f"unknown_erasing, {channels} classes ({100 * float(erased.float().mean()):.0f}% erased)", ms, times)
    ms, times = median_ms(lambda: occlusion_fusion(soe, meta, unknown_erasing=True), args.runs, args.warmup)
    report("occlusion_fusion, SOE + UE (54 classes)", ms, times)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
