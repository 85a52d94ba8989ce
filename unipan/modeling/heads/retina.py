"""RetinaNet's dense detection around any towers: anchors, focal / L1 losses, detections.

Built from torchvision's primitives (`AnchorGenerator`'s cell anchors and grid, `Matcher`,
`BoxCoder`, `sigmoid_focal_loss`, `batched_nms`) with the conventions of mmdetection 2's
`AnchorHead`, which SpatialFlow's released code uses and which differ from torchvision's
`RetinaNet` class:

- anchors sit on each level's exact stride (torchvision infers strides by integer division of the
  padded size, which is wrong for P6/P7 when the size is not a multiple of 128);
- the focal and L1 losses are divided by the positives of the whole batch, at least 1 per image
  (torchvision divides per image, then averages);
- detections keep the top `nms_pre` anchors of each level by their best class score, then every
  (anchor, class) pair above `score_thresh`, a class-wise NMS and the best `max_detections`.

Layouts: a level's head output FloatTensor[B, A * K, H, W] flattens to [B, H * W * A, K]
(position-major, then anchor), the order of `AnchorGenerator.grid_anchors`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, sigmoid_focal_loss

__all__ = [
    "DenseAnchors",
    "DetectionSettings",
    "dense_detections",
    "flatten_level",
    "retina_losses",
]


def flatten_level(x: Tensor, k: int) -> Tensor:
    """FloatTensor[B, A * k, H, W] -> FloatTensor[B, H * W * A, k] (the anchors' order)."""
    b, ak, h, w = x.shape
    a = ak // k
    return x.view(b, a, k, h, w).permute(0, 3, 4, 1, 2).reshape(b, h * w * a, k)


class DenseAnchors(nn.Module):
    """RetinaNet anchors on exact strides: sizes octave_base * stride * 2**(i / scales_per_octave).

    Args:
        strides: the stride of each level (8, 16, 32, 64, 128).
        octave_base: anchor size in units of the stride (RetinaNet: 4).
        scales_per_octave: sizes per level (3).
        aspect_ratios: h / w ratios (0.5, 1, 2).

    Attributes:
        generator: torchvision's `AnchorGenerator` holding the (rounded) cell anchors.
        num_anchors: A = scales_per_octave * len(aspect_ratios).
    """

    def __init__(
        self,
        strides: Sequence[int],
        octave_base: float = 4.0,
        scales_per_octave: int = 3,
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    ) -> None:
        super().__init__()
        if octave_base <= 0 or scales_per_octave < 1 or not aspect_ratios:
            raise ValueError(
                f"anchors need octave_base > 0, scales_per_octave >= 1 and aspect ratios, got {octave_base}, "
                f"{scales_per_octave}, {list(aspect_ratios)}"
            )
        self.strides = [int(s) for s in strides]
        sizes = tuple(
            tuple(octave_base * s * 2 ** (i / scales_per_octave) for i in range(scales_per_octave))
            for s in self.strides
        )
        self.generator = AnchorGenerator(sizes, (tuple(float(r) for r in aspect_ratios),) * len(self.strides))
        self.num_anchors = scales_per_octave * len(aspect_ratios)
        self._cache: dict[tuple[object, ...], list[Tensor]] = {}

    def forward(self, grid_sizes: Sequence[tuple[int, int]], dtype: torch.dtype, device: torch.device) -> list[Tensor]:
        """Per level FloatTensor[H_l * W_l * A, 4] xyxy anchors (position-major, then anchor).

        Args:
            grid_sizes: (H_l, W_l) of each level's feature map.
            dtype, device: of the anchors.
        """
        if len(grid_sizes) != len(self.strides):
            raise ValueError(f"{len(grid_sizes)} feature levels for {len(self.strides)} anchor strides")
        key = (tuple(tuple(int(v) for v in g) for g in grid_sizes), dtype, str(device))
        if key not in self._cache:
            self.generator.set_cell_anchors(dtype, device)
            strides = [[torch.tensor(s, device=device), torch.tensor(s, device=device)] for s in self.strides]
            grid = [[int(h), int(w)] for h, w in grid_sizes]
            anchors = self.generator.grid_anchors(grid, strides)
            if len(self._cache) > 16:  # a bounded cache: sizes vary with the images
                self._cache.clear()
            self._cache[key] = [a.to(dtype) for a in anchors]
        return self._cache[key]


def retina_losses(
    cls_logits: Tensor,
    box_deltas: Tensor,
    anchors: Tensor,
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    matcher: det_utils.Matcher,
    box_coder: det_utils.BoxCoder,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
) -> tuple[Tensor, Tensor]:
    """Sigmoid focal loss and L1 box loss, both divided by sum over images of max(#positives, 1).

    Anchors between the matcher's thresholds are ignored by both; negatives train only the
    classifier (all-zero targets).

    Args:
        cls_logits: FloatTensor[B, N, T] over all levels' anchors.
        box_deltas: FloatTensor[B, N, 4].
        anchors: FloatTensor[N, 4] xyxy.
        gt_boxes: per image FloatTensor[G_i, 4] xyxy; gt_labels: per image LongTensor[G_i] thing index.
        matcher: anchor-to-GT assignment (RetinaNet: 0.5 / 0.4 with low-quality matches).
        box_coder: the delta encoding (weights 1, 1, 1, 1).
        focal_alpha, focal_gamma: focal loss parameters.

    Returns:
        (loss_cls FloatTensor[], loss_box_reg FloatTensor[]).
    """
    b, n = cls_logits.shape[:2]
    cls_targets = torch.zeros_like(cls_logits)
    valid = torch.ones((b, n), dtype=torch.bool, device=cls_logits.device)
    box_targets: list[Tensor] = []
    pos_deltas: list[Tensor] = []
    normaliser = 0
    for i, (boxes, labels) in enumerate(zip(gt_boxes, gt_labels, strict=True)):
        if boxes.numel() == 0:
            normaliser += 1
            continue
        matched = matcher(box_iou(boxes.to(anchors.dtype), anchors))
        valid[i] = matched != det_utils.Matcher.BETWEEN_THRESHOLDS
        pos = torch.nonzero(matched >= 0).flatten()
        normaliser += max(int(pos.numel()), 1)
        gt_index = matched[pos]
        cls_targets[i, pos, labels[gt_index]] = 1.0
        box_targets.append(box_coder.encode_single(boxes[gt_index].to(anchors.dtype), anchors[pos]))
        pos_deltas.append(box_deltas[i, pos])
    loss_cls = sigmoid_focal_loss(
        cls_logits[valid], cls_targets[valid], alpha=focal_alpha, gamma=focal_gamma, reduction="sum"
    )
    if box_targets:
        loss_box = F.l1_loss(torch.cat(pos_deltas), torch.cat(box_targets), reduction="sum")
    else:
        loss_box = box_deltas.sum() * 0.0
    return loss_cls / normaliser, loss_box / normaliser


@dataclass(frozen=True)
class DetectionSettings:
    """Dense detection post-processing (mmdetection's `test_cfg`; SpatialFlow: 1000, 0.05, 0.4, 100).

    Attributes:
        nms_pre: anchors kept per level by their best class score.
        score_thresh: (anchor, class) pairs must score above this.
        nms_thresh: class-wise NMS IoU.
        max_detections: detections kept per image.
    """

    nms_pre: int = 1000
    score_thresh: float = 0.05
    nms_thresh: float = 0.4
    max_detections: int = 100

    def __post_init__(self) -> None:
        if self.nms_pre < 1 or self.max_detections < 1:
            raise ValueError(
                f"spatialflow.nms_pre and max_detections must be >= 1, got {self.nms_pre}, {self.max_detections}"
            )


def dense_detections(
    cls_logits: Sequence[Tensor],
    box_deltas: Sequence[Tensor],
    anchors: Sequence[Tensor],
    image_sizes: Sequence[tuple[int, int]],
    box_coder: det_utils.BoxCoder,
    settings: DetectionSettings,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Decode, filter and NMS the dense predictions of every image.

    Args:
        cls_logits: per level FloatTensor[B, N_l, T] (flattened).
        box_deltas: per level FloatTensor[B, N_l, 4].
        anchors: per level FloatTensor[N_l, 4].
        image_sizes: per image (h, w) before padding: boxes are clipped to it.
        box_coder: the delta decoding.
        settings: nms_pre, score threshold, NMS IoU, detections kept.

    Returns:
        per image (boxes FloatTensor[D, 4], scores FloatTensor[D], labels LongTensor[D] thing
        index), by descending score, D <= max_detections.
    """
    out: list[tuple[Tensor, Tensor, Tensor]] = []
    for i, (h, w) in enumerate(image_sizes):
        boxes_all, scores_all = [], []
        for logits, deltas, level_anchors in zip(cls_logits, box_deltas, anchors, strict=True):
            scores = logits[i].sigmoid()
            if scores.shape[0] > settings.nms_pre:
                # mmdetection keeps the anchors of a level by their best class score
                keep = scores.max(dim=1).values.topk(settings.nms_pre).indices
                scores, level_deltas, level_anchors = scores[keep], deltas[i, keep], level_anchors[keep]
            else:
                level_deltas = deltas[i]
            boxes_all.append(box_coder.decode_single(level_deltas, level_anchors))
            scores_all.append(scores)
        boxes = clip_boxes_to_image(torch.cat(boxes_all), (int(h), int(w)))
        scores = torch.cat(scores_all)
        anchor_index, labels = torch.nonzero(scores > settings.score_thresh, as_tuple=True)
        pair_boxes = boxes[anchor_index]
        pair_scores = scores[anchor_index, labels]
        keep = batched_nms(pair_boxes, pair_scores, labels, settings.nms_thresh)[: settings.max_detections]
        out.append((pair_boxes[keep], pair_scores[keep], labels[keep]))
    return out
