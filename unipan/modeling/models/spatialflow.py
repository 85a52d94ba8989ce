"""SpatialFlow (Chen, Cheng, He, Wang, Cheng; AAAI 2020): location-aware panoptic segmentation on RetinaNet.

ResNet-FPN P3-P7 -> four parallel sub-networks (reg, cls, stuff, mask) joined by spatial
information flows from the reg sub-network (`heads/spatialflow_towers.py`) -> RetinaNet
classification and box regression (`heads/retina.py`), Mask R-CNN's mask head on the detections
over the mask sub-network's P3-P5 outputs, and Panoptic FPN's semantic branch as the stuff head over
the stuff sub-network's P3-P5 outputs (stuff + "other" on COCO).

Training losses (Eq. 4): loss_cls (sigmoid focal) + loss_box_reg (L1) + loss_mask (per-pixel BCE,
against the GT crops thresholded at 0.5 as in the released code: `mask_head.binary_targets`)
+ lambda * loss_stuff (cross-entropy, mean over labelled pixels). The mask head learns on the
model's own detections (detached, decoded as at inference) plus the GT boxes, every one with IoU
>= 0.5 with a GT box (the released code).

Inference (the released code): detections (top 1000 anchors per level, score > 0.05, class-wise
NMS 0.4, top 100), masks of all of them, the stuff argmax, and the heuristic fusion with box fill
(`unipan.fusion.box_fill`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.models.detection import _utils as det_utils
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import box_iou

from unipan.config.models import SpatialFlowConfig
from unipan.fusion.box_fill import heuristic_fusion_box_fill
from unipan.modeling.backbone import FPN, ResNetTrunk, build_backbone
from unipan.modeling.heads.instance import torchvision_targets
from unipan.modeling.heads.retina import DenseAnchors, DetectionSettings, dense_detections, flatten_level, retina_losses
from unipan.modeling.heads.roi_mask import MaskHead, build_mask_head
from unipan.modeling.heads.semantic_fpn import SemanticFPNHead
from unipan.modeling.heads.spatialflow_towers import SpatialFlowTowers, TowerOutputs
from unipan.modeling.layers.losses import semantic_loss, upsample_logits
from unipan.modeling.layers.modulated_deform_conv import ModulatedDeformConvPack
from unipan.modeling.meta_arch import Fusion, PanopticModel, check_sem_seg
from unipan.segments import semantic_argmax, semantic_channels, to_semantic_space
from unipan.structures import Batch, DatasetMeta, PanopticTarget, RawPrediction, SemSpace

__all__ = ["DETECTOR_LEVELS", "SEGMENTATION_FEATURES", "SpatialFlow", "build_spatialflow", "convert_trunk_to_dcn"]

DETECTOR_LEVELS = ("p3", "p4", "p5", "p6", "p7")
"""The pyramid levels of the detector (strides 8..128)."""

SEGMENTATION_FEATURES = ("p3", "p4", "p5")
"""The levels of the stuff and mask sub-networks; the stuff and mask heads read their outputs
under these names."""


class SpatialFlow(PanopticModel):
    """Backbone -> sub-networks with spatial flows -> detector, mask head, stuff head -> fusion.

    Args:
        backbone: ResNet-FPN with p3..p7 (`fpn_levels="p3-p7"`).
        towers: the four sub-networks, their flows and the RetinaNet predictors.
        anchors: the dense anchors of P3..P7.
        mask_head: Mask R-CNN's mask head over `SEGMENTATION_FEATURES` (T channels).
        stuff_head: the stuff head over `SEGMENTATION_FEATURES`, S + 1 ("stuff+things") or S + T
            ("all") classes.
        meta: the dataset's classes.
        fuse: the fusion with its settings bound (`heuristic_fusion_box_fill`).
        matcher: anchor-to-GT assignment (0.5 / 0.4, low-quality matches kept).
        mask_matcher: mask-RoI-to-GT assignment (positives at IoU >= 0.5).
        detection: nms_pre / score / NMS / top-k of the detections (training and inference).
        stuff_loss_weight: lambda of Eq. 4 (COCO 0.25, Cityscapes 1.0).
        stuff_space: the stuff head's class space.
        crowd_as_other: crowd pixels train the stuff head as their thing class (else ignored).
        mask_gt_boxes: add the GT boxes to the training mask RoIs.
        mask_rois_per_image: train the mask head on at most this many positive RoIs per image,
            drawn uniformly without replacement (0: every positive, the released code).
        focal_alpha, focal_gamma: the focal loss.

    Losses (training): loss_cls, loss_box_reg, loss_mask, loss_stuff (lambda applied). Raw
    predictions: detections with their 28x28 mask probabilities, stuff logits in `stuff_space`
    with their argmax, extras["mask_logits"].
    """

    def __init__(
        self,
        *,
        backbone: FPN,
        towers: SpatialFlowTowers,
        anchors: DenseAnchors,
        mask_head: MaskHead,
        stuff_head: SemanticFPNHead,
        meta: DatasetMeta,
        fuse: Fusion,
        matcher: det_utils.Matcher,
        mask_matcher: det_utils.Matcher,
        detection: DetectionSettings,
        stuff_loss_weight: float = 0.25,
        stuff_space: SemSpace = "stuff+things",
        crowd_as_other: bool = True,
        mask_gt_boxes: bool = True,
        mask_rois_per_image: int = 0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__(meta=meta, size_divisibility=int(backbone.size_divisibility), fuse=fuse)
        if stuff_space not in ("stuff+things", "all"):
            raise ValueError(f"spatialflow.stuff_space must be 'stuff+things' or 'all', got {stuff_space!r}")
        if backbone.levels != "p3-p7":
            raise ValueError(f"SpatialFlow needs backbone.fpn_levels 'p3-p7', got {backbone.levels!r}")
        self.check_num_classes(
            "stuff head", stuff_head.num_classes, semantic_channels(meta, stuff_space), stuff_space.replace("+", " + ")
        )
        self.check_num_classes("classifier", towers.num_things, meta.num_things, "things")
        self.check_num_classes("mask head", mask_head.num_things, meta.num_things, "things")
        if towers.num_anchors != anchors.num_anchors:
            raise ValueError(
                f"towers predict {towers.num_anchors} anchors per position, the anchors are {anchors.num_anchors}"
            )
        self.backbone = backbone
        self.towers = towers
        self.anchors = anchors
        self.mask_head = mask_head
        self.stuff_head = stuff_head
        self.matcher = matcher
        self.mask_matcher = mask_matcher
        self.box_coder = det_utils.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.detection = detection
        self.stuff_loss_weight = float(stuff_loss_weight)
        self.stuff_space: SemSpace = stuff_space
        self.crowd_as_other = bool(crowd_as_other)
        self.mask_gt_boxes = bool(mask_gt_boxes)
        self.mask_rois_per_image = int(mask_rois_per_image)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)

    # --- shared ----------------------------------------------------------------------------------
    def run_towers(self, images: Tensor) -> tuple[TowerOutputs, list[Tensor]]:
        """The sub-networks' outputs and the anchors of every level.

        Args:
            images: FloatTensor[B, 3, Hp, Wp] padded.

        Returns:
            (towers' outputs, per level FloatTensor[H_l * W_l * A, 4] anchors).
        """
        features = self.backbone(images)
        out = self.towers([features[name] for name in DETECTOR_LEVELS])
        grid = [(int(x.shape[-2]), int(x.shape[-1])) for x in out.cls_logits]
        anchors = self.anchors(grid, out.cls_logits[0].dtype, out.cls_logits[0].device)
        return out, anchors

    def _flat(self, out: TowerOutputs) -> tuple[list[Tensor], list[Tensor]]:
        t = self.towers.num_things
        return [flatten_level(x, t) for x in out.cls_logits], [flatten_level(x, 4) for x in out.box_deltas]

    @staticmethod
    def segmentation_features(features: Sequence[Tensor]) -> dict[str, Tensor]:
        """The P3-P5 outputs of the stuff or mask sub-network under the names the heads read."""
        return dict(zip(SEGMENTATION_FEATURES, features, strict=True))

    # --- training --------------------------------------------------------------------------------
    def losses(self, batch: Batch) -> dict[str, Tensor]:
        """Weighted training losses of `batch` (see the class docstring)."""
        targets = batch.targets
        assert targets is not None
        padded_size = (int(batch.images.shape[-2]), int(batch.images.shape[-1]))
        stuff_targets = self.stuff_targets(batch)
        # named errors for malformed instances (labels outside the things, degenerate boxes, mask sizes)
        torchvision_targets(targets, batch.image_sizes, self.meta.num_things)

        out, anchors = self.run_towers(batch.images)
        cls_flat, deltas_flat = self._flat(out)
        gt_boxes = [t.boxes.to(batch.images.dtype) for t in targets]
        gt_labels = [t.labels for t in targets]
        loss_cls, loss_box = retina_losses(
            torch.cat(cls_flat, dim=1),
            torch.cat(deltas_flat, dim=1),
            torch.cat(anchors),
            gt_boxes,
            gt_labels,
            self.matcher,
            self.box_coder,
            self.focal_alpha,
            self.focal_gamma,
        )
        # The mask head learns on the model's own detections, which must not train the detector.
        with torch.no_grad():
            detections = dense_detections(
                [x.detach() for x in cls_flat],
                [x.detach() for x in deltas_flat],
                anchors,
                batch.image_sizes,
                self.box_coder,
                self.detection,
            )
        loss_mask = self._mask_loss(out.mask_features, detections, targets, padded_size)

        stuff_logits = upsample_logits(self.stuff_head(self.segmentation_features(out.stuff_features)), padded_size)
        return {
            "loss_cls": loss_cls,
            "loss_box_reg": loss_box,
            "loss_mask": loss_mask,
            "loss_stuff": semantic_loss(stuff_logits, stuff_targets) * self.stuff_loss_weight,
        }

    def stuff_targets(self, batch: Batch) -> Tensor:
        """The stuff head's targets: LongTensor[B, Hp, Wp] in `stuff_space`, IGNORE_LABEL on void and padding.

        "stuff+things": every thing pixel is "other" (S), crowd pixels too when `crowd_as_other`
        (the released converter); "all": thing pixels keep their class.
        """
        padded_sem = batch.padded_sem_seg(crowd_meta=self.meta if self.crowd_as_other else None)
        check_sem_seg(padded_sem, batch.image_ids, self.meta.num_classes)
        return to_semantic_space(padded_sem, self.meta.num_stuff, self.stuff_space)

    def _mask_loss(
        self,
        mask_features: list[Tensor],
        detections: list[tuple[Tensor, Tensor, Tensor]],
        targets: Sequence[PanopticTarget],
        padded_size: tuple[int, int],
    ) -> Tensor:
        """Mask BCE on the RoIs (detections + GT boxes) with IoU >= the mask threshold with a GT box.

        Every such RoI, or a random `mask_rois_per_image` of them per image when that is set.
        """
        rois, labels, gt_index = [], [], []
        for (boxes, _, _), target in zip(detections, targets, strict=True):
            gt = target.boxes.to(boxes.dtype)
            candidates = torch.cat([gt, boxes]) if self.mask_gt_boxes else boxes
            if gt.shape[0] == 0 or candidates.shape[0] == 0:
                rois.append(candidates[:0])
                labels.append(target.labels[:0])
                gt_index.append(target.labels[:0])
                continue
            matched = self.mask_matcher(box_iou(gt.float(), candidates.float()))
            pos = torch.nonzero(matched >= 0).flatten()
            if 0 < self.mask_rois_per_image < pos.numel():
                pos = pos[torch.randperm(pos.numel(), device=pos.device)[: self.mask_rois_per_image]]
            rois.append(candidates[pos])
            gt_index.append(matched[pos])
            labels.append(target.labels[matched[pos]])
        logits, _ = self.mask_head(self.segmentation_features(mask_features), rois, padded_size)
        return self.mask_head.loss(logits, rois, labels, gt_index, [t.masks for t in targets])

    # --- inference -------------------------------------------------------------------------------
    @torch.no_grad()
    def raw_predictions(self, batch: Batch) -> list[RawPrediction]:
        """Per image RawPrediction at its input size."""
        padded_size = (int(batch.images.shape[-2]), int(batch.images.shape[-1]))
        out, anchors = self.run_towers(batch.images)
        cls_flat, deltas_flat = self._flat(out)
        detections = dense_detections(cls_flat, deltas_flat, anchors, batch.image_sizes, self.box_coder, self.detection)
        boxes = [d[0] for d in detections]
        mask_logits, _ = self.mask_head(self.segmentation_features(out.mask_features), boxes, padded_size)
        own = MaskHead.select_class(mask_logits, torch.cat([d[2] for d in detections]))
        per_image = own.split([int(b.shape[0]) for b in boxes])
        stuff_logits = self.stuff_head(self.segmentation_features(out.stuff_features))
        raws: list[RawPrediction] = []
        for i, (h, w) in enumerate(batch.image_sizes):
            det_boxes, scores, labels = detections[i]
            # one image at a time: the full-resolution logits of a batch would be B x C x Hp x Wp
            logits = upsample_logits(stuff_logits[i : i + 1], padded_size)[0, :, :h, :w]
            raws.append(
                RawPrediction(
                    boxes=det_boxes,
                    scores=scores,
                    labels=labels,
                    sem_logits=logits,
                    mask_probs=per_image[i].sigmoid(),
                    sem_space=self.stuff_space,
                    sem_pred=semantic_argmax(logits),
                    extras={"mask_logits": per_image[i]},
                )
            )
        return raws


def convert_trunk_to_dcn(trunk: ResNetTrunk, stages: Sequence[str] = ("res3", "res4", "res5")) -> int:
    """Make the 3x3 conv of every block of `stages` a DCNv2 that predicts its own offsets, in place.

    Bottleneck blocks: `conv2` (their only 3x3 conv, with the stage's stride in the first block),
    mmdetection's `stage_with_dcn`. BasicBlock trunks (ResNet-18/34, for tiny models only; mmdetection
    has no DCN BasicBlock): `conv2`, the block's second 3x3 conv. The weights are kept (call it after
    loading them); the offset convs start at zero.

    Returns:
        The number of converted convs.
    """
    layers = {"res2": trunk.layer1, "res3": trunk.layer2, "res4": trunk.layer3, "res5": trunk.layer4}
    converted = 0
    for stage in stages:
        if stage not in layers:
            raise ValueError(f"unknown trunk stage {stage!r}; known: {sorted(layers)}")
        for block in layers[stage]:
            if not isinstance(block, BasicBlock | Bottleneck):
                raise ValueError(f"{stage}: cannot place a DCN in a {type(block).__name__}")
            conv = block.conv2
            if not isinstance(conv, ModulatedDeformConvPack):
                block.conv2 = ModulatedDeformConvPack.from_conv(conv)
                converted += 1
    return converted


def build_spatialflow(cfg: SpatialFlowConfig, meta: DatasetMeta) -> SpatialFlow:
    """SpatialFlow for `meta`'s classes from its model config."""
    sf = cfg.spatialflow
    if sf.stuff_space not in ("stuff+things", "all"):
        raise ValueError(f"spatialflow.stuff_space must be 'stuff+things' or 'all', got {sf.stuff_space!r}")
    if cfg.backbone.fpn_levels != "p3-p7":
        raise ValueError(f"SpatialFlow needs backbone.fpn_levels: p3-p7, got {cfg.backbone.fpn_levels!r}")
    backbone = build_backbone(cfg.backbone)
    if sf.dcn_backbone:
        convert_trunk_to_dcn(backbone.trunk)
    shapes = backbone.output_shape()
    channels = cfg.backbone.fpn_channels
    anchors = DenseAnchors(
        [shapes[name][1] for name in DETECTOR_LEVELS],
        sf.anchor_octave_base,
        sf.anchor_scales_per_octave,
        sf.anchor_aspect_ratios,
    )
    towers = SpatialFlowTowers(
        channels=channels,
        num_anchors=anchors.num_anchors,
        num_things=meta.num_things,
        cls_reg_convs=sf.cls_reg_convs,
        stuff_convs=sf.stuff_convs,
        mask_convs=sf.mask_convs,
        flow_reg_cls=sf.flow_reg_cls,
        flow_reg_stuff=sf.flow_reg_stuff,
        flow_reg_mask=sf.flow_reg_mask,
        flow_stuff_mask=sf.flow_stuff_mask,
        dcn_cls=sf.dcn_cls,
        dcn_stuff=sf.dcn_stuff,
        dcn_mask=sf.dcn_mask,
        norm=sf.tower_norm,
        prior_prob=sf.prior_prob,
        init_std=sf.head_init_std,
    )
    seg_shapes = {name: (channels, shapes[name][1]) for name in SEGMENTATION_FEATURES}
    mask_head = build_mask_head(
        cfg.mask_head,
        seg_shapes,
        meta.num_things,
        in_features=SEGMENTATION_FEATURES,
        canonical_scale=sf.mask_canonical_scale,
        canonical_level=4,
    )
    stuff_space: SemSpace = "all" if sf.stuff_space == "all" else "stuff+things"
    stuff_head = SemanticFPNHead(
        in_shapes=seg_shapes,
        in_features=SEGMENTATION_FEATURES,
        conv_dims=cfg.stuff.conv_dims,
        norm=cfg.stuff.norm,
        num_classes=semantic_channels(meta, stuff_space),
    )
    return SpatialFlow(
        backbone=backbone,
        towers=towers,
        anchors=anchors,
        mask_head=mask_head,
        stuff_head=stuff_head,
        meta=meta,
        fuse=functools.partial(heuristic_fusion_box_fill, **dataclasses.asdict(cfg.fusion)),
        matcher=det_utils.Matcher(sf.fg_iou_thresh, sf.bg_iou_thresh, allow_low_quality_matches=True),
        mask_matcher=det_utils.Matcher(sf.mask_fg_iou_thresh, sf.mask_fg_iou_thresh, allow_low_quality_matches=False),
        detection=DetectionSettings(sf.nms_pre, sf.score_thresh, sf.nms_thresh, sf.max_detections),
        stuff_loss_weight=cfg.stuff.loss_weight,
        stuff_space=stuff_space,
        crowd_as_other=sf.crowd_as_other,
        mask_gt_boxes=sf.mask_gt_boxes,
        mask_rois_per_image=sf.mask_rois_per_image,
        focal_alpha=sf.focal_alpha,
        focal_gamma=sf.focal_gamma,
    )
