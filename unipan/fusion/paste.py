"""Paste RoI masks (probabilities or logits) into their boxes, one pixel window per box.

An R-CNN mask head predicts an M x M grid (M = 28) for each detected box; fusion needs the mask at
image resolution. Pasting every mask into a full H x W canvas costs N x H x W memory and time
(100 instances on 1024 x 2048 = 200 M pixels), although each mask lives inside its box. The
functions here return only the pasted window of each box with its position in the image, so
callers work on `sum(box areas)` pixels.

Two geometries:

- ``"aligned"`` (default; detectron2's ``paste_masks_in_image``, the Panoptic FPN reference): the
  M x M grid covers the float box exactly; pixel ``x`` (centre ``x + 0.5``) samples the grid at
  ``u = (x + 0.5 - x0) / (x1 - x0) * M - 0.5`` with bilinear weights. ``outside="zero"`` treats
  the grid as zero beyond its border (right for probabilities; detectron2's ``grid_sample`` with
  zero padding) and pastes into the box's pixels plus one pixel of margin (detectron2's window);
  ``outside="edge"`` clamps to the border cells (right for logits, where 0 is not "background")
  and pastes into the pixels whose centres lie inside the box.
- ``"torchvision"``: torchvision's / maskrcnn-benchmark's ``paste_masks_in_image``: the grid is
  padded by one zero cell, the box enlarged by (M + 2) / M about its centre and truncated to
  integer pixels, and the padded grid resized to the integer box with ``F.interpolate``. Kept for
  exact comparisons with torchvision models; its integer snapping shifts masks by up to a pixel.

The aligned geometry is computed as two small matrix products per box, ``Wy @ mask @ Wx.T``,
with the bilinear weights ``Wy`` (rows of the window x M) and ``Wx`` built for all boxes at once:
bilinear interpolation is separable, so this equals ``grid_sample`` up to float rounding.

For logits on the pixels whose centres lie inside each box (UPSNet's panoptic head, training and
inference): `box_pixel_windows`, `paste_mask_logits` (differentiable) and `crop_full_mask_logits`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

PasteMode = Literal["aligned", "torchvision"]
Outside = Literal["zero", "edge"]
Window = tuple[int, int, int, int]
"""(y0, y1, x0, x1): the pasted rows y0..y1-1 and columns x0..x1-1 of the image."""


def _as_boxes(boxes: Tensor | Sequence[float], n_masks: int) -> Tensor:
    boxes_t = torch.as_tensor(boxes)
    if boxes_t.dim() == 1:
        boxes_t = boxes_t[None]
    if boxes_t.dim() != 2 or boxes_t.shape[1] != 4:
        raise ValueError(f"boxes must have shape [N, 4] (xyxy), got {tuple(boxes_t.shape)}")
    if boxes_t.shape[0] != n_masks:
        raise ValueError(f"{n_masks} masks but {boxes_t.shape[0]} boxes")
    if not torch.isfinite(boxes_t).all():
        bad = torch.nonzero(~torch.isfinite(boxes_t).all(dim=1)).flatten().tolist()
        raise ValueError(f"boxes {bad[:10]} have non-finite coordinates")
    return boxes_t


def _check_masks(masks: Tensor) -> None:
    if masks.dim() != 3:
        raise ValueError(f"masks must have shape [N, M, M], got {tuple(masks.shape)}")
    if not masks.is_floating_point():
        raise ValueError(f"masks must be floating point (probabilities or logits), got {masks.dtype}")


def box_windows(
    boxes: Tensor,
    image_size: tuple[int, int],
    mode: PasteMode = "aligned",
    outside: Outside = "zero",
    mask_size: int = 28,
) -> Tensor:
    """Pixel windows that `paste_masks_in_boxes` fills, clipped to the image.

    Args:
        boxes: FloatTensor[N, 4] xyxy boxes in pixels (x1, y1 are the right/bottom pixel edges).
        image_size: (h, w) of the image the masks are pasted into.
        mode: "aligned" or "torchvision" (see the module docstring).
        outside: "zero" or "edge" ("aligned" mode only).
        mask_size: M, the mask grid size ("torchvision" mode enlarges boxes by (M + 2) / M).

    Returns:
        LongTensor[N, 4] (y0, y1, x0, x1) per box; y1 <= y0 or x1 <= x0 means an empty window
        (box outside the image or degenerate).
    """
    h, w = image_size
    boxes = boxes.to(torch.float64) if mode == "aligned" else boxes
    if mode == "aligned":
        x0, y0, x1, y1 = boxes.unbind(dim=1)
        degenerate = (x1 <= x0) | (y1 <= y0)
        if outside == "zero":
            # detectron2's window: one pixel of margin around the box, where the bilinear ramp to
            # the zero border still gives values up to half the border cell.
            lo_x, hi_x = x0.floor() - 1, x1.ceil() + 1
            lo_y, hi_y = y0.floor() - 1, y1.ceil() + 1
        elif outside == "edge":
            # pixels whose centres lie in [x0, x1)
            lo_x, hi_x = (x0 - 0.5).ceil(), (x1 - 0.5).ceil()
            lo_y, hi_y = (y0 - 0.5).ceil(), (y1 - 0.5).ceil()
        else:
            raise ValueError(f"outside must be 'zero' or 'edge', got {outside!r}")
        win = torch.stack([lo_y.clamp(0, h), hi_y.clamp(0, h), lo_x.clamp(0, w), hi_x.clamp(0, w)], dim=1).long()
        win[degenerate] = 0
        return win
    if mode == "torchvision":
        exp = _torchvision_expanded_boxes(boxes, mask_size)
        x0, y0, x1, y1 = exp.unbind(dim=1)
        return torch.stack([y0.clamp(0, h), (y1 + 1).clamp(0, h), x0.clamp(0, w), (x1 + 1).clamp(0, w)], dim=1)
    raise ValueError(f"mode must be 'aligned' or 'torchvision', got {mode!r}")


def _torchvision_expanded_boxes(boxes: Tensor, mask_size: int) -> Tensor:
    """Torchvision's `expand_boxes` for one cell of padding, then truncation to int64."""
    scale = float(mask_size + 2) / mask_size
    # Same float32 operations in the same order as torchvision, so the integer boxes agree.
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    w_half = w_half * scale
    h_half = h_half * scale
    exp = torch.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], dim=1)
    return exp.to(torch.int64)


def _bilinear_weights(
    lo: Tensor,
    hi: Tensor,
    b0: Tensor,
    b1: Tensor,
    grid: int,
    outside: Outside,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Bilinear weights of all windows along one axis, stacked.

    Args:
        lo: LongTensor[N] window start (pixels) per box.
        hi: LongTensor[N] window end (pixels) per box; hi <= lo gives no rows.
        b0: DoubleTensor[N] box start (pixel edge) per box.
        b1: DoubleTensor[N] box end (pixel edge) per box.
        grid: M, cells of the mask along this axis.
        outside: "zero" (cells beyond the grid are 0) or "edge" (clamp to the border cells).
        dtype: of the returned weights.
        device: of the returned weights (all inputs are CPU tensors).

    Returns:
        (weights, offsets): weights FloatTensor[L, M] with L = sum(max(hi - lo, 0)), rows of box i
        at offsets[i]:offsets[i + 1]; offsets LongTensor[N + 1].
    """
    lengths = (hi - lo).clamp(min=0)
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.long)
    torch.cumsum(lengths, dim=0, out=offsets[1:])
    total = int(offsets[-1])
    if total == 0:
        return torch.zeros((0, grid), dtype=dtype, device=device), offsets
    box_of_row = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    pixel = (torch.arange(total) - offsets[:-1][box_of_row] + lo[box_of_row]).to(torch.float64)
    u = (pixel + 0.5 - b0[box_of_row]) * (grid / (b1 - b0)[box_of_row]) - 0.5
    if outside == "edge":
        u = u.clamp(0, grid - 1)
    # The bilinear weight of cell c at position u is the hat max(0, 1 - |u - c|): 1 - frac on
    # floor(u), frac on floor(u) + 1, 0 elsewhere; cells beyond the grid are simply absent, i.e. 0.
    cells = torch.arange(grid, dtype=torch.float64)
    weights = (u[:, None] - cells).abs_().neg_().add_(1.0).clamp_(min=0.0)
    return weights.to(device=device, dtype=dtype), offsets


def paste_masks_in_boxes(
    masks: Tensor,
    boxes: Tensor,
    image_size: tuple[int, int],
    *,
    mode: PasteMode = "aligned",
    outside: Outside = "zero",
) -> list[tuple[Tensor, Window]]:
    """Paste N RoI masks into their boxes; return each box's pixel window only.

    Args:
        masks: FloatTensor[N, Mh, Mw] per-box mask probabilities or logits.
        boxes: FloatTensor[N, 4] xyxy boxes in the pixels of the target image.
        image_size: (h, w) of the target image; windows are clipped to it.
        mode: "aligned" (detectron2 geometry) or "torchvision" (see the module docstring).
        outside: "zero" or "edge" value of the mask beyond its grid ("aligned" only;
            "torchvision" always pads with one zero cell).

    Returns:
        Per box `(values, (y0, y1, x0, x1))`: values FloatTensor[y1 - y0, x1 - x0] (masks' dtype)
        are the pasted mask on image rows y0..y1-1 and columns x0..x1-1. Empty windows (boxes
        outside the image, degenerate boxes) give a [0, 0] tensor and y1 == y0.
    """
    return list(iter_paste_masks_in_boxes(masks, boxes, image_size, mode=mode, outside=outside))


def _aligned_weights(
    masks: Tensor, boxes: Tensor, image_size: tuple[int, int], outside: Outside
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The aligned paste's geometry for all boxes: windows and the bilinear weights of both axes.

    The geometry is a few small vectors, computed on the CPU in float64; the weights go where
    the masks are, in their dtype.

    Returns:
        (windows LongTensor[N, 4] with empty ones zeroed, wy, off_y, wx, off_x as
        `_bilinear_weights` gives them).
    """
    _, grid_h, grid_w = masks.shape
    boxes64 = boxes.detach().to(device="cpu", dtype=torch.float64)
    win = box_windows(boxes64, image_size, "aligned", outside)
    empty = (win[:, 1] <= win[:, 0]) | (win[:, 3] <= win[:, 2])
    win[empty] = 0  # an empty window contributes no weight rows on either axis
    wy, off_y = _bilinear_weights(
        win[:, 0], win[:, 1], boxes64[:, 1], boxes64[:, 3], grid_h, outside, masks.dtype, masks.device
    )
    wx, off_x = _bilinear_weights(
        win[:, 2], win[:, 3], boxes64[:, 0], boxes64[:, 2], grid_w, outside, masks.dtype, masks.device
    )
    return win, wy, off_y, wx, off_x


def iter_paste_masks_in_boxes(
    masks: Tensor,
    boxes: Tensor,
    image_size: tuple[int, int],
    *,
    mode: PasteMode = "aligned",
    outside: Outside = "zero",
) -> Iterator[tuple[Tensor, Window]]:
    """`paste_masks_in_boxes` one box at a time (so a consumer can start on the first boxes).

    The arguments are checked and the interpolation weights of all boxes computed on the first
    `next()`; each further step pastes one box.
    """
    _check_masks(masks)
    boxes = _as_boxes(boxes, masks.shape[0])
    if mode == "torchvision":
        yield from _paste_torchvision(masks, boxes, image_size)
        return
    if mode != "aligned":
        raise ValueError(f"mode must be 'aligned' or 'torchvision', got {mode!r}")
    n = masks.shape[0]
    if n == 0:
        return
    win, wy, off_y, wx, off_x = _aligned_weights(masks, boxes, image_size, outside)
    win_list = win.tolist()
    oy, ox = off_y.tolist(), off_x.tolist()
    for i in range(n):
        y0, y1, x0, x1 = win_list[i]
        if y1 <= y0:
            yield masks.new_zeros((0, 0)), (y0, y0, x0, x0)
            continue
        # (Wy @ mask) @ Wx.T: the bilinear resample of the grid, separable in y and x
        values = torch.mm(torch.mm(wy[oy[i] : oy[i + 1]], masks[i]), wx[ox[i] : ox[i + 1]].t())
        yield values, (y0, y1, x0, x1)


def iter_paste_masks_batched(
    masks: Tensor, boxes: Tensor, image_size: tuple[int, int], *, outside: Outside = "zero"
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """The aligned paste of `iter_paste_masks_in_boxes` for groups of boxes at once.

    Boxes are grouped by window size (the larger side rounded up to a power of two), each group
    padded to its largest window and pasted with two batched products, so N boxes cost a few
    calls instead of 2 N (and as many autograd nodes): what a training step that pastes hundreds
    of RoIs needs. Within a group, rows and columns beyond a box's own window are 0.

    Args:
        masks: FloatTensor[N, M, M'] (differentiable).
        boxes: FloatTensor[N, 4] xyxy in pixels (not differentiated).
        image_size: (h, w).
        outside: "zero" or "edge", as for `iter_paste_masks_in_boxes`.

    Yields:
        (index LongTensor[n] of the group's boxes, pasted FloatTensor[n, Hg, Wg], windows
        LongTensor[n, 4] (y0, y1, x0, x1) of those boxes); boxes with an empty window are left out.
    """
    _check_masks(masks)
    boxes = _as_boxes(boxes, masks.shape[0])
    if masks.shape[0] == 0:
        return
    win, wy, off_y, wx, off_x = _aligned_weights(masks, boxes, image_size, outside)
    heights, widths = win[:, 1] - win[:, 0], win[:, 3] - win[:, 2]
    nonempty = (heights > 0) & (widths > 0)
    side = torch.maximum(heights, widths).clamp(min=1)
    bucket = torch.ceil(torch.log2(side.to(torch.float64))).long()
    for b in torch.unique(bucket[nonempty]).tolist():
        index = torch.nonzero(nonempty & (bucket == b)).squeeze(1)
        hs, ws = heights[index], widths[index]
        hg, wg = int(hs.max()), int(ws.max())
        pad_y = _padded_rows(wy, off_y[index], hs, hg)
        pad_x = _padded_rows(wx, off_x[index], ws, wg)
        dev_index = index.to(masks.device)
        pasted = torch.bmm(torch.bmm(pad_y, masks[dev_index]), pad_x.transpose(1, 2))
        yield dev_index, pasted, win[index].to(masks.device)


def _padded_rows(weights: Tensor, starts: Tensor, lengths: Tensor, size: int) -> Tensor:
    """Rows starts[i] .. starts[i] + lengths[i] of `weights` [L, M] as FloatTensor[n, size, M], zero-padded."""
    n = int(starts.numel())
    out = weights.new_zeros((n, size, weights.shape[1]))
    total = int(lengths.sum())
    if total:
        owner = torch.repeat_interleave(torch.arange(n), lengths)
        first = torch.cumsum(lengths, 0) - lengths
        row = torch.arange(total) - first[owner]
        out[owner.to(weights.device), row.to(weights.device)] = weights[(starts[owner] + row).to(weights.device)]
    return out


def _paste_torchvision(masks: Tensor, boxes: Tensor, image_size: tuple[int, int]) -> list[tuple[Tensor, Window]]:
    h, w = image_size
    n, grid_h, grid_w = masks.shape
    if grid_h != grid_w:
        raise ValueError(f"torchvision mode needs square masks, got {grid_h} x {grid_w}")
    padded = F.pad(masks, (1, 1, 1, 1))
    exp = _torchvision_expanded_boxes(boxes, grid_w).tolist()
    out: list[tuple[Tensor, Window]] = []
    for i in range(n):
        bx0, by0, bx1, by1 = exp[i]
        box_w = max(bx1 - bx0 + 1, 1)
        box_h = max(by1 - by0 + 1, 1)
        x0, x1 = max(bx0, 0), min(bx1 + 1, w)
        y0, y1 = max(by0, 0), min(by1 + 1, h)
        if x1 <= x0 or y1 <= y0:
            out.append((masks.new_zeros((0, 0)), (y0, y0, x0, x0)))
            continue
        resized = F.interpolate(padded[i][None, None], size=(box_h, box_w), mode="bilinear", align_corners=False)
        out.append((resized[0, 0, y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0], (y0, y1, x0, x1)))
    return out


def paste_mask_in_box(
    mask: Tensor,
    box: Tensor | Sequence[float],
    image_size: tuple[int, int],
    *,
    mode: PasteMode = "aligned",
    outside: Outside = "zero",
) -> tuple[Tensor, Window]:
    """Paste one RoI mask into its box (see `paste_masks_in_boxes`).

    Args:
        mask: FloatTensor[Mh, Mw] mask probabilities or logits.
        box: xyxy box in pixels (4 floats or a FloatTensor[4]).
        image_size: (h, w) of the target image.
        mode: as in `paste_masks_in_boxes`.
        outside: as in `paste_masks_in_boxes`.

    Returns:
        (FloatTensor[y1 - y0, x1 - x0], (y0, y1, x0, x1)).
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape [M, M], got {tuple(mask.shape)}")
    box_t = torch.as_tensor(box, dtype=mask.dtype if mask.is_floating_point() else torch.float32)
    return paste_masks_in_boxes(mask[None], box_t.reshape(1, 4), image_size, mode=mode, outside=outside)[0]


def paste_masks_in_image(
    masks: Tensor,
    boxes: Tensor,
    image_size: tuple[int, int],
    *,
    mode: PasteMode = "aligned",
    outside: Outside = "zero",
) -> Tensor:
    """Full-image pasted masks (for mask AP and visualisation; fusion uses the windows).

    Args:
        masks: FloatTensor[N, Mh, Mw].
        boxes: FloatTensor[N, 4] xyxy.
        image_size: (h, w).
        mode: as in `paste_masks_in_boxes`.
        outside: as in `paste_masks_in_boxes`.

    Returns:
        FloatTensor[N, h, w], zero outside each window.
    """
    _check_masks(masks)
    h, w = image_size
    out = masks.new_zeros((masks.shape[0], h, w))
    for i, (values, (y0, y1, x0, x1)) in enumerate(
        paste_masks_in_boxes(masks, boxes, image_size, mode=mode, outside=outside)
    ):
        out[i, y0:y1, x0:x1] = values
    return out


# --- logits on box pixels (UPSNet's panoptic head: training and inference) ------------------------
def box_pixel_windows(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """The pixels whose centres lie inside each box, clipped to the image.

    The windows of `box_windows` with ``outside="edge"``, with a window that is empty along one
    axis made empty along both (so its crop is [0, 0]).

    Args:
        boxes: FloatTensor[N, 4] xyxy boxes in pixel-edge coordinates of a (h, w) map.
        size: (h, w) of that map.

    Returns:
        LongTensor[N, 4] (y0, y1, x0, x1): rows y0..y1-1 and columns x0..x1-1.
    """
    if boxes.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.long, device=boxes.device)
    win = box_windows(boxes, size, mode="aligned", outside="edge")
    empty = (win[:, 1] <= win[:, 0]) | (win[:, 3] <= win[:, 2])
    win[empty, 1] = win[empty, 0]
    win[empty, 3] = win[empty, 2]
    return win.to(boxes.device)


def paste_mask_logits(mask_logits: Tensor, boxes: Tensor, size: tuple[int, int]) -> list[Tensor]:
    """Bilinearly resample RoI mask logits onto the pixels of their boxes (differentiable).

    Each M x M grid spans its box edge to edge; pixels sample it at their centres, clamped to the
    border cells (``outside="edge"``: a logit of 0 is not background).

    Args:
        mask_logits: FloatTensor[N, M, M] (or [N, 1, M, M]) mask logits of each instance's class.
        boxes: FloatTensor[N, 4] xyxy boxes, in the pixel units of the target map.
        size: (h, w) of the target map.

    Returns:
        N tensors FloatTensor[y1 - y0, x1 - x0]: the logits on the windows of
        `box_pixel_windows(boxes, size)`.
    """
    if mask_logits.dim() == 4:
        mask_logits = mask_logits.squeeze(1)
    if mask_logits.dim() != 3 or mask_logits.shape[0] != boxes.shape[0]:
        raise ValueError(
            f"mask logits of shape {tuple(mask_logits.shape)} do not match {boxes.shape[0]} boxes (expected [N, M, M])"
        )
    if boxes.shape[0] == 0:
        return []
    windows = box_pixel_windows(boxes, size)
    pasted = paste_masks_in_boxes(mask_logits, boxes, size, outside="edge")
    crops: list[Tensor] = []
    for (values, _), (y0, y1, x0, x1) in zip(pasted, windows.tolist(), strict=True):
        crops.append(values if values.shape == (y1 - y0, x1 - x0) else mask_logits.new_zeros((y1 - y0, x1 - x0)))
    return crops


def crop_full_mask_logits(full_mask_logits: Tensor, windows: Tensor) -> list[Tensor]:
    """Cut image-sized mask logits down to their windows (values outside a box are never used).

    Args:
        full_mask_logits: FloatTensor[N, h, w].
        windows: LongTensor[N, 4] from `box_pixel_windows`.

    Returns:
        N tensors FloatTensor[y1 - y0, x1 - x0].
    """
    return [full_mask_logits[i, y0:y1, x0:x1] for i, (y0, y1, x0, x1) in enumerate(windows.tolist())]
