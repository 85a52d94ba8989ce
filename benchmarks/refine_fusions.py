"""Any fusion on any model's raw predictions: REFINE's fusions on Panoptic FPN's and UPSNet's outputs.

For each trained checkpoint given (e.g. the `unipan demo` runs of panoptic_fpn and upsnet), every
image of its synthetic val split goes through the model once (`raw_predictions`), then through
each fusion below; PQ / PQ^Th / PQ^St per (model, fusion):

- own: the fusion the model's builder bound (Panoptic FPN: the heuristic; UPSNet: its panoptic head);
- heuristic: `heuristic_fusion` (detectron2's rules);
- UE: `occlusion_fusion` without relations + Unknown Erasing (REFINE Eq. 8);
- SHR: `occlusion_fusion` with SHR's box rule;
- SOE(SHR O): Eq. 7 (sigma 2.5) with O in {0, 1} given by SHR's rule (these models have no
  occlusion head, so SOE's soft weighting is applied to the rule's relations);
- SOE(SHR O) + UE.

The fusions share the thresholds of the model's own tiny config where it has them (instance score
0.3, stuff area 64 px at 128 x 128) and BCC-Net's otherwise (overlap 0.5, UE 0.5; UE radius 8 px at
128 px). A REFINE checkpoint can be given too: its own fusion then uses its occlusion head.

Run: ``python benchmarks/refine_fusions.py panoptic_fpn=demo_pfpn/run/model_final.pth
upsnet=demo_upsnet/run/model_final.pth [--max-images 50]``
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from unipan.data.build import build_dataset
from unipan.data.collate import collate
from unipan.engine.checkpoint import load_model_from_checkpoint
from unipan.evaluation.pq import PQResult, pq_compute_single
from unipan.fusion.heuristic import heuristic_fusion
from unipan.fusion.occlusion import candidate_pairs, occlusion_fusion, shr_relations, with_relations
from unipan.structures import DatasetMeta, PanopticResult, RawPrediction

SCORE, STUFF_AREA, UE_RADIUS = 0.3, 64, 8


def shr_as_occlusion(raw: RawPrediction) -> RawPrediction:
    """`raw` with O(i, j) in {0, 1} from SHR's box rule on the candidate pairs (0.5 / 0.5 where no rule)."""
    pairs = candidate_pairs(raw, score_thresh=SCORE)
    rel = shr_relations(raw.boxes, pairs)
    prob = torch.full((pairs.shape[0], 2), 0.5)
    index = {tuple(p): k for k, p in enumerate(pairs.tolist())}
    for top, bottom in rel.tolist():
        if (top, bottom) in index:
            prob[index[(top, bottom)]] = torch.tensor([1.0, 0.0])
        else:
            prob[index[(bottom, top)]] = torch.tensor([0.0, 1.0])
    return with_relations(raw, pairs, prob)


def fusions(
    own: Callable[..., PanopticResult],
) -> dict[str, Callable[[RawPrediction, DatasetMeta, str], PanopticResult]]:
    common: dict[str, Any] = {"instance_score_thresh": SCORE, "stuff_area": STUFF_AREA, "ue_dilation": UE_RADIUS}
    occ = functools.partial(occlusion_fusion, **common)
    return {
        "own": lambda raw, meta, image_id: own(raw, meta, image_id=image_id),
        "heuristic": lambda raw, meta, image_id: heuristic_fusion(
            raw, meta, instance_score_thresh=SCORE, stuff_area=STUFF_AREA, image_id=image_id
        ),
        "UE": lambda raw, meta, image_id: occ(raw, meta, occlusion="none", unknown_erasing=True, image_id=image_id),
        "SHR": lambda raw, meta, image_id: occ(raw, meta, occlusion="shr", unknown_erasing=False, image_id=image_id),
        "SOE(SHR O)": lambda raw, meta, image_id: occ(
            shr_as_occlusion(raw), meta, occlusion="learned", unknown_erasing=False, image_id=image_id
        ),
        "SOE(SHR O)+UE": lambda raw, meta, image_id: occ(
            shr_as_occlusion(raw), meta, occlusion="learned", unknown_erasing=True, image_id=image_id
        ),
    }


@torch.no_grad()
def evaluate_fusions(path: str, max_images: int) -> dict[str, PQResult]:
    loaded = load_model_from_checkpoint(path, "cpu")
    model, cfg, meta = loaded.model, loaded.cfg, loaded.meta
    val = build_dataset(cfg.data, "val", is_train=False)
    table = fusions(model.fuse)
    stats: dict[str, Any] = dict.fromkeys(table)
    n = len(val) if max_images <= 0 else min(len(val), max_images)
    for i in range(n):
        sample = val[i]
        batch = replace(collate([sample], model.size_divisibility), targets=None)
        (raw,) = model.raw_predictions(batch)
        target = sample.target
        assert target is not None
        for name, fuse in table.items():
            result = fuse(raw, meta, sample.image_id)
            stat = pq_compute_single(
                target.panoptic, target.segments, result.panoptic, result.segments, meta, sample.image_id
            )
            stats[name] = stat if stats[name] is None else stats[name] + stat
    return {name: PQResult.from_stat(stat, meta) for name, stat in stats.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", help="name=path of a trained unipan checkpoint")
    parser.add_argument("--max-images", type=int, default=0, help="val images (0 = all)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for item in args.checkpoints:
        name, _, path = item.partition("=")
        for fusion, pq in evaluate_fusions(path or name, args.max_images).items():
            rows.append((name, fusion, pq))
    print("\n| model | fusion | PQ | PQ^Th | PQ^St |\n|---|---|---|---|---|")
    for name, fusion, pq in rows:
        print(f"| {name} | {fusion} | {100 * pq.pq:.1f} | {100 * pq.things.pq:.1f} | {100 * pq.stuff.pq:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
