"""SPINet's feature pyramid: P2 at stride 8 (halved C2 + P3), P3-P5, optional P6 / P7.

Hwang et al. 2021 (SPINet), Sec. 3.1: "we scale down C2 in half, generating P2 with a summation
between halved C2 and P3", so that the heads that read every level (filter sampling, Panoptic-
Feature generator) never run at stride 4. How C2 is halved is not stated: C2 is average-pooled
2x2 and goes through P2's own 1x1 lateral, then is added to P3's top-down (inner) map and
smoothed by P2's own 3x3 output conv. Average pooling and a 1x1 conv commute, so pooling first
gives the same map at a quarter of the lateral's cost; the parameters are those of a plain
4-level FPN (which the paper's parameter count fits).

On COCO the paper adds P6, "the same as P5, which is of stride 32" (ambiguous): P6 here is a 3x3
stride-2 conv of P5 (stride 64, AdelaiDet's `LastLevelP6P7` reading P5); "p2s8-p7" adds P7 = a
3x3 stride-2 conv of ReLU(P6) for Table 4's P3-7 rows.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelP6P7

from unipan.modeling.backbone.fpn import FPN
from unipan.modeling.backbone.resnet import TRUNK_STAGES, ResNetTrunk

__all__ = ["SPINET_FPN_LEVELS", "LastLevelP6FromP5", "SPINetFPN"]

SPINET_FPN_LEVELS: tuple[str, ...] = ("p2s8-p5", "p2s8-p6", "p2s8-p7")
"""SPINet's pyramids: P2 (stride 8) .. P5, .. P6 (stride 64), .. P7 (stride 128)."""


class LastLevelP6FromP5(ExtraFPNBlock):
    """P6 = 3x3 stride-2 conv of P5 (no P7).

    Args:
        channels: FPN channels (P5's and P6's).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.p6 = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)
        # torchvision's LastLevelP6P7 init
        nn.init.kaiming_uniform_(self.p6.weight, a=1)
        nn.init.constant_(self.p6.bias, 0)  # type: ignore[arg-type]  # made with bias

    def forward(self, results: list[Tensor], x: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        return [*results, self.p6(results[-1])], [*names, "p6"]


class SPINetFPN(FPN):
    """ResNet trunk + SPINet's pyramid: res2..res5 and p2 (stride 8), p3, p4, p5 [, p6 [, p7]].

    The lateral and output convs are torchvision's `FeaturePyramidNetwork` modules of a 4-level
    FPN over res2..res5 (`fpn.inner_blocks.0` / `fpn.layer_blocks.0` serve P2).

    Args:
        trunk: the ResNet trunk.
        fpn_channels: output channels of every level.
        levels: one of `SPINET_FPN_LEVELS`.

    Raises:
        ValueError: for unknown `levels` or a non-positive `fpn_channels`.
    """

    def __init__(self, *, trunk: ResNetTrunk, fpn_channels: int = 256, levels: str = "p2s8-p5") -> None:
        if levels not in SPINET_FPN_LEVELS:
            raise ValueError(f"unknown SPINet FPN levels {levels!r}; known: {list(SPINET_FPN_LEVELS)}")
        # the 4-level torchvision FPN of "p2-p6"; its parameter-free max-pool P6 is replaced below
        super().__init__(trunk=trunk, fpn_channels=fpn_channels, levels="p2-p6")
        last = int(levels[-1])
        extra: ExtraFPNBlock | None = None
        if last == 6:
            extra = LastLevelP6FromP5(fpn_channels)
        elif last == 7:
            # torchvision reads P5 (use_P5) because its input and output widths are equal
            extra = LastLevelP6P7(fpn_channels, fpn_channels)
        self.fpn.extra_blocks = extra
        self.levels = levels
        self._shapes = {name: (trunk.stage_channels[k], 2 ** (k + 2)) for k, name in enumerate(TRUNK_STAGES)}
        self._shapes["p2"] = (fpn_channels, 8)
        for k in range(3, last + 1):
            self._shapes[f"p{k}"] = (fpn_channels, 2**k)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Compute trunk and pyramid features.

        Args:
            images: FloatTensor[B, 3, H, W] normalised, H and W multiples of `size_divisibility`.

        Returns:
            {"res2".."res5": FloatTensor[B, C_k, H/2^k, W/2^k], "p2": FloatTensor[B, fpn_channels,
            H/8, W/8], "p3".."p5" (and p6, p7): FloatTensor[B, fpn_channels, H/2^k, W/2^k]}
            (P6/P7 sizes rounded up).

        Raises:
            ValueError: for a wrong image shape or a size that is not a multiple of 32.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.size_divisibility or w % self.size_divisibility:
            raise ValueError(
                f"image batch size {h}x{w} is not a multiple of {self.size_divisibility}; pad the batch "
                f"(Batch.images must be padded to the backbone's size_divisibility)"
            )
        trunk_out = self.trunk(images)
        fpn = self.fpn
        feats = [trunk_out[name] for name in TRUNK_STAGES]
        inner = fpn.get_result_from_inner_blocks(feats[-1], -1)
        pyramid = [fpn.get_result_from_layer_blocks(inner, -1)]
        for idx in (2, 1):
            lateral = fpn.get_result_from_inner_blocks(feats[idx], idx)
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            pyramid.insert(0, fpn.get_result_from_layer_blocks(inner, idx))
        # P2: C2 halved (2x2 average), its lateral, plus P3's inner map (same stride 8)
        lateral = fpn.get_result_from_inner_blocks(F.avg_pool2d(feats[0], 2), 0)
        pyramid.insert(0, fpn.get_result_from_layer_blocks(lateral + inner, 0))
        names = [f"p{k}" for k in range(2, 6)]
        if fpn.extra_blocks is not None:
            pyramid, names = fpn.extra_blocks(pyramid, feats, names)
        out = dict(trunk_out)
        for k, feat in enumerate(pyramid, start=2):
            out[f"p{k}"] = feat
        return out
