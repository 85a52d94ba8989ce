"""Where to apply area thresholds in original pixels: scale them, or fuse at the original size?

Area thresholds of the fusions (the stuff area: 4096 pixels on COCO) are in pixels of the image
file, as in detectron2 and the official UPSNet. unipan's fusions run at the network input size;
two ways honour the threshold:

- A, "scale": fuse at the input size comparing areas with `stuff_area * (h * w) / (H * W)`
  (`unipan.segments.area_at_input_size`), then resize the result to H x W by nearest neighbour
  (`resize_result`, what the evaluator and the predictor do anyway);
- B, "fuse at original": resize the semantic logits bilinearly to H x W (detectron2's
  `sem_seg_postprocess`), scale the boxes, fuse there with the unscaled threshold (masks are
  pasted at H x W).

The case is COCO-like: real COCO val2017 panoptic ground truth (panopticapi's two sample images,
640 x 427 and 640 x 360, and the 640 x 480 image of the transformers fixtures, from
/work/shared/data), resized as at test time (shortest edge 800, longest at most 1333), turned into
imperfect predictions at the input size (one-hot logits plus smooth noise that breaks stuff into
fragments of all sizes, ground-truth instances with jittered boxes and 28 x 28 mask grids, random
scores, a few false positives), `--seeds` noise draws per image. For the heuristic fusion
(Panoptic FPN, "stuff+things" logits, 54 channels) and UPSNet's (all 133 classes) it prints the
median time of A and B and their ratio (measured in one process, interleaved), the PQ of each at
the original size against the original ground truth, and the share of pixels whose class the two
outputs agree on.

Run: ``python benchmarks/fusion_resolution.py`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from unipan.data.transforms import shortest_edge_size
from unipan.engine.evaluator import predicted_class_map
from unipan.evaluation.pq import PQResult, PQStat, pq_compute_single
from unipan.fusion.heuristic import heuristic_fusion
from unipan.fusion.settings import PanopticHeadSettings
from unipan.fusion.upsnet_head import upsnet_fusion
from unipan.io import load_json, read_id_png
from unipan.segments import nearest_source_index, resize_result
from unipan.structures import DatasetMeta, PanopticResult, PanopticTarget, RawPrediction, SegmentInfo

DATA = Path("/work/shared/data")


def load_cases() -> tuple[DatasetMeta, list[tuple[str, np.ndarray, list[SegmentInfo]]]]:
    """COCO categories and (image id, ids int32[H, W], segments) of every available sample."""
    sample = DATA / "panopticapi" / "sample_data"
    gt = load_json(sample / "panoptic_examples.json")
    meta = DatasetMeta(gt["categories"], name="coco")
    cases = []
    for ann in gt["annotations"]:
        ids = read_id_png(sample / "panoptic_examples" / ann["file_name"])
        segs = [
            SegmentInfo(
                id=s["id"],
                category_id=s["category_id"],
                iscrowd=bool(s.get("iscrowd", 0)),
                isthing=meta.isthing(s["category_id"]),
            )
            for s in ann["segments_info"]
        ]
        cases.append((str(ann["image_id"]), ids, segs))
    fixture = DATA / "transformers" / "COCO"
    if (fixture / "coco_panoptic" / "000000039769.png").is_file():
        ids = read_id_png(fixture / "coco_panoptic" / "000000039769.png")
        infos = json.loads((fixture / "coco_panoptic_annotations.txt").read_text())
        infos = infos["segments_info"] if isinstance(infos, dict) else infos
        segs = [
            SegmentInfo(
                id=s["id"],
                category_id=s["category_id"],
                iscrowd=bool(s.get("iscrowd", 0)),
                isthing=meta.isthing(s["category_id"]),
            )
            for s in infos
        ]
        cases.append(("39769", ids, segs))
    return meta, cases


def noisy_prediction(target: PanopticTarget, meta: DatasetMeta, noise: float, seed: int) -> RawPrediction:
    """Imperfect "all"-space prediction at the target's size (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    h, w = target.image_size
    c = meta.num_classes
    sem = target.sem_seg_with_crowd(meta)
    logits = F.one_hot(torch.where(sem == 255, 0, sem), c).permute(2, 0, 1).float() * 10.0
    logits[:, sem == 255] = 0.0
    coarse = torch.randn(1, c, max(h // 24, 2), max(w // 24, 2), generator=g)
    logits += noise * F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
    n = len(target)
    boxes = target.boxes.float() + 0.03 * (target.boxes[:, 2:] - target.boxes[:, :2]).repeat(1, 2) * torch.randn(
        n, 4, generator=g
    )
    rois = torch.cat([torch.arange(n, dtype=torch.float32)[:, None], boxes], dim=1)
    grids = roi_align(target.masks[:, None].float(), rois, output_size=28, sampling_ratio=2, aligned=True)[:, 0]
    labels = target.labels.clone()
    # a few false positives: random boxes with blobs, random classes
    k = 5
    xy = torch.rand(k, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
    wh = 30 + torch.rand(k, 2, generator=g) * 150
    fp_boxes = torch.cat([xy, xy + wh], dim=1)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="ij")
    blob = ((yy**2 + xx**2) < 0.7).float()
    boxes = torch.cat([boxes, fp_boxes])
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    probs = torch.cat([grids.clamp(0, 1), blob.expand(k, 28, 28)])
    labels = torch.cat([labels, torch.randint(meta.num_things, (k,), generator=g)])
    scores = torch.cat([0.55 + 0.45 * torch.rand(n, generator=g), 0.5 + 0.3 * torch.rand(k, generator=g)])
    return RawPrediction(
        boxes=boxes, scores=scores, labels=labels, sem_logits=logits, mask_probs=probs, sem_space="all"
    )


def to_stuff_things(raw: RawPrediction, meta: DatasetMeta) -> RawPrediction:
    """The same prediction as Panoptic FPN's head gives it: stuff channels + one "things" channel."""
    s = meta.num_stuff
    logits = torch.cat([raw.sem_logits[:s], raw.sem_logits[s:].amax(dim=0, keepdim=True)])
    return RawPrediction(**{**vars(raw), "sem_logits": logits, "sem_space": "stuff+things"})


def at_original(raw: RawPrediction, size: tuple[int, int]) -> RawPrediction:
    """Option B's input: logits resized bilinearly to the original size, boxes scaled."""
    h, w = raw.sem_logits.shape[-2:]
    logits = F.interpolate(raw.sem_logits[None], size=size, mode="bilinear", align_corners=False)[0]
    scale = torch.tensor([size[1] / w, size[0] / h, size[1] / w, size[0] / h])
    return RawPrediction(**{**vars(raw), "sem_logits": logits, "boxes": raw.boxes * scale, "sem_pred": None})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4, help="noise draws per image")
    parser.add_argument("--noise", type=float, default=4.0, help="amplitude of the smooth logit noise")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per case and option (median)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    meta, cases = load_cases()
    heur = {"stuff_area": 4096}
    fusions: dict[str, tuple[Callable[..., PanopticResult], Callable[[RawPrediction], RawPrediction]]] = {
        "heuristic (Panoptic FPN)": (
            lambda raw, **kw: heuristic_fusion(raw, meta, **heur, **kw),
            lambda raw: to_stuff_things(raw, meta),
        ),
        "UPSNet head": (
            lambda raw, **kw: upsnet_fusion(raw, meta, PanopticHeadSettings(stuff_area=4096), **kw),
            lambda raw: raw,
        ),
    }
    print(f"{len(cases)} COCO images x {args.seeds} noise draws; stuff area 4096 original pixels")
    for name, (fuse, adapt) in fusions.items():
        stats = {"A": PQStat(), "B": PQStat()}
        times: dict[str, list[float]] = {"A": [], "B": []}
        agree, total = 0, 0
        stuff_counts = {"A": 0, "B": 0}
        for image_id, ids, segs in cases:
            size = (int(ids.shape[0]), int(ids.shape[1]))
            in_size = shortest_edge_size(*size, 800, 1333)
            rows = nearest_source_index(in_size[0], size[0])
            cols = nearest_source_index(in_size[1], size[1])
            ids_in = torch.from_numpy(ids).index_select(0, rows).index_select(1, cols)
            target = PanopticTarget.from_panoptic(ids_in, segs, meta, image_id=image_id)
            for seed in range(args.seeds):
                raw = adapt(noisy_prediction(target, meta, args.noise, zlib.crc32(f"{image_id}/{seed}".encode())))
                outs: dict[str, PanopticResult] = {}
                for run in range(args.runs + 1):  # interleaved, so load changes hit both alike
                    t0 = time.perf_counter()
                    outs["A"] = resize_result(fuse(raw, original_size=size), size)
                    t1 = time.perf_counter()
                    outs["B"] = fuse(at_original(raw, size))
                    t2 = time.perf_counter()
                    if run:  # the first is a warm-up
                        times["A"].append(t1 - t0)
                        times["B"].append(t2 - t1)
                for key, out in outs.items():
                    stats[key] += pq_compute_single(ids, segs, out.panoptic.numpy(), out.segments, meta, image_id)
                    stuff_counts[key] += sum(not s.isthing for s in out.segments)
                ca, cb = predicted_class_map(outs["A"], meta), predicted_class_map(outs["B"], meta)
                agree += int((ca == cb).sum())
                total += ca.numel()
        ta, tb = statistics.median(times["A"]), statistics.median(times["B"])
        pa, pb = PQResult.from_stat(stats["A"], meta), PQResult.from_stat(stats["B"], meta)
        print(f"\n{name}")
        print(f"  time per image: A (scale) {1e3 * ta:.0f} ms, B (fuse at original) {1e3 * tb:.0f} ms", end="")
        print(f": B/A = {tb / ta:.2f}")
        for key, pq in (("A", pa), ("B", pb)):
            d = pq.to_dict()
            print(
                f"  {key}: PQ {100 * d['All']['pq']:.2f}  things {100 * d['Things']['pq']:.2f}  "
                f"stuff {100 * d['Stuff']['pq']:.2f}; {stuff_counts[key]} stuff segments"
            )
        print(f"  pixels with the same class in A and B: {100 * agree / total:.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
