"""Fast R-CNN box head on pyramid levels: RoI sampling, pooling, two-fc head, loss, detections.

Built from torchvision's parts (`MultiScaleRoIAlign`, `TwoMLPHead`, `FastRCNNPredictor`, `Matcher`,
`BalancedPositiveNegativeSampler`, `BoxCoder`, `fastrcnn_loss`; the pooler is unipan's subclass of
torchvision's, equal to it with a faster CPU backward, `layers/roi_align.py`); the sampling and
post-processing follow torchvision's `RoIHeads.select_training_samples` / `postprocess_detections`
step for step, so results equal torchvision's given the same weights and random state. `RoIHeads`
itself is not used because it bundles the mask and keypoint heads, which are parts of their own here.

Label spaces: the classifier has class 0 = background, so torchvision label t + 1 is thing index t.
Every input and output of `BoxHead`'s public methods speaks thing indices (-1 = background).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.ops import boxes as box_ops

from unipan.config import RoIHeadsConfig
from unipan.modeling.layers import require_features
from unipan.modeling.layers.roi_align import MultiScaleRoIAlign

__all__ = ["ROI_IN_FEATURES", "BoxHead", "RoISamples", "build_box_head"]

ROI_IN_FEATURES = ("p2", "p3", "p4", "p5")
"""Pyramid levels the RoI pools read (P6 is for proposals only)."""


@dataclass
class RoISamples:
    """Training RoIs of a batch and their targets (torchvision's `select_training_samples`).

    Attributes:
        rois: per image FloatTensor[R, 4] sampled proposals (+ GT boxes) in input pixels.
        labels: per image LongTensor[R] thing index of the matched GT, -1 for background.
        gt_index: per image LongTensor[R] index of the matched GT instance (0 for background RoIs
            and for images without instances).
        regression_targets: per image FloatTensor[R, 4] encoded deltas to the matched GT box.
    """

    rois: list[Tensor]
    labels: list[Tensor]
    gt_index: list[Tensor]
    regression_targets: list[Tensor]


class BoxHead(nn.Module):
    """RoIAlign over pyramid levels -> two fc layers -> class logits and per-class box deltas.

    Args:
        pooler: multi-level RoIAlign (it chooses each RoI's level from its size).
        mlp: torchvision `TwoMLPHead` (fc6, fc7).
        predictor: torchvision `FastRCNNPredictor` with T + 1 classes (background first).
        fg_iou_thresh: IoU with a GT box above which a proposal is foreground.
        bg_iou_thresh: IoU below which it is background.
        batch_size_per_image: RoIs sampled per image in training.
        positive_fraction: foreground fraction of those RoIs.
        score_thresh: minimum class probability of a detection.
        nms_thresh: per-class NMS IoU of the detections.
        detections_per_img: detections kept per image.
        bbox_reg_weights: box coder weights (None: torchvision's (10, 10, 5, 5)).

    Attributes:
        num_things: T, the predictor's classes minus background.
        in_features: the pyramid levels the pooler reads.
    """

    def __init__(
        self,
        *,
        pooler: MultiScaleRoIAlign,
        mlp: TwoMLPHead,
        predictor: FastRCNNPredictor,
        fg_iou_thresh: float,
        bg_iou_thresh: float,
        batch_size_per_image: int,
        positive_fraction: float,
        score_thresh: float,
        nms_thresh: float,
        detections_per_img: int,
        bbox_reg_weights: tuple[float, float, float, float] | None = None,
    ) -> None:
        super().__init__()
        self.pooler = pooler
        self.mlp = mlp
        self.predictor = predictor
        self.num_things = int(predictor.cls_score.out_features) - 1
        self.in_features = list(pooler.featmap_names)
        self.proposal_matcher = det_utils.Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.fg_bg_sampler = det_utils.BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.box_coder = det_utils.BoxCoder(bbox_reg_weights or (10.0, 10.0, 5.0, 5.0))
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img

    def forward(
        self, features: Mapping[str, Tensor], boxes: Sequence[Tensor], padded_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Box features, class logits and box deltas of arbitrary boxes.

        Args:
            features: pyramid features FloatTensor[B, C, Hl, Wl] holding `in_features`.
            boxes: per image FloatTensor[K_i, 4] xyxy boxes in input pixels.
            padded_size: (Hp, Wp) of the padded batch.

        Returns:
            (box_features FloatTensor[sum K_i, D], class_logits FloatTensor[sum K_i, T + 1]
            (column 0 = background), box_deltas FloatTensor[sum K_i, 4 (T + 1)]).
        """
        # The pools infer each level's scale from the image size; the padded size gives it exactly
        # (an unpadded size well below the padded one would round to the wrong power of two).
        pooled = self.pooler(dict(features), list(boxes), [tuple(padded_size)] * len(boxes))
        box_features = self.mlp(pooled)
        class_logits, box_deltas = self.predictor(box_features)
        return box_features, class_logits, box_deltas

    def sample_rois(self, proposals: Sequence[Tensor], tv_targets: Sequence[dict[str, Tensor]]) -> RoISamples:
        """Training RoIs: proposals plus GT boxes, matched to the GT and sampled fg/bg.

        Draws from torch's global random generator (the balanced sampler), as torchvision does.

        Args:
            proposals: per image FloatTensor[P, 4] (detached) proposals.
            tv_targets: per image {"boxes": FloatTensor[N, 4], "labels": LongTensor[N] thing index + 1}
                (`heads.instance.torchvision_targets`).

        Returns:
            The sampled RoIs with their labels, matched GT indices and regression targets.
        """
        dtype, device = proposals[0].dtype, proposals[0].device
        gt_boxes = [t["boxes"].to(dtype) for t in tv_targets]
        # GT boxes join the candidates so that every GT has at least one well-matched RoI
        candidates = [torch.cat((p, g)) for p, g in zip(proposals, gt_boxes, strict=True)]
        labels = [self._match(c, g, t["labels"]) for c, g, t in zip(candidates, gt_boxes, tv_targets, strict=True)]
        sampled_pos, sampled_neg = self.fg_bg_sampler([tv_labels for tv_labels, _ in labels])
        rois, out_labels, gt_index, matched_gt_boxes = [], [], [], []
        for c, g, (tv_labels, matched), pos, neg in zip(
            candidates, gt_boxes, labels, sampled_pos, sampled_neg, strict=True
        ):
            keep = torch.where(pos | neg)[0]
            rois.append(c[keep])
            out_labels.append(tv_labels[keep] - 1)
            gt_index.append(matched[keep])
            # an image without instances regresses its (background) RoIs to a dummy box
            g = g if g.numel() else torch.zeros((1, 4), dtype=dtype, device=device)
            matched_gt_boxes.append(g[matched[keep]])
        regression_targets = list(self.box_coder.encode(matched_gt_boxes, rois))
        return RoISamples(rois=rois, labels=out_labels, gt_index=gt_index, regression_targets=regression_targets)

    def _match(self, rois: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> tuple[Tensor, Tensor]:
        """(torchvision labels LongTensor[R]: 0 background, -1 ignored; clamped GT index LongTensor[R])."""
        if gt_boxes.numel() == 0:
            zeros = torch.zeros((rois.shape[0],), dtype=torch.int64, device=rois.device)
            return zeros, zeros.clone()
        matched = self.proposal_matcher(box_ops.box_iou(gt_boxes, rois))
        clamped = matched.clamp(min=0)
        tv_labels = gt_labels[clamped].to(dtype=torch.int64)
        tv_labels[matched == self.proposal_matcher.BELOW_LOW_THRESHOLD] = 0
        tv_labels[matched == self.proposal_matcher.BETWEEN_THRESHOLDS] = -1
        return tv_labels, clamped

    def loss(self, class_logits: Tensor, box_deltas: Tensor, samples: RoISamples) -> dict[str, Tensor]:
        """Fast R-CNN's classification and (foreground) box regression losses.

        Args:
            class_logits: FloatTensor[sum R, T + 1] of `samples.rois`.
            box_deltas: FloatTensor[sum R, 4 (T + 1)] of `samples.rois`.
            samples: from `sample_rois`.

        Returns:
            {"loss_classifier": FloatTensor[], "loss_box_reg": FloatTensor[]}.
        """
        tv_labels = [labels + 1 for labels in samples.labels]
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_deltas, tv_labels, samples.regression_targets)
        return {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}

    def detections(
        self,
        class_logits: Tensor,
        box_deltas: Tensor,
        rois: Sequence[Tensor],
        image_sizes: Sequence[tuple[int, int]],
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Decoded, clipped, score-filtered, per-class NMS'ed, top-k detections per image.

        Args:
            class_logits: FloatTensor[sum R, T + 1] of `rois`.
            box_deltas: FloatTensor[sum R, 4 (T + 1)] of `rois`.
            rois: per image FloatTensor[R_i, 4] boxes the head ran on.
            image_sizes: per image (h, w) before padding (boxes are clipped to it).

        Returns:
            per image (boxes FloatTensor[N, 4], scores FloatTensor[N], labels LongTensor[N] thing index),
            sorted by decreasing score.
        """
        num_classes = class_logits.shape[-1]
        per_image = [int(r.shape[0]) for r in rois]
        pred_boxes = self.box_coder.decode(box_deltas, list(rois)).split(per_image, 0)
        pred_scores = F.softmax(class_logits, -1).split(per_image, 0)
        all_boxes, all_scores, all_labels = [], [], []
        for boxes, scores, image_size in zip(pred_boxes, pred_scores, image_sizes, strict=True):
            boxes = box_ops.clip_boxes_to_image(boxes, image_size)
            labels = torch.arange(num_classes, device=class_logits.device).view(1, -1).expand_as(scores)
            # every (RoI, thing class) pair is a candidate; column 0 (background) is dropped
            boxes = boxes[:, 1:].reshape(-1, 4)
            scores = scores[:, 1:].reshape(-1)
            labels = labels[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            all_boxes.append(boxes[keep])
            all_scores.append(scores[keep])
            all_labels.append(labels[keep] - 1)
        return all_boxes, all_scores, all_labels

    def classify_boxes(
        self, features: Mapping[str, Tensor], boxes: Sequence[Tensor], padded_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """The most likely thing class of arbitrary boxes, background excluded.

        UPSNet's GT-box oracle uses it: an oracle box holds an object, so it takes the best thing
        class even when the classifier prefers background.

        Args:
            features: pyramid features holding `in_features`.
            boxes: per image FloatTensor[K_i, 4] xyxy boxes in input pixels (e.g. GT boxes).
            padded_size: (Hp, Wp) of the padded batch.

        Returns:
            (scores FloatTensor[sum K_i] softmax probability of that class over T + 1 classes,
            labels LongTensor[sum K_i] thing index), boxes of all images concatenated in order.
        """
        _, class_logits, _ = self(features, boxes, padded_size)
        return class_logits.softmax(dim=-1)[:, 1:].max(dim=-1)


def build_box_head(
    cfg: RoIHeadsConfig,
    feature_shapes: Mapping[str, tuple[int, int]],
    num_things: int,
    in_features: Sequence[str] = ROI_IN_FEATURES,
) -> BoxHead:
    """Mask R-CNN R50-FPN's box head sized by `cfg` and the backbone.

    Args:
        cfg: pooler, head width, sampling and detection settings.
        feature_shapes: {name: (channels, stride)} of the backbone; `in_features` must share one
            channel count.
        num_things: T, the number of thing classes (>= 1).
        in_features: the levels the pooler reads.

    Raises:
        ValueError: for T < 1, missing levels or unequal channels.
    """
    if num_things < 1:
        raise ValueError(f"the box head needs at least one thing class, got {num_things}")
    channels = {c for c, _ in require_features(feature_shapes, in_features, "box head")}
    if len(channels) != 1:
        raise ValueError(f"box head levels {list(in_features)} must share one channel count, got {channels}")
    in_channels = channels.pop()
    resolution = cfg.pooler_resolution
    return BoxHead(
        pooler=MultiScaleRoIAlign(list(in_features), resolution, cfg.sampling_ratio),
        mlp=TwoMLPHead(in_channels * resolution**2, cfg.box_head_dim),
        predictor=FastRCNNPredictor(cfg.box_head_dim, num_things + 1),
        fg_iou_thresh=cfg.fg_iou_thresh,
        bg_iou_thresh=cfg.bg_iou_thresh,
        batch_size_per_image=cfg.batch_size_per_image,
        positive_fraction=cfg.positive_fraction,
        score_thresh=cfg.score_thresh,
        nms_thresh=cfg.nms_thresh,
        detections_per_img=cfg.detections_per_img,
    )
