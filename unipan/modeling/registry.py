"""One flat registry of model builders: name -> builder(model config, meta) -> PanopticModel.

Each name has a config schema of the same name in `unipan.config.models.MODEL_CONFIGS` (a test
checks that the two tables agree).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from unipan.config import Config
from unipan.modeling.meta_arch import PanopticModel
from unipan.modeling.models.aunet import build_aunet
from unipan.modeling.models.panoptic_fpn import build_panoptic_fpn
from unipan.modeling.models.refine import build_refine
from unipan.modeling.models.spatialflow import build_spatialflow
from unipan.modeling.models.spinet import build_spinet
from unipan.modeling.models.upsnet import build_upsnet
from unipan.structures import DatasetMeta

__all__ = ["MODELS", "build_model"]

MODELS: dict[str, Callable[[Any, DatasetMeta], PanopticModel]] = {
    "aunet": build_aunet,
    "panoptic_fpn": build_panoptic_fpn,
    "refine": build_refine,
    "upsnet": build_upsnet,
    "spatialflow": build_spatialflow,
    "spinet": build_spinet,
}


def build_model(cfg: Config, meta: DatasetMeta) -> PanopticModel:
    """Build the model named by `cfg.model.name` for the classes of `meta`.

    Raises:
        ValueError: for an unknown name, listing the registered ones.
    """
    name = cfg.model.name
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} (config model.name); registered models: {sorted(MODELS)}")
    return MODELS[name](cfg.model, meta)
