"""A 3x3 conv turned deformable (DCNv1, Dai et al. 2017), for trunks with deformable stages.

`make_deformable(stage)` replaces the `conv2` (the 3x3 conv) of every residual block of a ResNet
stage by a `DeformConv3x3` that keeps the conv's weight under the same name and adds a
zero-initialised offset conv, so the converted network computes the same function until the
offsets learn (and loads the plain network's weights with `strict=False`).
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.ops import deform_conv2d

from unipan.modeling.layers.deform_conv import deform_conv2d_sampled

__all__ = ["DeformConv3x3", "make_deformable"]


class DeformConv3x3(nn.Module):
    """DCNv1 with the weight (and bias, stride, padding, dilation) of a 3x3 `nn.Conv2d`.

    Stride-1 convs run the sampled CPU form of `unipan.modeling.layers.deform_conv` off CUDA
    (faster there than torchvision's CPU kernel); strided ones and CUDA use torchvision's kernel.

    Args:
        conv: the 3x3 convolution to take over (groups 1).
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.kernel_size != (3, 3) or conv.groups != 1:
            raise ValueError(f"only plain 3x3 convs become deformable, got {conv}")
        self.weight = conv.weight
        self.bias = conv.bias
        self.stride = int(conv.stride[0])
        self.padding = int(conv.padding[0])
        self.dilation = int(conv.dilation[0])
        self.offset = nn.Conv2d(
            conv.in_channels, 18, kernel_size=3, stride=self.stride, padding=self.padding, dilation=self.dilation
        )
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)  # type: ignore[arg-type]  # made with bias

    def forward(self, x: Tensor) -> Tensor:
        """FloatTensor[B, C, H, W] -> FloatTensor[B, O, Ho, Wo] as the original conv's shape."""
        offset = self.offset(x)
        if self.stride == 1 and not x.is_cuda:
            return deform_conv2d_sampled(x, offset, self.weight, self.bias, self.padding, self.dilation)
        return deform_conv2d(
            x, offset, self.weight, self.bias, stride=self.stride, padding=self.padding, dilation=self.dilation
        )


def make_deformable(stage: nn.Module) -> int:
    """Replace the `conv2` of every block of `stage` by a `DeformConv3x3`; return how many.

    Args:
        stage: a ResNet stage (`nn.Sequential` of torchvision `BasicBlock` / `Bottleneck`).
    """
    count = 0
    for block in stage.children():
        conv = getattr(block, "conv2", None)
        if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
            block.conv2 = DeformConv3x3(conv)
            count += 1
    return count
