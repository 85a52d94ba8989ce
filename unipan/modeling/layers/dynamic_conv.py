"""Dynamic-filter ops of SPINet (Hwang et al. 2021, Sec. 3.2-3.4): coordinates, windows, one conv.

- `coord_features`: CoordConv's absolute (x, y) channels of a feature map, per image;
- `gather_windows`: the k x k window of a filter map around sampled locations, flattened;
- `single_shot_conv`: per image, the dynamic thing kernels and the learned stuff kernels stacked
  into one weight and applied to the Panoptic-Feature by one convolution.

All three are compositions of differentiable torch ops (autograd gives their gradients).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["coord_features", "gather_windows", "single_shot_conv"]


def coord_features(
    shape: tuple[int, int], stride: int, image_sizes: Sequence[tuple[int, int]], *, device: torch.device | None = None
) -> Tensor:
    """Absolute x and y of every cell centre, in [-1, 1] over each image's own (unpadded) extent.

    Normalising by the image's own size, not by the padded tensor's, keeps an image's features
    the same alone or in a padded batch (CoordConv, Liu et al. 2018; cells in the padding get
    values beyond 1).

    Args:
        shape: (h, w) of the feature map.
        stride: its stride in input pixels; cell (i, j) is centred at pixel (i + 0.5, j + 0.5) * stride.
        image_sizes: per image (H, W) in input pixels.
        device: where to create the result.

    Returns:
        FloatTensor[B, 2, h, w]: channel 0 = x, channel 1 = y.
    """
    h, w = shape
    sizes = torch.tensor([[float(s[1]), float(s[0])] for s in image_sizes], device=device)  # [B, 2] (W, H)
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * stride
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * stride
    x = 2 * xs[None, None, :] / sizes[:, 0, None, None] - 1  # [B, 1, w]
    y = 2 * ys[None, :, None] / sizes[:, 1, None, None] - 1  # [B, h, 1]
    return torch.stack([x.expand(-1, h, w), y.expand(-1, h, w)], dim=1)


def gather_windows(features: Tensor, batch_index: Tensor, ys: Tensor, xs: Tensor, k: int) -> Tensor:
    """The k x k windows of `features` centred at the given cells, flattened in (C, k, k) order.

    Cells beyond the border read zeros (zero padding, as the convolution that uses them).

    Args:
        features: FloatTensor[B, C, H, W].
        batch_index: LongTensor[N] image of each location.
        ys: LongTensor[N] row of each location.
        xs: LongTensor[N] column of each location.
        k: odd window size.

    Returns:
        FloatTensor[N, C * k * k]; entry c * k * k + dy * k + dx is features[b, c, y + dy - k // 2,
        x + dx - k // 2].

    Raises:
        ValueError: for an even `k` or index tensors of different lengths.
    """
    if k < 1 or k % 2 == 0:
        raise ValueError(f"window size must be odd and positive, got {k}")
    n = batch_index.numel()
    if ys.numel() != n or xs.numel() != n:
        raise ValueError(f"gather_windows got {n} images, {ys.numel()} rows and {xs.numel()} columns")
    c = features.shape[1]
    r = k // 2
    padded = F.pad(features, (r, r, r, r)).permute(0, 2, 3, 1)  # [B, H + 2r, W + 2r, C]
    offsets = torch.arange(k, device=features.device)
    rows = ys[:, None, None] + offsets[None, :, None]  # [N, k, 1] in padded coordinates
    cols = xs[:, None, None] + offsets[None, None, :]  # [N, 1, k]
    windows = padded[batch_index[:, None, None], rows, cols]  # [N, k, k, C]
    return windows.permute(0, 3, 1, 2).reshape(n, c * k * k)


def single_shot_conv(
    features: Tensor,
    thing_kernels: Sequence[Tensor],
    stuff_kernels: Tensor,
    thing_bias: Sequence[Tensor] | None = None,
    stuff_bias: Tensor | None = None,
) -> list[Tensor]:
    """SPINet's unified convolution: per image, [thing kernels; stuff kernels] in one conv.

    Args:
        features: FloatTensor[B, D, H, W] the Panoptic-Feature.
        thing_kernels: per image FloatTensor[N_b, D, k, k] (N_b may be 0).
        stuff_kernels: FloatTensor[S', D, k, k], shared by every image.
        thing_bias: per image FloatTensor[N_b], or None (no bias).
        stuff_bias: FloatTensor[S'], or None.

    Returns:
        Per image FloatTensor[N_b + S', H, W]: thing logits first, then stuff logits ("same"
        padding, k odd).

    Raises:
        ValueError: for a kernel list of another length than the batch, or kernels whose shape
            does not fit the features.
    """
    b, d = features.shape[:2]
    if len(thing_kernels) != b:
        raise ValueError(f"{len(thing_kernels)} thing kernel sets for a batch of {b}")
    k = stuff_kernels.shape[-1]
    if stuff_kernels.dim() != 4 or stuff_kernels.shape[1] != d or stuff_kernels.shape[2] != k or k % 2 == 0:
        raise ValueError(f"stuff kernels {tuple(stuff_kernels.shape)} do not fit {d}-channel features (odd k x k)")
    outs = []
    for i, kernels in enumerate(thing_kernels):
        if kernels.dim() != 4 or tuple(kernels.shape[1:]) != (d, k, k):
            raise ValueError(f"image {i}: thing kernels {tuple(kernels.shape)}, expected [N, {d}, {k}, {k}]")
        weight = torch.cat([kernels, stuff_kernels])
        bias = None
        if thing_bias is not None or stuff_bias is not None:
            tb = thing_bias[i] if thing_bias is not None else kernels.new_zeros(kernels.shape[0])
            sb = stuff_bias if stuff_bias is not None else stuff_kernels.new_zeros(stuff_kernels.shape[0])
            bias = torch.cat([tb, sb])
        outs.append(F.conv2d(features[i : i + 1], weight, bias, padding=k // 2)[0])
    return outs
