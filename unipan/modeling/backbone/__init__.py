"""ResNet(-X) trunks (`resnet.py`) and the feature pyramid over them (`fpn.py`)."""

from __future__ import annotations

from unipan.config import BackboneConfig
from unipan.modeling.backbone.fpn import FPN, FPN_LEVELS, GlobalContext, LastLevelP6P7FromC5
from unipan.modeling.backbone.resnet import (
    NORMS,
    RESNET_SPECS,
    TRUNK_STAGES,
    ResNetSpec,
    ResNetTrunk,
    build_trunk,
    convert_frozen_batchnorm,
    freeze_stages,
    load_trunk_weights,
)
from unipan.modeling.backbone.spinet_fpn import SPINET_FPN_LEVELS, SPINetFPN

__all__ = [
    "FPN",
    "FPN_LEVELS",
    "NORMS",
    "RESNET_SPECS",
    "SPINET_FPN_LEVELS",
    "TRUNK_STAGES",
    "GlobalContext",
    "LastLevelP6P7FromC5",
    "ResNetSpec",
    "ResNetTrunk",
    "SPINetFPN",
    "build_backbone",
    "build_trunk",
    "convert_frozen_batchnorm",
    "freeze_stages",
    "load_trunk_weights",
]


def build_backbone(cfg: BackboneConfig, *, global_context: bool = False) -> FPN:
    """Build the ResNet(-X) trunk and FPN described by `cfg`.

    Args:
        cfg: trunk (name, width, depths, norm, weights, freezing) and FPN (channels, levels).
        global_context: add UPSNet's COCO global context (GAP(res5) -> Linear) to the coarsest
            lateral; its weights are `context.fc.*`.

    Returns:
        The backbone; `output_shape()` lists its features.

    Raises:
        ValueError: for an unknown network, norm or levels, bad sizes, or unusable weights.
        FileNotFoundError: when `cfg.weights` names a missing file.
    """
    if cfg.fpn_levels not in FPN_LEVELS + SPINET_FPN_LEVELS:
        known = list(FPN_LEVELS + SPINET_FPN_LEVELS)
        raise ValueError(f"unknown backbone.fpn_levels {cfg.fpn_levels!r}; known: {known}")
    if cfg.p6_from not in ("", "c5", "p5"):
        raise ValueError(f"backbone.p6_from must be '', 'c5' or 'p5', got {cfg.p6_from!r}")
    if cfg.p6_from and cfg.fpn_levels != "p3-p7":
        raise ValueError(
            f"backbone.p6_from={cfg.p6_from!r} applies to fpn_levels 'p3-p7' only, not {cfg.fpn_levels!r} "
            "(whose P6 source is fixed)"
        )
    trunk = build_trunk(cfg)
    if cfg.fpn_levels in SPINET_FPN_LEVELS:
        # SPINet's pyramid (P2 at stride 8); a FPN subclass with the same interface
        fpn: FPN = SPINetFPN(trunk=trunk, fpn_channels=cfg.fpn_channels, levels=cfg.fpn_levels)
    else:
        fpn = FPN(trunk=trunk, fpn_channels=cfg.fpn_channels, levels=cfg.fpn_levels, p6_from=cfg.p6_from or "c5")
    if global_context:
        # after the FPN's convs: the creation order (and so the seeded weights) of UPSNet before
        # the context moved into the backbone
        fpn.set_global_context(GlobalContext(trunk.stage_channels[-1], cfg.fpn_channels))
    return fpn
