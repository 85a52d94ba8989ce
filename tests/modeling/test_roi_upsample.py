"""RoIUpsample against a naive loop, against torchvision's `roi_align` (its adjoint), and the paper's Eq. 5-6."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from helpers import roi_align_points
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import LevelMapper

from unipan.modeling.layers.roi_upsample import fpn_levels, multiscale_roi_upsample, roi_upsample


def naive_roi_upsample(
    y: Tensor,
    rois: Tensor,
    size: tuple[int, int, int],
    scale: float,
    ratio: int,
    aligned: bool,
    normalize: bool,
) -> Tensor:
    """The layer written as loops over RoIs, bins and sampling points (torchvision's geometry)."""
    b, h, w = size
    k, c, mh, mw = y.shape
    values = y.double().numpy()
    out = np.zeros((b, c, h, w))
    for r in range(k):
        n = int(rois[r, 0])
        for p, q, corners, count in roi_align_points(rois[r].tolist(), (h, w), (mh, mw), scale, ratio, aligned):
            # Eq. 6: the sum of the squared bilinear weights, (ly^2 + hy^2)(lx^2 + hx^2)
            norm = sum(wgt * wgt for _, _, wgt in corners) if normalize else 1.0
            v = values[r, :, p, q] / count / norm
            for yi, xi, wgt in corners:
                out[n, :, yi, xi] += v * wgt
    return torch.from_numpy(out)


def make_rois(seed: int, image_size: tuple[int, int], batch: int = 2, k: int = 5) -> Tensor:
    """Random boxes in input pixels, some crossing the border, one under a pixel, one degenerate."""
    g = torch.Generator().manual_seed(seed)
    hi, wi = image_size
    x0 = torch.rand(k, generator=g, dtype=torch.float64) * (wi + 8) - 6
    y0 = torch.rand(k, generator=g, dtype=torch.float64) * (hi + 8) - 6
    bw = torch.rand(k, generator=g, dtype=torch.float64) * wi * 0.8 + 0.3
    bh = torch.rand(k, generator=g, dtype=torch.float64) * hi * 0.8 + 0.3
    boxes = torch.stack([x0, y0, x0 + bw, y0 + bh], dim=1)
    boxes[0] = torch.tensor([2.2, 3.1, 2.6, 3.5])  # under one pixel
    boxes[1] = torch.tensor([5.0, 4.0, 5.0, 9.0])  # zero width
    index = torch.arange(k, dtype=torch.float64).remainder(batch)
    return torch.cat([index[:, None], boxes], dim=1)


CASES = [
    (aligned, ratio, scale, m, normalize)
    for aligned, ratio, scale, m, normalize in itertools.product(
        (False, True), (1, 2, 0), (1.0, 0.25, 1 / 32), (1, 2, 14), (False, True)
    )
    # m = 14 with the coarsest scale only: the loop reference is slow and the geometry is the same
    if m < 14 or scale == 1 / 32
]


# float32: sample positions exact in both precisions (boxes on a 1/16 px grid, 1 or 2 bins and
# points per bin), so that float32 rounding cannot move a point across a pixel edge
CASES_FLOAT32 = [c for c in CASES if c[1] in (1, 2) and c[2] in (1.0, 0.25) and c[3] in (1, 2)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_the_naive_loop(dtype: torch.dtype) -> None:
    for seed, (aligned, ratio, scale, m, normalize) in enumerate(CASES if dtype == torch.float64 else CASES_FLOAT32):
        image = (32, 48)
        size = (2, max(1, round(image[0] * scale)), max(1, round(image[1] * scale)))
        rois = make_rois(seed, image)
        if dtype == torch.float32:
            rois = (rois * 16).round() / 16
        y = torch.randn(rois.shape[0], 3, m, m, generator=torch.Generator().manual_seed(seed), dtype=dtype)
        got = roi_upsample(y, rois.to(dtype), size, scale, ratio, aligned=aligned, normalize=normalize)
        want = naive_roi_upsample(y, rois.to(dtype), size, scale, ratio, aligned, normalize)
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        case = f"aligned={aligned} ratio={ratio} scale={scale} m={m} normalize={normalize}"
        assert got.shape == want.shape and got.dtype == dtype, case
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, msg=case)


def test_each_roi_writes_into_its_own_image() -> None:
    rois = make_rois(0, (32, 32), batch=3, k=6)
    y = torch.randn(6, 2, 2, 2, dtype=torch.float64)
    out = roi_upsample(y, rois, (3, 32, 32), 1.0, 2)
    for image in range(3):
        alone = rois[:, 0] == image
        part = roi_upsample(y[alone], rois[alone], (3, 32, 32), 1.0, 2)
        torch.testing.assert_close(part[image], out[image])
        assert all(float(part[j].abs().sum()) == 0 for j in range(3) if j != image)


def test_no_rois_gives_zeros_with_a_gradient_path() -> None:
    y = torch.zeros(0, 4, 14, 14, requires_grad=True)
    out = roi_upsample(y, torch.zeros(0, 5), (2, 8, 8), 0.25, 2)
    assert out.shape == (2, 4, 8, 8) and float(out.detach().abs().sum()) == 0
    out.sum().backward()
    assert y.grad is not None and y.grad.shape == y.shape


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize(("scale", "ratio"), [(1.0, 2), (0.5, 1), (0.25, 0), (1.0, 3)])
def test_without_normalisation_it_is_the_adjoint_of_roi_align(aligned: bool, scale: float, ratio: int) -> None:
    """<roi_align(x), y> = <x, roi_upsample(y)>, and roi_upsample equals roi_align's vector-Jacobian product."""
    g = torch.Generator().manual_seed(int(scale * 8) + ratio)
    rois = make_rois(ratio, (40, 56), batch=2, k=6)
    size = (2, round(40 * scale), round(56 * scale))
    x = torch.randn(2, 3, size[1], size[2], generator=g, dtype=torch.float64, requires_grad=True)
    pooled = roi_align(x, rois, (7, 7), scale, ratio, aligned)
    y = torch.randn(pooled.shape, generator=g, dtype=torch.float64)
    up = roi_upsample(y, rois, size, scale, ratio, aligned=aligned, normalize=False)
    lhs, rhs = float((pooled.detach() * y).sum()), float((x.detach() * up).sum())
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))
    (vjp,) = torch.autograd.grad(pooled, x, y)
    torch.testing.assert_close(up, vjp, rtol=1e-10, atol=1e-10)


def test_normalised_equals_the_adjoint_where_samples_fall_on_whole_pixels() -> None:
    """aligned=False, scale 1, bins of 2 px with 2 points: boxes starting at k + 0.5 sample integers."""
    rois = torch.tensor([[0, 3.5, 2.5, 3.5 + 8, 2.5 + 8], [1, 0.5, 6.5, 0.5 + 8, 6.5 + 8]], dtype=torch.float64)
    y = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    x = torch.randn(2, 3, 20, 20, dtype=torch.float64, requires_grad=True)
    paper = roi_upsample(y, rois, (2, 20, 20), 1.0, 2, normalize=True)
    (adjoint,) = torch.autograd.grad(roi_align(x, rois, (4, 4), 1.0, 2, False), x, y)
    torch.testing.assert_close(paper, adjoint, rtol=0, atol=1e-12)
    # elsewhere Eq. 6 amplifies by 1 / (value_x * value_y), between 1 and 4
    shifted = rois.clone()
    shifted[:, 1:] += 0.3
    paper = roi_upsample(y, shifted, (2, 20, 20), 1.0, 2, normalize=True)
    (adjoint,) = torch.autograd.grad(roi_align(x, shifted, (4, 4), 1.0, 2, False), x, y)
    assert float((paper - adjoint).abs().max()) > 0.1


def test_normalised_reverts_through_roi_align_when_samples_are_two_pixels_apart() -> None:
    """The paper: the m x m mask is recovered by forward bilinear interpolation, cnt * RoIAlign(RoIUpsample(y)) = y."""
    for x0, y0, ratio, m in [(3.3, 5.7, 2, 4), (2.0, 2.0, 2, 3), (4.6, 3.25, 1, 5)]:
        bin_px = 2 * ratio  # points 2 px apart
        rois = torch.tensor([[0, x0, y0, x0 + bin_px * m, y0 + bin_px * m]], dtype=torch.float64)
        y = torch.randn(1, 2, m, m, dtype=torch.float64)
        up = roi_upsample(y, rois, (1, 40, 40), 1.0, ratio, normalize=True)
        back = roi_align(up, rois, (m, m), 1.0, ratio, False)
        torch.testing.assert_close(ratio * ratio * back, y, rtol=1e-12, atol=1e-12)


def test_mass() -> None:
    """Without Eq. 6 nothing is lost or gained; with it, a constant 2x2 mask over a 4x4 box sums to 16 or 4."""
    rois = torch.tensor([[0, 4.2, 5.1, 14.7, 11.3], [0, 8.0, 2.0, 12.5, 16.0]], dtype=torch.float64)
    y = torch.rand(2, 1, 7, 7, dtype=torch.float64)
    up = roi_upsample(y, rois, (1, 24, 24), 1.0, 2, normalize=False)
    assert abs(float(up.sum()) - float(y.sum())) < 1e-12
    ones = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    phase0 = roi_upsample(ones, torch.tensor([[0, 2.0, 2.0, 6.0, 6.0]], dtype=torch.float64), (1, 10, 10), 1.0, 2)
    phase_half = roi_upsample(ones, torch.tensor([[0, 2.5, 2.5, 6.5, 6.5]], dtype=torch.float64), (1, 10, 10), 1.0, 2)
    assert abs(float(phase0.sum()) - 16) < 1e-12 and abs(float(phase_half.sum()) - 4) < 1e-12


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradcheck_two_levels_overlapping_rois(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    boxes = [
        torch.tensor([[2.0, 3.0, 20.0, 25.0], [5.0, 4.0, 22.0, 30.0], [1.0, 1.0, 70.0, 66.0]], dtype=torch.float64),
        torch.tensor([[10.0, 8.5, 80.0, 75.0]], dtype=torch.float64),
    ]
    y = torch.randn(4, 1, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)

    def fn(t: Tensor) -> tuple[Tensor, ...]:
        return tuple(
            multiscale_roi_upsample(t, boxes, [(16, 16), (8, 8)], (64, 64), 2, canonical_scale=32, canonical_level=2)
        )

    maps = fn(y)
    assert all(float(level.detach().abs().sum()) > 0 for level in maps)  # both levels are used
    # the full Jacobian once, a random projection for the other seeds
    assert torch.autograd.gradcheck(fn, (y,), fast_mode=seed > 0)


def test_levels_match_torchvision_level_mapper() -> None:
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 600
    wh = torch.rand(200, 2, generator=g) ** 2 * 800 + 1
    boxes = torch.cat([xy, xy + wh], dim=1)
    want = LevelMapper(2, 5)([boxes]) + 2
    assert torch.equal(fpn_levels(boxes), want)
    assert set(want.tolist()) == {2, 3, 4, 5}


def test_a_pooled_roi_goes_back_to_its_own_level_only() -> None:
    """MultiScaleRoIAlign pools each RoI from one level; multiscale_roi_upsample writes it back there."""
    names = ["p2", "p3", "p4", "p5"]
    padded = (256, 320)
    feats = {
        n: torch.randn(1, 2, padded[0] // 2**k, padded[1] // 2**k, dtype=torch.float64)
        for n, k in zip(names, range(2, 6), strict=True)
    }
    pooler = MultiScaleRoIAlign(names, 7, 2)
    seen = set()
    for box in [[10.0, 10.0, 40.0, 50.0], [20.0, 30.0, 150.0, 140.0], [0.0, 0.0, 300.0, 250.0], [-90.0, -90, 400, 400]]:
        boxes = [torch.tensor([box], dtype=torch.float64)]
        pooled = pooler(feats, boxes, [padded])
        assert pooler.map_levels is not None
        level = int(pooler.map_levels(boxes)[0])  # the level the pooler read
        maps = multiscale_roi_upsample(pooled, boxes, [tuple(f.shape[-2:]) for f in feats.values()], padded, 2)
        assert [i for i, m in enumerate(maps) if float(m.abs().sum()) > 0] == [level]
        seen.add(level)
    assert seen == {0, 1, 2, 3}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("normalize", [False, True])
def test_cuda_equals_the_reference(normalize: bool) -> None:
    rois = make_rois(3, (64, 96))
    y = torch.randn(rois.shape[0], 3, 7, 7, dtype=torch.float64)
    want = naive_roi_upsample(y, rois, (2, 16, 24), 0.25, 2, False, normalize)
    got = roi_upsample(y.cuda(), rois.cuda(), (2, 16, 24), 0.25, 2, normalize=normalize)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-10)
    if not normalize:
        # torchvision's CUDA roi_align backward is the same operator
        x = torch.zeros(2, 3, 16, 24, dtype=torch.float64, device="cuda", requires_grad=True)
        (vjp,) = torch.autograd.grad(roi_align(x, rois.cuda(), (7, 7), 0.25, 2, False), x, y.cuda())
        torch.testing.assert_close(vjp.cpu(), want, rtol=1e-10, atol=1e-10)
