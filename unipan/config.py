"""One config system: typed dataclasses, loaded from YAML, overridden by dotted `key.sub=value`.

Every field carries a comment. `load_config(path, overrides)` merges a YAML file over the
defaults below (OmegaConf structured configs check names and types), and `save_config` writes
the resolved config next to a run's checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from unipan.io import atomic_write_text


@dataclass
class BackboneConfig:
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


@dataclass
class RPNConfig:
    # anchor size per FPN level p2..p6 (one size per level, as Mask R-CNN)
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    # anchor aspect ratios (h / w), shared by all levels
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    # proposals kept per level before NMS, training / testing
    pre_nms_top_n_train: int = 2000
    pre_nms_top_n_test: int = 1000
    # proposals kept after NMS per image, training / testing
    post_nms_top_n_train: int = 2000
    post_nms_top_n_test: int = 1000
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
    # RoIAlign output sizes of the box and mask heads, and its sampling ratio (Mask R-CNN: 7, 14, 2)
    box_pooler_resolution: int = 7
    mask_pooler_resolution: int = 14
    pooler_sampling_ratio: int = 2
    # mask head: number of 3x3 convs and their channels (Mask R-CNN: 4 x 256)
    mask_head_convs: int = 4
    mask_head_channels: int = 256


@dataclass
class SemanticHeadConfig:
    # channels of the per-level conv blocks (Kirillov et al. 2019: 128)
    conv_dims: int = 128
    # norm in the blocks: GN (32 groups) | none
    norm: str = "GN"
    # weight of the semantic cross-entropy (0.5 on COCO, 1.0 on Cityscapes)
    loss_weight: float = 0.5


@dataclass
class FusionConfig:
    # instances below this score are not pasted
    instance_score_thresh: float = 0.5
    # an instance is skipped when more than this fraction of it is already taken
    overlap_thresh: float = 0.5
    # RoI mask probability above which a pixel belongs to the instance
    mask_thresh: float = 0.5
    # stuff regions smaller than this many pixels become void (COCO 4096, Cityscapes 2048)
    stuff_area: int = 4096


@dataclass
class UPSNetConfig:
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
    # --- Table 6 switches ---
    # train the panoptic head (False: its loss is off, the head is used only at inference)
    panoptic_loss: bool = True
    # instance class assignment heuristic (False: trust the detector's class)
    instance_class_assignment: bool = True
    # predict the unknown class
    unknown: bool = True
    # --- inference ---
    # class-agnostic NMS IoU, minimum score, and detections kept before mask pruning
    nms_thresh: float = 0.5
    score_thresh: float = 0.6
    max_detections: int = 100
    # a mask is dropped when more than this fraction overlaps kept masks of the same class
    mask_overlap_thresh: float = 0.3
    # stuff segments smaller than this many pixels become void (COCO 4096, Cityscapes 2048)
    stuff_area: int = 4096
    # a stuff majority relabels an instance region when it covers at least this fraction
    stuff_majority: float = 0.5
    # --- oracle modes of Table 6's lower rows (need ground truth at inference) ---
    oracle_boxes: bool = False
    oracle_class_assignment: bool = False
    oracle_semantic: bool = False


@dataclass
class ModelConfig:
    # registered model name: panoptic_fpn (more follow: upsnet, aunet, refine, spatialflow, spinet)
    name: str = "panoptic_fpn"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: RoIHeadsConfig = field(default_factory=RoIHeadsConfig)
    semantic: SemanticHeadConfig = field(default_factory=SemanticHeadConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    # UPSNet's heads, losses and panoptic head (used when name == "upsnet")
    upsnet: UPSNetConfig = field(default_factory=UPSNetConfig)


@dataclass
class DataConfig:
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
    # images are padded so both sides are multiples of this (32 for FPN with P6)
    size_divisibility: int = 32
    # ImageNet normalisation applied after the 0..255 -> float conversion (RGB order)
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    # DataLoader worker processes per rank
    num_workers: int = 2


@dataclass
class SolverConfig:
    # images per iteration over all processes (divided evenly among them)
    batch_size: int = 16
    # base learning rate, SGD momentum and weight decay
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
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


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- dotted overrides (`solver.lr=0.01`), checked against the schema.

    Raises:
        ValueError: naming the file or override with an unknown key or a wrong type.
    """
    cfg = OmegaConf.structured(Config)
    try:
        if path is not None:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except Exception as e:  # omegaconf raises several error types; all mean bad user config
        where = f"{path}" if path is not None else "overrides"
        raise ValueError(f"config {where}: {e}".splitlines()[0]) from e
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, Config)
    return obj


def config_to_dict(cfg: Config) -> dict[str, Any]:
    out = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]


def config_from_dict(d: dict[str, Any]) -> Config:
    obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), d))
    assert isinstance(obj, Config)
    return obj


def config_to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(Path(path), config_to_yaml(cfg))
