"""Time the heuristic panoptic fusion alone on a Cityscapes-sized prediction.

Setting: a 1024 x 2048 input, 100 instances with random boxes of varied sizes (sides drawn
log-uniformly in 16..512 pixels, centres anywhere, so some boxes are cut by the border) and random
28 x 28 mask probabilities, scores in [0.5, 1) so that every instance passes the score threshold
(the worst case), random semantic logits over S + 1 = 54 channels (COCO: 53 stuff + "things").

Numbers, each the median of `--runs` timed runs after `--warmup` untimed ones (min and max
printed too: on a shared machine the minimum is the closest to the uncontended time):

- fusion given the semantic argmax (`RawPrediction.sem_pred`), as detectron2's
  ``combine_semantic_and_instance_outputs`` receives it; target <= 30 ms on 2 CPU cores (the SPINet
  paper reports 310 ms of post-processing for UPSNet on a GPU machine);
- fusion including the argmax of the 54 x 1024 x 2048 logits on the CPU;
- that argmax alone, as `unipan.segments.semantic_argmax` computes it (`max(dim=0)`) beside
  `torch.argmax(dim=0)` (the same indices), and their ratio.

Run: ``python benchmarks/fusion_speed.py`` (about 15 s, most of it making the inputs and the
argmax runs).
"""

from __future__ import annotations

import argparse

import torch
from _common import median_ms, random_boxes

from unipan.fusion.heuristic import heuristic_fusion
from unipan.segments import semantic_argmax
from unipan.structures import DatasetMeta, RawPrediction

TARGET_MS = 30.0


def bench_meta(num_stuff: int = 53, num_things: int = 80) -> DatasetMeta:
    """COCO-sized class list: `num_things` things (ids 1..) then `num_stuff` stuff categories."""
    cats = [{"id": i + 1, "name": f"thing{i}", "isthing": 1} for i in range(num_things)]
    cats += [{"id": 1000 + i, "name": f"stuff{i}", "isthing": 0} for i in range(num_stuff)]
    return DatasetMeta(cats, name="bench")


def make_prediction(
    meta: DatasetMeta, size: tuple[int, int], num_instances: int, seed: int, mask_size: int = 28
) -> RawPrediction:
    """Random RawPrediction in the "stuff+things" space, with `sem_pred` filled in."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    boxes = random_boxes(g, num_instances, size)
    scores = 0.5 + 0.5 * torch.rand(num_instances, generator=g)
    labels = torch.randint(meta.num_things, (num_instances,), generator=g)
    mask_probs = torch.rand(num_instances, mask_size, mask_size, generator=g)
    sem_logits = torch.randn(meta.num_stuff + 1, h, w, generator=g)
    return RawPrediction(
        boxes=boxes,
        scores=scores,
        labels=labels,
        sem_logits=sem_logits,
        mask_probs=mask_probs,
        sem_space="stuff+things",
        sem_pred=sem_logits.argmax(dim=0),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=[1024, 2048], metavar=("H", "W"))
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--runs", type=int, default=9, help="timed runs (median reported), >= 5")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--argmax-runs", type=int, default=5, help="timed runs including the argmax")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.runs < 5:
        parser.error("--runs must be at least 5")
    torch.set_num_threads(args.threads)
    meta = bench_meta()
    raw = make_prediction(meta, (args.size[0], args.size[1]), args.instances, args.seed)
    result = heuristic_fusion(raw, meta)
    n_things = sum(s.isthing for s in result.segments)
    print(
        f"input {args.size[0]}x{args.size[1]}, {args.instances} instances -> {n_things} thing and "
        f"{len(result.segments) - n_things} stuff segments; torch threads {torch.get_num_threads()}"
    )
    ms, times = median_ms(lambda: heuristic_fusion(raw, meta), args.runs, args.warmup)
    print(
        f"fusion given sem_pred: median {ms:.1f} ms over {args.runs} runs "
        f"(min {min(times):.1f}, max {max(times):.1f}); {ms / TARGET_MS:.2f} x the {TARGET_MS:.0f} ms target"
    )
    no_pred = RawPrediction(**{**vars(raw), "sem_pred": None})
    ms_arg, times_arg = median_ms(lambda: heuristic_fusion(no_pred, meta), args.argmax_runs, 1)
    print(
        f"fusion including the argmax of {meta.num_stuff + 1}x{args.size[0]}x{args.size[1]} logits: "
        f"median {ms_arg:.1f} ms over {args.argmax_runs} runs (min {min(times_arg):.1f})"
    )
    ms_ours, _ = median_ms(lambda: semantic_argmax(raw.sem_logits), args.argmax_runs, 1)
    ms_torch, _ = median_ms(lambda: raw.sem_logits.argmax(dim=0), args.argmax_runs, 1)
    print(
        f"argmax alone: semantic_argmax {ms_ours:.1f} ms, torch.argmax(dim=0) {ms_torch:.1f} ms "
        f"(ratio {ms_ours / ms_torch:.2f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
