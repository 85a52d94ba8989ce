"""The semantic branch of Panoptic FPN (Kirillov et al. 2019; detectron2's SemSegFPNHead).

Each pyramid level p2..p5 goes through max(1, log2(stride / 4)) blocks of
[3x3 conv, GroupNorm(32), ReLU, 2x bilinear upsampling unless already at stride 4]; the four
stride-4 maps are summed and a 1x1 conv predicts the classes at stride 4. Every conv, the
predictor included, is initialised as detectron2's `c2_msra_fill` (kaiming normal, fan_out).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from unipan.modeling.layers import require_features

__all__ = ["SemanticFPNHead"]

NORMS = ("GN", "none")


class SemanticFPNHead(nn.Module):
    """Per-level conv/upsample towers summed at `common_stride`, then a 1x1 class predictor.

    Args:
        in_shapes: {feature name: (channels, stride)} of the backbone (`output_shape()`).
        in_features: the levels used, fine to coarse.
        conv_dims: channels of every tower conv (128 in the paper).
        norm: "GN" (GroupNorm with 32 groups) or "none".
        num_classes: predicted classes (Panoptic FPN: stuff + one "things" class).
        common_stride: stride of the output (4).
    """

    def __init__(
        self,
        *,
        in_shapes: dict[str, tuple[int, int]],
        in_features: Sequence[str] = ("p2", "p3", "p4", "p5"),
        conv_dims: int = 128,
        norm: str = "GN",
        num_classes: int,
        common_stride: int = 4,
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown semantic head norm {norm!r}; known: {list(NORMS)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        require_features(in_shapes, in_features, "semantic head")
        if norm == "GN" and conv_dims % 32:
            raise ValueError(f"GroupNorm(32) needs conv_dims divisible by 32, got {conv_dims}")
        self.in_features = list(in_features)
        self.common_stride = common_stride
        self.num_classes = num_classes
        self.conv_dims = conv_dims
        self.scale_heads = nn.ModuleDict()
        for name in self.in_features:
            channels, stride = in_shapes[name]
            if stride < common_stride or stride % common_stride or not _is_power_of_two(stride // common_stride):
                raise ValueError(
                    f"feature {name!r} has stride {stride}; the semantic head needs strides {common_stride} * 2**k"
                )
            octaves = round(math.log2(stride / common_stride))
            blocks: list[nn.Module] = []
            for k in range(max(1, octaves)):
                conv = nn.Conv2d(
                    channels if k == 0 else conv_dims, conv_dims, kernel_size=3, padding=1, bias=norm == "none"
                )
                # detectron2's c2_msra_fill
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)
                blocks.append(conv)
                if norm == "GN":
                    blocks.append(nn.GroupNorm(32, conv_dims))
                blocks.append(nn.ReLU(inplace=True))
                if octaves > 0:
                    blocks.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads[name] = nn.Sequential(*blocks)
        self.predictor = nn.Conv2d(conv_dims, num_classes, kernel_size=1)
        # detectron2's c2_msra_fill, as for the tower convs (std sqrt(2 / num_classes))
        nn.init.kaiming_normal_(self.predictor.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.predictor.bias)  # type: ignore[arg-type]  # a Conv2d made with bias

    def layers(self, features: dict[str, Tensor]) -> Tensor:
        """The fused feature before the predictor.

        Args:
            features: backbone features holding `in_features`, FloatTensor[B, C, H/s, W/s].

        Returns:
            FloatTensor[B, conv_dims, H/common_stride, W/common_stride].
        """
        fused: Tensor | None = None
        for name in self.in_features:
            y = self.scale_heads[name](features[name])
            fused = y if fused is None else fused + y
        assert fused is not None
        return fused

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        """Semantic logits at stride `common_stride`.

        Args:
            features: backbone features holding `in_features`.

        Returns:
            FloatTensor[B, num_classes, H/common_stride, W/common_stride].
        """
        return self.predictor(self.layers(features))


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
