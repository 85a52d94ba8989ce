"""Settings of the fusions, declared once: the config tree embeds them and the fusions take them.

Torch-free on purpose: `unipan.config` imports this module, and the light verbs of the CLI must
not import torch. Each field's comment is its documentation in the saved `config.yaml` too.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ORACLE_LOGIT",
    "BoxFillFusionSettings",
    "HeuristicFusionSettings",
    "OcclusionFusionSettings",
    "PanopticHeadSettings",
]

ORACLE_LOGIT = 10.0
"""Logit magnitude of ground truth turned into predictions (`unipan.fusion.oracle`), and of binary
masks given to UPSNet's head without logits: sigmoid(10) = 0.99995, a certain but finite logit.
Declared here, not in `oracle`, so that this torch-free module can use it as a default."""


@dataclass
class HeuristicFusionSettings:
    """Thresholds of the heuristic fusion (Panoptic FPN; detectron2's defaults)."""

    # instances below this score are not pasted (and neither is any instance after them)
    instance_score_thresh: float = 0.5
    # an instance is skipped when more than this fraction of it is already taken
    overlap_thresh: float = 0.5
    # RoI mask probability above which a pixel belongs to the instance
    mask_thresh: float = 0.5
    # stuff regions smaller than this many pixels become void (COCO 4096, Cityscapes 2048)
    stuff_area: int = 4096


@dataclass
class BoxFillFusionSettings(HeuristicFusionSettings):
    """The heuristic fusion followed by box fill (SpatialFlow's released fusion; `unipan.fusion.box_fill`)."""

    # box fill: a detection (score >= instance_score_thresh, by score) takes the void pixels of its
    # box when they make up at least this fraction of it (released SpatialFlow configs: 0.5); 0 = off
    box_fill_thresh: float = 0.0


@dataclass
class PanopticHeadSettings:
    """Inference settings of UPSNet's panoptic head (defaults: the paper's COCO values)."""

    # class-agnostic NMS IoU, minimum detection score, detections kept before mask pruning
    nms_thresh: float = 0.5
    score_thresh: float = 0.6
    max_detections: int = 100
    # a mask is dropped when more than this fraction of it overlaps kept masks of its class
    mask_overlap_thresh: float = 0.3
    # stuff segments smaller than this many pixels become void (COCO 4096, Cityscapes 2048)
    stuff_area: int = 4096
    # Table 6 "ICA": instance class assignment, a stuff majority relabels a region covering at
    # least `stuff_majority` of it (the GT class oracle turns it off)
    class_assignment: bool = True
    stuff_majority: float = 0.5
    # Table 6 "Unk.": the unknown class, trained from dropped instances; its pixels become void
    unknown: bool = True
    # False: use every given instance as is, no NMS, score filter or top-k (set by the GT-box oracle)
    filter_detections: bool = True
    # mask logit magnitude given to binary masks when a prediction has no logits or probabilities
    binary_mask_logit: float = ORACLE_LOGIT
    # stuff segment score: mean class probability (one more pass over all logits) or 1.0
    stuff_scores: bool = False


@dataclass
class OcclusionFusionSettings:
    """REFINE's fusion (`unipan.fusion.occlusion.occlusion_fusion`).

    The heuristic's thresholds, occlusion relations (Tables 5-6) and Unknown Erasing (Table 3).
    Defaults: the paper's COCO model, with BCC-Net's thresholds.
    """

    # instances below this score are not placed (BCC-Net 0.5)
    instance_score_thresh: float = 0.5
    # an instance is skipped when more than this fraction of its mask is lost (after reclaims)
    overlap_thresh: float = 0.5
    # RoI mask probability at or above which a pixel belongs to the instance
    mask_thresh: float = 0.5
    # stuff regions smaller than this many original-image pixels become void (COCO 4096)
    stuff_area: int = 4096
    # Table 5 occlusion relations: none (the heuristic) | learned (the occlusion head's O with
    # Eq. 7; needs model.occlusion.enabled) | shr (SHR's box rule)
    occlusion: str = "learned"
    # Eq. 7's sigma (Table 5: 2.5 best); 0 = the hard rule O(i,j) > O(j,i) ("OCFusion" /
    # "strong baseline" rows)
    sigma: float = 2.5
    # instance pairs whose binary masks overlap by at least this fraction of either mask get a
    # relation (BCC-Net / OCFusion 0.2); the model's candidate pairs and training pairs use it too
    rho: float = 0.2
    # same-class pairs get relations too (the paper's Fig. 5: a kite-kite pair)
    intraclass: bool = True
    # shr: box i is on top of box j when more than this fraction of it lies inside j
    shr_iof: float = 0.5
    # Table 3 "UE": void stuff regions whose mean confidence is below ue_threshold; fragments of a
    # class within ue_dilation input pixels are judged together (BCC-Net: 0.5, 50 at ~800x1333)
    unknown_erasing: bool = True
    ue_threshold: float = 0.5
    ue_dilation: int = 50
