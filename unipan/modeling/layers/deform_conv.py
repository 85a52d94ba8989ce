"""Deformable convolution (DCNv1) by bilinear sampling and one matrix product.

torchvision's `deform_conv2d` is fast on CUDA, but its CPU backward is a slow loop that dominated
a tiny UPSNet training step. Here the k*k taps are sampled with `grid_sample` (bilinear, zero
outside the image) into columns [B, C, k*k, H*W] and contracted with the weight, and autograd
differentiates both. Same semantics as torchvision (offsets as (dy, dx) per tap, row-major taps,
zero padding), stride 1; several times faster forward+backward on the CPU (the README gives the
measurement). The columns cost k*k times the input's memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import deform_conv2d


def deform_conv2d_sampled(
    x: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None = None, padding: int = 1, dilation: int = 1
) -> Tensor:
    """DCNv1 convolution with stride 1, equal to `torchvision.ops.deform_conv2d`.

    Args:
        x: FloatTensor[B, C, H, W].
        offset: FloatTensor[B, 2 * k * k, Ho, Wo], (dy, dx) for each tap in row-major order.
        weight: FloatTensor[O, C, k, k].
        bias: FloatTensor[O] or None.
        padding, dilation: as for a 3x3 `nn.Conv2d` (one value for both axes).

    Returns:
        FloatTensor[B, O, Ho, Wo] with Ho = H + 2 padding - dilation (k - 1) (likewise Wo).
    """
    b, c, h, w = x.shape
    o, c_w, kh, kw = weight.shape
    if c_w != c or kh != kw:
        raise ValueError(f"weight {tuple(weight.shape)} does not fit input with {c} channels / square kernel")
    k = kh
    ho, wo = h + 2 * padding - dilation * (k - 1), w + 2 * padding - dilation * (k - 1)
    if offset.shape != (b, 2 * k * k, ho, wo):
        raise ValueError(f"offset has shape {tuple(offset.shape)}, expected {(b, 2 * k * k, ho, wo)}")
    taps = torch.arange(k, dtype=x.dtype, device=x.device) * dilation - padding
    tap_y = taps.repeat_interleave(k).view(1, k * k, 1, 1)
    tap_x = taps.repeat(k).view(1, k * k, 1, 1)
    base_y = torch.arange(ho, dtype=x.dtype, device=x.device).view(1, 1, ho, 1)
    base_x = torch.arange(wo, dtype=x.dtype, device=x.device).view(1, 1, 1, wo)
    off = offset.view(b, k * k, 2, ho, wo)
    py = base_y + tap_y + off[:, :, 0]
    px = base_x + tap_x + off[:, :, 1]
    # pixel coordinates -> grid_sample's [-1, 1] with align_corners=False (works for H or W = 1)
    grid = torch.stack([(2 * px + 1) / w - 1, (2 * py + 1) / h - 1], dim=-1)
    cols = F.grid_sample(
        x, grid.view(b, k * k * ho, wo, 2), mode="bilinear", padding_mode="zeros", align_corners=False
    ).view(b, c, k * k, ho * wo)
    out = torch.einsum("ock,bckn->bon", weight.reshape(o, c, k * k), cols).view(b, o, ho, wo)
    return out if bias is None else out + bias.view(1, o, 1, 1)


def deform_conv2d_any(
    x: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None = None, padding: int = 1, dilation: int = 1
) -> Tensor:
    """Torchvision's kernel on CUDA (fast there), the sampled form elsewhere (fast on CPU)."""
    if x.is_cuda:
        return deform_conv2d(x, offset, weight, bias, padding=padding, dilation=dilation)
    return deform_conv2d_sampled(x, offset, weight, bias, padding=padding, dilation=dilation)
