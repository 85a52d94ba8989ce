"""RoIUpsample (AUNet, Li et al. 2019, Sec. 3.3.2): per-RoI m x m features written back into a feature map.

The layer inverts bilinear RoIAlign (torchvision's `roi_align` geometry: bins, `sampling_ratio`
points per bin axis, the half-pixel `aligned` offset, samples beyond one pixel outside the map
dropped, clamping at the borders). Each bin value is split equally among its sampling points
("one quarter" for 2 x 2 points, Eq. 5) and each point spreads its share over its four
neighbouring pixels with the bilinear weights, divided by `value_x * value_y` where
`value = l^2 + (1 - l)^2` for the point's fractional offset `l` along that axis (Eq. 6). Without
that division (`normalize=False`) the layer is exactly the adjoint of `roi_align`:
<roi_align(x), y> = <x, roi_upsample(y)>. Overlapping RoIs add up; pixels no RoI reaches stay 0
(the paper's "zero padding for vacant areas").

Why separable matrices: the weight of a point factorises into a y part and an x part, and a bin's
point count is the product of the per-axis counts, so one RoI's contribution is
`Ly^T @ Y_c @ Lx` with `Ly` FloatTensor[m_h, n_y] and `Lx` FloatTensor[m_w, n_x] over the RoI's
pixel window (n_y x n_x). Two batched matrix products compute every RoI's window at once; one
`index_add_` per chunk of RoIs sums the windows into the map. No per-sample scatter, and autograd derives the
backward (a gather of windows and the transposed matmuls), which is RoIAlign with the same weights.

`fpn_levels` assigns RoIs to pyramid levels as torchvision's `LevelMapper` (FPN Eq. 1), and
`multiscale_roi_upsample` writes each RoI into the level `MultiScaleRoIAlign` pooled it from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["fpn_levels", "infer_scale", "multiscale_roi_upsample", "roi_upsample"]

_CHUNK_ELEMENTS = 1 << 24
"""Upper bound on the elements of one chunk's intermediate FloatTensor[k, n_y, max(n_x, m_w), C]
(64 MiB in float32): RoIs much larger than their level (a single-level use) are then processed a
few at a time."""


def _axis_weights(
    start: Tensor, length: Tensor, bins: int, grid: Tensor, size: int, normalize: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-RoI interpolation matrices along one axis.

    Args:
        start: FloatTensor[K] RoI start on this axis in map pixels (after scale and offset).
        length: FloatTensor[K] RoI extent on this axis (already clamped to >= 1 when not aligned).
        bins: output bins of RoIAlign along this axis (m).
        grid: LongTensor[K] sampling points per bin along this axis (0 = no point).
        size: the map's extent along this axis (H or W).
        normalize: divide each point's weights by l^2 + (1 - l)^2 (Eq. 6).

    Returns:
        weights FloatTensor[K, bins, n]: entry [k, p, j] is what bin p of RoI k adds to pixel
        offset[k] + j, already divided by the point count of the axis; offset LongTensor[K];
        extent LongTensor[K] the number of pixels RoI k touches from its offset (0 when none).
    """
    k = start.shape[0]
    dtype, device = start.dtype, start.device
    points = max(int(grid.max()) if k else 1, 1)
    bin_size = length / bins
    p = torch.arange(bins, device=device, dtype=dtype).view(1, bins, 1)
    i = torch.arange(points, device=device, dtype=dtype).view(1, 1, points)
    g = grid.clamp(min=1).to(dtype).view(k, 1, 1)
    # torchvision's order of operations: start + p * bin + (i + 0.5) * bin / grid
    pos = start.view(k, 1, 1) + p * bin_size.view(k, 1, 1) + (i + 0.5) * bin_size.view(k, 1, 1) / g
    valid = (i < grid.view(k, 1, 1)) & (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0)
    low = pos.floor().long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(pos), pos - low.to(dtype))
    w_low, w_high = 1 - frac, frac
    if normalize:
        value = frac * frac + w_low * w_low
        w_low, w_high = w_low / value, w_high / value
    share = valid.to(dtype) / g
    w_low, w_high = w_low * share, w_high * share
    big = torch.iinfo(torch.long).max
    offset = torch.where(valid, low, torch.full_like(low, big)).flatten(1).amin(dim=1)
    last = torch.where(valid, high, torch.full_like(high, -1)).flatten(1).amax(dim=1)
    any_valid = valid.flatten(1).any(dim=1)
    offset = torch.where(any_valid, offset, torch.zeros_like(offset))
    extent = torch.where(any_valid, last - offset + 1, torch.zeros_like(offset))
    n = max(int(extent.max()) if k else 0, 1)
    rel_low = torch.where(valid, low - offset.view(k, 1, 1), torch.zeros_like(low))
    rel_high = torch.where(valid, high - offset.view(k, 1, 1), torch.zeros_like(high))
    weights = torch.zeros(k, bins, n, dtype=dtype, device=device)
    weights.scatter_add_(2, rel_low, w_low)
    weights.scatter_add_(2, rel_high, w_high)
    return weights, offset, extent


def _round_up(n: int) -> int:
    """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and 1.5 x them) that is >= n."""
    p = 1
    while p < n:
        if p >= 2 and p * 3 // 2 >= n:
            return p * 3 // 2
        p *= 2
    return p


def roi_upsample(
    features: Tensor,
    rois: Tensor,
    output_size: tuple[int, int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool = False,
    normalize: bool = True,
) -> Tensor:
    """Write per-RoI features back into a batch of maps (the inverse of `torchvision.ops.roi_align`).

    Args:
        features: FloatTensor[K, C, m_h, m_w], one RoIAlign output per RoI (e.g. mask features).
        rois: FloatTensor[K, 5] (batch index, x0, y0, x1, y1) in input pixels, as `roi_align`
            takes them; treated as constants (no gradient).
        output_size: (B, H, W) of the map.
        spatial_scale: map pixels per input pixel (1 / stride).
        sampling_ratio: points per bin along each axis; 0 = adaptive, ceil(RoI extent / bins)
            per RoI (torchvision's rule).
        aligned: the half-pixel offset of `roi_align(aligned=True)`; False is the geometry of
            torchvision's `MultiScaleRoIAlign` (Mask R-CNN).
        normalize: divide by value_x * value_y (the paper's Eq. 6); False gives the exact adjoint
            of `roi_align`.

    Returns:
        FloatTensor[B, C, H, W] in the dtype and on the device of `features`; differentiable
        with respect to `features`.

    Raises:
        ValueError: for mismatched shapes, a negative sampling ratio or a batch index outside 0..B-1.
    """
    b, h, w = (int(v) for v in output_size)
    if features.dim() != 4:
        raise ValueError(f"roi_upsample: features must be FloatTensor[K, C, m, m], got shape {tuple(features.shape)}")
    if rois.dim() != 2 or rois.shape[1] != 5 or rois.shape[0] != features.shape[0]:
        raise ValueError(
            f"roi_upsample: rois must be FloatTensor[{features.shape[0]}, 5] (batch index, x0, y0, x1, y1), "
            f"got shape {tuple(rois.shape)}"
        )
    if sampling_ratio < 0:
        raise ValueError(f"roi_upsample: sampling_ratio must be >= 0, got {sampling_ratio}")
    k, c, mh, mw = (int(v) for v in features.shape)
    out = features.new_zeros((b * h * w + 1, c))  # the last row takes the window cells outside the map
    if k == 0:
        # keep a gradient path to the (empty) features so that callers can always backpropagate
        return (out[:-1] + features.sum()).view(b, h, w, c).permute(0, 3, 1, 2)
    rois = rois.detach().to(features.dtype)
    index = rois[:, 0].round().long()
    if int(index.min()) < 0 or int(index.max()) >= b:
        raise ValueError(f"roi_upsample: RoI batch indices {int(index.min())}..{int(index.max())} outside 0..{b - 1}")
    offset = 0.5 if aligned else 0.0
    x0 = rois[:, 1] * spatial_scale - offset
    y0 = rois[:, 2] * spatial_scale - offset
    rw = rois[:, 3] * spatial_scale - offset - x0
    rh = rois[:, 4] * spatial_scale - offset - y0
    if not aligned:
        rw, rh = rw.clamp(min=1.0), rh.clamp(min=1.0)
    if sampling_ratio > 0:
        gy = torch.full((k,), sampling_ratio, dtype=torch.long, device=features.device)
        gx = gy
    else:
        gy, gx = torch.ceil(rh / mh).long(), torch.ceil(rw / mw).long()
    wy, oy, ny = _axis_weights(y0, rh, mh, gy, h, normalize)
    wx, ox, nx = _axis_weights(x0, rw, mw, gx, w, normalize)
    device = features.device
    # RoIs grouped by window size (rounded up to 1, 2, 3, 4, 6, 8, 12, ...): a group pads its
    # windows by less than 1.5x per axis, where one padded batch of all RoIs would pay for the
    # tallest and the widest window at once; groups are split to bound their intermediates
    groups: dict[tuple[int, int], list[int]] = {}
    for j, (ey, ex) in enumerate(zip(ny.tolist(), nx.tolist(), strict=True)):
        key = (min(_round_up(ey), int(wy.shape[2])), min(_round_up(ex), int(wx.shape[2])))
        groups.setdefault(key, []).append(j)
    # one copy of the features, channels last and in group order: both products then run over
    # contiguous C-wide rows, every chunk is a slice, and the windows come out in `out`'s layout
    chunks: list[tuple[int, int, list[int]]] = []
    for (cy, cx), members in groups.items():
        step = max(1, _CHUNK_ELEMENTS // (c * cy * max(cx, mw)))
        chunks += [(cy, cx, members[first : first + step]) for first in range(0, len(members), step)]
    perm = torch.tensor([j for _, _, members in chunks for j in members], device=device)
    values = features.index_select(0, perm).permute(0, 2, 3, 1).contiguous()
    # one split (its backward is one concatenation), not a slice per chunk (whose backward would
    # each write a zero tensor of the whole input)
    pieces = values.split([len(members) for _, _, members in chunks])
    for (cy, cx, members), piece in zip(chunks, pieces, strict=True):
        sel = torch.tensor(members, device=device)
        n = len(members)
        ly, lx = wy[sel, :, :cy], wx[sel, :, :cx]
        # rows: [n, cy, m_h] @ [n, m_h, m_w * C]; columns: [n, 1, cx, m_w] @ [n, cy, m_w, C]
        rows_done = torch.bmm(ly.transpose(1, 2), piece.reshape(n, mh, mw * c)).view(n, cy, mw, c)
        windows = torch.matmul(lx.transpose(1, 2).unsqueeze(1), rows_done)
        rows = oy[sel].view(-1, 1, 1) + torch.arange(cy, device=device).view(1, cy, 1)
        cols = ox[sel].view(-1, 1, 1) + torch.arange(cx, device=device).view(1, 1, cx)
        flat = (index[sel].view(-1, 1, 1) * h + rows) * w + cols
        flat = torch.where((rows < h) & (cols < w), flat, torch.full_like(flat, b * h * w))
        out.index_add_(0, flat.flatten(), windows.reshape(-1, c))
    return out[:-1].view(b, h, w, c).permute(0, 3, 1, 2)


def fpn_levels(
    boxes: Tensor, k_min: int = 2, k_max: int = 5, canonical_scale: int = 224, canonical_level: int = 4
) -> Tensor:
    """The FPN level of each box (FPN Eq. 1), exactly as torchvision's `LevelMapper`.

    Args:
        boxes: FloatTensor[K, 4] xyxy in input pixels.
        k_min: finest level (2 for P2).
        k_max: coarsest level.
        canonical_scale: box size (sqrt of the area) mapped to `canonical_level`.
        canonical_level: that level.

    Returns:
        LongTensor[K] levels in k_min..k_max.
    """
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    s = torch.sqrt(area)
    level = torch.floor(canonical_level + torch.log2(s / canonical_scale) + torch.tensor(1e-6, dtype=s.dtype))
    return level.clamp(min=k_min, max=k_max).to(torch.int64)


def infer_scale(level_size: tuple[int, int], padded_size: tuple[int, int]) -> float:
    """A level's spatial scale as `MultiScaleRoIAlign` infers it: the nearest power of two of h / Hp."""
    return float(2 ** round(math.log2(level_size[0] / padded_size[0])))


def multiscale_roi_upsample(
    features: Tensor,
    boxes: Sequence[Tensor],
    level_shapes: Sequence[tuple[int, int]],
    padded_size: tuple[int, int],
    sampling_ratio: int,
    aligned: bool = False,
    normalize: bool = True,
    canonical_scale: int = 224,
    canonical_level: int = 4,
) -> list[Tensor]:
    """RoIUpsample of every RoI into the pyramid level `MultiScaleRoIAlign` would pool it from.

    Args:
        features: FloatTensor[sum K_i, C, m, m], the RoIs of all images in order.
        boxes: per image FloatTensor[K_i, 4] xyxy in input pixels.
        level_shapes: (H_l, W_l) of each level, fine to coarse (P2..P5: strides 4..32).
        padded_size: (Hp, Wp) of the padded batch (the levels' scales derive from it, as the
            pooler's do).
        sampling_ratio, aligned, normalize: see `roi_upsample` (the pooler's values).
        canonical_scale, canonical_level: the pooler's level mapping (Mask R-CNN: 224, 4).

    Returns:
        per level FloatTensor[B, C, H_l, W_l]; a level no RoI maps to is all zeros (still
        differentiable with respect to `features`).
    """
    b = len(boxes)
    scales = [infer_scale(shape, padded_size) for shape in level_shapes]
    k_min, k_max = round(-math.log2(scales[0])), round(-math.log2(scales[-1]))
    all_boxes = torch.cat([bx.detach().to(features.dtype) for bx in boxes]) if b else features.new_zeros((0, 4))
    if all_boxes.shape[0] != features.shape[0]:
        raise ValueError(f"multiscale_roi_upsample: {all_boxes.shape[0]} boxes for {features.shape[0]} RoI features")
    image_index = torch.cat(
        [torch.full((int(bx.shape[0]),), i, dtype=features.dtype, device=features.device) for i, bx in enumerate(boxes)]
    )
    rois = torch.cat([image_index[:, None], all_boxes], dim=1)
    levels = fpn_levels(all_boxes, k_min, k_max, canonical_scale, canonical_level)
    # RoIs in level order, then one split: one gather in the backward, not one per level
    order = torch.argsort(levels, stable=True)
    counts = torch.bincount(levels - k_min, minlength=len(level_shapes)).tolist()
    per_level = features.index_select(0, order).split(counts)
    rois_per_level = rois[order].split(counts)
    maps = []
    for shape, scale, level_features, level_rois in zip(level_shapes, scales, per_level, rois_per_level, strict=True):
        maps.append(
            roi_upsample(
                level_features,
                level_rois,
                (b, int(shape[0]), int(shape[1])),
                scale,
                sampling_ratio,
                aligned=aligned,
                normalize=normalize,
            )
        )
    return maps
