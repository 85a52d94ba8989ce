"""UPSNet (Xiong et al., CVPR 2019): one ResNet-FPN, a Mask R-CNN instance branch, a deformable
semantic head over all S + T classes, and the parameter-free panoptic head.

Training losses (weights from the config; COCO: semantic 0.2, RoI 0.04, panoptic 0.1):
RPN objectness / box, box classifier / regression, mask (Mask R-CNN, weight 1), the semantic
cross-entropy at input resolution, the RoI loss of the semantic head at the GT boxes, and the
panoptic cross-entropy of Z built at stride 4 from GT boxes and classes (70% of the instances kept,
the rest labelled unknown), whose gradients reach the semantic and mask heads.

Inference: detections -> class-agnostic NMS, score filter, top-k -> mask pruning -> argmax of Z
at the input resolution -> unknown = void, instance class assignment, small stuff = void
(`unipan.fusion.upsnet_head.upsnet_fusion`).

Oracle modes (the lower rows of the paper's Table 6) read `batch.targets` at inference: GT boxes
(classified by the box head, masks from the mask head), GT class assignment, GT semantic logits.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou

from unipan.config import Config
from unipan.fusion.upsnet_head import (
    PanopticHeadSettings,
    instance_index_map,
    oracle_sem_logits,
    panoptic_loss,
    sample_kept_instances,
    upsnet_fusion,
)
from unipan.modeling.backbone import ResNetFPN, build_backbone
from unipan.modeling.heads.instance import InstanceBranch, build_instance_branch, check_num_things
from unipan.modeling.heads.semantic_fpn import semantic_loss, upsample_logits
from unipan.modeling.heads.upsnet_semantic import GlobalContext, UPSNetSemanticHead, semantic_roi_loss
from unipan.modeling.models.panoptic_fpn import check_batch, check_sem_seg
from unipan.structures import Batch, DatasetMeta, PanopticResult, PanopticTarget, RawPrediction

__all__ = ["ContextFPN", "UPSNet", "build_upsnet"]

ORACLE_LOGIT = 10.0
"""Magnitude of the one-hot semantic logits of the GT-semantic oracle."""


class ContextFPN(nn.Module):
    """A ResNet-FPN whose P5 lateral gets a global-context vector added before the top-down path.

    UPSNet on COCO: GAP(res5) -> Linear(2048 -> 256) "added back to FPN before producing P5".
    With `context=None` this is the plain backbone.

    Args:
        backbone: the ResNet-FPN (its trunk and torchvision FPN modules are used as they are).
        context: the `GlobalContext` module, or None.
    """

    def __init__(self, *, backbone: ResNetFPN, context: GlobalContext | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.context = context
        self.size_divisibility = int(backbone.size_divisibility)

    def output_shape(self) -> dict[str, tuple[int, int]]:
        """{feature name: (channels, stride)}, as the wrapped backbone."""
        return self.backbone.output_shape()

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Trunk features res2..res5 and pyramid levels p2..p6 (see `ResNetFPN.forward`)."""
        if self.context is None:
            return self.backbone(images)
        h, w = images.shape[-2:]
        if images.dim() != 4 or h % self.size_divisibility or w % self.size_divisibility:
            raise ValueError(
                f"expected images [B, 3, H, W] padded to multiples of {self.size_divisibility}, "
                f"got {tuple(images.shape)}"
            )
        trunk_out = self.backbone.trunk(images)
        fpn = self.backbone.fpn
        names = list(trunk_out)
        feats = list(trunk_out.values())
        # top-down path of torchvision's FPN, with the context added to the coarsest lateral
        inner = fpn.get_result_from_inner_blocks(feats[-1], -1) + self.context(feats[-1])
        levels = [fpn.get_result_from_layer_blocks(inner, -1)]
        for idx in range(len(feats) - 2, -1, -1):
            lateral = fpn.get_result_from_inner_blocks(feats[idx], idx)
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            levels.insert(0, fpn.get_result_from_layer_blocks(inner, idx))
        if fpn.extra_blocks is not None:
            levels, names = fpn.extra_blocks(levels, feats, names)
        out: dict[str, Tensor] = OrderedDict(trunk_out)
        for k, feat in enumerate(levels, start=2):
            out[f"p{k}"] = feat
        return out


class UPSNet(nn.Module):
    """Backbone -> (instance branch, semantic head) -> losses, or panoptic results via the panoptic head.

    Args:
        backbone: ResNet-FPN (or `ContextFPN`) with `output_shape()`, `size_divisibility`, p2..p6.
        instance_branch: the Mask R-CNN branch (T thing classes).
        semantic_head: the deformable semantic head over S + T classes.
        meta: the dataset's classes.
        fusion: inference settings of the panoptic head.
        semantic_loss_weight: weight of the semantic cross-entropy (COCO 0.2, Cityscapes 1.0).
        roi_loss_weight: weight of the semantic head's RoI loss (COCO 0.04; 0 = off).
        panoptic_loss_weight: weight of the panoptic cross-entropy (COCO 0.1, Cityscapes 0.5).
        panoptic_loss: train the panoptic head (Table 6, "Pano."); False drops its loss.
        unknown: predict the unknown class (training target of dropped instances, inference channel).
        instance_keep_fraction: GT instances kept when building Z in training (0.7).
        roi_loss_size: RoIAlign resolution of the RoI loss (28).
        instance_loss_weight: weight of each of the five RPN / box / mask losses (1.0).
        oracle_boxes: inference on GT boxes classified by the box head (Table 6, "GT Box").
        oracle_class_assignment: instances take the class of their GT box (IoU >= 0.5) and the
            class assignment heuristic is off ("GT ICA").
        oracle_semantic: one-hot GT semantic logits replace the semantic head's ("GT Seg.").
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        instance_branch: InstanceBranch,
        semantic_head: UPSNetSemanticHead,
        meta: DatasetMeta,
        fusion: PanopticHeadSettings,
        semantic_loss_weight: float = 0.2,
        roi_loss_weight: float = 0.04,
        panoptic_loss_weight: float = 0.1,
        panoptic_loss: bool = True,
        unknown: bool = True,
        instance_keep_fraction: float = 0.7,
        roi_loss_size: int = 28,
        instance_loss_weight: float = 1.0,
        oracle_boxes: bool = False,
        oracle_class_assignment: bool = False,
        oracle_semantic: bool = False,
    ) -> None:
        super().__init__()
        if semantic_head.num_classes != meta.num_classes:
            raise ValueError(
                f"semantic head predicts {semantic_head.num_classes} classes; UPSNet needs stuff + things "
                f"= {meta.num_classes} for {meta!r}"
            )
        check_num_things(instance_branch, meta)
        if not 0.0 <= instance_keep_fraction <= 1.0:
            raise ValueError(f"instance_keep_fraction must lie in [0, 1], got {instance_keep_fraction}")
        self.backbone = backbone
        self.instance_branch = instance_branch
        self.semantic_head = semantic_head
        self.meta = meta
        self.fusion = fusion
        self.semantic_loss_weight = float(semantic_loss_weight)
        self.roi_loss_weight = float(roi_loss_weight)
        self.panoptic_loss_weight = float(panoptic_loss_weight)
        self.panoptic_loss = bool(panoptic_loss)
        self.unknown = bool(unknown)
        self.instance_keep_fraction = float(instance_keep_fraction)
        self.roi_loss_size = int(roi_loss_size)
        self.instance_loss_weight = float(instance_loss_weight)
        self.oracle_boxes = bool(oracle_boxes)
        self.oracle_class_assignment = bool(oracle_class_assignment)
        self.oracle_semantic = bool(oracle_semantic)
        self.size_divisibility = int(getattr(backbone, "size_divisibility", 32))

    @property
    def uses_oracle(self) -> bool:
        """True when inference reads the batch's ground truth."""
        return self.oracle_boxes or self.oracle_class_assignment or self.oracle_semantic

    def forward(self, batch: Batch) -> dict[str, Tensor] | list[PanopticResult]:
        """Losses in training, panoptic results in eval.

        Args:
            batch: padded images FloatTensor[B, 3, Hp, Wp] with sizes (and targets in training, or
                at inference in an oracle mode).

        Returns:
            training: {"loss_rpn_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg",
            "loss_mask", "loss_sem_seg", "loss_sem_roi" (when its weight > 0), "loss_panoptic" (when
            the panoptic loss is on)}, each FloatTensor[] already weighted.
            eval: one PanopticResult per image at its input size (h, w); `.raw` is the
            RawPrediction (sem_logits FloatTensor[S + T, h, w], sem_space "all", mask logits in
            extras["mask_logits"]).
        """
        if self.training:
            if batch.targets is None:
                raise ValueError("UPSNet in training mode needs batch.targets (call .eval() to predict)")
            check_batch(batch, self.size_divisibility)
            return self.losses(batch)
        check_batch(batch, self.size_divisibility)
        if self.uses_oracle and batch.targets is None:
            raise ValueError("UPSNet oracle modes (model.upsnet.oracle_*) need batch.targets at inference")
        return self.predict(batch)

    # --- training --------------------------------------------------------------------------------
    def losses(self, batch: Batch) -> dict[str, Tensor]:
        """Weighted training losses of `batch` (see `forward`)."""
        targets = batch.targets
        assert targets is not None
        padded_size = (int(batch.images.shape[-2]), int(batch.images.shape[-1]))
        features = self.backbone(batch.images)
        _, instance_losses = self.instance_branch(features, batch.image_sizes, padded_size, targets)
        losses = {name: loss * self.instance_loss_weight for name, loss in instance_losses.items()}

        sem_logits, sem_feature = self.semantic_head(features)
        padded_sem = batch.padded_sem_seg()
        check_sem_seg(padded_sem, batch.image_ids, self.meta.num_classes)
        losses["loss_sem_seg"] = (
            semantic_loss(upsample_logits(sem_logits, padded_size), padded_sem) * self.semantic_loss_weight
        )
        if self.roi_loss_weight > 0:
            roi = semantic_roi_loss(
                self.semantic_head, sem_feature, [t.boxes for t in targets], list(padded_sem), self.roi_loss_size
            )
            losses["loss_sem_roi"] = roi * self.roi_loss_weight
        if self.panoptic_loss and self.panoptic_loss_weight > 0:
            losses["loss_panoptic"] = (
                self._panoptic_loss(features, sem_logits, padded_sem, targets, padded_size) * self.panoptic_loss_weight
            )
        return losses

    def _panoptic_loss(
        self,
        features: dict[str, Tensor],
        sem_logits: Tensor,
        padded_sem: Tensor,
        targets: list[PanopticTarget],
        padded_size: tuple[int, int],
    ) -> Tensor:
        """Mean over images of the panoptic cross-entropy at the semantic logits' stride."""
        stride = self.semantic_head.common_stride
        gt_boxes = [t.boxes.to(sem_logits.dtype) for t in targets]
        mask_logits, _ = self.instance_branch.forward_masks(features, gt_boxes, padded_size)
        per_image = mask_logits.split([int(b.shape[0]) for b in gt_boxes])
        hp, wp = padded_size
        # the logit pixel (y, x) covers input pixels [4y, 4y + 4): its label is the one at its centre
        centre = stride // 2
        total = sem_logits.new_zeros(())
        for i, t in enumerate(targets):
            h, w = t.sem_seg.shape
            imap = torch.full((hp, wp), -1, dtype=torch.long, device=sem_logits.device)
            imap[:h, :w] = instance_index_map(t.masks)
            n = len(t)
            fraction = self.instance_keep_fraction if self.unknown else 1.0
            keep = sample_kept_instances(n, fraction).to(sem_logits.device)
            rows = torch.arange(n, device=sem_logits.device)
            own_logits = per_image[i][rows, t.labels] if n else per_image[i][:, 0]
            total = total + panoptic_loss(
                sem_logits[i],
                gt_boxes[i] / stride,
                t.labels,
                own_logits,
                padded_sem[i, centre::stride, centre::stride],
                imap[centre::stride, centre::stride],
                keep,
                self.meta.num_stuff,
                unknown=self.unknown,
            )
        return total / max(len(targets), 1)

    # --- inference -------------------------------------------------------------------------------
    @torch.no_grad()
    def raw_predictions(self, batch: Batch) -> list[RawPrediction]:
        """Per image RawPrediction at its input size (oracle modes applied)."""
        padded_size = (int(batch.images.shape[-2]), int(batch.images.shape[-1]))
        features = self.backbone(batch.images)
        sem_logits, _ = self.semantic_head(features)
        targets = batch.targets if self.uses_oracle else None
        if self.oracle_boxes:
            assert targets is not None
            detections = self._classify_gt_boxes(features, targets, padded_size)
        else:
            detections = self.instance_branch.run(features, batch.image_sizes, padded_size, None).detections
        if self.oracle_class_assignment:
            assert targets is not None
            detections = [dict(d) for d in detections]
            for det, target in zip(detections, targets, strict=True):
                det["labels"] = _gt_class_of_boxes(det["boxes"], det["labels"], target)
            # the masks of the (possibly new) classes; one call so each box pools from its own image
            sizes = [int(d["boxes"].shape[0]) for d in detections]
            masks = self._mask_logits(
                features, [d["boxes"] for d in detections], [d["labels"] for d in detections], padded_size
            )
            for det, mask in zip(detections, masks.split(sizes), strict=True):
                det["mask_logits"] = mask
        raws: list[RawPrediction] = []
        for i, (h, w) in enumerate(batch.image_sizes):
            det = detections[i]
            if self.oracle_semantic:
                assert targets is not None
                logits = oracle_sem_logits(targets[i].sem_seg, self.meta.num_classes, ORACLE_LOGIT)
                logits = logits.to(sem_logits.dtype)
            else:
                # one image at a time: the full-resolution logits of a batch would be B x C x Hp x Wp
                logits = upsample_logits(sem_logits[i : i + 1], padded_size)[0, :, :h, :w]
            raws.append(
                RawPrediction(
                    boxes=det["boxes"],
                    scores=det["scores"],
                    labels=det["labels"],
                    sem_logits=logits,
                    mask_probs=det["mask_logits"].sigmoid(),
                    sem_space="all",
                    extras={"mask_logits": det["mask_logits"]},
                )
            )
        return raws

    @torch.no_grad()
    def predict(self, batch: Batch) -> list[PanopticResult]:
        """Panoptic results of `batch` (see `forward`)."""
        raws = self.raw_predictions(batch)
        return [
            upsnet_fusion(raw, self.meta, self.fusion, image_id=image_id)
            for image_id, raw in zip(batch.image_ids, raws, strict=True)
        ]

    def _mask_logits(
        self, features: dict[str, Tensor], boxes: list[Tensor], labels: list[Tensor], padded_size: tuple[int, int]
    ) -> Tensor:
        """FloatTensor[sum K, M, M] mask logits of each box's class (one image's boxes per list item)."""
        logits, _ = self.instance_branch.forward_masks(features, boxes, padded_size)
        flat_labels = torch.cat(labels)
        return logits[torch.arange(flat_labels.numel(), device=logits.device), flat_labels]

    def _classify_gt_boxes(
        self,
        features: dict[str, Tensor],
        targets: list[PanopticTarget],
        padded_size: tuple[int, int],
    ) -> list[dict[str, Tensor]]:
        """GT-box oracle: the box head's most likely thing class and its probability for each GT box."""
        heads = self.instance_branch.roi_heads
        boxes = [t.boxes.to(features["p2"].dtype) for t in targets]
        pooled = heads.box_roi_pool(features, boxes, [padded_size] * len(boxes))
        class_logits, _ = heads.box_predictor(heads.box_head(pooled))
        # column 0 is torchvision's background: the oracle box holds an object, so pick a thing
        probs = class_logits.softmax(dim=-1)[:, 1:]
        scores, labels = probs.max(dim=-1)
        sizes = [int(b.shape[0]) for b in boxes]
        label_list = list(labels.split(sizes))
        mask_logits = self._mask_logits(features, boxes, label_list, padded_size).split(sizes)
        return [
            {"boxes": b, "scores": s, "labels": lab, "mask_logits": m}
            for b, s, lab, m in zip(boxes, scores.split(sizes), label_list, mask_logits, strict=True)
        ]


def _gt_class_of_boxes(boxes: Tensor, labels: Tensor, target: PanopticTarget, min_iou: float = 0.5) -> Tensor:
    """Each box takes the thing index of its best-overlapping GT box when IoU >= min_iou.

    Args:
        boxes: FloatTensor[N, 4]; labels: LongTensor[N] predicted thing index.
        target: the image's ground truth.

    Returns:
        LongTensor[N].
    """
    if boxes.shape[0] == 0 or len(target) == 0:
        return labels
    iou = box_iou(boxes.float(), target.boxes.to(boxes.device).float())
    best, index = iou.max(dim=1)
    return torch.where(best >= min_iou, target.labels.to(labels.device)[index], labels)


def build_upsnet(cfg: Config, meta: DatasetMeta) -> UPSNet:
    """UPSNet for `meta`'s classes from `cfg.model` (backbone, rpn, roi_heads, upsnet)."""
    model_cfg = cfg.model
    ups = model_cfg.upsnet
    backbone = build_backbone(model_cfg.backbone)
    shapes = backbone.output_shape()
    context = None
    if ups.global_context:
        res5_channels = shapes["res5"][0]
        context = GlobalContext(res5_channels, shapes["p5"][0])
    instance_branch = build_instance_branch(model_cfg, meta.num_things, shapes)
    semantic_head = UPSNetSemanticHead(
        in_shapes=shapes,
        num_classes=meta.num_classes,
        num_convs=ups.semantic_num_convs,
        mid_channels=ups.semantic_mid_channels,
        out_channels=ups.semantic_out_channels,
        deformable=ups.deformable,
    )
    return UPSNet(
        backbone=ContextFPN(backbone=backbone, context=context),
        instance_branch=instance_branch,
        semantic_head=semantic_head,
        meta=meta,
        fusion=PanopticHeadSettings.from_config(ups),
        semantic_loss_weight=ups.semantic_loss_weight,
        roi_loss_weight=ups.roi_loss_weight,
        panoptic_loss_weight=ups.panoptic_loss_weight,
        panoptic_loss=ups.panoptic_loss,
        unknown=ups.unknown,
        instance_keep_fraction=ups.instance_keep_fraction,
        roi_loss_size=ups.roi_loss_size,
        oracle_boxes=ups.oracle_boxes,
        oracle_class_assignment=ups.oracle_class_assignment,
        oracle_semantic=ups.oracle_semantic,
    )
