"""Builders shared by the model tests (imported as `helpers`: conftest.py puts tests/ on sys.path)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import replace

import torch

from unipan.data.collate import collate
from unipan.data.synthetic import SyntheticPanoptic, SynthOptions
from unipan.data.transforms import Normalize
from unipan.structures import Batch, DatasetMeta, PanopticTarget, masks_to_boxes


def synth_batch(n: int, size: tuple[int, int] = (64, 64), seed: int = 0, **opts: object) -> tuple[Batch, DatasetMeta]:
    """A collated batch of `n` synthetic images (normalised) and their metadata."""
    ds = SyntheticPanoptic(n, seed=seed, opts=SynthOptions(size=size, **opts), transform=Normalize())  # type: ignore[arg-type]
    return collate([ds[i] for i in range(n)]), ds.meta


def tight_crops(masks: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """BoolTensor[N, H, W] -> their tight boxes and each mask cropped to its box (`RawPrediction.mask_crops`)."""
    boxes = masks_to_boxes(masks)
    return boxes, [m[y0:y1, x0:x1] for m, (x0, y0, x1, y1) in zip(masks, boxes.long().tolist(), strict=True)]


def stuff_only(batch: Batch, meta: DatasetMeta, index: int) -> Batch:
    """`batch` with image `index`'s things relabelled as void: a target with zero instances."""
    assert batch.targets is not None
    t = batch.targets[index]
    keep = [s for s in t.segments if not s.isthing]
    kept_ids = torch.tensor([s.id for s in keep], dtype=torch.int32)
    panoptic = torch.where(torch.isin(t.panoptic, kept_ids), t.panoptic, torch.zeros_like(t.panoptic))
    empty = PanopticTarget.from_panoptic(panoptic, keep, meta, image_id=t.image_id)
    assert len(empty) == 0
    targets = list(batch.targets)
    targets[index] = empty
    return replace(batch, targets=targets)


def roi_align_points(
    roi: Sequence[float], size: tuple[int, int], bins: tuple[int, int], scale: float, ratio: int, aligned: bool
) -> Iterator[tuple[int, int, list[tuple[int, int, float]], int]]:
    """RoIAlign's sampling points of one RoI, written with Python loops from torchvision's CPU kernel.

    The naive reference that RoIAlign's and RoIUpsample's tests build on.

    Args:
        roi: (batch index, x1, y1, x2, y2) in input pixels.
        size: (H, W) of the feature map.
        bins: (PH, PW) output bins.
        scale: map pixels per input pixel.
        ratio: sampling points per bin axis; <= 0 is adaptive (ceil(RoI extent / bins)).
        aligned: the half-pixel offset of RoIAlignV2 (else RoI extents are clamped to >= 1).

    Yields:
        For every point inside the map (within one pixel of it): its bin (row, column), its four
        bilinear corners (y, x, weight) and the number of points of its bin.
    """
    h, w = size
    ph, pw = bins
    off = 0.5 if aligned else 0.0
    _, x1, y1, x2, y2 = (float(v) for v in roi)
    sx, sy = x1 * scale - off, y1 * scale - off
    rw, rh = x2 * scale - off - sx, y2 * scale - off - sy
    if not aligned:
        rw, rh = max(rw, 1.0), max(rh, 1.0)
    gh = ratio if ratio > 0 else math.ceil(rh / ph)
    gw = ratio if ratio > 0 else math.ceil(rw / pw)
    for p, q, iy, ix in itertools.product(range(ph), range(pw), range(max(gh, 0)), range(max(gw, 0))):
        yy = sy + p * (rh / ph) + (iy + 0.5) * (rh / ph) / gh
        xx = sx + q * (rw / pw) + (ix + 0.5) * (rw / pw) / gw
        if yy < -1 or yy > h or xx < -1 or xx > w:
            continue
        yy, xx = max(yy, 0.0), max(xx, 0.0)
        yl, xl = int(yy), int(xx)
        if yl >= h - 1:
            yl = yh = h - 1
            yy = float(yl)
        else:
            yh = yl + 1
        if xl >= w - 1:
            xl = xh = w - 1
            xx = float(xl)
        else:
            xh = xl + 1
        ly, lx = yy - yl, xx - xl
        corners = [(yl, xl, (1 - ly) * (1 - lx)), (yl, xh, (1 - ly) * lx), (yh, xl, ly * (1 - lx)), (yh, xh, ly * lx)]
        yield p, q, corners, gh * gw
