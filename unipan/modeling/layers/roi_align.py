"""RoIAlign whose CPU backward is one sparse matrix product, and the FPN pooler built on it.

torchvision's `roi_align` forward is fast enough on the CPU, but its backward
(`torchvision::_roi_align_backward`) is a serial scalar loop over RoIs x channels x bins x
sampling points that recomputes the bilinear weights of every point once per channel and scatters
four scalars at a time; it was about a fifth of a CPU training step of the Mask R-CNN based models.
The weights do not depend on the channel: RoIAlign is a linear map `Y[k, :, p] = sum_n W[n, (k, p)]
X[n, :]` over the pixels `n` (batch image, row, column), the same for every channel. The backward
here builds that matrix once, W FloatTensor[B*H*W, K*PH*PW] in CSR form with at most
K*PH*PW*grid_h*grid_w*4 non-zeros (four bilinear corners per sampling point), and computes the
input gradient channels-last as `W @ dY` with `dY` FloatTensor[K*PH*PW, C]: one sparse-dense
product that runs over contiguous C-wide rows, vectorised and threaded, in place of C scalar passes.

The weights follow torchvision's CPU kernel to the letter (the half-pixel offset of `aligned`, the
RoI size clamped to 1 when not aligned, `sampling_ratio` or the adaptive ceil(RoI size / bins)
points per bin axis, points beyond one pixel outside the map dropped, clamping at the borders,
division by the point count), and the non-zeros of a pixel are summed in torchvision's order, so
the gradients agree with it to rounding. The forward is torchvision's operator itself. Inputs on
other devices go to `torchvision.ops.roi_align` as they are (its CUDA kernels, deterministic
mode and autocast rule); on the CPU, dtypes other than float32/float64 (half) take torchvision's
backward kernel. Under CPU autocast the pooling runs in float32, as torchvision's autocast rule has it.
`benchmarks/roi_align_speed.py` times the two backwards side by side.

Double backward is not supported (torchvision does not support it either): the backward is marked
`once_differentiable`, so differentiating through a gradient taken with `create_graph=True`
raises. Boxes receive no gradient, as with torchvision.

`MultiScaleRoIAlign` is torchvision's FPN pooler (same constructor, state and level mapping) with
this `roi_align` on every level.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any

import torch
import torchvision
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable
from torchvision.ops.poolers import _filter_input, _setup_scales

__all__ = ["MultiScaleRoIAlign", "roi_align", "roi_align_weights"]

_CHUNK_NONZEROS = 1 << 22
"""Upper bound on the non-zeros of W built at once (about 100 MiB of indices and values): RoIs with
many sampling points (adaptive sampling of large RoIs) are then processed a few at a time."""

_FAST_DTYPES = (torch.float32, torch.float64)


_Axis = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]
"""Per sampling point along one axis: low pixel, high pixel, their weights, valid (see `_axis_points`)."""


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """(height, width) from an int or a pair, as torchvision's `output_size`."""
    if isinstance(size, int):
        return size, size
    if len(size) == 1:
        return int(size[0]), int(size[0])
    if len(size) != 2:
        raise ValueError(f"roi_align: output_size must be an int or a pair, got {size}")
    return int(size[0]), int(size[1])


def _to_rois(boxes: Tensor | list[Tensor] | tuple[Tensor, ...], like: Tensor) -> Tensor:
    """Tensor[K, 5] (batch index, x1, y1, x2, y2) from either box format of `roi_align`."""
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(f"roi_align: boxes must be Tensor[K, 5] or a list of Tensor[K_i, 4], got {boxes.shape}")
        return boxes
    if not isinstance(boxes, (list, tuple)):
        raise TypeError(f"roi_align: boxes must be Tensor[K, 5] or a list of Tensor[K_i, 4], got {type(boxes)}")
    for b in boxes:
        if b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"roi_align: every tensor of the boxes list must be Tensor[K_i, 4], got {b.shape}")
    if not boxes:
        return like.new_zeros((0, 5))
    ids = [torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)]
    return torch.cat([torch.cat(ids), torch.cat(list(boxes))], dim=1)


def _axis_points(start: Tensor, length: Tensor, bins: int, grid: Tensor, size: int) -> _Axis:
    """Sampling points of every RoI along one axis, padded to the largest grid.

    Args:
        start: FloatTensor[K] RoI start on this axis in map pixels (after scale and offset).
        length: FloatTensor[K] RoI extent on this axis (already clamped to >= 1 when not aligned).
        bins: output bins along this axis.
        grid: LongTensor[K] points per bin along this axis (>= 0).
        size: the map's extent along this axis.

    Returns:
        (low, high) LongTensor[K, bins, G] the two neighbouring pixels of each point, (w_low,
        w_high) FloatTensor[K, bins, G] their bilinear weights, and valid BoolTensor[K, bins, G]:
        the point exists (index < grid) and lies within [-1, size]. G = max(grid, 1); entries
        that are not valid hold pixel 0.
    """
    k = start.shape[0]
    dtype, device = start.dtype, start.device
    points = max(int(grid.max()) if k else 1, 1)
    bin_size = (length / bins).view(k, 1, 1)
    p = torch.arange(bins, device=device, dtype=dtype).view(1, bins, 1)
    i = torch.arange(points, device=device, dtype=dtype).view(1, 1, points)
    g = grid.to(dtype).view(k, 1, 1)
    # torchvision's order of operations: (start + p * bin) + ((i + 0.5) * bin) / grid
    pos = start.view(k, 1, 1) + p * bin_size + (i + 0.5) * bin_size / g
    valid = (i < g) & (pos >= -1.0) & (pos <= size)  # NaN coordinates are not valid
    pos = torch.where(valid, pos.clamp(min=0.0), torch.zeros_like(pos))
    low = pos.floor()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    frac = torch.where(at_edge, torch.zeros_like(pos), pos - low)
    low_index = low.long()
    high_index = torch.where(at_edge, low_index, low_index + 1)
    return low_index, high_index, 1.0 - frac, frac, valid


def _roi_geometry(rois: Tensor, spatial_scale: float, aligned: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """RoI start (x, y) and extent (width, height) in map pixels, as torchvision's kernel computes them.

    Args:
        rois: FloatTensor[K, 5] (batch index, x1, y1, x2, y2) in input pixels.
        spatial_scale, aligned: as for `roi_align`.

    Returns:
        FloatTensor[K] each: x start, y start, width, height; without `aligned` the extents are
        clamped to at least one pixel (torchvision's "malformed RoIs" rule).
    """
    offset = 0.5 if aligned else 0.0
    x0 = rois[:, 1] * spatial_scale - offset
    y0 = rois[:, 2] * spatial_scale - offset
    width = (rois[:, 3] * spatial_scale - offset) - x0
    height = (rois[:, 4] * spatial_scale - offset) - y0
    if not aligned:
        width, height = width.clamp(min=1.0), height.clamp(min=1.0)
    return x0, y0, width, height


def _point_grid(length: Tensor, bins: int, sampling_ratio: int) -> Tensor:
    """Points per bin along one axis: `sampling_ratio`, or ceil(RoI extent / bins) when <= 0.

    A zero or negative extent (aligned boxes with x2 <= x1) gives no points, as does a non-finite one.
    """
    if sampling_ratio > 0:
        return torch.full(length.shape, sampling_ratio, dtype=torch.long, device=length.device)
    grid = torch.ceil(length / bins)
    return torch.where(torch.isfinite(grid), grid, torch.zeros_like(grid)).long().clamp(min=0)


def _uniform_points(
    ys: _Axis, xs: _Axis, image: Tensor, grid: tuple[int, int]
) -> tuple[_Axis, _Axis, Tensor, Tensor, Tensor]:
    """Every sampling point of RoIs that share one point grid, by broadcasting.

    Args:
        ys, xs: `_axis_points` of the y and the x axis, [K, PH, G_y] and [K, PW, G_x].
        image: LongTensor[K] batch index of each RoI.
        grid: (G_y, G_x) points per bin of every RoI.

    Returns:
        per point, in torchvision's order (RoI, bin row, bin column, point row, point column):
        its y entries and x entries (`_Axis`, flat), its column of W (RoI * PH * PW + bin), its
        image, and the point count of its bin (a 0-dim tensor: the same for all).
    """
    k, ph, gy = ys[0].shape
    pw, gx = xs[0].shape[1:]
    shape = (k, ph, pw, *grid)
    y = tuple(t.view(k, ph, 1, gy, 1).expand(shape).reshape(-1) for t in ys)
    x = tuple(t.view(k, 1, pw, 1, gx).expand(shape).reshape(-1) for t in xs)
    device = image.device
    column = torch.arange(k * ph * pw, device=device).view(k, ph, pw, 1, 1).expand(shape).reshape(-1)
    images = image.view(k, 1, 1, 1, 1).expand(shape).reshape(-1)
    count = torch.tensor(grid[0] * grid[1], dtype=ys[2].dtype, device=device)
    return y, x, column, images, count  # type: ignore[return-value]


def _ragged_points(
    ys: _Axis, xs: _Axis, image: Tensor, gy: Tensor, gx: Tensor
) -> tuple[_Axis, _Axis, Tensor, Tensor, Tensor]:
    """Every sampling point of RoIs with their own point grids (adaptive sampling).

    RoI k has PH*PW*gy[k]*gx[k] points; their indices are decoded from a running number, so no
    RoI is padded to the largest grid.

    Args:
        ys, xs: `_axis_points` of the y and the x axis, [K, PH, max G_y] and [K, PW, max G_x].
        image: LongTensor[K] batch index of each RoI.
        gy, gx: LongTensor[K] points per bin of each RoI along y and x.

    Returns:
        as `_uniform_points`, with the point count of each point's bin FloatTensor[S].
    """
    k, ph, ny = ys[0].shape
    pw, nx = xs[0].shape[1:]
    device = image.device
    points = gy * gx
    per_roi = points * (ph * pw)
    roi = torch.repeat_interleave(torch.arange(k, device=device), per_roi)
    local = torch.arange(roi.shape[0], device=device) - (torch.cumsum(per_roi, 0) - per_roi)[roi]
    per_bin, row_length = points[roi], gx[roi]
    cell = torch.div(local, per_bin, rounding_mode="floor")
    rest = local - cell * per_bin
    iy = torch.div(rest, row_length, rounding_mode="floor")
    ix = rest - iy * row_length
    py = torch.div(cell, pw, rounding_mode="floor")
    px = cell - py * pw
    yi = (roi * ph + py) * ny + iy
    xi = (roi * pw + px) * nx + ix
    y = tuple(t.flatten()[yi] for t in ys)
    x = tuple(t.flatten()[xi] for t in xs)
    count = per_bin.to(ys[2].dtype)
    return y, x, roi * (ph * pw) + cell, image[roi], count  # type: ignore[return-value]


def roi_align_weights(
    rois: Tensor,
    input_shape: tuple[int, int, int],
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """The sparse matrix of RoIAlign: `roi_align(x)` as [K*PH*PW, C] is `W.t() @ x` as [B*H*W, C].

    Args:
        rois: FloatTensor[K, 5] (batch index, x1, y1, x2, y2) in input pixels, in the dtype the
            weights should have; batch indices must lie in 0..B-1.
        input_shape: (B, H, W) of the feature map.
        output_size: (PH, PW) bins per RoI.
        spatial_scale, sampling_ratio, aligned: as for `roi_align`.

    Returns:
        W as a sparse CSR FloatTensor[B*H*W, K*PH*PW]: row b*H*W + y*W + x, column k*PH*PW +
        ph*PW + pw holds what pixel (b, y, x) contributes to bin (ph, pw) of RoI k (the bilinear
        weights of the bin's points, divided by their count). A row's non-zeros are in
        torchvision's order (RoI, bin, point, corner) and may repeat a column (several points of a
        bin on one pixel); points outside the map have no entry.
    """
    b, h, w = (int(v) for v in input_shape)
    ph, pw = output_size
    k = int(rois.shape[0])
    dtype, device = rois.dtype, rois.device
    rois = rois.detach()
    x0, y0, rw, rh = _roi_geometry(rois, spatial_scale, aligned)
    gy, gx = _point_grid(rh, ph, sampling_ratio), _point_grid(rw, pw, sampling_ratio)
    ys = _axis_points(y0, rh, ph, gy, h)
    xs = _axis_points(x0, rw, pw, gx, w)
    image = rois[:, 0].long()  # truncation, as torchvision's int conversion
    if k and bool((gy == gy[0]).all()) and bool((gx == gx[0]).all()):
        y, x, column, image, count = _uniform_points(ys, xs, image, (int(gy[0]), int(gx[0])))
    else:
        y, x, column, image, count = _ragged_points(ys, xs, image, gy, gx)
    y_low, y_high, wy_low, wy_high, y_valid = y
    x_low, x_high, wx_low, wx_high, x_valid = x
    row_low = (image * h + y_low) * w
    row_high = (image * h + y_high) * w
    # the four corners of each point, in torchvision's order
    pixels = torch.stack([row_low + x_low, row_low + x_high, row_high + x_low, row_high + x_high], dim=1)
    corners = [wy_low * wx_low, wy_low * wx_high, wy_high * wx_low, wy_high * wx_high]
    values = torch.stack(corners, dim=1) / (count[:, None] if count.dim() else count)
    keep = y_valid & x_valid
    if not bool(keep.all()):
        # points beyond one pixel outside the map add nothing (not even 0 * inf)
        index = keep.nonzero().squeeze(1)
        pixels, values, column = pixels[index], values[index], column[index]
    pixels, values = pixels.flatten(), values.flatten()
    columns = column.repeat_interleave(4)

    # CSR: the non-zeros sorted by pixel; a stable sort keeps torchvision's summation order
    n_rows, n_cols = b * h * w, k * ph * pw
    small = max(n_rows, n_cols, pixels.numel()) < 2**31
    index_dtype = torch.int32 if small else torch.long
    _, order = torch.sort(pixels.to(index_dtype), stable=True)
    crow = torch.zeros(n_rows + 1, dtype=torch.long, device=device)
    crow[1:] = torch.cumsum(torch.bincount(pixels, minlength=n_rows), 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(
            crow.to(index_dtype),
            columns[order].to(index_dtype),
            values[order],
            size=(n_rows, n_cols),
            dtype=dtype,
            device=device,
            check_invariants=False,
        )


def _sparse_backward(
    grad_output: Tensor,
    rois: Tensor,
    input_shape: tuple[int, int, int, int],
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """Input gradient of RoIAlign on the CPU: W @ grad_output channels-last, chunked over RoIs.

    Args:
        grad_output: FloatTensor[K, C, PH, PW].
        rois: FloatTensor[K, 5] of the forward.
        input_shape: (B, C, H, W) of the input.
        output_size, spatial_scale, sampling_ratio, aligned: those of the forward.

    Returns:
        FloatTensor[B, C, H, W], contiguous.
    """
    b, c, h, w = input_shape
    ph, pw = output_size
    k = int(rois.shape[0])
    if k == 0 or b * c * h * w == 0:
        return grad_output.new_zeros((b, c, h, w))
    out: Tensor | None = None
    bounds = _chunk_bounds(rois, output_size, spatial_scale, sampling_ratio, aligned)
    for first, last in itertools.pairwise(bounds):
        weights = roi_align_weights(rois[first:last], (b, h, w), output_size, spatial_scale, sampling_ratio, aligned)
        rows = grad_output[first:last].permute(0, 2, 3, 1).reshape((last - first) * ph * pw, c)
        if out is None:
            out = torch.sparse.mm(weights, rows)
        else:
            out.addmm_(weights, rows)
    assert out is not None
    # channels-last [B*H*W, C] -> [B, C, H, W]: one 2-D transposed copy per image (torch copies a
    # transposed matrix block-wise, several times faster than a 4-D permuted copy)
    grad_input = grad_output.new_empty((b, c, h, w))
    per_image = out.view(b, h * w, c)
    for i in range(b):
        grad_input[i].view(c, h * w).copy_(per_image[i].t())
    return grad_input


def _chunk_bounds(
    rois: Tensor, output_size: tuple[int, int], spatial_scale: float, sampling_ratio: int, aligned: bool
) -> list[int]:
    """Boundaries 0 = k_0 < k_1 < ... = K of RoI chunks of at most `_CHUNK_NONZEROS` non-zeros of W.

    A chunk holds at least one RoI; the point grids are those of `roi_align_weights`.
    """
    k = int(rois.shape[0])
    ph, pw = output_size
    _, _, width, height = _roi_geometry(rois.detach(), spatial_scale, aligned)
    per_roi = 4 * ph * pw * _point_grid(height, ph, sampling_ratio) * _point_grid(width, pw, sampling_ratio)
    total = torch.cumsum(per_roi.cpu(), 0)
    if k == 0 or int(total[-1]) <= _CHUNK_NONZEROS:
        return [0, k]
    bounds = [0]
    while bounds[-1] < k:
        start = bounds[-1]
        before = int(total[start - 1]) if start else 0
        # the last RoI whose running total stays within the budget, at least one RoI
        end = int(torch.searchsorted(total, before + _CHUNK_NONZEROS, right=True))
        bounds.append(max(end, start + 1))
    return bounds


class _RoIAlignFunction(torch.autograd.Function):
    """torchvision's `roi_align` operator with the sparse CPU backward."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        input: Tensor,
        rois: Tensor,
        spatial_scale: float,
        pooled_height: int,
        pooled_width: int,
        sampling_ratio: int,
        aligned: bool,
    ) -> Tensor:
        ctx.save_for_backward(rois)
        ctx.input_shape = tuple(int(v) for v in input.shape)  # type: ignore[attr-defined]
        ctx.settings = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)  # type: ignore[attr-defined]
        with torch.no_grad():
            return torch.ops.torchvision.roi_align(
                input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned
            )

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        (rois,) = ctx.saved_tensors
        spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = ctx.settings
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        if grad_output.device.type == "cpu" and grad_output.dtype in _FAST_DTYPES and rois.dtype == grad_output.dtype:
            # a backward called under autocast must not run the product in bfloat16
            with torch.autocast("cpu", enabled=False):
                grad_input = _sparse_backward(
                    grad_output,
                    rois,
                    ctx.input_shape,
                    (pooled_height, pooled_width),
                    spatial_scale,
                    sampling_ratio,
                    aligned,
                )
        else:
            b, c, h, w = ctx.input_shape
            grad_input = torch.ops.torchvision._roi_align_backward(
                grad_output, rois, spatial_scale, pooled_height, pooled_width, b, c, h, w, sampling_ratio, aligned
            )
        return grad_input, None, None, None, None, None, None


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for the device type (torchvision then pools in float32)."""
    return device_type in ("cpu", "cuda", "xpu") and torch.is_autocast_enabled(device_type)


def roi_align(
    input: Tensor,
    boxes: Tensor | list[Tensor],
    output_size: int | tuple[int, int] | list[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign (Mask R-CNN) with torchvision's semantics; a sparse matrix product as CPU backward.

    Args:
        input: FloatTensor[B, C, H, W].
        boxes: Tensor[K, 5] (batch index, x1, y1, x2, y2), or a list of Tensor[K_i, 4] (x1, y1,
            x2, y2), one per image, in input pixels before `spatial_scale`.
        output_size: bins per RoI, an int or (height, width).
        spatial_scale: map pixels per box unit (1 / stride).
        sampling_ratio: points per bin along each axis; <= 0 = adaptive, ceil(RoI extent / bins)
            per RoI and axis.
        aligned: shift the boxes by half a pixel (Detectron2's RoIAlignV2); False is the legacy
            geometry of Mask R-CNN (RoI extents clamped to at least one pixel).

    Returns:
        FloatTensor[K, C, output_size[0], output_size[1]], equal to `torchvision.ops.roi_align`,
        differentiable with respect to `input` once (boxes receive no gradient).

    Raises:
        ValueError: for boxes of the wrong shape or, on the CPU, batch indices outside 0..B-1.
    """
    out_h, out_w = _pair(output_size)
    rois = _to_rois(boxes, input)
    if input.device.type != "cpu" or input.is_quantized:
        # torchvision's own path (its deterministic CUDA fallback, quantised kernels, ...)
        return torchvision.ops.roi_align(input, rois, (out_h, out_w), spatial_scale, sampling_ratio, aligned)
    if rois.shape[0]:
        index = rois[:, 0].detach().long()
        if int(index.min()) < 0 or int(index.max()) >= input.shape[0]:
            raise ValueError(
                f"roi_align: RoI batch indices {int(index.min())}..{int(index.max())} outside 0..{input.shape[0] - 1}"
            )
    args = (float(spatial_scale), out_h, out_w, int(sampling_ratio), bool(aligned))
    if _autocast_on(input.device.type):
        # torchvision's autocast rule: pool in float32 (float64 stays), return the input's dtype
        cast_input = input.float() if input.dtype != torch.float64 else input
        cast_rois = rois.float() if rois.dtype != torch.float64 else rois
        with torch.autocast(input.device.type, enabled=False):
            pooled = _RoIAlignFunction.apply(cast_input, cast_rois, *args)
        return pooled.to(input.dtype)
    return _RoIAlignFunction.apply(input, rois, *args)


class MultiScaleRoIAlign(torchvision.ops.MultiScaleRoIAlign):
    """torchvision's `MultiScaleRoIAlign` pooling every level with this module's `roi_align`.

    Same constructor, attributes and level mapping (FPN Eq. 1 with canonical scale 224 and level
    4 by default, scales inferred from the feature sizes on the first call), reused from
    torchvision; only the per-level pooling differs, so its CPU backward is the sparse product.
    """

    scales: list[float] | None
    map_levels: Any  # torchvision's LevelMapper

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """Pool each box from its pyramid level.

        Args:
            x: feature maps {name: FloatTensor[B, C, H_l, W_l]}; those in `featmap_names` are
                used, in the dict's order (fine to coarse).
            boxes: per image FloatTensor[K_i, 4] (x1, y1, x2, y2) in input pixels.
            image_shapes: (height, width) of each image before the backbone (the scales are
                inferred from the largest).

        Returns:
            FloatTensor[sum K_i, C, PH, PW], the RoIs of all images in order.
        """
        levels_in = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                levels_in, image_shapes, self.canonical_scale, self.canonical_level
            )
        scales, mapper = self.scales, self.map_levels
        rois = _to_rois(list(boxes), levels_in[0])
        if len(levels_in) == 1:
            return roi_align(levels_in[0], rois, self.output_size, scales[0], self.sampling_ratio)
        levels = mapper(boxes)
        first = levels_in[0]
        result = first.new_zeros((rois.shape[0], first.shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(levels_in, scales, strict=True)):
            index = torch.where(levels == level)[0]
            pooled = roi_align(feature, rois[index], self.output_size, scale, self.sampling_ratio)
            # levels may differ in dtype under autocast; the result takes the first level's
            result[index] = pooled.to(result.dtype)
        return result
