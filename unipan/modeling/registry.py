"""One flat registry of model builders: name -> builder(cfg, meta) -> nn.Module."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from unipan.config import Config
from unipan.modeling.models.panoptic_fpn import build_panoptic_fpn
from unipan.modeling.models.upsnet import build_upsnet
from unipan.structures import DatasetMeta

__all__ = ["MODELS", "build_model"]

MODELS: dict[str, Callable[[Config, DatasetMeta], nn.Module]] = {
    "panoptic_fpn": build_panoptic_fpn,
    "upsnet": build_upsnet,
}


def build_model(cfg: Config, meta: DatasetMeta) -> nn.Module:
    """Build the model named by `cfg.model.name` for the classes of `meta`.

    Raises:
        ValueError: for an unknown name, listing the registered ones.
    """
    name = cfg.model.name
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} (config model.name); registered models: {sorted(MODELS)}")
    return MODELS[name](cfg, meta)
