"""Modulated deformable convolution (DCNv2, Zhu et al. 2019) and its conv modules.

`modulated_deform_conv2d` is torchvision's `deform_conv2d` with a `mask` on CUDA; on the CPU it
samples the k*k taps with `grid_sample` (bilinear, zero outside the image), multiplies each tap by
its modulation and contracts the columns with the weight in one matmul, as
`unipan.modeling.layers.deform_conv` does for DCNv1 (torchvision's CPU backward is a slow loop).
Here any stride is allowed, because the DCN backbone puts one in the first block of res3-res5.

Modules:
- `ModulatedDeformConv2d`: an `nn.Conv2d` (same parameters, same state-dict keys) whose forward
  takes the offsets and the modulation from outside; SpatialFlow's DCN towers compute them from
  their spatial flows.
- `ModulatedDeformConvPack`: the backbone form, which computes its own offsets and modulation
  with a zero-initialised 3x3 conv (`conv_offset`, 3 k*k outputs: the first 2 k*k are offsets,
  the last k*k pass a sigmoid), so that it starts as the plain convolution scaled by 0.5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

__all__ = [
    "ModulatedDeformConv2d",
    "ModulatedDeformConvPack",
    "modulated_deform_conv2d",
    "modulated_deform_conv2d_sampled",
    "split_offset_mask",
]


def _pair(value: int | tuple[int, ...]) -> int:
    """One value for both axes (the modules here are square)."""
    if isinstance(value, tuple):
        if len(set(value)) != 1:
            raise ValueError(f"modulated deformable conv supports equal values for both axes, got {value}")
        return int(value[0])
    return int(value)


def split_offset_mask(out: Tensor) -> tuple[Tensor, Tensor]:
    """Split a 3 k*k-channel offset-conv output into offsets and a sigmoid modulation.

    The layout of mmcv's `ModulatedDeformConv2dPack` (and SpatialFlow's DCN towers): the output is
    chunked in three; the first two chunks are the offsets, (dy, dx) per tap in row-major order
    (torchvision's layout), the third the modulation logits.

    Args:
        out: FloatTensor[B, 3 k*k, H, W].

    Returns:
        (offset FloatTensor[B, 2 k*k, H, W], mask FloatTensor[B, k*k, H, W] in (0, 1)).
    """
    if out.shape[1] % 3:
        raise ValueError(f"offset conv output has {out.shape[1]} channels, expected 3 * k * k")
    o1, o2, logits = torch.chunk(out, 3, dim=1)
    return torch.cat((o1, o2), dim=1), torch.sigmoid(logits)


def modulated_deform_conv2d_sampled(
    x: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int = 1,
    padding: int = 1,
    dilation: int = 1,
) -> Tensor:
    """DCNv2 by bilinear sampling and one matmul, equal to `torchvision.ops.deform_conv2d(..., mask=mask)`.

    Args:
        x: FloatTensor[B, C, H, W].
        offset: FloatTensor[B, 2 k*k, Ho, Wo], (dy, dx) per tap in row-major order.
        mask: FloatTensor[B, k*k, Ho, Wo] modulation of each tap.
        weight: FloatTensor[O, C, k, k].
        bias: FloatTensor[O] or None.
        stride, padding, dilation: as for a square `nn.Conv2d`.

    Returns:
        FloatTensor[B, O, Ho, Wo], Ho = (H + 2 padding - dilation (k - 1) - 1) // stride + 1 (likewise Wo).
    """
    b, c, h, w = x.shape
    o, c_w, kh, kw = weight.shape
    if c_w != c or kh != kw:
        raise ValueError(f"weight {tuple(weight.shape)} does not fit input with {c} channels / square kernel")
    k = kh
    ho = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    if offset.shape != (b, 2 * k * k, ho, wo):
        raise ValueError(f"offset has shape {tuple(offset.shape)}, expected {(b, 2 * k * k, ho, wo)}")
    if mask.shape != (b, k * k, ho, wo):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {(b, k * k, ho, wo)}")
    taps = torch.arange(k, dtype=x.dtype, device=x.device) * dilation - padding
    tap_y = taps.repeat_interleave(k).view(1, k * k, 1, 1)
    tap_x = taps.repeat(k).view(1, k * k, 1, 1)
    base_y = (torch.arange(ho, dtype=x.dtype, device=x.device) * stride).view(1, 1, ho, 1)
    base_x = (torch.arange(wo, dtype=x.dtype, device=x.device) * stride).view(1, 1, 1, wo)
    off = offset.view(b, k * k, 2, ho, wo)
    py = base_y + tap_y + off[:, :, 0]
    px = base_x + tap_x + off[:, :, 1]
    # pixel coordinates -> grid_sample's [-1, 1] with align_corners=False
    grid = torch.stack([(2 * px + 1) / w - 1, (2 * py + 1) / h - 1], dim=-1)
    cols = F.grid_sample(
        x, grid.view(b, k * k * ho, wo, 2), mode="bilinear", padding_mode="zeros", align_corners=False
    ).view(b, c, k * k, ho * wo)
    cols = cols * mask.reshape(b, 1, k * k, ho * wo)
    out = torch.einsum("ock,bckn->bon", weight.reshape(o, c, k * k), cols).view(b, o, ho, wo)
    return out if bias is None else out + bias.view(1, o, 1, 1)


def modulated_deform_conv2d(
    x: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int = 1,
    padding: int = 1,
    dilation: int = 1,
) -> Tensor:
    """DCNv2: torchvision's kernel on CUDA (fast there), the sampled form elsewhere (fast on CPU)."""
    if x.is_cuda:
        return deform_conv2d(x, offset, weight, bias, stride=stride, padding=padding, dilation=dilation, mask=mask)
    return modulated_deform_conv2d_sampled(x, offset, mask, weight, bias, stride, padding, dilation)


class ModulatedDeformConv2d(nn.Conv2d):
    """A square `nn.Conv2d` run as DCNv2 with offsets and modulation given by the caller.

    Same parameters (`weight`, `bias`) and initialisation as the `nn.Conv2d` it replaces; groups 1.
    """

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
        """DCNv2 of `x`.

        Args:
            x: FloatTensor[B, C_in, H, W].
            offset: FloatTensor[B, 2 k*k, Ho, Wo].
            mask: FloatTensor[B, k*k, Ho, Wo].

        Returns:
            FloatTensor[B, C_out, Ho, Wo].
        """
        return modulated_deform_conv2d(
            x,
            offset,
            mask,
            self.weight,
            self.bias,
            stride=_pair(self.stride),
            padding=_pair(self.padding),  # type: ignore[arg-type]
            dilation=_pair(self.dilation),
        )


class ModulatedDeformConvPack(ModulatedDeformConv2d):
    """DCNv2 that predicts its own offsets and modulation from its input (mmcv's `ModulatedDeformConv2dPack`).

    `conv_offset` (3x3 with the conv's stride, padding and dilation, 3 k*k outputs) starts at zero:
    offsets 0 and modulation sigmoid(0) = 0.5.
    """

    def __init__(self, *args: int, **kwargs: int | bool) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if self.groups != 1:
            raise ValueError("ModulatedDeformConvPack supports groups=1 only")
        k = _pair(self.kernel_size)
        self.conv_offset = nn.Conv2d(
            self.in_channels,
            3 * k * k,
            kernel_size=k,
            stride=_pair(self.stride),
            padding=_pair(self.padding),  # type: ignore[arg-type]  # an int, as built here
            dilation=_pair(self.dilation),
            bias=True,
        )
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)  # type: ignore[arg-type]  # made with bias

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> ModulatedDeformConvPack:
        """A DCNv2 replacement of a square `conv` (groups 1) holding its weights.

        The new offset conv trains iff the conv's weight does (a frozen stage stays frozen).
        """
        if conv.groups != 1:
            raise ValueError(f"cannot make a modulated deformable conv of a grouped conv ({conv.groups} groups)")
        dcn = cls(
            conv.in_channels,
            conv.out_channels,
            kernel_size=_pair(conv.kernel_size),
            stride=_pair(conv.stride),
            padding=_pair(conv.padding),  # type: ignore[arg-type]
            dilation=_pair(conv.dilation),
            bias=conv.bias is not None,
        ).to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            dcn.weight.copy_(conv.weight)
            if conv.bias is not None and dcn.bias is not None:
                dcn.bias.copy_(conv.bias)
        dcn.requires_grad_(conv.weight.requires_grad)
        return dcn

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """FloatTensor[B, C_in, H, W] -> FloatTensor[B, C_out, Ho, Wo]."""
        offset, mask = split_offset_mask(self.conv_offset(x))
        return super().forward(x, offset, mask)
