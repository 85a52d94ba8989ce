"""In-memory evaluation over a dataset: PQ (and mIoU when available), on one process or many.

Every rank evaluates a disjoint shard of the images (rank, rank + W, ...), accumulates a
`PQStat`, and the statistics are summed across ranks before the metrics are computed, so the
numbers equal a single-process evaluation of the same images.

Predictions are compared with `Sample.target` at the network input size (the size after the
testing transforms), where a model's `PanopticResult` lives. When the testing transforms resize,
this in-memory PQ is measured at the input size, not at the files' size; the predictions written
to `out_dir` are mapped back to each image's original size, so `unipan pq` over those folders
measures PQ at the files' size as panopticapi does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from unipan.engine import distributed as du
from unipan.engine.checkpoint import preserve_rng_state
from unipan.modeling.meta_arch import check_results, model_size_divisibility
from unipan.structures import Batch, DatasetMeta, PanopticResult, Sample

logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """What `evaluate` measured.

    Attributes:
        metrics: flat name -> number: "PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st",
            "SQ_st", "RQ_st", "mIoU" (percent, 0..100, as papers report them), "num_images",
            "time_per_image" (s).
        pq: the `PQResult` (fractions 0..1, per-class table via `.table()`), on every rank.
        semantic: the `SemSegResult` (mIoU of the classes the panoptic output implies).
        predictions_json: the COCO-panoptic prediction JSON written (rank 0), or None.
    """

    metrics: dict[str, float]
    pq: Any
    semantic: Any
    predictions_json: Path | None = None

    @property
    def miou(self) -> float:
        """Semantic mIoU as a fraction (0..1)."""
        return float(self.semantic.miou)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _identity_collate(samples: list[Sample]) -> list[Sample]:
    return samples


def predicted_class_map(result: PanopticResult, meta: DatasetMeta) -> torch.Tensor:
    """LongTensor[H, W]: class index of each pixel of a panoptic prediction, IGNORE (255) on void.

    This is the semantic segmentation a panoptic output implies; mIoU is computed on it so that
    every model is measured the same way whatever its semantic head's class space.
    """
    from unipan.structures import IGNORE_LABEL, VOID_ID

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


def evaluate(
    model: nn.Module,
    dataset: Dataset[Sample],
    meta: DatasetMeta,
    device: torch.device | str,
    max_images: int = 0,
    batch_size: int = 1,
    num_workers: int = 0,
    out_dir: str | Path | None = None,
) -> EvalResult:
    """PQ (and mIoU) of `model` on `dataset`; distributed-aware (shards images over ranks).

    Every rank must call this together when a process group is initialised. The model is put in
    eval mode and restored to its previous mode afterwards; the global RNGs are left untouched,
    so evaluating during training does not change the training's random stream.

    Args:
        model: a PanopticModel: returns one PanopticResult per image, at the image's input size,
            in eval mode (checked by `check_results`); a DDP wrapper is unwrapped (no gradient
            sync during evaluation). Batches are padded to its `size_divisibility`; it sees the
            ground truth only when it declares `needs_targets_at_inference` (oracle modes).
        dataset: yields `Sample`s with ground truth.
        meta: class information of the dataset.
        device: where the model runs.
        max_images: evaluate the first `max_images` images only (0 = all).
        batch_size: images per forward pass on each rank.
        num_workers: DataLoader workers.
        out_dir: when set, write predictions there as COCO-panoptic at each image's original
            size: PNGs under out_dir/panoptic/ (every rank writes its own images) and
            out_dir/predictions.json (rank 0).

    Returns:
        EvalResult with the metrics summed over all ranks (identical on every rank).

    Raises:
        TypeError: the model's eval output is not one PanopticResult per image.
        ValueError: a prediction's size differs from its image's ground truth (names the image).
    """
    from unipan.data.collate import Collate
    from unipan.evaluation.pq import PQResult, PQStat, all_reduce_pq_stat, pq_compute_single
    from unipan.evaluation.semantic import SemSegStat
    from unipan.io import write_panoptic_json, write_panoptic_prediction
    from unipan.segments import resize_result

    device = torch.device(device)
    n_total = len(dataset)  # type: ignore[arg-type]
    n = n_total if max_images <= 0 else min(max_images, n_total)
    if n == 0:
        raise ValueError("evaluation dataset is empty")
    shard = Subset(dataset, list(du.shard_indices(n)))
    collate = Collate(model_size_divisibility(model))
    loader = DataLoader(
        shard,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_identity_collate,
        # a fixed generator keeps the DataLoader from drawing on the global torch RNG
        generator=torch.Generator().manual_seed(0),
    )
    sem_stat = SemSegStat(meta.num_classes)
    category_ids = [c.id for c in meta.categories]
    pq_stat = PQStat()
    pred_dir = Path(out_dir) / "panoptic" if out_dir is not None else None
    annotations: list[dict[str, Any]] = []
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    start = time.perf_counter()
    count = 0
    try:
        with preserve_rng_state(), torch.no_grad():
            for samples in loader:
                batch: Batch = collate(samples)
                if not getattr(net, "needs_targets_at_inference", False):
                    # the model sees no ground truth; PQ reads it from the samples on the CPU
                    batch = replace(batch, targets=None)
                results = check_results(net(batch.to(device)), net, batch)
                for sample, result in zip(samples, results, strict=True):
                    gt = sample.target
                    pred_ids = result.panoptic.detach().cpu()
                    pq_stat += pq_compute_single(
                        gt.panoptic.numpy(),
                        gt.segments,
                        pred_ids.numpy(),
                        result.segments,
                        meta,
                        image_id=sample.image_id,
                    )
                    pred_cls = predicted_class_map(PanopticResult(pred_ids, result.segments, result.image_id), meta)
                    sem_stat.update(gt.sem_seg, pred_cls, image_id=sample.image_id)
                    if pred_dir is not None:
                        at_file_size = resize_result(
                            PanopticResult(pred_ids, result.segments, sample.image_id), sample.original_size
                        )
                        ann = write_panoptic_prediction(
                            pred_dir,
                            sample.image_id,
                            f"{sample.image_id}.png",
                            at_file_size.panoptic,
                            at_file_size.segments,
                        )
                        annotations.append(ann.to_coco_dict())
                    count += 1
    finally:
        net.train(was_training)
    elapsed = time.perf_counter() - start
    pq_stat = all_reduce_pq_stat(pq_stat, category_ids)
    counts = du.all_reduce_sum(
        torch.tensor([float(count), elapsed], dtype=torch.float64, device=du.backend_device())
    ).tolist()
    sem_result = sem_stat.all_reduce().result(meta)
    pq = PQResult.from_stat(pq_stat, meta)
    metrics = pq_metrics(pq)
    metrics["mIoU"] = 100.0 * float(sem_result.miou)
    metrics["num_images"] = float(counts[0])
    metrics["time_per_image"] = counts[1] / max(counts[0], 1.0)
    json_path = None
    if pred_dir is not None:
        gathered = du.all_gather_object(annotations)
        if du.is_main_process():
            merged = [a for part in gathered for a in part]
            json_path = pred_dir.parent / "predictions.json"
            write_panoptic_json(json_path, [], merged, meta.to_coco_categories())
    return EvalResult(metrics=metrics, pq=pq, semantic=sem_result, predictions_json=json_path)


def pq_metrics(pq: Any) -> dict[str, float]:
    """Flat percent metrics from a PQResult's panopticapi-style dict."""
    d = pq.to_dict()
    out: dict[str, float] = {}
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for key in ("pq", "sq", "rq"):
            out[f"{key.upper()}{suffix}"] = 100.0 * float(d[group][key])
    return out
