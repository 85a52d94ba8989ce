"""Mask R-CNN's mask head as a part of its own, usable on any boxes.

RoIAlign over pyramid levels -> `num_convs` 3x3 convs -> 2x deconv -> 1x1 conv with one channel
per thing index (no background channel, as in detectron2). Panoptic FPN runs it on sampled RoIs
and detections, UPSNet also on GT boxes, SpatialFlow on one-stage detections (P3-P5, canonical
scale 112).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import project_masks_on_boxes

from unipan.config import MaskHeadConfig
from unipan.modeling.heads.roi_box import ROI_IN_FEATURES
from unipan.modeling.layers import require_features
from unipan.modeling.layers.roi_align import MultiScaleRoIAlign

__all__ = ["MaskHead", "build_mask_head", "mask_rcnn_loss", "mask_rcnn_targets"]


class MaskHead(nn.Module):
    """Per-class mask logits of arbitrary boxes.

    Args:
        pooler: multi-level RoIAlign (output M/2 x M/2).
        convs: torchvision `MaskRCNNHeads` (or `nn.Identity` without convs).
        predictor: torchvision `MaskRCNNPredictor` with T output channels.
        binary_targets: train on the targets thresholded at 0.5 (`mask_rcnn_targets`).

    Attributes:
        num_things: T, the predictor's channels (one per thing index).
        in_features: the pyramid levels the pooler reads.
    """

    def __init__(
        self,
        *,
        pooler: MultiScaleRoIAlign,
        convs: nn.Module,
        predictor: MaskRCNNPredictor,
        binary_targets: bool = False,
    ) -> None:
        super().__init__()
        self.pooler = pooler
        self.convs = convs
        self.predictor = predictor
        self.binary_targets = binary_targets
        self.num_things = int(predictor.mask_fcn_logits.out_channels)
        self.in_features = list(pooler.featmap_names)

    def forward(
        self, features: Mapping[str, Tensor], boxes: Sequence[Tensor], padded_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """Mask logits of every thing class for arbitrary boxes (RoIs, detections, GT boxes).

        Args:
            features: pyramid features FloatTensor[B, C, Hl, Wl] holding `in_features`.
            boxes: per image FloatTensor[K_i, 4] xyxy boxes in input pixels.
            padded_size: (Hp, Wp) of the padded batch.

        Returns:
            (mask_logits FloatTensor[sum K_i, T, M, M], mask_features FloatTensor[sum K_i, Cm, M/2, M/2]),
            boxes of all images concatenated in order.
        """
        # The pools infer each level's scale from the image size; the padded size gives it exactly
        # (an unpadded size well below the padded one would round to the wrong power of two).
        pooled = self.pooler(dict(features), list(boxes), [tuple(padded_size)] * len(boxes))
        mask_features = self.convs(pooled)
        return self.predictor(mask_features), mask_features

    @staticmethod
    def select_class(mask_logits: Tensor, thing_index: Tensor) -> Tensor:
        """The channel of each RoI's thing index.

        Args:
            mask_logits: FloatTensor[K, T, M, M].
            thing_index: LongTensor[K] in 0..T-1.

        Returns:
            FloatTensor[K, M, M].
        """
        rows = torch.arange(mask_logits.shape[0], device=mask_logits.device)
        return mask_logits[rows, thing_index]

    def loss(
        self,
        mask_logits: Tensor,
        rois: Sequence[Tensor],
        thing_labels: Sequence[Tensor],
        gt_index: Sequence[Tensor],
        gt_masks_per_image: Sequence[Tensor],
    ) -> Tensor:
        """Mask R-CNN's per-pixel sigmoid cross-entropy on each RoI's own class channel.

        Args:
            mask_logits: FloatTensor[K, T, M, M] of `rois` (from `forward`).
            rois: per image FloatTensor[K_i, 4] (foreground) RoIs.
            thing_labels: per image LongTensor[K_i] thing index of the matched GT.
            gt_index: per image LongTensor[K_i] index of the matched GT instance.
            gt_masks_per_image: per image BoolTensor[N_i, h, w] (or float) GT instance masks.

        Returns:
            FloatTensor[] mean over K * M * M, or 0 (keeping the graph) when there is no RoI.
        """
        if sum(int(boxes.shape[0]) for boxes in rois) == 0:
            return mask_logits.sum() * 0.0
        own = self.select_class(mask_logits, torch.cat(list(thing_labels)))
        return mask_rcnn_loss(own, rois, gt_index, gt_masks_per_image, binarize=self.binary_targets)


def mask_rcnn_loss(
    own_logits: Tensor,
    rois: Sequence[Tensor],
    gt_index: Sequence[Tensor],
    gt_masks_per_image: Sequence[Tensor],
    *,
    binarize: bool = False,
) -> Tensor:
    """Mask R-CNN's per-pixel sigmoid cross-entropy of one mask per RoI (any mask head's).

    The target of each RoI is its matched GT mask cropped to the RoI and resized to M x M
    (`mask_rcnn_targets`, thresholded at 0.5 with `binarize`). Heads that pick the channel
    themselves call this directly; `MaskHead.loss` selects the own-class channel first.

    Args:
        own_logits: FloatTensor[K, M, M] mask logits of each RoI (its class's channel), the RoIs of
            all images concatenated in order.
        rois: per image FloatTensor[K_i, 4] (foreground) RoIs in input pixels.
        gt_index: per image LongTensor[K_i] index of the matched GT instance.
        gt_masks_per_image: per image BoolTensor[N_i, h, w] (or float) GT instance masks.
        binarize: threshold the targets at 0.5.

    Returns:
        FloatTensor[] mean over K * M * M, or 0 (keeping the graph) when there is no RoI.
    """
    targets = mask_rcnn_targets(rois, gt_index, gt_masks_per_image, int(own_logits.shape[-1]), binarize=binarize)
    if targets.shape[0] == 0:
        return own_logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(own_logits, targets.to(own_logits.dtype))


def mask_rcnn_targets(
    rois: Sequence[Tensor],
    gt_index: Sequence[Tensor],
    gt_masks_per_image: Sequence[Tensor],
    size: int,
    *,
    binarize: bool = False,
) -> Tensor:
    """The M x M mask targets of `mask_rcnn_loss`: each RoI's matched GT mask cropped and resized.

    Computed once, they serve several heads on the same RoIs (REFINE's iterations). The crops are
    torchvision's `project_masks_on_boxes` (RoIAlign of the binary masks); `binarize` thresholds
    them at 0.5, as detectron2's `BitMasks.crop_and_resize` and mmdetection's `mask_target` do.

    Args:
        rois: per image FloatTensor[K_i, 4] RoIs in input pixels.
        gt_index: per image LongTensor[K_i] index of the matched GT instance.
        gt_masks_per_image: per image BoolTensor[N_i, h, w] (or float) GT instance masks.
        size: M.
        binarize: threshold the crops at 0.5 (values 0 and 1).

    Returns:
        FloatTensor[sum K_i, M, M] in [0, 1], RoIs in order.
    """
    crops = [
        project_masks_on_boxes(masks, boxes, index, size)
        for masks, boxes, index in zip(gt_masks_per_image, rois, gt_index, strict=True)
        if boxes.shape[0] > 0
    ]
    if not crops:
        dtype = rois[0].dtype if len(rois) else torch.float32
        return torch.zeros((0, size, size), dtype=dtype)
    targets = torch.cat(crops)
    return (targets >= 0.5).to(targets.dtype) if binarize else targets


def build_mask_head(
    cfg: MaskHeadConfig,
    feature_shapes: Mapping[str, tuple[int, int]],
    num_things: int,
    in_features: Sequence[str] = ROI_IN_FEATURES,
    canonical_scale: int = 224,
    canonical_level: int = 4,
) -> MaskHead:
    """Mask R-CNN's mask head sized by `cfg` and the backbone.

    Args:
        cfg: pooler resolution and sampling ratio, conv count and width, binary targets.
        feature_shapes: {name: (channels, stride)} of the backbone; `in_features` must share one
            channel count.
        num_things: T, the number of thing classes (>= 1).
        in_features: the levels the pooler reads.
        canonical_scale: box size (pixels) pooled from `canonical_level` (FPN paper: 224 on P4;
            SpatialFlow on P3-P5: 112).
        canonical_level: that level.

    Raises:
        ValueError: for T < 1, negative conv counts, missing levels or unequal channels.
    """
    if num_things < 1:
        raise ValueError(f"the mask head needs at least one thing class, got {num_things}")
    if cfg.num_convs < 0:
        raise ValueError(f"mask_head.num_convs must be >= 0, got {cfg.num_convs}")
    channels = {c for c, _ in require_features(feature_shapes, in_features, "mask head")}
    if len(channels) != 1:
        raise ValueError(f"mask head levels {list(in_features)} must share one channel count, got {channels}")
    in_channels = channels.pop()
    layers = [cfg.conv_dims] * cfg.num_convs
    pooler = MultiScaleRoIAlign(
        list(in_features),
        cfg.pooler_resolution,
        cfg.sampling_ratio,
        canonical_scale=canonical_scale,
        canonical_level=canonical_level,
    )
    convs: nn.Module = MaskRCNNHeads(in_channels, layers, 1) if layers else nn.Identity()
    predictor = MaskRCNNPredictor(layers[-1] if layers else in_channels, cfg.conv_dims, num_things)
    return MaskHead(pooler=pooler, convs=convs, predictor=predictor, binary_targets=cfg.binary_targets)
