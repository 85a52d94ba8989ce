"""The ranges of the numeric settings, checked when a config is read, so a bad value is named at once.

A value outside its range (`model.roi_heads.positive_fraction=1.5`, `solver.clip_grad_norm=-1`,
`engine.num_threads=-4`) would otherwise be accepted and then ignored, or fail deep inside a
model. Ranges are declared per schema class and field (`RANGES`), so a part shared by several
models (the RPN, the fusions) is declared once; a list's range holds for each of its items.
Fields without an obvious range (seeds, widths of a schedule's steps) are not listed.

Also checked here: `engine.device` names a device, `data.synth_options` names `SynthOptions`
fields with valid values, and a few pairs (`bg_iou_thresh <= fg_iou_thresh`).

This module imports no torch.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from unipan.config.models import (
    AUNetHeadsConfig,
    OcclusionHeadConfig,
    RefineHeadsConfig,
    SpatialFlowHeadsConfig,
    SPINetHeadsConfig,
    UPSNetHeadsConfig,
)
from unipan.config.parts import (
    BackboneConfig,
    DataConfig,
    EngineConfig,
    MaskHeadConfig,
    RoIHeadsConfig,
    RPNConfig,
    SemanticFPNHeadConfig,
    SolverConfig,
)
from unipan.fusion.settings import (
    BoxFillFusionSettings,
    HeuristicFusionSettings,
    OcclusionFusionSettings,
    PanopticHeadSettings,
)

__all__ = ["RANGES", "Range", "check_values"]


@dataclass(frozen=True)
class Range:
    """An interval of allowed numbers; None is an open end."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"lie in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"be {'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"be {'<' if self.high_open else '<='} {_num(self.high)}"
        return "be a finite number"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


POSITIVE = Range(0, None, low_open=True)
NON_NEGATIVE = Range(0)
UNIT = Range(0, 1)  # probabilities, IoU and score thresholds, fractions
FRACTION = Range(0, 1, low_open=True)  # a share that must not be empty

RANGES: dict[type, dict[str, Range]] = {
    BackboneConfig: {"freeze_at": Range(0, 5), "base_width": POSITIVE, "depths": POSITIVE, "fpn_channels": POSITIVE},
    RPNConfig: {
        "anchor_sizes": POSITIVE,
        "aspect_ratios": POSITIVE,
        "pre_nms_top_n_train": POSITIVE,
        "pre_nms_top_n_test": POSITIVE,
        "post_nms_top_n_train": POSITIVE,
        "post_nms_top_n_test": POSITIVE,
        "nms_thresh": UNIT,
        "fg_iou_thresh": UNIT,
        "bg_iou_thresh": UNIT,
        "batch_size_per_image": POSITIVE,
        "positive_fraction": FRACTION,
    },
    RoIHeadsConfig: {
        "box_head_dim": POSITIVE,
        "batch_size_per_image": POSITIVE,
        "positive_fraction": FRACTION,
        "fg_iou_thresh": UNIT,
        "bg_iou_thresh": UNIT,
        "score_thresh": UNIT,
        "nms_thresh": UNIT,
        "detections_per_img": POSITIVE,
        "pooler_resolution": POSITIVE,
        "sampling_ratio": NON_NEGATIVE,
    },
    MaskHeadConfig: {
        "pooler_resolution": POSITIVE,
        "sampling_ratio": NON_NEGATIVE,
        "num_convs": NON_NEGATIVE,
        "conv_dims": POSITIVE,
    },
    SemanticFPNHeadConfig: {"conv_dims": POSITIVE, "loss_weight": NON_NEGATIVE},
    DataConfig: {
        "synth_train": NON_NEGATIVE,
        "synth_val": NON_NEGATIVE,
        "synth_size": Range(32),
        "min_size_train": NON_NEGATIVE,
        "max_size_train": NON_NEGATIVE,
        "min_size_test": NON_NEGATIVE,
        "max_size_test": NON_NEGATIVE,
        "scale_range": POSITIVE,
        "crop_size": POSITIVE,
        "flip_prob": UNIT,
        "pixel_mean": Range(0, 255),
        "pixel_std": POSITIVE,
        "num_workers": NON_NEGATIVE,
    },
    SolverConfig: {
        "batch_size": POSITIVE,
        "lr": NON_NEGATIVE,
        "momentum": Range(0, 1, high_open=True),
        "weight_decay": NON_NEGATIVE,
        "bias_lr_factor": NON_NEGATIVE,
        "weight_decay_bias": NON_NEGATIVE,
        "max_iter": POSITIVE,
        "warmup_iters": NON_NEGATIVE,
        "warmup_factor": UNIT,
        "steps": NON_NEGATIVE,
        "gamma": POSITIVE,
        "poly_power": NON_NEGATIVE,
        "clip_grad_norm": NON_NEGATIVE,
    },
    EngineConfig: {
        "log_period": NON_NEGATIVE,
        "checkpoint_period": NON_NEGATIVE,
        "eval_period": NON_NEGATIVE,
        "eval_max_images": NON_NEGATIVE,
        "num_threads": NON_NEGATIVE,
    },
    HeuristicFusionSettings: {
        "instance_score_thresh": UNIT,
        "overlap_thresh": UNIT,
        "mask_thresh": UNIT,
        "stuff_area": NON_NEGATIVE,
    },
    BoxFillFusionSettings: {"box_fill_thresh": UNIT},
    PanopticHeadSettings: {
        "nms_thresh": UNIT,
        "score_thresh": UNIT,
        "max_detections": POSITIVE,
        "mask_overlap_thresh": UNIT,
        "stuff_area": NON_NEGATIVE,
        "stuff_majority": UNIT,
        "binary_mask_logit": POSITIVE,
    },
    OcclusionFusionSettings: {
        "instance_score_thresh": UNIT,
        "overlap_thresh": UNIT,
        "mask_thresh": UNIT,
        "stuff_area": NON_NEGATIVE,
        "sigma": NON_NEGATIVE,
        "rho": UNIT,
        "shr_iof": UNIT,
        "ue_threshold": UNIT,
        "ue_dilation": NON_NEGATIVE,
    },
    UPSNetHeadsConfig: {
        "semantic_num_convs": POSITIVE,
        "semantic_mid_channels": POSITIVE,
        "semantic_out_channels": POSITIVE,
        "semantic_loss_weight": NON_NEGATIVE,
        "roi_loss_weight": NON_NEGATIVE,
        "panoptic_loss_weight": NON_NEGATIVE,
        "roi_loss_size": POSITIVE,
        "instance_keep_fraction": UNIT,
    },
    SpatialFlowHeadsConfig: {
        "cls_reg_convs": NON_NEGATIVE,
        "stuff_convs": NON_NEGATIVE,
        "mask_convs": NON_NEGATIVE,
        "anchor_octave_base": POSITIVE,
        "anchor_scales_per_octave": POSITIVE,
        "anchor_aspect_ratios": POSITIVE,
        "fg_iou_thresh": UNIT,
        "bg_iou_thresh": UNIT,
        "focal_alpha": UNIT,
        "focal_gamma": NON_NEGATIVE,
        "prior_prob": Range(0, 1, low_open=True, high_open=True),
        "head_init_std": NON_NEGATIVE,
        "nms_pre": POSITIVE,
        "score_thresh": UNIT,
        "nms_thresh": UNIT,
        "max_detections": POSITIVE,
        "mask_canonical_scale": POSITIVE,
        "mask_fg_iou_thresh": UNIT,
        "mask_rois_per_image": NON_NEGATIVE,
    },
    SPINetHeadsConfig: {
        "panoptic_channels": POSITIVE,
        "filter_channels": POSITIVE,
        "kernel_size": POSITIVE,
        "fsm_num_convs": NON_NEGATIVE,
        "pfg_channels": POSITIVE,
        "deconv_kernel": POSITIVE,
        "filters_per_image": POSITIVE,
        "bootstrap_ratio": FRACTION,
        "cls_weight": NON_NEGATIVE,
        "stuff_weight": NON_NEGATIVE,
        "thing_weight": NON_NEGATIVE,
        "contour_weight": NON_NEGATIVE,
        "triplet_weight": NON_NEGATIVE,
        "focal_alpha": UNIT,
        "focal_gamma": NON_NEGATIVE,
        "contour_focal_alpha": UNIT,
        "contour_focal_gamma": NON_NEGATIVE,
        "contour_sigma": POSITIVE,
        "triplet_dim": POSITIVE,
        "score_thresh": UNIT,
        "pre_topk": POSITIVE,
        "nms_thresh": UNIT,
        "kernel_sim_thresh": UNIT,
        "max_detections": POSITIVE,
        "head_init_std": NON_NEGATIVE,
    },
    AUNetHeadsConfig: {
        "reweight_gn_groups": POSITIVE,
        "mam_mask_resolution": POSITIVE,
        "mam_score_thresh": UNIT,
        "rpn_loss_weight": NON_NEGATIVE,
        "rcnn_loss_weight": NON_NEGATIVE,
        "mask_loss_weight": NON_NEGATIVE,
    },
    RefineHeadsConfig: {
        "ibpp_iterations": NON_NEGATIVE,
        "stage_loss_weights": NON_NEGATIVE,
        "semantic_embed_channels": NON_NEGATIVE,
        "refine_sem_channels": POSITIVE,
    },
    OcclusionHeadConfig: {
        "num_convs": POSITIVE,
        "conv_channels": POSITIVE,
        "fc_dim": POSITIVE,
        "loss_weight": NON_NEGATIVE,
        "pairs_per_image": POSITIVE,
    },
}
"""Allowed values per schema class and field (a subclass inherits its bases' ranges)."""

# (schema class, field that must not exceed, field) pairs
_ORDERED: list[tuple[type, str, str]] = [
    (RPNConfig, "bg_iou_thresh", "fg_iou_thresh"),
    (RoIHeadsConfig, "bg_iou_thresh", "fg_iou_thresh"),
    (SpatialFlowHeadsConfig, "bg_iou_thresh", "fg_iou_thresh"),
]

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _ranges_of(cls: type) -> dict[str, Range]:
    out: dict[str, Range] = {}
    for base in reversed(cls.__mro__):
        out.update(RANGES.get(base, {}))
    return out


def _walk(node: Any, prefix: str) -> Iterator[tuple[str, Any, str, Any]]:
    """(dotted path, schema object, field name, value) of every field under a dataclass tree."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from _walk(value, f"{path}.")
        else:
            yield path, node, f.name, value


def _numbers(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def check_values(cfg: Any) -> list[tuple[str, str]]:
    """Every value of a resolved config that is out of its range: (dotted key, what is wrong).

    Args:
        cfg: a `Config` (or any tree of the schema dataclasses).

    Returns:
        One (key, problem) per bad value, in the config's order; empty when all is well.
    """
    problems: list[tuple[str, str]] = []
    for path, owner, name, value in _walk(cfg, ""):
        allowed = _ranges_of(type(owner)).get(name)
        if allowed is None or value is None:
            continue
        for item in _numbers(value):
            if isinstance(item, bool) or not isinstance(item, int | float) or item not in allowed:
                problems.append((path, f"must {allowed}, got {value!r}"))
                break
    for path, owner, name, value in _walk(cfg, ""):
        for cls, low, high in _ORDERED:
            if isinstance(owner, cls) and name == low and value is not None:
                above = getattr(owner, high)
                if value > above:
                    problems.append((path, f"must be <= {high} ({above}), got {value!r}"))
    problems += _check_special(cfg)
    return problems


def _check_special(cfg: Any) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    engine = getattr(cfg, "engine", None)
    if isinstance(engine, EngineConfig) and not _DEVICE.fullmatch(engine.device):
        problems.append(("engine.device", f"must be auto, cpu, cuda or cuda:N, got {engine.device!r}"))
    data = getattr(cfg, "data", None)
    if isinstance(data, DataConfig) and len(data.synth_size) != 2:
        problems.append(("data.synth_size", f"must be [H, W], got {data.synth_size}"))
    elif isinstance(data, DataConfig) and data.dataset == "synthetic":
        problem = _synth_options_problem(data)
        if problem:
            problems.append(("data.synth_options", problem))
    return problems


def _synth_options_problem(data: DataConfig) -> str:
    """What is wrong with `data.synth_options` (and `data.synth_size`) for `SynthOptions`, or ''."""
    # imported here: the generator is torch-free but not needed to read a config of real data
    from unipan.data.synthetic import SynthOptions

    known = [f.name for f in dataclasses.fields(SynthOptions) if f.name != "size"]
    options = dict(data.synth_options)
    unknown = sorted(k for k in options if k not in known)
    if unknown:
        return f"unknown option(s) {', '.join(unknown)} (SynthOptions has: {', '.join(known)})"
    try:
        SynthOptions(**{**options, "size": (data.synth_size[0], data.synth_size[1])})
    except (TypeError, ValueError) as e:
        return str(e).removeprefix("bad SynthOptions: ")
    return ""
