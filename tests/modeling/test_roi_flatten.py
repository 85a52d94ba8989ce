"""ROI-Flatten (REFINE Eq. 5): against a naive full-canvas reference, gradcheck, and its geometry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from unipan.modeling.layers.roi_flatten import roi_flatten


def naive_flatten(
    probs: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    image_index: torch.Tensor,
    batch: int,
    things: int,
    size: tuple[int, int],
    stride: float,
) -> torch.Tensor:
    """Per instance a full-canvas `grid_sample` paste (zeros outside the grid), x score, per-class max."""
    h, w = size
    out = torch.zeros((batch, things, h, w), dtype=probs.dtype)
    m = probs.shape[-1]
    for k in range(probs.shape[0]):
        x0, y0, x1, y1 = (float(v) / stride for v in boxes[k])
        # canvas pixel centre (x + 0.5) -> grid cell coordinate u -> grid_sample's [-1, 1]
        u = ((torch.arange(w, dtype=probs.dtype) + 0.5 - x0) / (x1 - x0) * m - 0.5 + 0.5) / m * 2 - 1
        v = ((torch.arange(h, dtype=probs.dtype) + 0.5 - y0) / (y1 - y0) * m - 0.5 + 0.5) / m * 2 - 1
        grid = torch.stack(torch.meshgrid(u, v, indexing="xy"), dim=-1)[None]
        pasted = F.grid_sample(probs[k][None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        b, c = int(image_index[k]), int(labels[k])
        out[b, c] = torch.maximum(out[b, c], pasted[0, 0] * weights[k])
    return out


def random_case(seed: int, k: int, size: tuple[int, int], stride: float, m: int = 6, things: int = 3, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    h, w = size
    probs = torch.rand((k, m, m), generator=g, dtype=torch.float64)
    # boxes at most 2M canvas pixels wide: detectron2's one-pixel margin then holds the whole paste
    wh = (torch.rand((k, 2), generator=g, dtype=torch.float64) * (2 * m - 1) + 1) * stride
    # centres anywhere, some boxes crossing the canvas border
    centres = torch.rand((k, 2), generator=g, dtype=torch.float64) * torch.tensor([w, h]) * stride
    boxes = torch.cat([centres - wh / 2, centres + wh / 2], dim=1)
    labels = torch.randint(0, things, (k,), generator=g)
    weights = torch.rand(k, generator=g, dtype=torch.float64)
    image_index = torch.randint(0, batch, (k,), generator=g)
    return probs, boxes, labels, weights, image_index, batch, things


@pytest.mark.parametrize(
    ("seed", "k", "size", "stride"), [(0, 7, (9, 13), 4.0), (1, 12, (16, 16), 1.0), (2, 0, (5, 6), 4.0)]
)
def test_equals_the_naive_reference(seed: int, k: int, size: tuple[int, int], stride: float) -> None:
    probs, boxes, labels, weights, image_index, batch, things = random_case(seed, k, size, stride)
    got = roi_flatten(probs, boxes, labels, weights, image_index, batch, things, size, stride)
    ref = naive_flatten(probs, boxes, labels, weights, image_index, batch, things, size, stride)
    assert got.shape == (batch, things, *size)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    # without weights = weights of one
    got1 = roi_flatten(probs, boxes, labels, None, image_index, batch, things, size, stride)
    ref1 = naive_flatten(
        probs, boxes, labels, torch.ones(k, dtype=probs.dtype), image_index, batch, things, size, stride
    )
    torch.testing.assert_close(got1, ref1, rtol=0, atol=1e-6)


def test_gradcheck() -> None:
    g = torch.Generator().manual_seed(3)
    probs = torch.rand((3, 4, 4), generator=g, dtype=torch.float64).requires_grad_(True)
    # two overlapping boxes of class 0 (the max picks between them), one of class 1
    boxes = torch.tensor([[0.0, 0.0, 5.0, 6.0], [2.5, 1.5, 8.0, 7.0], [1.0, 2.0, 6.0, 8.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    weights = torch.tensor([0.9, 0.7, 0.8], dtype=torch.float64)
    index = torch.zeros(3, dtype=torch.long)

    def fn(p: torch.Tensor) -> torch.Tensor:
        return roi_flatten(p, boxes, labels, weights, index, 1, 2, (8, 8), 1.0)

    assert torch.autograd.gradcheck(fn, (probs,), eps=1e-6, atol=1e-5)


def test_box_of_ones_fills_its_pixel_window_with_its_score() -> None:
    m = 4
    probs = torch.ones((1, m, m))
    box = torch.tensor([[8.0, 12.0, 8.0 + 4 * m, 12.0 + 4 * m]])  # canvas pixels 2..5, 3..6 at stride 4
    out = roi_flatten(probs, box, torch.tensor([1]), torch.tensor([0.7]), torch.tensor([0]), 1, 2, (10, 10), 4.0)
    expected = torch.zeros((1, 2, 10, 10))
    expected[0, 1, 3:7, 2:6] = 0.7
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_duplicates_are_one_instance_channels_and_images_independent() -> None:
    probs, boxes, _, weights, _, _, _ = random_case(5, 4, (8, 8), 1.0, things=2, batch=1)

    def flat(rows: list[int], labels: list[int], images: list[int], batch: int = 1) -> torch.Tensor:
        return roi_flatten(
            probs[rows], boxes[rows], torch.tensor(labels), weights[rows], torch.tensor(images), batch, 2, (8, 8), 1.0
        )

    torch.testing.assert_close(flat([0], [0], [0]), flat([0, 0], [0, 0], [0, 0]), rtol=0, atol=0)
    # a second class channel does not change the first; a batch is its images flattened alone
    both = flat([0, 1, 2, 3], [0, 0, 1, 1], [0, 1, 0, 1], batch=2)
    torch.testing.assert_close(both[0], flat([0, 2], [0, 1], [0, 0])[0], rtol=0, atol=0)
    torch.testing.assert_close(both[1], flat([1, 3], [0, 1], [0, 0])[0], rtol=0, atol=0)
    torch.testing.assert_close(both[0, 0], flat([0], [0], [0])[0, 0], rtol=0, atol=0)


def test_round_trip_with_roi_align_pins_the_geometry() -> None:
    """Stride 1, an M-sized box on integer pixels: RoIAlign(aligned=True, one sample) reads the grid back."""
    m = 5
    grid = torch.rand((1, m, m))
    box = torch.tensor([[3.0, 2.0, 3.0 + m, 2.0 + m]])
    canvas = roi_flatten(grid, box, torch.tensor([0]), None, torch.tensor([0]), 1, 1, (12, 12), 1.0)
    back = roi_align(canvas, [box], output_size=m, spatial_scale=1.0, sampling_ratio=1, aligned=True)
    torch.testing.assert_close(back[0, 0], grid[0], rtol=0, atol=1e-6)


def test_errors_and_empty() -> None:
    probs = torch.rand((2, 4, 4), requires_grad=True)
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 3.0, 3.0]])
    with pytest.raises(ValueError, match=r"labels 0\.\.5 outside 0\.\.2"):
        roi_flatten(probs, boxes, torch.tensor([0, 5]), None, torch.tensor([0, 0]), 1, 3, (4, 4), 1.0)
    with pytest.raises(ValueError, match="2 masks but boxes"):
        roi_flatten(probs, boxes[:1], torch.tensor([0, 1]), None, torch.tensor([0, 0]), 1, 3, (4, 4), 1.0)
    none = torch.zeros(0, dtype=torch.long)
    empty = roi_flatten(probs[:0], boxes[:0], none, None, none, 2, 3, (4, 4), 1.0)
    assert empty.shape == (2, 3, 4, 4) and float(empty.detach().abs().sum()) == 0 and empty.requires_grad
