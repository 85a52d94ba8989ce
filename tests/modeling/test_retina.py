"""RetinaNet's anchors, losses and detections as SpatialFlow's released code has them, and the mask RoI levels."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import sigmoid_focal_loss

from unipan.config import MaskHeadConfig
from unipan.modeling.heads.retina import DenseAnchors, DetectionSettings, dense_detections, flatten_level, retina_losses
from unipan.modeling.heads.roi_mask import build_mask_head

STRIDES = (8, 16, 32, 64, 128)


def test_anchor_sizes_and_exact_strides() -> None:
    anchors = DenseAnchors(STRIDES, 4.0, 3, (0.5, 1.0, 2.0))
    assert anchors.num_anchors == 9
    # 800 x 1216 padded: P7 is 7 x 10, where dividing the padded size would give stride 114
    grids = [(100, 152), (50, 76), (25, 38), (13, 19), (7, 10)]
    levels = anchors(grids, torch.float32, torch.device("cpu"))
    for (h, w), stride, a in zip(grids, STRIDES, levels, strict=True):
        assert a.shape == (h * w * 9, 4)
        centres = (a[:, :2] + a[:, 2:]) / 2
        # position-major: the 9 anchors of one position share its centre (x * s, y * s)
        assert torch.equal(centres[9 * (w + 1)], torch.tensor([stride, stride], dtype=torch.float32))
        assert float(centres[-1, 0]) == (w - 1) * stride and float(centres[-1, 1]) == (h - 1) * stride
        sides = (a[:9, 2:] - a[:9, :2]).prod(dim=1).sqrt()
        expected = sorted(4 * stride * 2 ** (k / 3) for k in range(3))
        # square anchors of the three octave scales (torchvision rounds the corners)
        for got, want in zip(sorted(sides[3:6].tolist()), expected, strict=True):
            assert abs(got - want) <= 1.0


def test_flatten_level_matches_anchor_order() -> None:
    x = torch.arange(2 * 9 * 3 * 2 * 5, dtype=torch.float32).view(2, 27, 2, 5)
    flat = flatten_level(x, 3)
    assert flat.shape == (2, 2 * 5 * 9, 3)
    # anchor a of position (y, x), class k sits at channel a * K + k
    assert float(flat[1, (1 * 5 + 4) * 9 + 7, 2]) == float(x[1, 7 * 3 + 2, 1, 4])


def test_losses_use_the_batch_positive_count() -> None:
    anchors = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 11], [20, 20, 30, 30], [50, 50, 60, 60.0]])
    gt_boxes = [torch.tensor([[0, 0, 10, 10.0]]), torch.zeros((0, 4))]
    gt_labels = [torch.tensor([1]), torch.zeros(0, dtype=torch.long)]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 2, generator=g)
    deltas = torch.randn(2, 4, 4, generator=g)
    matcher = det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)
    coder = det_utils.BoxCoder((1.0, 1.0, 1.0, 1.0))
    loss_cls, loss_box = retina_losses(logits, deltas, anchors, gt_boxes, gt_labels, matcher, coder)
    # image 0: anchors 0 and 1 positive (IoU 1 and 10/11), the others negative; image 1: all negative
    targets = torch.zeros(2, 4, 2)
    targets[0, 0, 1] = targets[0, 1, 1] = 1.0
    normaliser = 2 + 1  # max(#pos, 1) per image
    torch.testing.assert_close(loss_cls, sigmoid_focal_loss(logits, targets, reduction="sum") / normaliser)
    box_targets = coder.encode_single(gt_boxes[0].expand(2, 4), anchors[:2])
    torch.testing.assert_close(loss_box, (deltas[0, :2] - box_targets).abs().sum() / normaliser)
    # no GT anywhere: the focal loss is over negatives, the box loss 0 with a graph
    deltas.requires_grad_()
    _, zero = retina_losses(logits, deltas, anchors, [gt_boxes[1]] * 2, [gt_labels[1]] * 2, matcher, coder)
    assert float(zero.detach()) == 0.0 and zero.requires_grad


def test_detections_filter_nms_and_topk() -> None:
    # two anchors on the same spot: class 0 and class 1 both score high; a third overlaps the first
    anchors = [torch.tensor([[10, 10, 50, 50], [10, 10, 50, 50], [12, 12, 50, 50], [0, 0, 5, 5.0]])]
    logit = math.log(0.9 / 0.1)
    logits = torch.full((1, 4, 2), -10.0)
    logits[0, 0, 0] = logit
    logits[0, 1, 1] = logit - 0.5
    logits[0, 2, 0] = logit - 1.0  # same class, IoU > 0.4 with the first: suppressed
    logits[0, 3, 1] = math.log(0.04 / 0.96)  # below 0.05
    deltas = [torch.zeros(1, 4, 4)]
    coder = det_utils.BoxCoder((1.0, 1.0, 1.0, 1.0))
    ((boxes, scores, labels),) = dense_detections(
        [logits], deltas, anchors, [(64, 64)], coder, DetectionSettings(1000, 0.05, 0.4, 100)
    )
    assert labels.tolist() == [0, 1] and boxes.tolist() == [[10, 10, 50, 50]] * 2
    torch.testing.assert_close(scores[0], torch.tensor(0.9))
    # top-k after NMS, per-level preselection by the best class score, clipping to the image
    ((boxes, scores, labels),) = dense_detections(
        [logits], deltas, anchors, [(40, 64)], coder, DetectionSettings(1, 0.05, 0.4, 1)
    )
    assert labels.tolist() == [0] and boxes.tolist() == [[10, 10, 50, 40]]


@pytest.mark.parametrize(
    ("side", "level"), [(100, 3), (111, 3), (112, 4), (150, 4), (223, 4), (224, 5), (300, 5), (30, 3), (900, 5)]
)
def test_mask_roi_levels_follow_mmdetection_finest_scale_56(side: int, level: int) -> None:
    """floor(log2(sqrt(area) / 56 + 1e-6)) clamped to 0..2: P3 below 112 px, P4 below 224, P5 above."""
    shapes = {f"p{k}": (4, 2**k) for k in (3, 4, 5)}
    head = build_mask_head(MaskHeadConfig(num_convs=0), shapes, 1, in_features=("p3", "p4", "p5"), canonical_scale=112)
    size = 1024
    # each level is constant at its own number: the pooled value names the level an RoI read
    feats = {f"p{k}": torch.full((1, 4, size // 2**k, size // 2**k), float(k)) for k in (3, 4, 5)}
    box = torch.tensor([[10.0, 10.0, 10.0 + side, 10.0 + side]])
    pooled = head.pooler(feats, [box], [(size, size)])
    assert torch.all(pooled == level)
    mmdet = min(max(math.floor(math.log2(side / 56 + 1e-6)), 0), 2) + 3
    assert mmdet == level
