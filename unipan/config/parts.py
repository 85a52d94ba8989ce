"""Config sections of the parts that models share, declared once and composed by `models.py`.

Every field carries a comment; the comments are the documentation of the YAML files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BackboneConfig",
    "DataConfig",
    "EngineConfig",
    "MaskHeadConfig",
    "RPNConfig",
    "RoIHeadsConfig",
    "SemanticFPNHeadConfig",
    "SolverConfig",
]


IMAGENET_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
"""RGB pixel mean on the 0..255 scale (the `DataConfig.pixel_mean` default)."""

IMAGENET_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)
"""RGB pixel std on the 0..255 scale (the `DataConfig.pixel_std` default)."""


@dataclass
class BackboneConfig:
    """ResNet/ResNeXt trunk and FPN."""

    # torchvision trunk: resnet18 | resnet34 | resnet50 | resnet101 | resnext101_32x8d
    name: str = "resnet50"
    # local file with torchvision ImageNet weights ("" = random init; nothing is downloaded)
    weights: str = ""
    # normalisation in the trunk: frozen_bn (detection default) | bn (trainable, from scratch)
    norm: str = "frozen_bn"
    # stages frozen from the bottom: 0 none, 1 stem, 2 stem+res2 (Mask R-CNN default), ... 5 all
    freeze_at: int = 2
    # width of the stem and first stage (64 = the published networks; less for tiny CPU models)
    base_width: int = 64
    # blocks per stage res2..res5; empty = the named network's depth
    depths: list[int] = field(default_factory=list)
    # FPN output channels (256 in the papers)
    fpn_channels: int = 256
    # pyramid levels: p2-p6 (P6 = max-pool of P5, for RPN models) | p3-p7 (P6 from C5, P7 from
    # P6, for RetinaNet models) | p2s8-p5, p2s8-p6, p2s8-p7 (SPINet: P2 at stride 8 = halved C2 +
    # P3; P6 = 3x3/2 conv of P5, P7 = 3x3/2 conv of ReLU(P6))
    fpn_levels: str = "p2-p6"
    # input of P6 with fpn_levels p3-p7: c5 (RetinaNet, the default) | p5 (FCOS / AdelaiDet, SPINet's
    # Table 4 P3-7 rows); empty = the pyramid's own (other levels fix it: p2-p6 pools P5, p2s8 reads P5)
    p6_from: str = ""
    # trunk stem: torchvision (one 7x7 conv, loads torchvision weights) | resnet_c (three 3x3 convs
    # of base/2, base/2, base channels; He et al. 2019 "Bag of tricks") | deeplab (three 3x3 convs
    # of base, base, 2 base channels; detectron2's DeepLabStem, res2 then reads 2 base channels)
    stem: str = "torchvision"


@dataclass
class RPNConfig:
    """Region proposal network (Mask R-CNN R50-FPN defaults)."""

    # anchor size per FPN level p2..p6 (one size per level, as Mask R-CNN)
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    # anchor aspect ratios (h / w), shared by all levels
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    # proposals kept per level before NMS, training / testing
    pre_nms_top_n_train: int = 2000
    pre_nms_top_n_test: int = 1000
    # proposals kept after NMS per image, training / testing (per level when post_nms_per_level)
    post_nms_top_n_train: int = 2000
    post_nms_top_n_test: int = 1000
    # keep post_nms_top_n_* proposals of every level and no cap per image (official UPSNet's
    # individual proposals: up to 5 x 2000 in training, 5 x 1000 in testing); false = torchvision's
    # and detectron2's cap per image
    post_nms_per_level: bool = False
    # NMS IoU threshold among proposals
    nms_thresh: float = 0.7
    # IoU above which an anchor is positive / below which negative
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    # anchors sampled per image for the RPN loss, and their positive fraction
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5


@dataclass
class RoIHeadsConfig:
    """Box head of the R-CNN: RoI sampling, the two-fc head, detection post-processing."""

    # hidden size of the two-fc box head (1024 in Mask R-CNN R50-FPN)
    box_head_dim: int = 1024
    # RoIs sampled per image for the box/mask losses, and their positive fraction
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    # IoU of a proposal with a GT box to be foreground / below which background
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    # inference: minimum class score, per-class NMS IoU, detections kept per image
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    # RoIAlign output size of the box head and its sampling ratio (Mask R-CNN: 7, 2)
    pooler_resolution: int = 7
    sampling_ratio: int = 2


@dataclass
class MaskHeadConfig:
    """Mask R-CNN mask head, usable on any boxes (proposals, detections, GT boxes)."""

    # RoIAlign output size and sampling ratio (Mask R-CNN: 14, 2); masks come out at twice the size
    pooler_resolution: int = 14
    sampling_ratio: int = 2
    # number of 3x3 convs and their channels (Mask R-CNN: 4 x 256)
    num_convs: int = 4
    conv_dims: int = 256
    # mask targets: each RoI's GT mask cut by RoIAlign to M x M, kept soft in [0, 1] (torchvision's
    # `project_masks_on_boxes`; false) or thresholded at 0.5 (detectron2, mmdetection; true)
    binary_targets: bool = False


@dataclass
class SemanticFPNHeadConfig:
    """Panoptic FPN's semantic branch (Kirillov et al. 2019)."""

    # channels of the per-level conv blocks (Kirillov et al. 2019: 128)
    conv_dims: int = 128
    # norm in the blocks: GN (32 groups) | none
    norm: str = "GN"
    # weight of the semantic cross-entropy (0.5 on COCO, 1.0 on Cityscapes)
    loss_weight: float = 0.5


@dataclass
class DataConfig:
    """Datasets, resizing and augmentation. Batches are padded to the model's size divisibility."""

    # synthetic | coco_panoptic (Cityscapes-panoptic uses coco_panoptic with its own json)
    dataset: str = "synthetic"
    # coco_panoptic: images folder, panoptic PNG folder and JSON of the training split
    train_images: str = ""
    train_panoptic: str = ""
    train_json: str = ""
    # coco_panoptic: the same for the validation split
    val_images: str = ""
    val_panoptic: str = ""
    val_json: str = ""
    # synthetic: where to write the generated set ("" = <output_dir>/synthetic)
    synth_root: str = ""
    # synthetic: images in the train / val split, image size (h, w), generator seed
    synth_train: int = 400
    synth_val: int = 50
    synth_size: list[int] = field(default_factory=lambda: [128, 128])
    synth_seed: int = 0
    # synthetic: difficulty knobs passed to unipan.data.synthetic.SynthOptions (its fields, e.g.
    # max_instances, occlusion, noise); empty = the generator's defaults
    synth_options: dict[str, Any] = field(default_factory=dict)
    # training resize: shortest edge drawn from this list, longest edge capped at max_size_train
    min_size_train: list[int] = field(default_factory=lambda: [800])
    max_size_train: int = 1333
    # testing resize (0 = keep the file's size)
    min_size_test: int = 800
    max_size_test: int = 1333
    # random scale jitter (low, high) followed by a crop of crop_size (h, w); empty = off
    scale_range: list[float] = field(default_factory=list)
    crop_size: list[int] = field(default_factory=list)
    # horizontal flip probability during training
    flip_prob: float = 0.5
    # ImageNet normalisation applied after the 0..255 -> float conversion (RGB order)
    pixel_mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    pixel_std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    # DataLoader worker processes per rank
    num_workers: int = 2


@dataclass
class SolverConfig:
    """Optimiser and learning-rate schedule."""

    # images per iteration over all processes (divided evenly among them)
    batch_size: int = 16
    # base learning rate, SGD momentum and weight decay (norm layers' affine parameters: no decay)
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # biases (outside norm layers): lr x bias_lr_factor and weight decay weight_decay_bias (null =
    # weight_decay); detectron2's BIAS_LR_FACTOR / WEIGHT_DECAY_BIAS; official UPSNet: 2.0 and 0.0
    bias_lr_factor: float = 1.0
    weight_decay_bias: float | None = None
    # total iterations
    max_iter: int = 90000
    # linear warmup: iterations, and the starting fraction of lr
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    # step | poly
    schedule: str = "step"
    # step schedule: iterations at which lr is multiplied by gamma
    steps: list[int] = field(default_factory=lambda: [60000, 80000])
    gamma: float = 0.1
    # poly schedule: lr = base * (1 - it / max_iter) ** power
    poly_power: float = 0.9
    # clip the global gradient norm to this (0 = off)
    clip_grad_norm: float = 0.0
    # mixed precision on CUDA (ignored on CPU)
    amp: bool = False


@dataclass
class EngineConfig:
    """Where a run writes, how it seeds, logs, checkpoints and evaluates."""

    # where checkpoints, metrics, the resolved config and plots go
    output_dir: str = "runs/default"
    # global seed (each rank and data worker derives its own from it)
    seed: int = 0
    # auto (cuda when available) | cpu | cuda
    device: str = "auto"
    # log every N iterations; save a checkpoint every N; evaluate PQ on val every N (0 = only at end)
    log_period: int = 20
    checkpoint_period: int = 5000
    eval_period: int = 0
    # evaluate on at most this many val images during training (0 = all)
    eval_max_images: int = 0
    # torch intra-op threads on CPU (0 = torch's default)
    num_threads: int = 0
