"""In-memory evaluation over a dataset, on one process or many, measured as the papers measure.

What is measured, for every image at its **original** size (the size of its files) against its
original ground truth, as panopticapi and the papers' tables measure it:

- PQ / SQ / RQ (All, Things, Stuff): the model's `PanopticResult` (at the network input size) is
  resized to the original size by nearest neighbour (`resize_result`), exactly the prediction
  `out_dir` receives, so `evaluate` equals `unipan pq` over the files it writes;
- `mIoU_pan`: mIoU of the class map the panoptic output implies (every model measured alike);
- `mIoU_sem`: mIoU of the semantic head itself (the argmax of `RawPrediction.sem_logits`, resized
  to the original size by nearest neighbour), in the head's own class space (S stuff classes,
  S + 1 for "stuff+things", S + T for "all"): the number UPSNet's tables report;
- mask and box AP of the thing classes, COCO-style (`unipan.evaluation.coco_ap`), from the raw
  detections: `mask_AP`, `mask_AP50`, ..., `box_APl`.

The original ground truth comes from the dataset: an item whose input size equals its
`original_size` carries it in `Sample.target` (nothing more is read); otherwise the evaluator asks
the dataset for `original_panoptic(i)` (`unipan.data.common.HasOriginalPanoptic`), in the
DataLoader workers.

Every rank evaluates a disjoint shard of the images (rank, rank + W, ...); the PQ statistics and
confusion matrices are summed across ranks and the COCO records gathered before the metrics are
computed, so the numbers equal a single-process evaluation of the same images.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from unipan.engine import distributed as du
from unipan.engine.checkpoint import preserve_rng_state
from unipan.modeling.meta_arch import check_results, model_size_divisibility
from unipan.structures import (
    IGNORE_LABEL,
    VOID_ID,
    Batch,
    DatasetMeta,
    PanopticResult,
    PanopticTarget,
    RawPrediction,
    Sample,
    SegmentInfo,
    SemSpace,
)

logger = logging.getLogger(__name__)

SEM_NAMES = {
    "stuff": "stuff classes",
    "stuff+things": "stuff classes + things",
    "all": "all classes",
}


@dataclass
class EvalResult:
    """What `evaluate` measured, at each image's original size.

    Attributes:
        metrics: flat name -> number, percent (0..100) as papers report them: "PQ", "SQ", "RQ",
            "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st", "mIoU_pan"; "mIoU_sem" when the
            model's results carry their RawPrediction; "mask_AP", "mask_AP50", "mask_AP75",
            "mask_APs", "mask_APm", "mask_APl" and the same "box_*" when the dataset has thing
            classes and the results carry RawPredictions (NaN where COCOeval has no ground truth,
            e.g. no small objects); "num_images", "time_per_image" (s).
        pq: the `PQResult` (fractions 0..1, per-class table via `.table()`), on every rank.
        semantic_pan: `SemSegResult` of the class map the panoptic output implies (all classes).
        semantic_sem: `SemSegResult` of the semantic head's argmax in its own class space, or None.
        sem_space: that class space, or None.
        instances: {"segm": {...}, "bbox": {...}} COCO AP in percent (`AP_NAMES`), or None.
        predictions_json: the COCO-panoptic prediction JSON written (rank 0), or None.
        instances_json: the COCO instance results JSON written (rank 0), or None.
    """

    metrics: dict[str, float]
    pq: Any
    semantic_pan: Any
    semantic_sem: Any = None
    sem_space: SemSpace | None = None
    instances: dict[str, dict[str, float]] | None = None
    predictions_json: Path | None = None
    instances_json: Path | None = None

    @property
    def miou_pan(self) -> float:
        """The mIoU implied by the panoptic output, as a fraction (0..1)."""
        return float(self.semantic_pan.miou)

    @property
    def miou_sem(self) -> float | None:
        """The mIoU of the semantic head, as a fraction (0..1); None without raw predictions."""
        return None if self.semantic_sem is None else float(self.semantic_sem.miou)

    def summary(self) -> str:
        """The lines printed beside the PQ table: both mIoUs and the COCO AP of the things."""
        lines = [f"mIoU (panoptic output, all classes) {100 * self.miou_pan:6.2f}"]
        if self.semantic_sem is not None:
            space = SEM_NAMES.get(str(self.sem_space), str(self.sem_space))
            lines.append(f"mIoU (semantic head, {space}) {100 * float(self.semantic_sem.miou):6.2f}")
        if self.instances is not None:
            from unipan.evaluation.coco_ap import AP_NAMES

            head = " ".join(f"{name:>6s}" for name in AP_NAMES)
            lines += ["", f"{'':5s} {head}"]
            for iou_type, label in (("segm", "mask"), ("bbox", "box")):
                values = " ".join(_fmt(self.instances[iou_type][name]) for name in AP_NAMES)
                lines.append(f"{label:5s} {values}")
        return "\n".join(lines)


def _fmt(value: float) -> str:
    return f"{'-':>6s}" if math.isnan(value) else f"{value:6.2f}"


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _identity_collate(items: list[Any]) -> list[Any]:
    return items


def predicted_class_map(result: PanopticResult, meta: DatasetMeta) -> torch.Tensor:
    """LongTensor[H, W]: class index of each pixel of a panoptic prediction, IGNORE (255) on void.

    This is the semantic segmentation a panoptic output implies; `mIoU_pan` is computed on it so
    that every model is measured the same way whatever its semantic head's class space.
    """
    panoptic = result.panoptic.to(torch.int64)
    out = torch.full(panoptic.shape, IGNORE_LABEL, dtype=torch.long, device=panoptic.device)
    if not result.segments:
        return out
    max_id = max(int(panoptic.max()), max(s.id for s in result.segments))
    lut = torch.full((max_id + 1,), IGNORE_LABEL, dtype=torch.long, device=panoptic.device)
    for seg in result.segments:
        if seg.id != VOID_ID:
            lut[seg.id] = meta.class_index(seg.category_id)
    return lut[panoptic.clamp(min=0)]


# --- the original ground truth ---------------------------------------------------------------------
@dataclass
class _GroundTruth:
    """An image's ground truth at its original size: what every metric compares with.

    Attributes:
        ids: int32[H, W] segment ids, 0 = void.
        segments: its segments as the annotation lists them (crowd included).
        sem_seg: LongTensor[H, W] class index, IGNORE_LABEL on void and crowd.
    """

    ids: np.ndarray
    segments: list[SegmentInfo]
    sem_seg: Tensor


def _source(dataset: Dataset[Sample], index: int) -> tuple[Dataset[Sample], int]:
    """The dataset that holds item `index` and its index there (looking through Subsets)."""
    while isinstance(dataset, Subset):
        subset: Subset[Sample] = dataset
        dataset, index = subset.dataset, int(subset.indices[index])
    return dataset, index


class _EvalItems(Dataset[tuple[Sample, _GroundTruth]]):
    """(sample, ground truth at its original size) per evaluated index; run in DataLoader workers."""

    def __init__(self, dataset: Dataset[Sample], indices: list[int], meta: DatasetMeta) -> None:
        self.dataset, self.indices, self.meta = dataset, indices, meta

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[Sample, _GroundTruth]:
        index = self.indices[k]
        sample = self.dataset[index]
        original = (int(sample.original_size[0]), int(sample.original_size[1]))
        if tuple(sample.image.shape[-2:]) == original:
            # test-time transforms only resize: an item that kept its size holds its file's GT
            t = sample.target
            return sample, _GroundTruth(t.panoptic.numpy(), list(t.segments), t.sem_seg)
        source, i = _source(self.dataset, index)
        reader = getattr(source, "original_panoptic", None)
        if reader is None:
            h, w = sample.image.shape[-2:]
            raise TypeError(
                f"image {sample.image_id!r}: evaluated at {h}x{w} but its original size is "
                f"{original[0]}x{original[1]}, and {type(source).__name__} has no original_panoptic(i) "
                "to give its original ground truth (unipan.data.common.HasOriginalPanoptic)"
            )
        ids, segments = reader(i)
        if tuple(ids.shape) != original:
            raise ValueError(
                f"image {sample.image_id!r}: original_panoptic is {ids.shape[0]}x{ids.shape[1]} but the "
                f"sample's original_size is {original[0]}x{original[1]}"
            )
        target = PanopticTarget.from_panoptic(torch.from_numpy(ids), segments, self.meta, image_id=sample.image_id)
        return sample, _GroundTruth(ids, list(segments), target.sem_seg)


# --- accumulation ------------------------------------------------------------------------------------
def _semantic_names(meta: DatasetMeta, space: SemSpace) -> list[str]:
    stuff = [meta.category(cid).name for cid in meta.stuff_dataset_ids]
    if space == "stuff":
        return stuff
    if space == "stuff+things":
        return [*stuff, "things"]
    return [meta.category(cid).name for cid in meta.class_index_to_dataset_id]


def _resize_labels(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """LongTensor[h, w] -> [H, W] by nearest neighbour on the grid `resize_result` uses."""
    from unipan.segments import nearest_source_index

    if tuple(labels.shape) == tuple(size):
        return labels
    rows = nearest_source_index(size[0], int(labels.shape[0]), labels.device)
    cols = nearest_source_index(size[1], int(labels.shape[1]), labels.device)
    return labels.index_select(0, rows).index_select(1, cols)


@dataclass
class _Accumulator:
    """Everything one rank adds up over its images."""

    meta: DatasetMeta
    instance_ap: bool
    pred_dir: Path | None
    pq_stat: Any = None
    sem_pan: Any = None
    sem_head: Any = None
    sem_space: SemSpace | None = None
    coco: Any = None
    annotations: list[dict[str, Any]] = field(default_factory=list)
    count: int = 0

    def __post_init__(self) -> None:
        from unipan.evaluation.coco_ap import CocoInstanceStat
        from unipan.evaluation.pq import PQStat
        from unipan.evaluation.semantic import SemSegStat

        self.pq_stat = PQStat()
        self.sem_pan = SemSegStat(self.meta.num_classes)
        self.coco = CocoInstanceStat() if self.instance_ap and self.meta.num_things > 0 else None

    def add(self, sample: Sample, gt: _GroundTruth, result: PanopticResult) -> None:
        from unipan.evaluation.pq import pq_compute_single
        from unipan.io import write_panoptic_prediction
        from unipan.segments import resize_result

        meta, image_id = self.meta, sample.image_id
        size = (int(sample.original_size[0]), int(sample.original_size[1]))
        # the prediction `out_dir` receives, id for id: resized, segments re-counted
        pred = resize_result(PanopticResult(result.panoptic.detach().cpu(), result.segments, image_id), size)
        self.pq_stat += pq_compute_single(
            gt.ids, gt.segments, pred.panoptic.numpy(), pred.segments, meta, image_id=image_id
        )
        self.sem_pan.update(gt.sem_seg, predicted_class_map(pred, meta), image_id=image_id)
        raw = result.raw
        if raw is not None:
            self._add_semantic_head(raw, gt, size, image_id)
        if self.coco is not None:
            from unipan.evaluation.coco_ap import detection_records, gt_instance_records

            dets = [] if raw is None else detection_records(raw, meta, image_id, size)
            self.coco.add_image(image_id, size, gt_instance_records(gt.ids, gt.segments, meta, image_id), dets)
        if self.pred_dir is not None:
            ann = write_panoptic_prediction(self.pred_dir, image_id, f"{image_id}.png", pred.panoptic, pred.segments)
            self.annotations.append(ann.to_coco_dict())
        self.count += 1

    def _add_semantic_head(self, raw: RawPrediction, gt: _GroundTruth, size: tuple[int, int], image_id: str) -> None:
        from unipan.evaluation.semantic import SemSegStat
        from unipan.segments import semantic_argmax, semantic_channels, to_semantic_space

        if self.sem_space is None:
            self.sem_space = raw.sem_space
            self.sem_head = SemSegStat(semantic_channels(self.meta, raw.sem_space))
        elif raw.sem_space != self.sem_space:
            raise ValueError(
                f"image {image_id!r}: semantic logits in class space {raw.sem_space!r}, earlier images "
                f"in {self.sem_space!r}"
            )
        sem_pred = raw.sem_pred if raw.sem_pred is not None else semantic_argmax(raw.sem_logits)
        pred = _resize_labels(sem_pred.detach().cpu().long(), size)
        target = to_semantic_space(gt.sem_seg, self.meta.num_stuff, raw.sem_space)
        self.sem_head.update(target, pred, image_id=image_id)

    def semantic_head_result(self) -> tuple[Any, SemSpace | None]:
        """The semantic head's SemSegResult summed over ranks (every rank calls this together)."""
        from unipan.evaluation.semantic import SemSegStat
        from unipan.segments import semantic_channels

        spaces = {s for s in du.all_gather_object(self.sem_space) if s is not None}
        if len(spaces) > 1:
            raise ValueError(f"ranks saw semantic logits in different class spaces: {sorted(spaces)}")
        if not spaces:
            return None, None
        space: SemSpace = spaces.pop()
        stat = self.sem_head if self.sem_head is not None else SemSegStat(semantic_channels(self.meta, space))
        return stat.all_reduce().result(_semantic_names(self.meta, space)), space

    def instance_result(self, out_dir: Path | None) -> tuple[dict[str, dict[str, float]] | None, Path | None]:
        """COCO AP over every rank's records, and the results JSON under `out_dir` (rank 0)."""
        if self.coco is None:
            return None, None
        merged = self.coco.all_gather()
        if not merged.dt and not any(du.all_gather_object(self.sem_space is not None)):
            return None, None  # a model without raw predictions has no detections to measure
        json_path = None
        result = None
        if du.is_main_process():
            result = merged.evaluate(self.meta)
            if out_dir is not None:
                from unipan.io import atomic_write_text

                json_path = Path(out_dir) / "instances_results.json"
                atomic_write_text(json_path, json.dumps(merged.dt))
        return du.broadcast_object(result), json_path


def evaluate(
    model: nn.Module,
    dataset: Dataset[Sample],
    meta: DatasetMeta,
    device: torch.device | str,
    max_images: int = 0,
    batch_size: int = 1,
    num_workers: int = 0,
    out_dir: str | Path | None = None,
    instance_ap: bool = True,
) -> EvalResult:
    """PQ, both mIoUs and COCO AP of `model` on `dataset`, at each image's original size.

    Distributed-aware (shards images over ranks): every rank must call this together when a
    process group is initialised. The model is put in eval mode and restored to its previous mode
    afterwards; the global RNGs are left untouched, so evaluating during training does not change
    the training's random stream.

    Args:
        model: a PanopticModel: returns one PanopticResult per image, at the image's input size,
            in eval mode (checked by `check_results`), with its RawPrediction in `.raw` (for
            `mIoU_sem` and AP; results without it get neither); a DDP wrapper is unwrapped (no
            gradient sync during evaluation). Batches are padded to its `size_divisibility`; it
            sees the ground truth only when it declares `needs_targets_at_inference` (oracle modes).
        dataset: yields `Sample`s with ground truth; when an item's input size differs from its
            `original_size`, `original_panoptic(i)` gives its original ground truth
            (`unipan.data.common.HasOriginalPanoptic`; the datasets of `build_dataset` have it).
        meta: class information of the dataset.
        device: where the model runs.
        max_images: evaluate the first `max_images` images only (0 = all).
        batch_size: images per forward pass on each rank.
        num_workers: DataLoader workers (they also read the original ground truth).
        out_dir: when set, write predictions there at each image's original size: COCO-panoptic
            PNGs under out_dir/panoptic/ (every rank writes its own images),
            out_dir/predictions.json and the COCO instance results out_dir/instances_results.json
            (rank 0).
        instance_ap: measure the COCO mask and box AP of the thing classes.

    Returns:
        EvalResult with the metrics summed over all ranks (identical on every rank).

    Raises:
        TypeError: the model's eval output is not one PanopticResult per image, or a resized item's
            dataset cannot give its original ground truth.
        ValueError: a prediction's size differs from its image's input size (names the image).
    """
    from unipan.data.collate import Collate
    from unipan.evaluation.pq import PQResult, all_reduce_pq_stat
    from unipan.io import write_panoptic_json

    device = torch.device(device)
    n_total = len(dataset)  # type: ignore[arg-type]
    n = n_total if max_images <= 0 else min(max_images, n_total)
    if n == 0:
        raise ValueError("evaluation dataset is empty")
    items = _EvalItems(dataset, list(du.shard_indices(n)), meta)
    collate = Collate(model_size_divisibility(model))
    loader = DataLoader(
        items,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_identity_collate,
        # a fixed generator keeps the DataLoader from drawing on the global torch RNG
        generator=torch.Generator().manual_seed(0),
    )
    pred_dir = Path(out_dir) / "panoptic" if out_dir is not None else None
    acc = _Accumulator(meta, instance_ap, pred_dir)
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    start = time.perf_counter()
    try:
        with preserve_rng_state(), torch.no_grad():
            for pairs in loader:
                samples = [sample for sample, _ in pairs]
                batch: Batch = collate(samples)
                if not getattr(net, "needs_targets_at_inference", False):
                    # the model sees no ground truth; the metrics read it from the items on the CPU
                    batch = replace(batch, targets=None)
                results = check_results(net(batch.to(device)), net, batch)
                for (sample, gt), result in zip(pairs, results, strict=True):
                    acc.add(sample, gt, result)
    finally:
        net.train(was_training)
    elapsed = time.perf_counter() - start
    category_ids = [c.id for c in meta.categories]
    pq_stat = all_reduce_pq_stat(acc.pq_stat, category_ids)
    counts = du.all_reduce_sum(
        torch.tensor([float(acc.count), elapsed], dtype=torch.float64, device=du.backend_device())
    ).tolist()
    sem_pan = acc.sem_pan.all_reduce().result(meta)
    sem_head, sem_space = acc.semantic_head_result()
    instances, instances_json = acc.instance_result(None if out_dir is None else Path(out_dir))
    pq = PQResult.from_stat(pq_stat, meta)
    metrics = pq_metrics(pq)
    metrics["mIoU_pan"] = 100.0 * float(sem_pan.miou)
    if sem_head is not None:
        metrics["mIoU_sem"] = 100.0 * float(sem_head.miou)
    if instances is not None:
        from unipan.evaluation.coco_ap import IOU_TYPES

        for iou_type, prefix in IOU_TYPES.items():
            metrics.update({f"{prefix}_{name}": value for name, value in instances[iou_type].items()})
    metrics["num_images"] = float(counts[0])
    metrics["time_per_image"] = counts[1] / max(counts[0], 1.0)
    json_path = None
    if pred_dir is not None:
        gathered = du.all_gather_object(acc.annotations)
        if du.is_main_process():
            merged = [a for part in gathered for a in part]
            json_path = pred_dir.parent / "predictions.json"
            write_panoptic_json(json_path, [], merged, meta.to_coco_categories())
    return EvalResult(
        metrics=metrics,
        pq=pq,
        semantic_pan=sem_pan,
        semantic_sem=sem_head,
        sem_space=sem_space,
        instances=instances,
        predictions_json=json_path,
        instances_json=instances_json,
    )


def pq_metrics(pq: Any) -> dict[str, float]:
    """Flat percent metrics from a PQResult's panopticapi-style dict."""
    d = pq.to_dict()
    out: dict[str, float] = {}
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for key in ("pq", "sq", "rq"):
            out[f"{key.upper()}{suffix}"] = 100.0 * float(d[group][key])
    return out
