"""Panoptic FPN (Kirillov, Girshick, He, Dollar 2019): Mask R-CNN + a light FPN semantic branch.

The semantic branch predicts stuff classes plus one "things" class; instances come from Mask
R-CNN; a heuristic fusion merges both into a panoptic id map. As detectron2's
`prepare_panoptic_fpn.py`, crowd pixels train as "things" in the semantic cross-entropy (only
void is ignored), and the logits are upsampled in float32 before it (AMP).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import Tensor

from unipan.config import PanopticFPNConfig
from unipan.fusion.heuristic import heuristic_fusion
from unipan.modeling.backbone import FPN, build_backbone
from unipan.modeling.heads.instance import InstanceBranch, InstanceOutputs, build_instance_branch
from unipan.modeling.heads.semantic_fpn import SemanticFPNHead
from unipan.modeling.layers.losses import semantic_loss, upsample_logits
from unipan.modeling.meta_arch import Fusion, PanopticModel, check_sem_seg
from unipan.segments import semantic_argmax, to_semantic_space
from unipan.structures import Batch, DatasetMeta, RawPrediction

__all__ = ["PanopticFPN", "build_panoptic_fpn"]


class PanopticFPN(PanopticModel):
    """Backbone -> (instance branch, semantic branch) -> losses, or fused panoptic results.

    Args:
        backbone: ResNet-FPN with `output_shape()`, `size_divisibility` and p2..p6 outputs.
        instance_branch: the Mask R-CNN branch.
        semantic_head: predicts S + 1 classes (stuff, then "things") at stride 4.
        meta: the dataset's class information.
        fuse: the fusion with its settings bound (the builder binds the heuristic fusion).
        semantic_loss_weight: weight of the semantic cross-entropy (COCO 0.5, Cityscapes 1.0).
        instance_loss_weight: weight of each of the five RPN / box / mask losses (1.0).

    Losses (training): loss_rpn_objectness, loss_rpn_box_reg, loss_classifier, loss_box_reg,
    loss_mask, loss_sem_seg. Raw predictions: sem_logits FloatTensor[S + 1, h, w] in the
    "stuff+things" space, detections with their 28x28 mask probabilities.
    """

    def __init__(
        self,
        *,
        backbone: FPN,
        instance_branch: InstanceBranch,
        semantic_head: SemanticFPNHead,
        meta: DatasetMeta,
        fuse: Fusion,
        semantic_loss_weight: float,
        instance_loss_weight: float = 1.0,
    ) -> None:
        super().__init__(meta=meta, size_divisibility=int(backbone.size_divisibility), fuse=fuse)
        self.check_num_classes("semantic head", semantic_head.num_classes, meta.num_stuff + 1, "stuff + 1")
        self.check_num_classes("instance branch", instance_branch.num_things, meta.num_things, "things")
        self.backbone = backbone
        self.instance_branch = instance_branch
        self.semantic_head = semantic_head
        self.semantic_loss_weight = float(semantic_loss_weight)
        self.instance_loss_weight = float(instance_loss_weight)

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        """Weighted training losses of `batch` (see the class docstring)."""
        assert batch.targets is not None
        padded_size = (int(batch.images.shape[-2]), int(batch.images.shape[-1]))
        # crowd pixels carry their class, hence "things" below (detectron2 trains them so)
        padded_sem_seg = batch.padded_sem_seg(crowd_meta=self.meta)
        check_sem_seg(padded_sem_seg, batch.image_ids, self.meta.num_classes)
        features = self.backbone(batch.images)
        instances = self.instance_branch.run(features, batch.image_sizes, padded_size, batch.targets)
        losses = {name: loss * self.instance_loss_weight for name, loss in instances.losses.items()}
        # float32 before the bilinear upsampling and the softmax (fp16 under autocast otherwise)
        sem_logits = upsample_logits(self.semantic_head(features).float(), padded_size)
        sem_targets = to_semantic_space(padded_sem_seg, self.meta.num_stuff, "stuff+things")
        losses["loss_sem_seg"] = semantic_loss(sem_logits, sem_targets) * self.semantic_loss_weight
        return losses

    @torch.no_grad()
    def raw_predictions(self, batch: Batch) -> list[RawPrediction]:
        """Per image RawPrediction at its input size."""
        return self.inference(batch)[0]

    @torch.no_grad()
    def inference(self, batch: Batch) -> tuple[list[RawPrediction], InstanceOutputs]:
        """The raw predictions together with everything the instance branch computed."""
        padded_size = (int(batch.images.shape[-2]), int(batch.images.shape[-1]))
        features = self.backbone(batch.images)
        instances = self.instance_branch.run(features, batch.image_sizes, padded_size, None)
        sem_logits = upsample_logits(self.semantic_head(features), padded_size)
        raws: list[RawPrediction] = []
        for i, (h, w) in enumerate(batch.image_sizes):
            det = instances.detections[i]
            logits = sem_logits[i, :, :h, :w]
            raws.append(
                RawPrediction(
                    boxes=det["boxes"],
                    scores=det["scores"],
                    labels=det["labels"],
                    sem_logits=logits,
                    mask_probs=det["mask_probs"],
                    sem_space="stuff+things",
                    sem_pred=semantic_argmax(logits),
                    extras={"mask_logits": det["mask_logits"]},
                )
            )
        return raws, instances


def build_panoptic_fpn(cfg: PanopticFPNConfig, meta: DatasetMeta) -> PanopticFPN:
    """Panoptic FPN for `meta`'s classes from its model config."""
    backbone = build_backbone(cfg.backbone)
    shapes = backbone.output_shape()
    instance_branch = build_instance_branch(cfg.rpn, cfg.roi_heads, cfg.mask_head, meta.num_things, shapes)
    semantic_head = SemanticFPNHead(
        in_shapes=shapes,
        conv_dims=cfg.semantic.conv_dims,
        norm=cfg.semantic.norm,
        num_classes=meta.num_stuff + 1,
    )
    return PanopticFPN(
        backbone=backbone,
        instance_branch=instance_branch,
        semantic_head=semantic_head,
        meta=meta,
        fuse=functools.partial(heuristic_fusion, **dataclasses.asdict(cfg.fusion)),
        semantic_loss_weight=cfg.semantic.loss_weight,
    )
