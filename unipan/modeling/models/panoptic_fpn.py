"""Panoptic FPN (Kirillov, Girshick, He, Dollar 2019): Mask R-CNN + a light FPN semantic branch.

The semantic branch predicts stuff classes plus one "things" class; instances come from Mask
R-CNN; a heuristic fusion merges both into a panoptic id map.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from unipan.config import Config, FusionConfig
from unipan.modeling.backbone import ResNetFPN, build_backbone
from unipan.modeling.heads.instance import (
    InstanceBranch,
    InstanceOutputs,
    build_instance_branch,
    check_num_things,
)
from unipan.modeling.heads.semantic_fpn import (
    SemanticFPNHead,
    semantic_loss,
    semantic_targets_stuff_things,
    upsample_logits,
)
from unipan.structures import IGNORE_LABEL, Batch, DatasetMeta, PanopticResult, RawPrediction

__all__ = ["PanopticFPN", "build_panoptic_fpn", "check_batch", "check_sem_seg"]

FusionFn = Callable[[RawPrediction], PanopticResult]


def check_batch(batch: Batch, size_divisibility: int) -> None:
    """Raise ValueError naming the problem when `batch` breaks the Batch contract (shapes only).

    Args:
        batch: the batch to check.
        size_divisibility: padded sides must be multiples of it.
    """
    images = batch.images
    if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"Batch.images must be FloatTensor[B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    b, _, hp, wp = images.shape
    if hp % size_divisibility or wp % size_divisibility:
        raise ValueError(f"Batch.images is {hp}x{wp}, not padded to a multiple of {size_divisibility}")
    if len(batch.image_sizes) != b or len(batch.image_ids) != b:
        raise ValueError(
            f"Batch has {b} images but {len(batch.image_sizes)} image_sizes and {len(batch.image_ids)} image_ids"
        )
    for image_id, (h, w) in zip(batch.image_ids, batch.image_sizes, strict=True):
        if not (0 < h <= hp and 0 < w <= wp):
            raise ValueError(f"image {image_id!r}: size {h}x{w} does not fit the padded batch {hp}x{wp}")
    if batch.targets is None:
        return
    if len(batch.targets) != b:
        raise ValueError(f"Batch has {b} images but {len(batch.targets)} targets")
    for image_id, size, t in zip(batch.image_ids, batch.image_sizes, batch.targets, strict=True):
        if tuple(t.sem_seg.shape) != tuple(size):
            raise ValueError(
                f"image {image_id!r}: target sem_seg is {tuple(t.sem_seg.shape)} but the image is {tuple(size)}"
            )


def check_sem_seg(sem_seg: Tensor, image_ids: list[str], num_classes: int) -> None:
    """Raise ValueError naming the image when a class index lies outside 0..num_classes-1 and 255.

    One reduction over the batch (a single device sync); the image is looked up only on failure.

    Args:
        sem_seg: LongTensor[B, H, W] class indices (e.g. `Batch.padded_sem_seg()`).
        image_ids: the B image ids.
        num_classes: the size of the class-index space.
    """
    bad = ((sem_seg < 0) | (sem_seg >= num_classes)) & (sem_seg != IGNORE_LABEL)
    if not bool(bad.any()):
        return
    index = int(torch.nonzero(bad.flatten(1).any(dim=1))[0])
    value = int(sem_seg[index][bad[index]][0])
    raise ValueError(
        f"image {image_ids[index]!r}: sem_seg holds class index {value}, outside 0..{num_classes - 1} "
        f"and not {IGNORE_LABEL}"
    )


class PanopticFPN(nn.Module):
    """Backbone -> (instance branch, semantic branch) -> losses, or fused panoptic results.

    Args:
        backbone: ResNet-FPN (any module with `output_shape()`, `size_divisibility` and a
            forward returning p2..p6).
        instance_branch: the Mask R-CNN branch.
        semantic_head: predicts S + 1 classes (stuff, then "things") at stride 4.
        meta: the dataset's class information.
        semantic_loss_weight: weight of the semantic cross-entropy (COCO 0.5, Cityscapes 1.0).
        fusion: a function RawPrediction -> PanopticResult, or the settings of the heuristic
            fusion (`unipan.fusion.heuristic.heuristic_fusion`).
        instance_loss_weight: weight of each of the five RPN / box / mask losses (1.0).
    """

    def __init__(
        self,
        *,
        backbone: ResNetFPN,
        instance_branch: InstanceBranch,
        semantic_head: SemanticFPNHead,
        meta: DatasetMeta,
        semantic_loss_weight: float,
        fusion: FusionFn | FusionConfig,
        instance_loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if semantic_head.num_classes != meta.num_stuff + 1:
            raise ValueError(
                f"semantic head predicts {semantic_head.num_classes} classes; Panoptic FPN needs stuff + 1 "
                f"= {meta.num_stuff + 1} for {meta!r}"
            )
        check_num_things(instance_branch, meta)
        self.backbone = backbone
        self.instance_branch = instance_branch
        self.semantic_head = semantic_head
        self.meta = meta
        self.semantic_loss_weight = float(semantic_loss_weight)
        self.instance_loss_weight = float(instance_loss_weight)
        self.size_divisibility = int(backbone.size_divisibility)
        self._fusion = _make_fusion(fusion, meta)

    def forward(self, batch: Batch) -> dict[str, Tensor] | list[PanopticResult]:
        """Losses in training, panoptic results in eval.

        Args:
            batch: padded images FloatTensor[B, 3, Hp, Wp] with sizes (and targets in training).

        Returns:
            training (and `batch.targets` given): {"loss_rpn_objectness", "loss_rpn_box_reg",
            "loss_classifier", "loss_box_reg", "loss_mask", "loss_sem_seg"}, each FloatTensor[]
            already weighted (their sum is the total loss).
            eval: one PanopticResult per image at its input size (h, w), with `.raw` the
            RawPrediction (sem_logits FloatTensor[S + 1, h, w], sem_space "stuff+things").
        """
        if self.training:
            if batch.targets is None:
                raise ValueError("PanopticFPN in training mode needs batch.targets (call .eval() to predict)")
            check_batch(batch, self.size_divisibility)
            return self.losses(batch)
        check_batch(batch, self.size_divisibility)
        return self.predict(batch)

    def losses(self, batch: Batch) -> dict[str, Tensor]:
        """Weighted training losses of `batch` (see `forward`)."""
        assert batch.targets is not None
        padded_size = (int(batch.images.shape[-2]), int(batch.images.shape[-1]))
        padded_sem_seg = batch.padded_sem_seg()
        check_sem_seg(padded_sem_seg, batch.image_ids, self.meta.num_classes)
        features = self.backbone(batch.images)
        _, instance_losses = self.instance_branch(features, batch.image_sizes, padded_size, batch.targets)
        losses = {name: loss * self.instance_loss_weight for name, loss in instance_losses.items()}
        sem_logits = upsample_logits(self.semantic_head(features), padded_size)
        sem_targets = semantic_targets_stuff_things(padded_sem_seg, self.meta.num_stuff)
        losses["loss_sem_seg"] = semantic_loss(sem_logits, sem_targets) * self.semantic_loss_weight
        return losses

    @torch.no_grad()
    def raw_predictions(self, batch: Batch) -> tuple[list[RawPrediction], InstanceOutputs]:
        """Per image RawPrediction at its input size, plus the instance branch's full outputs."""
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
                    sem_pred=logits.argmax(dim=0),
                    extras={"mask_logits": det["mask_logits"]},
                )
            )
        return raws, instances

    @torch.no_grad()
    def predict(self, batch: Batch) -> list[PanopticResult]:
        """Fused panoptic results of `batch` (see `forward`)."""
        raws, _ = self.raw_predictions(batch)
        results = []
        for image_id, raw in zip(batch.image_ids, raws, strict=True):
            result = self._fusion(raw, image_id)
            result.raw = raw
            if not result.image_id:
                result.image_id = image_id
            results.append(result)
        return results


def _make_fusion(fusion: FusionFn | FusionConfig, meta: DatasetMeta) -> Callable[[RawPrediction, str], PanopticResult]:
    if isinstance(fusion, FusionConfig):
        settings = fusion

        def fuse(raw: RawPrediction, image_id: str) -> PanopticResult:
            # imported on use so that a model can be built and trained without the fusion module
            from unipan.fusion.heuristic import heuristic_fusion

            return heuristic_fusion(
                raw,
                meta,
                instance_score_thresh=settings.instance_score_thresh,
                overlap_thresh=settings.overlap_thresh,
                mask_thresh=settings.mask_thresh,
                stuff_area=settings.stuff_area,
                image_id=image_id,
            )

        return fuse
    if not callable(fusion):
        raise TypeError(f"fusion must be a FusionConfig or a callable RawPrediction -> PanopticResult, got {fusion!r}")
    user_fusion = fusion
    return lambda raw, _image_id: user_fusion(raw)


def build_panoptic_fpn(cfg: Config, meta: DatasetMeta) -> PanopticFPN:
    """Panoptic FPN for `meta`'s classes from `cfg.model` (backbone, rpn, roi_heads, semantic, fusion)."""
    model_cfg = cfg.model
    backbone = build_backbone(model_cfg.backbone)
    shapes = backbone.output_shape()
    instance_branch = build_instance_branch(model_cfg, meta.num_things, shapes)
    semantic_head = SemanticFPNHead(
        in_shapes=shapes,
        conv_dims=model_cfg.semantic.conv_dims,
        norm=model_cfg.semantic.norm,
        num_classes=meta.num_stuff + 1,
    )
    return PanopticFPN(
        backbone=backbone,
        instance_branch=instance_branch,
        semantic_head=semantic_head,
        meta=meta,
        semantic_loss_weight=model_cfg.semantic.loss_weight,
        fusion=model_cfg.fusion,
    )
