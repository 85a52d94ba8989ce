"""UPSNet's semantic head (Xiong et al., CVPR 2019, Sec. 3.1 and Fig. 2) and its RoI loss.

- One sub-network shared by P2-P5: `num_convs` deformable 3x3 convs with ReLU, no norm
  (DCNv1: offsets from a plain 3x3 conv with 2 * 3 * 3 = 18 channels, initialised to zero so
  the head starts as a plain conv net). Widths as the authors' released `FCNSubNet`: the
  next-to-last conv narrows to `out_channels` and the last one keeps that width, the ones
  before keep the input width: 256 -> 256, 256 -> 128, 128 -> 128 with 3 convs (COCO),
  256 -> 128, 128 -> 128 with 2 (Cityscapes).
- The P3-P5 outputs are bilinearly upsampled to P2's size and concatenated (4 x 128 = 512
  channels, the "semantic feature"); a 1x1 conv scores all S + T classes, stuff first.
- RoI loss: RoIAlign (28 x 28) at the GT boxes of the 1x1 scorer's output (the released code
  pools the semantic feature, then scores it: the same logits, see `roi_logits`), cross-entropy
  against the GT semantic crop resized (nearest) to 28 x 28, averaged over all K x 28 x 28
  cells, ignored ones included (the released code's unreduced loss followed by `.mean()`).

The COCO global context (GAP(res5) -> Linear, added to P5's lateral) is part of the backbone:
`unipan.modeling.backbone.fpn.GlobalContext`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import DeformConv2d

from unipan.modeling.layers import require_features
from unipan.modeling.layers.deform_conv import deform_conv2d_any
from unipan.modeling.layers.roi_align import roi_align
from unipan.structures import IGNORE_LABEL

__all__ = [
    "DeformableConvBlock",
    "UPSNetSemanticHead",
    "roi_semantic_targets",
    "semantic_roi_loss",
    "semantic_subnet_widths",
]


def semantic_subnet_widths(in_channels: int, num_convs: int, mid_channels: int, out_channels: int) -> list[int]:
    """Channel widths [w_0, ..., w_n] of the n = `num_convs` layers (layer k goes w_k -> w_{k+1}).

    The released `FCNSubNet`: the layer at index n - 2 narrows to `out_channels`, the last keeps
    it; the layers before go to `mid_channels` (the released code keeps the input width).
    """
    if num_convs < 1:
        raise ValueError(f"the semantic sub-network needs at least one conv, got num_convs={num_convs}")
    if num_convs == 1:
        return [in_channels, out_channels]
    return [in_channels] + [mid_channels] * (num_convs - 2) + [out_channels, out_channels]


class DeformableConvBlock(nn.Module):
    """3x3 DCNv1 conv + ReLU, or a plain 3x3 conv + ReLU when `deformable` is False.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        deformable: use a deformable conv whose offsets come from a zero-initialised 3x3 conv.
    """

    def __init__(self, in_channels: int, out_channels: int, deformable: bool = True) -> None:
        super().__init__()
        self.deformable = deformable
        self.offset: nn.Conv2d | None
        if deformable:
            # 2 offsets (dy, dx) for each of the 3 x 3 kernel taps
            self.offset = nn.Conv2d(in_channels, 18, kernel_size=3, padding=1)
            nn.init.zeros_(self.offset.weight)
            nn.init.zeros_(self.offset.bias)  # type: ignore[arg-type]  # a Conv2d made with bias
            self.conv: nn.Module = DeformConv2d(in_channels, out_channels, kernel_size=3, padding=1)
        else:
            self.offset = None
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        weight = self.conv.weight
        bias = self.conv.bias
        assert isinstance(weight, Tensor) and isinstance(bias, Tensor)
        # the released code: kaiming_normal_ with its defaults (fan_in, gain sqrt(2)), bias 0
        nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(bias)

    def forward(self, x: Tensor) -> Tensor:
        """FloatTensor[B, in, H, W] -> FloatTensor[B, out, H, W]."""
        if self.offset is not None:
            # the module holds the parameters; the op is chosen per device (see deform_conv.py)
            conv = self.conv
            assert isinstance(conv, DeformConv2d)
            return F.relu(deform_conv2d_any(x, self.offset(x), conv.weight, conv.bias, padding=1))
        return F.relu(self.conv(x))


class UPSNetSemanticHead(nn.Module):
    """Shared deformable sub-network over P2-P5, concatenation at stride 4, 1x1 class scorer.

    Args:
        in_shapes: {feature name: (channels, stride)} of the backbone (`output_shape()`).
        num_classes: C = S + T (stuff first, then things: the class index space).
        in_features: the pyramid levels used, finest first (its stride is the output stride).
        num_convs: layers of the shared sub-network (3 on COCO, 2 on Cityscapes).
        mid_channels: output width of the layers before the next-to-last one (the released
            code keeps the input width there: 256; unused with 2 layers or fewer).
        out_channels: output width of the last two layers (per level; the semantic feature has
            len(in_features) * out_channels channels). Layer widths: in -> mid, ..., mid -> out,
            out -> out; a single layer goes in -> out.
        deformable: DCNv1 layers (True) or plain 3x3 convs (ablation).

    Attributes:
        feature_channels: channels of the concatenated semantic feature (512 by default).
        common_stride: stride of the logits and the semantic feature (4).
    """

    def __init__(
        self,
        *,
        in_shapes: dict[str, tuple[int, int]],
        num_classes: int,
        in_features: Sequence[str] = ("p2", "p3", "p4", "p5"),
        num_convs: int = 3,
        mid_channels: int = 256,
        out_channels: int = 128,
        deformable: bool = True,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if num_convs < 1:
            raise ValueError(f"the semantic sub-network needs at least one conv, got num_convs={num_convs}")
        channels = {c for c, _ in require_features(in_shapes, in_features, "semantic head")}
        if len(channels) != 1:
            raise ValueError(
                f"levels {list(in_features)} share one sub-network and need equal channels, got {channels}"
            )
        strides = [in_shapes[f][1] for f in in_features]
        if strides != sorted(strides):
            raise ValueError(f"in_features must go from fine to coarse, got strides {strides}")
        in_channels = channels.pop()
        self.in_features = list(in_features)
        self.num_classes = num_classes
        self.common_stride = strides[0]
        widths = semantic_subnet_widths(in_channels, num_convs, mid_channels, out_channels)
        self.subnet = nn.Sequential(
            *(DeformableConvBlock(widths[k], widths[k + 1], deformable) for k in range(num_convs))
        )
        self.feature_channels = out_channels * len(self.in_features)
        self.scorer = nn.Conv2d(self.feature_channels, num_classes, kernel_size=1)
        nn.init.normal_(self.scorer.weight, std=0.01)
        nn.init.zeros_(self.scorer.bias)  # type: ignore[arg-type]  # a Conv2d made with bias

    def semantic_feature(self, features: dict[str, Tensor]) -> Tensor:
        """The concatenated stride-4 feature before the scorer.

        Args:
            features: backbone features holding `in_features`, FloatTensor[B, Cin, H/s, W/s].

        Returns:
            FloatTensor[B, feature_channels, H/4, W/4].
        """
        outs: list[Tensor] = []
        size: tuple[int, int] | None = None
        for name in self.in_features:
            y = self.subnet(features[name])
            if size is None:
                size = (int(y.shape[-2]), int(y.shape[-1]))
            elif tuple(y.shape[-2:]) != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            outs.append(y)
        return torch.cat(outs, dim=1)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        """Semantic logits at stride 4.

        Args:
            features: backbone features holding `in_features`.

        Returns:
            FloatTensor[B, C, H/4, W/4].
        """
        return self.scorer(self.semantic_feature(features))

    def roi_logits(self, logits: Tensor, boxes: Sequence[Tensor], output_size: int = 28) -> Tensor:
        """Class logits of RoIs: RoIAlign of the head's stride-4 logits.

        The released code pools the 512-channel semantic feature and then applies the 1x1 scorer.
        Both are linear and RoIAlign's bilinear weights sum to one wherever its samples lie within
        the map (always, for boxes inside the image), so pooling the scored map gives the same
        logits while RoIAlign's backward, whose cost grows with the channels, touches num_classes
        channels instead of 512 (with torchvision's serial CPU backward, pooling the feature was
        40% of a tiny UPSNet training step).

        Args:
            logits: FloatTensor[B, C, H/4, W/4] from `forward`.
            boxes: per image FloatTensor[K_i, 4] xyxy boxes in input pixels, inside the image.
            output_size: RoI resolution (28).

        Returns:
            FloatTensor[sum K_i, C, output_size, output_size].
        """
        # Boxes stay float32 (fp16 would round coordinates above 2048 to 2 px); RoIAlign runs in
        # float32, as torchvision's autocast rule for it does anyway.
        return roi_align(
            logits.float(),
            [b.float() for b in boxes],
            output_size=output_size,
            spatial_scale=1.0 / self.common_stride,
            sampling_ratio=2,
            aligned=True,
        )


def roi_semantic_targets(sem_seg: Tensor, boxes: Tensor, output_size: int = 28) -> Tensor:
    """The GT semantic map inside each box, resized (nearest) to output_size x output_size.

    Cell (j, k) takes the label of the pixel under its centre, the point RoIAlign (aligned)
    samples around, so targets and logits describe the same spot.

    Args:
        sem_seg: LongTensor[H, W] class index, IGNORE_LABEL on void/crowd/padding.
        boxes: FloatTensor[K, 4] xyxy boxes in the pixels of `sem_seg`.
        output_size: 28.

    Returns:
        LongTensor[K, output_size, output_size].
    """
    k = boxes.shape[0]
    h, w = sem_seg.shape
    if k == 0:
        return sem_seg.new_full((0, output_size, output_size), IGNORE_LABEL)
    boxes = boxes.to(torch.float64)
    centres = (torch.arange(output_size, dtype=torch.float64, device=boxes.device) + 0.5) / output_size
    ys = boxes[:, 1:2] + centres[None] * (boxes[:, 3:4] - boxes[:, 1:2])
    xs = boxes[:, 0:1] + centres[None] * (boxes[:, 2:3] - boxes[:, 0:1])
    rows = ys.floor().long().clamp(0, h - 1)
    cols = xs.floor().long().clamp(0, w - 1)
    return sem_seg[rows[:, :, None], cols[:, None, :]]


def semantic_roi_loss(
    head: UPSNetSemanticHead,
    logits: Tensor,
    boxes: Sequence[Tensor],
    sem_segs: Sequence[Tensor],
    output_size: int = 28,
) -> Tensor:
    """The RoI loss: cross-entropy of the scorer's RoI logits against GT semantic crops.

    Args:
        head: the semantic head (its scorer is shared).
        logits: FloatTensor[B, C, H/4, W/4] the head's logits.
        boxes: per image FloatTensor[K_i, 4] GT boxes in input pixels.
        sem_segs: per image LongTensor[h_i, w_i] (or the padded [Hp, Wp]) class index targets.
        output_size: 28.

    Returns:
        FloatTensor[] the summed cross-entropy of the labelled cells divided by the number of all
        cells (ignored ones included, as the released code's `.mean()` of the unreduced loss);
        0 (keeping the graph) without any box.
    """
    if len(boxes) != len(sem_segs):
        raise ValueError(f"{len(boxes)} box sets for {len(sem_segs)} semantic maps")
    targets = torch.cat([roi_semantic_targets(s, b, output_size) for s, b in zip(sem_segs, boxes, strict=True)])
    if targets.shape[0] == 0:
        return logits.sum() * 0.0
    # float32 logits for the cross-entropy (as detectron2 does under AMP)
    roi = head.roi_logits(logits, boxes, output_size)
    num_classes = roi.shape[1]
    valid = targets != IGNORE_LABEL
    if bool((valid & ((targets < 0) | (targets >= num_classes))).any()):
        bad = int(targets[valid & ((targets < 0) | (targets >= num_classes))][0])
        raise ValueError(f"RoI loss: semantic target {bad} out of range for {num_classes} classes")
    total = F.cross_entropy(roi, targets, ignore_index=IGNORE_LABEL, reduction="sum")
    return total / targets.numel()
