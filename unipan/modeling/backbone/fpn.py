"""Feature pyramid over a ResNet trunk: P2-P6 (Mask R-CNN) or P3-P7 (RetinaNet), optional global context.

The lateral and output convs are torchvision's `FeaturePyramidNetwork` modules (so their names,
inits and the state-dict keys `fpn.*` are torchvision's); the top-down pass is written out here,
once, because UPSNet's global context must be added to the coarsest lateral before it runs.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from unipan.modeling.backbone.resnet import TRUNK_STAGES, ResNetTrunk

__all__ = ["FPN", "FPN_LEVELS", "GlobalContext", "LastLevelP6P7FromC5"]

FPN_LEVELS: tuple[str, ...] = ("p2-p6", "p3-p7")
"""The pyramid variants: "p2-p6" (P6 = max-pool of P5, for RPNs), "p3-p7" (P6/P7 convs, RetinaNet)."""


class GlobalContext(nn.Module):
    """COCO global context of UPSNet: GAP(res5) -> Linear, a per-image vector added to P5's lateral.

    Args:
        in_channels: res5 channels (2048 for ResNet-50).
        out_channels: FPN channels (256).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        # PyTorch's default Linear init, as the released code (`fpn_gap = nn.Linear(2048, 256)`)
        self.fc = nn.Linear(in_channels, out_channels)

    def forward(self, res5: Tensor) -> Tensor:
        """FloatTensor[B, in, H, W] -> FloatTensor[B, out, 1, 1] (broadcasts over P5's lateral)."""
        return self.fc(res5.mean(dim=(2, 3)))[:, :, None, None]


class LastLevelP6P7FromC5(LastLevelP6P7):
    """RetinaNet's P6 = 3x3/2 conv of C5 and P7 = 3x3/2 conv of ReLU(P6), whatever the widths.

    torchvision's `LastLevelP6P7` reads P5 instead of C5 whenever C5 and the FPN have equal widths
    (its `use_P5`), which silently changes the network of a narrow trunk; this block always reads C5.

    Args:
        in_channels: C5 channels.
        out_channels: FPN channels.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels)
        self.use_P5 = False


class FPN(nn.Module):
    """ResNet trunk + feature pyramid: trunk features res2..res5 and levels p2..p6 or p3..p7.

    - levels "p2-p6": laterals on res2..res5, P6 = stride-2 subsampling of P5 (torchvision's
      `LastLevelMaxPool`), as Mask R-CNN's RPN uses.
    - levels "p3-p7": laterals on res3..res5 only, P6 = 3x3 stride-2 conv on C5, P7 = 3x3 stride-2
      conv on ReLU(P6), as RetinaNet (`LastLevelP6P7FromC5`); with `p6_from="p5"` P6 reads P5
      instead, as FCOS and AdelaiDet do (torchvision's `LastLevelP6P7` at equal widths).

    With a `global_context`, its vector (from res5) is added to the coarsest lateral before the
    top-down pass, so it reaches every level (UPSNet on COCO).

    Args:
        trunk: the ResNet trunk.
        fpn_channels: output channels of every pyramid level.
        levels: "p2-p6" or "p3-p7".
        global_context: UPSNet's context module (res5 channels -> fpn_channels), or None.
        p6_from: "c5" or "p5", the input of P6 with levels "p3-p7" ("c5" for "p2-p6").

    Attributes:
        size_divisibility: input sides must be multiples of this (32: P5 has stride 32 and the
            top-down pass needs exact 2x sizes).
        fpn_channels: channels of the pyramid levels.
        levels: the pyramid variant.
        context: the global context module, or None.

    Raises:
        ValueError: for a non-positive `fpn_channels`, unknown `levels` or `p6_from`, or a context
            of other widths.
    """

    size_divisibility: int = 32

    def __init__(
        self,
        *,
        trunk: ResNetTrunk,
        fpn_channels: int = 256,
        levels: str = "p2-p6",
        global_context: GlobalContext | None = None,
        p6_from: str = "c5",
    ) -> None:
        super().__init__()
        if fpn_channels < 1:
            raise ValueError(f"fpn_channels must be positive, got {fpn_channels}")
        if levels not in FPN_LEVELS:
            raise ValueError(f"unknown FPN levels {levels!r}; known: {list(FPN_LEVELS)}")
        if p6_from not in ("c5", "p5") or (p6_from == "p5" and levels != "p3-p7"):
            raise ValueError(f"p6_from={p6_from!r} with levels {levels!r}: 'p5' needs 'p3-p7', else 'c5'")
        stage_channels = dict(zip(TRUNK_STAGES, trunk.stage_channels, strict=True))
        in_stages: tuple[str, ...]
        if levels == "p2-p6":
            in_stages = TRUNK_STAGES
            extra: ExtraFPNBlock = LastLevelMaxPool()
        else:
            in_stages = TRUNK_STAGES[1:]
            if p6_from == "p5":
                # equal widths: torchvision's block reads P5 (its `use_P5`)
                extra = LastLevelP6P7(fpn_channels, fpn_channels)
            else:
                extra = LastLevelP6P7FromC5(stage_channels["res5"], fpn_channels)
        self.trunk = trunk
        # Created after the trunk and before any context: a seeded build then draws the same
        # weights as the ResNetFPN (+ UPSNet context) of before the backbone package.
        self.fpn = FeaturePyramidNetwork(
            in_channels_list=[stage_channels[s] for s in in_stages],
            out_channels=fpn_channels,
            extra_blocks=extra,
        )
        self.fpn_channels = fpn_channels
        self.levels = levels
        self.in_stages = in_stages
        self.context: GlobalContext | None = None
        if global_context is not None:
            self.set_global_context(global_context)
        self._shapes: dict[str, tuple[int, int]] = {}
        for k, name in enumerate(TRUNK_STAGES, start=2):
            self._shapes[name] = (stage_channels[name], 2**k)
        first = 2 if levels == "p2-p6" else 3
        for k in range(first, first + 5):
            self._shapes[f"p{k}"] = (fpn_channels, 2**k)

    def set_global_context(self, context: GlobalContext | None) -> None:
        """Attach (or with None, remove) the global context after construction.

        `build_backbone` uses it to create the context after the FPN's convs, the parameter order
        of the models saved before the backbone package.

        Raises:
            ValueError: when the context does not map res5's channels to `fpn_channels`.
        """
        if context is not None:
            fc = context.fc
            res5 = self.trunk.stage_channels[-1]
            if (fc.in_features, fc.out_features) != (res5, self.fpn_channels):
                raise ValueError(
                    f"global context maps {fc.in_features} -> {fc.out_features} channels; the FPN needs "
                    f"res5's {res5} -> {self.fpn_channels}"
                )
        self.context = context

    def output_shape(self) -> dict[str, tuple[int, int]]:
        """{feature name: (channels, stride)} for res2..res5 and p2..p6 or p3..p7."""
        return dict(self._shapes)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Compute trunk and pyramid features.

        Args:
            images: FloatTensor[B, 3, H, W] normalised, H and W multiples of `size_divisibility`.

        Returns:
            {"res2".."res5": trunk features FloatTensor[B, C_k, H/2^k, W/2^k],
            "p2".."p6" or "p3".."p7": FloatTensor[B, fpn_channels, H/s, W/s]} (P6/P7 sizes rounded up).

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
        names = list(self.in_stages)
        feats = [trunk_out[name] for name in names]
        # torchvision's FeaturePyramidNetwork.forward, with the context added to the coarsest
        # lateral before the top-down pass
        inner = fpn.get_result_from_inner_blocks(feats[-1], -1)
        if self.context is not None:
            inner = inner + self.context(feats[-1])
        pyramid = [fpn.get_result_from_layer_blocks(inner, -1)]
        for idx in range(len(feats) - 2, -1, -1):
            lateral = fpn.get_result_from_inner_blocks(feats[idx], idx)
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            pyramid.insert(0, fpn.get_result_from_layer_blocks(inner, idx))
        if fpn.extra_blocks is not None:
            pyramid, names = fpn.extra_blocks(pyramid, feats, names)
        out = dict(trunk_out)
        first = 2 if self.levels == "p2-p6" else 3
        for k, feat in enumerate(pyramid, start=first):
            out[f"p{k}"] = feat
        return out
