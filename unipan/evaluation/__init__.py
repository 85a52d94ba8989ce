"""Evaluation: panoptic quality exactly as panopticapi computes it (`pq`), and mIoU (`semantic`)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

# The names below are imported from their module on first use: `unipan pq` imports
# unipan.evaluation.pq, hence this package, and must not load the torch-based mIoU module with it.
_HOMES = {
    "PanopticEvalError": "pq",
    "PQResult": "pq",
    "PQStat": "pq",
    "PQStatCat": "pq",
    "all_reduce_pq_stat": "pq",
    "pq_compute_folders": "pq",
    "pq_compute_png": "pq",
    "pq_compute_single": "pq",
    "SemSegResult": "semantic",
    "SemSegStat": "semantic",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


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
