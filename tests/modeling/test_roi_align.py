"""unipan's RoIAlign against torchvision's (forward, input gradients, the FPN pooler) and a naive loop."""

from __future__ import annotations

import itertools
from collections import OrderedDict

import pytest
import torch
import torchvision
from helpers import roi_align_points
from torch import Tensor
from torchvision.ops import roi_align as tv_roi_align

import unipan.modeling.layers.roi_align as ra
from unipan.modeling.layers.roi_align import MultiScaleRoIAlign, roi_align, roi_align_weights

SIZES = [(1, 1), (1, 7), (6, 1), (2, 2), (5, 8), (16, 13), (32, 24)]
OUTPUTS = [1, 2, 7, (3, 5), (14, 6)]
RATIOS = [-1, 0, 1, 2, 3]
SCALES = [1.0, 0.5, 0.25, 0.125]


def random_rois(
    gen: torch.Generator, batch: int, h: int, w: int, scale: float, k: int, reversed_boxes: bool = False
) -> Tensor:
    """Tensor[k, 5] mixing boxes inside, across every border, fully outside, zero-size (and reversed).

    Reversed boxes (x2 < x1) only on request: torchvision's kernel fails on them with aligned=True
    and adaptive sampling (a negative point count), so they are tested with fixed sampling only.
    """
    img_w, img_h = w / scale, h / scale

    def u(lo: float, hi: float, n: int) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)

    kind = torch.randint(0, 7, (k,), generator=gen)
    x1, y1 = u(0, img_w, k), u(0, img_h, k)
    x2, y2 = x1 + u(0, img_w, k), y1 + u(0, img_h, k)
    # across the borders: start before 0 and end beyond the image
    cross = kind == 1
    x1[cross], y1[cross] = u(-0.6 * img_w, 0.5 * img_w, k)[cross], u(-0.6 * img_h, 0.5 * img_h, k)[cross]
    x2[cross], y2[cross] = u(0.5 * img_w, 1.7 * img_w, k)[cross], u(0.5 * img_h, 1.7 * img_h, k)[cross]
    # fully outside: more than one map pixel beyond a border (left/top or right/bottom)
    out = kind == 2
    shift_x = torch.where(torch.rand(k, generator=gen) < 0.5, -img_w - 3 / scale, img_w + 2 / scale)
    x1[out], x2[out] = (x1 + shift_x)[out], (x2 + shift_x)[out]
    # zero-size boxes, some on the border pixels
    zero = kind == 3
    x2[zero], y2[zero] = x1[zero], y1[zero]
    edge = zero & (torch.rand(k, generator=gen) < 0.5)
    x1[edge], x2[edge] = img_w, img_w
    # reversed boxes (x2 < x1): aligned gives a negative extent
    rev = (kind == 4) & reversed_boxes
    x1[rev], x2[rev] = x2[rev], x1[rev]
    # the whole image, exactly
    whole = kind == 5
    x1[whole], y1[whole], x2[whole], y2[whole] = 0.0, 0.0, img_w, img_h
    # kind 6: small boxes (a pixel or two), several points per pixel
    small = kind == 6
    x2[small], y2[small] = (x1 + u(0.1, 2.0, k) / scale)[small], (y1 + u(0.1, 2.0, k) / scale)[small]
    index = torch.randint(0, batch, (k,), generator=gen).double()
    return torch.stack([index, x1, y1, x2, y2], dim=1)


def cases(n: int) -> list[tuple[int, int, tuple[int, int], int | tuple[int, int], int, bool, float, int]]:
    """n parameter sets (seed, batch, (H, W), output size, sampling ratio, aligned, scale, RoIs) drawn once."""
    gen = torch.Generator().manual_seed(1234)
    picked = []
    for seed in range(n):

        def pick(options: list) -> object:
            return options[int(torch.randint(0, len(options), (1,), generator=gen))]

        picked.append(
            (
                seed,
                int(pick([1, 2, 3])),
                pick(SIZES),
                pick(OUTPUTS),
                int(pick(RATIOS)),
                bool(pick([False, True])),
                float(pick(SCALES)),
                int(pick([1, 5, 17, 40])),
            )
        )
    # every size, ratio and alignment at least once
    for seed, (size, ratio, aligned) in enumerate(itertools.product(SIZES, RATIOS, [False, True]), start=n):
        picked.append((seed, 2, size, (3, 5), ratio, aligned, 0.5, 12))
    return picked  # type: ignore[return-value]


def both(
    x: Tensor, rois: Tensor | list[Tensor], output_size: int | tuple[int, int], scale: float, ratio: int, aligned: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(torchvision output, unipan output, torchvision input gradient, unipan input gradient) for one random dY."""
    xa = x.detach().clone().requires_grad_(True)
    xb = x.detach().clone().requires_grad_(True)
    ya = tv_roi_align(xa, rois, output_size, scale, ratio, aligned)
    yb = roi_align(xb, rois, output_size, scale, ratio, aligned)
    dy = torch.randn(ya.shape, dtype=ya.dtype, generator=torch.Generator().manual_seed(7))
    (ga,) = torch.autograd.grad(ya, xa, dy)
    (gb,) = torch.autograd.grad(yb, xb, dy)
    return ya, yb, ga, gb


@pytest.mark.parametrize(("seed", "batch", "size", "output_size", "ratio", "aligned", "scale", "k"), cases(60))
def test_forward_and_input_gradient_equal_torchvision_float64(
    seed: int,
    batch: int,
    size: tuple[int, int],
    output_size: int | tuple[int, int],
    ratio: int,
    aligned: bool,
    scale: float,
    k: int,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    x = torch.randn(batch, 3, h, w, dtype=torch.float64, generator=gen)
    rois = random_rois(gen, batch, h, w, scale, k, reversed_boxes=ratio > 0)
    ya, yb, ga, gb = both(x, rois, output_size, scale, ratio, aligned)
    assert torch.equal(ya, yb)
    assert gb.shape == x.shape and gb.dtype == torch.float64 and gb.is_contiguous()
    torch.testing.assert_close(gb, ga, rtol=0, atol=1e-10)


def test_the_random_cases_have_real_gradients() -> None:
    """The equality above is not vacuous: most cases have non-zero gradients, and they depend on the geometry."""
    nonzero = 0
    for seed, batch, (h, w), output_size, ratio, aligned, scale, k in cases(60):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 3, h, w, dtype=torch.float64, generator=gen)
        rois = random_rois(gen, batch, h, w, scale, k, reversed_boxes=ratio > 0)
        _, _, ga, gb = both(x, rois, output_size, scale, ratio, aligned)
        _, _, g_other, _ = both(x, rois, output_size, scale, ratio, not aligned)
        if ga.abs().sum() > 0:
            nonzero += 1
            assert gb.abs().sum() > 0
        if h > 1 and w > 1 and k > 5:
            # the other half-pixel offset moves the samples: a difference far above the tolerance
            assert (g_other - ga).abs().max() > 1e-6
    assert nonzero >= 55


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("ratio", [-1, 1, 2])
def test_float32_agrees(aligned: bool, ratio: int) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 20, 27, generator=gen)
    rois = random_rois(gen, 2, 20, 27, 0.25, 64).float()
    ya, yb, ga, gb = both(x, rois, (7, 5), 0.25, ratio, aligned)
    assert torch.equal(ya, yb)
    assert gb.dtype == torch.float32
    torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-6)


def test_boxes_as_a_list_per_image_and_zero_rois() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 10, 12, dtype=torch.float64, generator=gen)
    per_image = [random_rois(gen, 1, 10, 12, 0.5, k)[:, 1:] for k in (4, 0, 6)]
    ya, yb, ga, gb = both(x, per_image, 5, 0.5, 2, True)
    assert yb.shape == (10, 4, 5, 5)
    assert torch.equal(ya, yb)
    torch.testing.assert_close(gb, ga, rtol=0, atol=1e-10)
    # the same boxes as Tensor[K, 5]
    rois = torch.cat(
        [torch.cat([torch.full((len(b), 1), float(i), dtype=b.dtype), b], 1) for i, b in enumerate(per_image)]
    )
    assert torch.equal(roi_align(x, rois, 5, 0.5, 2, True), yb)
    # no RoIs at all: an empty output and a zero gradient
    for empty in (torch.zeros(0, 5, dtype=torch.float64), [torch.zeros(0, 4, dtype=torch.float64)] * 3):
        ya, yb, ga, gb = both(x, empty, (2, 3), 0.5, -1, False)
        assert yb.shape == (0, 4, 2, 3) and ya.shape == yb.shape
        assert torch.equal(gb, torch.zeros_like(x)) and torch.equal(ga, gb)


@pytest.mark.parametrize("aligned", [False, True])
def test_points_exactly_on_the_validity_borders(aligned: bool) -> None:
    """A point at -1 or at H (W) still counts (clamped to the border pixel); a point just beyond does not."""
    x = torch.arange(2 * 4 * 5, dtype=torch.float64).view(1, 2, 4, 5)
    off = 0.5 if aligned else 0.0
    # one bin, one point at the box centre: centres (x, y) at (-1, 1), (W, 2), (2, H), (-1, -1), just beyond
    centres = [(-1.0, 1.0), (5.0, 2.0), (2.0, 4.0), (-1.0, -1.0), (5.0 + 1e-9, 1.0), (-1.0 - 1e-9, 2.0)]
    rois = torch.tensor(
        [[0, cx - 1 + off, cy - 1 + off, cx + 1 + off, cy + 1 + off] for cx, cy in centres], dtype=torch.float64
    )
    ya, yb, ga, gb = both(x, rois, 1, 1.0, 1, aligned)
    assert torch.equal(ya, yb)
    torch.testing.assert_close(gb, ga, rtol=0, atol=1e-12)
    # the border pixels the clamped points land on
    expected = x[0, :, [1, 2, 3, 0], [0, 4, 2, 0]].t()
    assert torch.equal(yb[:4, :, 0, 0], expected)
    assert torch.equal(yb[4:], torch.zeros_like(yb[4:]))


def test_gradcheck_small_float64() -> None:
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    rois = torch.tensor(
        [[0, 0.3, 0.7, 4.1, 3.9], [1, -1.5, 2.0, 7.5, 6.5], [1, 2.2, 1.1, 2.2, 1.1], [0, 3.0, 0.0, 9.0, 5.0]],
        dtype=torch.float64,
    )
    for ratio, aligned in [(2, False), (-1, True), (1, True)]:
        assert torch.autograd.gradcheck(lambda t, r=ratio, a=aligned: roi_align(t, rois, (3, 2), 0.8, r, a), (x,))


def test_non_contiguous_gradient_and_input() -> None:
    """`y.sum().backward()` hands an expanded (stride 0) gradient; a channels-last input works too."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 9, 11, dtype=torch.float64, generator=gen).to(memory_format=torch.channels_last)
    rois = random_rois(gen, 2, 9, 11, 1.0, 9)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    tv_roi_align(xa, rois, 4, 1.0, 2).sum().backward()
    roi_align(xb, rois, 4, 1.0, 2).sum().backward()
    assert xb.grad is not None and xa.grad is not None
    torch.testing.assert_close(xb.grad, xa.grad, rtol=0, atol=1e-10)


def test_boxes_get_no_gradient_and_double_backward_raises() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    rois = random_rois(gen, 1, 8, 8, 1.0, 5).requires_grad_(True)
    y = roi_align(x, rois, 3, 1.0, 2)
    y.sum().backward()
    assert rois.grad is None and x.grad is not None and x.grad.abs().sum() > 0
    # create_graph: the first-order gradient is right, differentiating it again raises
    y = roi_align(x, rois.detach(), 3, 1.0, 2)
    (g,) = torch.autograd.grad((y**2).sum(), x, create_graph=True)
    expected = torch.autograd.grad((tv_roi_align(x, rois.detach(), 3, 1.0, 2) ** 2).sum(), x)[0]
    torch.testing.assert_close(g, expected, rtol=0, atol=1e-10)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()


def test_chunked_backward_equals_one_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny non-zero budget splits the RoIs into many chunks (fixed and adaptive grids)."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 14, 17, dtype=torch.float64, generator=gen)
    rois = random_rois(gen, 2, 14, 17, 0.5, 30)
    monkeypatch.setattr(ra, "_CHUNK_NONZEROS", 300)
    for ratio in (2, -1):
        bounds = ra._chunk_bounds(rois, (5, 4), 0.5, ratio, False)
        assert len(bounds) > 3 and bounds[0] == 0 and bounds[-1] == 30
        _, _, ga, gb = both(x, rois, (5, 4), 0.5, ratio, False)
        torch.testing.assert_close(gb, ga, rtol=0, atol=1e-10)


def naive_weights(
    rois: Tensor, size: tuple[int, int, int], out: tuple[int, int], scale: float, ratio: int, aligned: bool
) -> Tensor:
    """W as a dense matrix, from the naive loop over RoIAlign's sampling points."""
    b, h, w = size
    ph, pw = out
    dense = torch.zeros(b * h * w, rois.shape[0] * ph * pw, dtype=torch.float64)
    for r in range(rois.shape[0]):
        n = int(rois[r, 0])
        for p, q, corners, count in roi_align_points(rois[r].tolist(), (h, w), out, scale, ratio, aligned):
            for yi, xi, wgt in corners:
                dense[(n * h + yi) * w + xi, (r * ph + p) * pw + q] += wgt / count
    return dense


@pytest.mark.parametrize(("ratio", "aligned"), [(2, False), (-1, True), (-1, False), (1, True)])
def test_weights_match_a_naive_loop_and_reproduce_the_forward(ratio: int, aligned: bool) -> None:
    gen = torch.Generator().manual_seed(21 + ratio)
    b, h, w, c = 2, 6, 9, 3
    rois = random_rois(gen, b, h, w, 0.5, 14)
    weights = roi_align_weights(rois, (b, h, w), (3, 4), 0.5, ratio, aligned)
    assert weights.layout == torch.sparse_csr and weights.shape == (b * h * w, 14 * 12)
    torch.testing.assert_close(
        weights.to_dense(), naive_weights(rois, (b, h, w), (3, 4), 0.5, ratio, aligned), rtol=0, atol=1e-12
    )
    # at most four non-zeros per sampling point
    _, _, rw, rh = ra._roi_geometry(rois, 0.5, aligned)
    points = ra._point_grid(rh, 3, ratio) * ra._point_grid(rw, 4, ratio) * 12
    assert weights.values().numel() <= 4 * int(points.sum())
    # the forward is W^T applied to the channels-last map
    x = torch.randn(b, c, h, w, dtype=torch.float64, generator=gen)
    pooled = (weights.to_dense().t() @ x.permute(0, 2, 3, 1).reshape(-1, c)).view(14, 3, 4, c).permute(0, 3, 1, 2)
    torch.testing.assert_close(pooled, tv_roi_align(x, rois, (3, 4), 0.5, ratio, aligned), rtol=0, atol=1e-12)


def test_half_precision_on_cpu_takes_torchvision_backward() -> None:
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(1, 4, 10, 10, generator=gen).half()
    rois = random_rois(gen, 1, 10, 10, 1.0, 6).half()
    ya, yb, ga, gb = both(x, rois, 3, 1.0, 2, False)
    assert torch.equal(ya, yb) and torch.equal(ga, gb) and gb.dtype == torch.float16


def test_autocast_pools_in_float32_like_torchvision() -> None:
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 4, 12, 10, generator=gen).bfloat16()
    rois = random_rois(gen, 2, 12, 10, 1.0, 8).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb, ga, gb = both(x, rois, 4, 1.0, -1, True)
    assert ya.dtype == yb.dtype == torch.bfloat16 and gb.dtype == torch.bfloat16
    assert torch.equal(ya, yb)
    torch.testing.assert_close(gb.float(), ga.float(), rtol=1e-2, atol=1e-2)


def test_batch_index_out_of_range_is_refused() -> None:
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="batch indices"):
        roi_align(x, torch.tensor([[2.0, 0, 0, 2, 2]]), 2)
    with pytest.raises(ValueError, match="Tensor\\[K, 5\\]"):
        roi_align(x, torch.zeros(3, 4), 2)


def test_other_devices_take_torchvision_path() -> None:
    x = torch.empty(2, 3, 8, 8, device="meta")
    rois = torch.zeros(4, 5, device="meta")
    assert roi_align(x, rois, (3, 2), 0.5, 2).shape == (4, 3, 3, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_equals_torchvision() -> None:
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(2, 3, 16, 12, dtype=torch.float64, generator=gen).cuda()
    rois = random_rois(gen, 2, 16, 12, 0.5, 20).cuda()
    ya, yb, ga, gb = both(x, rois, 5, 0.5, 2, True)
    assert torch.equal(ya, yb) and torch.equal(ga, gb)


def pyramid(
    gen: torch.Generator, dtype: torch.dtype
) -> tuple[OrderedDict[str, Tensor], list[Tensor], list[tuple[int, int]]]:
    """A 4-level feature dict (strides 4..32 of a 512 x 640 padded batch) and boxes of every level."""
    feats = OrderedDict(
        (name, torch.randn(2, 3, 512 // s, 640 // s, dtype=dtype, generator=gen))
        for name, s in (("p2", 4), ("p3", 8), ("p4", 16), ("p5", 32))
    )
    feats["pool"] = torch.randn(2, 3, 8, 10, dtype=dtype, generator=gen)  # not pooled from
    boxes = []
    for _ in range(2):
        fixed = torch.tensor([8.0, 30.0, 60.0, 120.0, 200.0, 250.0, 460.0, 500.0])
        side = torch.cat([fixed, 5 + 500 * torch.rand(12, generator=gen)])
        aspect = 0.5 + torch.rand(side.shape[0], generator=gen)
        bw, bh = side * aspect.sqrt(), side / aspect.sqrt()
        x1 = torch.rand(side.shape[0], generator=gen) * (640 - bw).clamp(min=1)
        y1 = torch.rand(side.shape[0], generator=gen) * (512 - bh).clamp(min=1)
        boxes.append(torch.stack([x1, y1, x1 + bw, y1 + bh], 1).to(dtype))
    return feats, boxes, [(512, 640), (480, 600)]


@pytest.mark.parametrize(
    ("dtype", "ratio"), [(torch.float64, 2), (torch.float64, -1), (torch.float32, 2), (torch.float32, 0)]
)
def test_multiscale_pooler_equals_torchvision(dtype: torch.dtype, ratio: int) -> None:
    gen = torch.Generator().manual_seed(12)
    feats, boxes, image_shapes = pyramid(gen, dtype)
    names = ["p2", "p3", "p4", "p5"]
    ours, theirs = MultiScaleRoIAlign(names, (7, 5), ratio), torchvision.ops.MultiScaleRoIAlign(names, (7, 5), ratio)
    assert isinstance(ours, torchvision.ops.MultiScaleRoIAlign)
    fa = OrderedDict((n, t.clone().requires_grad_(True)) for n, t in feats.items())
    fb = OrderedDict((n, t.clone().requires_grad_(True)) for n, t in feats.items())
    ya, yb = theirs(fa, boxes, image_shapes), ours(fb, boxes, image_shapes)
    assert ours.scales == theirs.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    assert (
        (ours.map_levels.k_min, ours.map_levels.k_max) == (theirs.map_levels.k_min, theirs.map_levels.k_max) == (2, 5)
    )
    levels = theirs.map_levels(boxes)
    assert torch.equal(ours.map_levels(boxes), levels) and len(set(levels.tolist())) == 4  # every level used
    assert torch.equal(ya, yb) and yb.shape == (40, 3, 7, 5)
    dy = torch.randn(ya.shape, dtype=dtype, generator=gen)
    ga = torch.autograd.grad(ya, list(fa.values())[:4], dy)
    gb = torch.autograd.grad(yb, list(fb.values())[:4], dy)
    tol = {"rtol": 0, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    for a, b in zip(ga, gb, strict=True):
        assert a.abs().sum() > 0
        torch.testing.assert_close(b, a, **tol)
    # the inferred scales are kept, as torchvision's pooler keeps them
    assert torch.equal(ours(fb, boxes, image_shapes), theirs(fa, boxes, image_shapes))


def test_multiscale_pooler_single_level_and_options() -> None:
    gen = torch.Generator().manual_seed(13)
    feats, boxes, image_shapes = pyramid(gen, torch.float64)
    for args, kwargs in [
        ((["p3"], 4, 2), {}),
        ((["p2", "p3", "p4"], 6, -1), {"canonical_scale": 112, "canonical_level": 3}),
    ]:
        ours = MultiScaleRoIAlign(*args, **kwargs)
        theirs = torchvision.ops.MultiScaleRoIAlign(*args, **kwargs)
        assert repr(ours).replace("unipan.", "") == repr(theirs).replace("torchvision.ops.", "")
        x = OrderedDict((n, t.clone().requires_grad_(True)) for n, t in feats.items())
        ya, yb = theirs(x, boxes, image_shapes), ours(x, boxes, image_shapes)
        assert torch.equal(ya, yb)
        names = list(args[0])
        ga = torch.autograd.grad(ya.sum(), [x[n] for n in names])
        gb = torch.autograd.grad(yb.sum(), [x[n] for n in names])
        for a, b in zip(ga, gb, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-10)
