"""UPSNet (Xiong et al., CVPR 2019).

One ResNet-FPN, a Mask R-CNN instance branch, a deformable semantic head over all S + T classes,
and the parameter-free panoptic head.

Training losses (weights from the config; COCO: semantic 0.2, RoI 0.04, panoptic 0.1):
RPN objectness / box, box classifier / regression, mask (Mask R-CNN, weight 1), the semantic
cross-entropy at input resolution, the RoI loss of the semantic head at the GT boxes, and the
panoptic cross-entropy of Z built at stride 4 from GT boxes and classes (max(floor(0.7 N), 1) of
the N instances kept; the pixels of the others and of crowd regions labelled unknown), whose
gradients reach the semantic and mask heads. As in the released code, crowd pixels train as their
thing class in the semantic and RoI losses, and the RoI and panoptic losses are averaged over all
cells / pixels, ignored ones included. Every cross-entropy sees float32 logits (under AMP too),
and GT boxes stay float32.

Inference: detections -> class-agnostic NMS, score filter, top-k -> mask pruning -> argmax of Z
at the input resolution -> unknown = void, instance class assignment, small stuff = void
(`unipan.fusion.upsnet_head.upsnet_fusion`).

Oracle modes (the lower rows of the paper's Table 6) read `batch.targets` at inference: GT boxes
(classified by the box head, masks from the mask head), GT class assignment, GT semantic logits.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import Tensor
from torchvision.ops import box_iou

from unipan.config import UPSNetConfig
from unipan.fusion.oracle import ORACLE_LOGIT, oracle_sem_logits
from unipan.fusion.settings import PanopticHeadSettings
from unipan.fusion.upsnet_head import panoptic_loss, sample_kept_instances, upsnet_fusion
from unipan.modeling.backbone import FPN, build_backbone
from unipan.modeling.heads.instance import InstanceBranch, build_instance_branch
from unipan.modeling.heads.roi_mask import MaskHead
from unipan.modeling.heads.upsnet_semantic import UPSNetSemanticHead, semantic_roi_loss
from unipan.modeling.layers.losses import semantic_loss, upsample_logits
from unipan.modeling.meta_arch import Fusion, PanopticModel, check_sem_seg
from unipan.structures import Batch, DatasetMeta, PanopticTarget, RawPrediction

__all__ = ["UPSNet", "build_upsnet"]


class UPSNet(PanopticModel):
    """Backbone -> (instance branch, semantic head) -> losses, or panoptic results via the panoptic head.

    Args:
        backbone: ResNet-FPN (with the global context on COCO) with `output_shape()`,
            `size_divisibility`, p2..p6.
        instance_branch: the Mask R-CNN branch (T thing classes).
        semantic_head: the deformable semantic head over S + T classes.
        meta: the dataset's classes.
        fuse: the panoptic head's inference (`upsnet_fusion` with its settings bound).
        semantic_loss_weight: weight of the semantic cross-entropy (COCO 0.2, Cityscapes 1.0).
        roi_loss_weight: weight of the semantic head's RoI loss (COCO 0.04; 0 = off).
        panoptic_loss_weight: weight of the panoptic cross-entropy (COCO 0.1, Cityscapes 0.5).
        panoptic_loss: train the panoptic head (Table 6, "Pano."); False drops its loss.
        unknown: train the unknown class from dropped instances (the fusion's `unknown` setting
            must agree: the builder takes both from `model.fusion.unknown`).
        instance_keep_fraction: GT instances kept when building Z in training (0.7).
        roi_loss_size: RoIAlign resolution of the RoI loss (28).
        instance_loss_weight: weight of each of the five RPN / box / mask losses (1.0).
        oracle_boxes: inference on GT boxes classified by the box head (Table 6, "GT Box").
        oracle_class_assignment: instances take the class of their GT box (IoU >= 0.5) and the
            class assignment heuristic is off ("GT ICA").
        oracle_semantic: one-hot GT semantic logits (crowd pixels with their class) replace
            the semantic head's ("GT Seg.").
    """

    def __init__(
        self,
        *,
        backbone: FPN,
        instance_branch: InstanceBranch,
        semantic_head: UPSNetSemanticHead,
        meta: DatasetMeta,
        fuse: Fusion,
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
        super().__init__(meta=meta, size_divisibility=int(backbone.size_divisibility), fuse=fuse)
        self.check_num_classes("semantic head", semantic_head.num_classes, meta.num_classes, "stuff + things")
        self.check_num_classes("instance branch", instance_branch.num_things, meta.num_things, "things")
        if not 0.0 <= instance_keep_fraction <= 1.0:
            raise ValueError(f"instance_keep_fraction must lie in [0, 1], got {instance_keep_fraction}")
        self.backbone = backbone
        self.instance_branch = instance_branch
        self.semantic_head = semantic_head
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
        self.needs_targets_at_inference = self.oracle_boxes or self.oracle_class_assignment or self.oracle_semantic

    # --- training --------------------------------------------------------------------------------
    def losses(self, batch: Batch) -> dict[str, Tensor]:
        """Weighted training losses of `batch` (see `forward`)."""
        targets = batch.targets
        assert targets is not None
        padded_size = (int(batch.images.shape[-2]), int(batch.images.shape[-1]))
        features = self.backbone(batch.images)
        instances = self.instance_branch.run(features, batch.image_sizes, padded_size, targets)
        losses = {name: loss * self.instance_loss_weight for name, loss in instances.losses.items()}

        sem_logits = self.semantic_head(features)
        # crowd pixels carry their thing class (both reference implementations train them)
        padded_sem = batch.padded_sem_seg(crowd_meta=self.meta)
        check_sem_seg(padded_sem, batch.image_ids, self.meta.num_classes)
        # upsampled in float32: bilinear fp16 logits lose precision before the softmax under AMP
        losses["loss_sem_seg"] = (
            semantic_loss(upsample_logits(sem_logits.float(), padded_size), padded_sem) * self.semantic_loss_weight
        )
        if self.roi_loss_weight > 0:
            roi = semantic_roi_loss(
                self.semantic_head, sem_logits, [t.boxes for t in targets], list(padded_sem), self.roi_loss_size
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
        # float32 boxes even under autocast: fp16 rounds coordinates above 2048 to 2 px
        gt_boxes = [t.boxes.float() for t in targets]
        mask_logits, _ = self.instance_branch.forward_masks(features, gt_boxes, padded_size)
        per_image = mask_logits.split([int(b.shape[0]) for b in gt_boxes])
        hp, wp = padded_size
        # the logit pixel (y, x) covers input pixels [4y, 4y + 4): its label is the one at its centre
        centre = stride // 2
        total = sem_logits.new_zeros(())
        for i, t in enumerate(targets):
            h, w = t.sem_seg.shape
            imap = torch.full((hp, wp), -1, dtype=torch.long, device=sem_logits.device)
            imap[:h, :w] = t.instance_index_map()
            n = len(t)
            fraction = self.instance_keep_fraction if self.unknown else 1.0
            keep = sample_kept_instances(n, fraction).to(sem_logits.device)
            rows = torch.arange(n, device=sem_logits.device)
            own_logits = per_image[i][rows, t.labels] if n else per_image[i][:, 0]
            total = total + panoptic_loss(
                sem_logits[i].float(),
                gt_boxes[i] / stride,
                t.labels,
                own_logits.float(),
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
        sem_logits = self.semantic_head(features)
        targets = batch.targets if self.needs_targets_at_inference else None
        if self.oracle_boxes:
            assert targets is not None
            detections = self._classify_gt_boxes(features, targets, padded_size)
        else:
            detections = self.instance_branch.run(features, batch.image_sizes, padded_size).detections
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
                # crowd pixels show their class (the released code's GT segmentation labels them)
                sem_gt = targets[i].sem_seg_with_crowd(self.meta)
                logits = oracle_sem_logits(sem_gt, self.meta.num_classes, ORACLE_LOGIT)
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

    def _mask_logits(
        self, features: dict[str, Tensor], boxes: list[Tensor], labels: list[Tensor], padded_size: tuple[int, int]
    ) -> Tensor:
        """FloatTensor[sum K, M, M] mask logits of each box's class (one image's boxes per list item)."""
        logits, _ = self.instance_branch.forward_masks(features, boxes, padded_size)
        return MaskHead.select_class(logits, torch.cat(labels))

    def _classify_gt_boxes(
        self,
        features: dict[str, Tensor],
        targets: list[PanopticTarget],
        padded_size: tuple[int, int],
    ) -> list[dict[str, Tensor]]:
        """GT-box oracle: the box head's most likely thing class and its probability for each GT box."""
        boxes = [t.boxes.float() for t in targets]  # float32 under autocast too (RoIAlign casts)
        scores, labels = self.instance_branch.box_head.classify_boxes(features, boxes, padded_size)
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


def build_upsnet(cfg: UPSNetConfig, meta: DatasetMeta) -> UPSNet:
    """UPSNet for `meta`'s classes from its model config.

    The oracle switches set the panoptic head's derived settings: GT boxes are used as they are
    (no detection filtering), and GT class assignment turns the class-assignment heuristic off.
    """
    ups = cfg.upsnet
    backbone = build_backbone(cfg.backbone, global_context=ups.global_context)
    shapes = backbone.output_shape()
    instance_branch = build_instance_branch(cfg.rpn, cfg.roi_heads, cfg.mask_head, meta.num_things, shapes)
    semantic_head = UPSNetSemanticHead(
        in_shapes=shapes,
        num_classes=meta.num_classes,
        num_convs=ups.semantic_num_convs,
        mid_channels=ups.semantic_mid_channels,
        out_channels=ups.semantic_out_channels,
        deformable=ups.deformable,
    )
    settings: PanopticHeadSettings = dataclasses.replace(
        cfg.fusion,
        class_assignment=cfg.fusion.class_assignment and not ups.oracle_class_assignment,
        filter_detections=cfg.fusion.filter_detections and not ups.oracle_boxes,
    )
    return UPSNet(
        backbone=backbone,
        instance_branch=instance_branch,
        semantic_head=semantic_head,
        meta=meta,
        fuse=functools.partial(upsnet_fusion, settings=settings),
        semantic_loss_weight=ups.semantic_loss_weight,
        roi_loss_weight=ups.roi_loss_weight,
        panoptic_loss_weight=ups.panoptic_loss_weight,
        panoptic_loss=ups.panoptic_loss,
        unknown=settings.unknown,
        instance_keep_fraction=ups.instance_keep_fraction,
        roi_loss_size=ups.roi_loss_size,
        oracle_boxes=ups.oracle_boxes,
        oracle_class_assignment=ups.oracle_class_assignment,
        oracle_semantic=ups.oracle_semantic,
    )
