"""One config schema per model, composed of the shared parts; `MODEL_CONFIGS` maps name -> schema.

`load_config` picks the schema by `model.name` before merging, so a key another model would use
(or none does) is an error naming the key and the model. Adding a model adds one dataclass here
and one entry to `MODEL_CONFIGS` (a test checks it matches the model registry).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from unipan.config.parts import BackboneConfig, MaskHeadConfig, RoIHeadsConfig, RPNConfig, SemanticFPNHeadConfig
from unipan.fusion.settings import (
    BoxFillFusionSettings,
    HeuristicFusionSettings,
    OcclusionFusionSettings,
    PanopticHeadSettings,
)

__all__ = [
    "MODEL_CONFIGS",
    "AUNetConfig",
    "AUNetHeadsConfig",
    "ModelConfig",
    "OcclusionHeadConfig",
    "PanopticFPNConfig",
    "RefineConfig",
    "RefineHeadsConfig",
    "SPINetConfig",
    "SPINetHeadsConfig",
    "SpatialFlowConfig",
    "SpatialFlowHeadsConfig",
    "UPSNetConfig",
    "UPSNetHeadsConfig",
]


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
    # their widths, as the released FCNSubNet: the next-to-last layer narrows to
    # semantic_out_channels and the last keeps it; the layers before output semantic_mid_channels
    # (the released code keeps the FPN width, 256). COCO: 256->256, 256->128, 128->128;
    # Cityscapes (2 layers, mid unused): 256->128, 128->128
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


@dataclass
class SpatialFlowHeadsConfig:
    """SpatialFlow's sub-networks, flows, RetinaNet detector, mask RoIs and stuff targets.

    Defaults: the paper's full model on COCO (Chen et al. 2020, Sec. 3) with the released code's
    detector settings (mmdetection 2 RetinaNet). Each row of the paper's Tables 1-3 is a switch:
    baseline = stuff_convs 0, mask_convs 0, every flow off; then the towers, then each flow.
    """

    # depth of the reg and cls sub-networks (RetinaNet: 4 x [3x3 conv, ReLU], FPN channels)
    cls_reg_convs: int = 4
    # Tables 2/3 "+ stuff + mask sub-net": stuff tower depth (0 = the stuff head reads P3-P5, or
    # cls_reg_convs) and mask tower depth (0 = the mask head reads P3-P5, or 1)
    stuff_convs: int = 4
    mask_convs: int = 1
    # Tables 2/3, one row each: reg->cls flows (one 3x3 phi per depth), reg->stuff flows (one phi per
    # depth), reg->mask flow (one phi from the last reg layer), stuff->mask flow (one 3x3 psi)
    flow_reg_cls: bool = True
    flow_reg_stuff: bool = True
    flow_reg_mask: bool = True
    flow_stuff_mask: bool = True
    # DCN variant (supplementary Eq. 6): DCNv2 on the 3x3 conv of every block of res3-res5, and on
    # the cls / stuff / mask tower convs with their flow conv as offset conv (27 outputs)
    dcn_backbone: bool = False
    dcn_cls: bool = False
    dcn_stuff: bool = False
    dcn_mask: bool = False
    # anchors: sizes octave_base x stride x 2^(k / scales_per_octave), k < scales_per_octave, per
    # level (RetinaNet: 4, 3: P3 32-51 px ... P7 512-813 px), aspect ratios h / w
    anchor_octave_base: float = 4.0
    anchor_scales_per_octave: int = 3
    anchor_aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    # anchor IoU with a GT box: >= fg positive, < bg negative, between ignored (low-quality
    # matches kept, as mmdetection's min_pos_iou 0)
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.4
    # sigmoid focal loss and the classifier's initial foreground probability
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    prior_prob: float = 0.01
    # std of the normal init of every tower and flow conv (RetinaNet and the released head: 0.01, for
    # 256 channels); biases 0. The predictors keep N(0, 0.01), the classifier's bias from prior_prob
    head_init_std: float = 0.01
    # normalisation after every tower conv: "" (the paper and the released head) | "GN" (GroupNorm(32)
    # before each ReLU, as torchvision's RetinaNet v2 head and mmdetection's norm_cfg GN)
    tower_norm: str = ""
    # detections, in training (the mask RoIs) and at inference: anchors kept per level by their best
    # class score, minimum score, class-wise NMS IoU (the paper's 0.4), detections kept per image
    nms_pre: int = 1000
    score_thresh: float = 0.05
    nms_thresh: float = 0.4
    max_detections: int = 100
    # mask head: RoI box size pooled from P4 (112 = mmdetection's finest_scale 56: sqrt(area) < 112
    # on P3, 112-224 on P4, larger on P5); training RoIs = the detached detections plus the GT boxes
    # (mask_gt_boxes), positives at IoU >= mask_fg_iou_thresh with a GT box
    mask_canonical_scale: int = 112
    mask_fg_iou_thresh: float = 0.5
    mask_gt_boxes: bool = True
    # at most this many positive mask RoIs per image, drawn at random (0: all, the released code's
    # pseudo sampler; a cap as Mask R-CNN's RoI sampler bounds the mask head's cost on CPU)
    mask_rois_per_image: int = 0
    # stuff head classes: stuff+things (S stuff + "other", COCO) | all (S + T, the released code's
    # non-"other" mode; thing channels are void at fusion, Cityscapes)
    stuff_space: str = "stuff+things"
    # crowd pixels train the stuff head as their thing class ("other"), as the released converter
    crowd_as_other: bool = True


@dataclass
class SpatialFlowConfig:
    """SpatialFlow (Chen et al., AAAI 2020): RetinaNet + four sub-networks with spatial flows + mask / stuff heads."""

    # registered model name (chooses this schema)
    name: str = "spatialflow"
    # P3-P7 pyramid: P6 = 3x3/2 conv of C5, P7 = 3x3/2 conv of ReLU(P6) (Sec. 3.1)
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(fpn_levels="p3-p7"))
    spatialflow: SpatialFlowHeadsConfig = field(default_factory=SpatialFlowHeadsConfig)
    # Mask R-CNN's mask head on the mask-tower outputs of P3-P5 (RoIAlign 14, adaptive sampling),
    # its targets thresholded at 0.5 (the released mmdetection code's binarised crops)
    mask_head: MaskHeadConfig = field(default_factory=lambda: MaskHeadConfig(sampling_ratio=0, binary_targets=True))
    # the stuff head (Fig. 3): Panoptic FPN's semantic branch on the stuff-tower outputs of P3-P5;
    # loss_weight is the paper's lambda (Table 1; COCO 0.25, Cityscapes 1.0)
    stuff: SemanticFPNHeadConfig = field(default_factory=lambda: SemanticFPNHeadConfig(loss_weight=0.25))
    # the heuristic fusion with the released thresholds (COCO 0.37 / 0.37 / 4900 px), then box fill
    # (box_fill_thresh, 0 = off; the paper configs turn it on)
    fusion: BoxFillFusionSettings = field(
        default_factory=lambda: BoxFillFusionSettings(instance_score_thresh=0.37, overlap_thresh=0.37, stuff_area=4900)
    )


@dataclass
class SPINetHeadsConfig:
    """SPINet's heads, losses and inference (Hwang et al. 2021); the switches of its Tables 3-5."""

    # D_phi: channels of the Panoptic-Feature and of every kernel applied to it (256)
    panoptic_channels: int = 256
    # D_f: channels of the filter map, and k: size of the thing and stuff kernels (3, the only
    # values the paper's parameter count fits)
    filter_channels: int = 256
    kernel_size: int = 3
    # one bias per thing / stuff kernel (the paper's kernels have k^2 D_phi weights, no bias)
    kernel_bias: bool = False
    # Table 4: FPN levels of the filter sampling module (F.S.M) and of the Panoptic-Feature
    # generator (P.F.G); they must be outputs of model.backbone.fpn_levels
    fsm_levels: list[str] = field(default_factory=lambda: ["p2", "p3", "p4", "p5"])
    pfg_levels: list[str] = field(default_factory=lambda: ["p2", "p3", "p4", "p5"])
    # per FSM level [lo, hi]: the instance scales (sqrt of the mask's box area, input pixels) that
    # level's locations are positive for (Panoptic FCN's and FCOS's size of interest, e.g. [[1, 64],
    # [32, 128], [64, 256], [128, 512]]); empty = every level (the paper's "points that belong to
    # the instance mask")
    scale_ranges: list[list[float]] = field(default_factory=list)
    # convs of each FSM tower (class and filter head: 4, each with GN)
    fsm_num_convs: int = 4
    # width of the PFG towers (256)
    pfg_channels: int = 256
    # kernel of the PFG's stride-2 transposed conv (2 or 4)
    deconv_kernel: int = 2
    # CoordConv channels for the filter head and the PFG
    coords: bool = True
    # Table 5: one Panoptic-Feature for things and stuff (true) | two PFGs, thing kernels on one
    # and stuff kernels on the other (false)
    integrated: bool = True
    # stuff kernels: S, one per stuff class (false, the paper; sem_space "stuff") | S + 1 with a
    # "things" channel (true; Panoptic FCN; sem_space "stuff+things")
    stuff_things_channel: bool = False
    # thing filters sampled per image in training, uniformly over the positive locations
    filters_per_image: int = 250
    # Table 3 "M.C.D": multi-class dice on the stuff softmax (part of L_s)
    multiclass_dice: bool = True
    # bootstrapped cross-entropy over the hardest fraction of pixels (0.2 Cityscapes; 1.0 = plain
    # cross-entropy, COCO)
    bootstrap_ratio: float = 0.2
    # loss weights lambda_0..lambda_4 of Eq. 7: class, stuff, thing, contour, triplet (Cityscapes
    # 1, 1, 5, 20, 1; COCO 1, 0.5, 3, 0, 1); Table 3: contour 0 = L_inter off (head not built),
    # triplet 0 = L_intra off (head not built)
    cls_weight: float = 1.0
    stuff_weight: float = 1.0
    thing_weight: float = 5.0
    contour_weight: float = 20.0
    triplet_weight: float = 1.0
    # focal loss of the class head (FCOS / CondInst: alpha 0.25, gamma 2)
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    # focal loss of the contour head (Eq. 6; same defaults, its own keys so that tuning the class
    # head does not move L_inter)
    contour_focal_alpha: float = 0.25
    contour_focal_gamma: float = 2.0
    # soft contour width in pixels (targets exp(-d^2 / 2 sigma^2) up to 3 sigma)
    contour_sigma: float = 1.0
    # size of the triplet representation V = FC(v)
    triplet_dim: int = 256
    # negatives of the triplet loss: any (every other instance of the image) | same_class
    triplet_negatives: str = "any"
    # inference: class score above which a location yields a thing filter (0.45), and the
    # highest-scoring candidates kept per level
    score_thresh: float = 0.45
    pre_topk: int = 1000
    # duplicates (P2 and P3 share stride 8; neighbouring locations fire for one object):
    # box_nms (class-wise NMS on the boxes of the stride-4 masks) | kernel_fusion (Panoptic FCN's:
    # same-class kernels of cosine similarity >= kernel_sim_thresh are averaged before the conv) |
    # none (the fusion's overlap rule)
    dedup: str = "box_nms"
    nms_thresh: float = 0.6
    kernel_sim_thresh: float = 0.9
    max_detections: int = 100
    # Table 1 "SPINet + deform": deformable 3x3 convs (DCNv1) in res3-res5 of the trunk
    deformable: bool = False
    # std of the normal init of the filter sampling module's convs and FC (0.01: FCOS / CondInst);
    # the contract tests widen it, so that an untrained model's scores differ by more than float noise
    head_init_std: float = 0.01


@dataclass
class SPINetConfig:
    """SPINet (Hwang et al. 2021): dynamic thing kernels and learned stuff kernels on one feature."""

    # registered model name (chooses this schema)
    name: str = "spinet"
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(fpn_levels="p2s8-p5"))
    spinet: SPINetHeadsConfig = field(default_factory=SPINetHeadsConfig)
    # the heuristic fusion (instance_score_thresh: the paper's 0.45; mask_thresh also binarises
    # the thing masks)
    fusion: HeuristicFusionSettings = field(default_factory=lambda: HeuristicFusionSettings(instance_score_thresh=0.45))


@dataclass
class AUNetHeadsConfig:
    """AUNet's attention modules, their switches (Table 1 rows, Table 3's BG classes) and Eq. 7's weights.

    Table 1 rows as overrides: unipan.modeling.models.aunet.TABLE1_ROWS.
    """

    # Table 1 "sep": the BG branch on its own backbone (no parameter shared with the FG branch)
    separate: bool = False
    # the Proposal Attention Module (Eq. 1-2) on each of pam_levels, fed by the RPN's 3x3 conv features
    pam: bool = True
    # the Mask Attention Module (Sec. 3.3.2) on the summed stride-4 BG map, fed by RoIUpsampled mask features
    mam: bool = True
    # background reweighting (Eq. 3-4) after every PAM and MAM (Table 1 "rewt")
    reweight: bool = True
    # BG branch classes: stuff+things (stuff + one "things" class, COCO) | all (every class, Cityscapes)
    bg_classes: str = "stuff+things"
    # BG levels that get a PAM (each its own weights)
    pam_levels: list[str] = field(default_factory=lambda: ["p2", "p3", "p4", "p5"])
    # GroupNorm groups of the reweighting (>= 4 channels per group; 32 at 128 channels)
    reweight_gn_groups: int = 32
    # mask features MAM reads: 28 (the mask predictor's deconv + ReLU output) | 14 (the conv head's)
    mam_mask_resolution: int = 28
    # fpn: each RoI RoIUpsampled into its FPN level, levels upsampled to stride 4 and summed (the
    # paper) | single: every RoI straight to stride 4
    mam_levels: str = "fpn"
    # RoIUpsample's Eq. 6 normalisation (false: the exact adjoint of RoIAlign)
    roi_upsample_normalize: bool = True
    # inference: MAM reads the detections scoring >= this; null = model.fusion.instance_score_thresh
    # (the instances the fusion can paste; the paper's "RoIs" at test time are unstated)
    mam_score_thresh: float | None = None
    # Eq. 7: lambda_1 (RPN losses), lambda_2 (box classifier + regression), lambda_3 (mask); lambda_4
    # is model.semantic.loss_weight (COCO 1, 1, 1, 0.3; Cityscapes 1, 0.75, 1, 1)
    rpn_loss_weight: float = 1.0
    rcnn_loss_weight: float = 1.0
    mask_loss_weight: float = 1.0


@dataclass
class AUNetConfig:
    """AUNet (Li et al. 2019): Mask R-CNN + Panoptic FPN's semantic head joined by PAM and MAM + heuristic fusion."""

    # registered model name (chooses this schema)
    name: str = "aunet"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: RoIHeadsConfig = field(default_factory=RoIHeadsConfig)
    mask_head: MaskHeadConfig = field(default_factory=MaskHeadConfig)
    semantic: SemanticFPNHeadConfig = field(default_factory=SemanticFPNHeadConfig)
    aunet: AUNetHeadsConfig = field(default_factory=AUNetHeadsConfig)
    # the heuristic fusion; at inference MAM reads the detections scoring >= instance_score_thresh
    # (unless aunet.mam_score_thresh is set)
    fusion: HeuristicFusionSettings = field(default_factory=HeuristicFusionSettings)


@dataclass
class RefineHeadsConfig:
    """REFINE's Iterative Bi-directional Prediction Projection (Ren et al. 2021, Eq. 2-6)."""

    # Table 4: IBPP iterations T (paper 3); 0 = Mask R-CNN + the all-class semantic head, the
    # base of Table 3
    ibpp_iterations: int = 3
    # one H_ins / H_sem pair for every iteration (default: separate heads, the cascade convention)
    share_weights: bool = False
    # weight of iteration t's mask loss, and factor of its semantic loss (HTC / BCC-Net stages)
    stage_loss_weights: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25])
    # channels of the semantic embedding F_sem (1x1 conv + ReLU of the semantic features); it is
    # added to the FPN RoI features, so 0 = the FPN's channels (the only valid value otherwise)
    semantic_embed_channels: int = 0
    # channels of H_sem^(t)'s 3x3 conv block (a Panoptic FPN block; the paper leaves it open)
    refine_sem_channels: int = 128
    # ROI-Flatten weights each mask by its RoI's (detached) class score; false = plain paste
    flatten_score_weighted: bool = True
    # final masks: last (m^(T), the paper) | mean (of the T iterations' probabilities, as HTC)
    mask_output: str = "last"


@dataclass
class OcclusionHeadConfig:
    """REFINE's occlusion network (SOE's O(i, j); BCC-Net's 'feature+mask+label' head)."""

    # Table 3 "SOE": train and run the occlusion head (model.fusion.occlusion=learned reads it)
    enabled: bool = True
    # Table 6 inputs: any of mask (shape prior), feature (appearance), label (class prior); mask
    # or feature needed
    inputs: list[str] = field(default_factory=lambda: ["mask", "feature", "label"])
    # convs (3x3, the last with stride 2), their channels, the two hidden FC widths
    num_convs: int = 4
    conv_channels: int = 512
    fc_dim: int = 1024
    # weight of its binary cross-entropy
    loss_weight: float = 1.0
    # ordered training pairs kept per image (OCFusion 128); labels come from the panoptic ground
    # truth: the GT segment owning most of two overlapping RoI masks' intersection is on top
    pairs_per_image: int = 128
    # train the occlusion head alone (every other part frozen; BCC-Net's separate stage)
    occlusion_only: bool = False


@dataclass
class RefineConfig:
    """REFINE (Ren et al., AAAI 2021): Panoptic FPN with an all-class semantic head, IBPP, SOE and UE."""

    # registered model name (chooses this schema)
    name: str = "refine"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: RoIHeadsConfig = field(default_factory=RoIHeadsConfig)
    # every iteration's H_ins (and the base mask head when ibpp_iterations = 0)
    mask_head: MaskHeadConfig = field(default_factory=MaskHeadConfig)
    # H_sem, predicting all stuff + thing classes; loss_weight = P^(0)'s (P^(t)'s: x stage weight)
    semantic: SemanticFPNHeadConfig = field(default_factory=SemanticFPNHeadConfig)
    refine: RefineHeadsConfig = field(default_factory=RefineHeadsConfig)
    occlusion: OcclusionHeadConfig = field(default_factory=OcclusionHeadConfig)
    fusion: OcclusionFusionSettings = field(default_factory=OcclusionFusionSettings)


ModelConfig = PanopticFPNConfig | UPSNetConfig | AUNetConfig | SpatialFlowConfig | SPINetConfig | RefineConfig
"""Any model's config (the type of `Config.model`)."""

MODEL_CONFIGS: dict[str, type] = {
    "refine": RefineConfig,
    "aunet": AUNetConfig,
    "panoptic_fpn": PanopticFPNConfig,
    "upsnet": UPSNetConfig,
    "spatialflow": SpatialFlowConfig,
    "spinet": SPINetConfig,
}
