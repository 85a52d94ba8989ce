"""Evaluation: panoptic quality exactly as panopticapi computes it (`pq`), and mIoU (`semantic`)."""

from unipan.evaluation.pq import (
    PanopticEvalError,
    PQResult,
    PQStat,
    PQStatCat,
    all_reduce_pq_stat,
    pq_compute_folders,
    pq_compute_png,
    pq_compute_single,
)
from unipan.evaluation.semantic import SemSegResult, SemSegStat

__all__ = [
    "PQResult",
    "PQStat",
    "PQStatCat",
    "PanopticEvalError",
    "SemSegResult",
    "SemSegStat",
    "all_reduce_pq_stat",
    "pq_compute_folders",
    "pq_compute_png",
    "pq_compute_single",
]
