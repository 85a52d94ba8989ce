"""One config schema per model, composed of the shared parts; `MODEL_CONFIGS` maps name -> schema.

`load_config` picks the schema by `model.name` before merging, so a key another model would use
(or none does) is an error naming the key and the model. Adding a model adds one dataclass here
and one entry to `MODEL_CONFIGS` (a test checks it matches the model registry).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from unipan.config.parts import BackboneConfig, MaskHeadConfig, RoIHeadsConfig, RPNConfig, SemanticFPNHeadConfig
from unipan.fusion.settings import HeuristicFusionSettings, PanopticHeadSettings

__all__ = ["MODEL_CONFIGS", "ModelConfig", "PanopticFPNConfig", "UPSNetConfig", "UPSNetHeadsConfig"]


@dataclass
class PanopticFPNConfig:
    """Panoptic FPN (Kirillov et al. 2019): Mask R-CNN + semantic FPN head + heuristic fusion."""

    # registered model name (chooses this schema)
    name: str = "panoptic_fpn"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: RoIHeadsConfig = field(default_factory=RoIHeadsConfig)
    mask_head: MaskHeadConfig = field(default_factory=MaskHeadConfig)
    semantic: SemanticFPNHeadConfig = field(default_factory=SemanticFPNHeadConfig)
    fusion: HeuristicFusionSettings = field(default_factory=HeuristicFusionSettings)


@dataclass
class UPSNetHeadsConfig:
    """UPSNet's semantic head, its losses, the context FPN and the oracle rows of Table 6."""

    # deformable 3x3 conv layers of the shared semantic sub-network (3 on COCO, 2 on Cityscapes)
    semantic_num_convs: int = 3
    # channels of those layers: the first ones keep 256, the last outputs this many
    semantic_mid_channels: int = 256
    semantic_out_channels: int = 128
    # use deformable convs (DCNv1) in the semantic head; False = plain 3x3 convs (for ablations)
    deformable: bool = True
    # COCO context: global-average-pooled res5 -> Linear -> added to P5's lateral
    global_context: bool = True
    # loss weights: semantic CE, RoI loss, panoptic loss (COCO 0.2 / 0.04 / 0.1)
    semantic_loss_weight: float = 0.2
    roi_loss_weight: float = 0.04
    panoptic_loss_weight: float = 0.1
    # RoIAlign output size of the RoI loss
    roi_loss_size: int = 28
    # fraction of GT instances kept when building the training panoptic logits (rest -> unknown)
    instance_keep_fraction: float = 0.7
    # Table 6 "Pano.": train the panoptic head (False: its loss is off, the head runs at inference)
    panoptic_loss: bool = True
    # --- oracle modes of Table 6's lower rows (read ground truth at inference) ---
    # GT boxes classified by the box head replace the detections ("GT Box")
    oracle_boxes: bool = False
    # instances take the class of their GT box ("GT ICA"; turns the class assignment off)
    oracle_class_assignment: bool = False
    # one-hot GT semantic logits replace the semantic head's ("GT Seg.")
    oracle_semantic: bool = False


@dataclass
class UPSNetConfig:
    """UPSNet (Xiong et al. 2019): Mask R-CNN + deformable semantic head + panoptic head."""

    # registered model name (chooses this schema)
    name: str = "upsnet"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: RoIHeadsConfig = field(default_factory=RoIHeadsConfig)
    mask_head: MaskHeadConfig = field(default_factory=MaskHeadConfig)
    upsnet: UPSNetHeadsConfig = field(default_factory=UPSNetHeadsConfig)
    # the panoptic head's inference settings; `unknown` also switches the unknown class in training
    fusion: PanopticHeadSettings = field(default_factory=PanopticHeadSettings)


ModelConfig = PanopticFPNConfig | UPSNetConfig
"""Any model's config (the type of `Config.model`)."""

MODEL_CONFIGS: dict[str, type] = {
    "panoptic_fpn": PanopticFPNConfig,
    "upsnet": UPSNetConfig,
}
