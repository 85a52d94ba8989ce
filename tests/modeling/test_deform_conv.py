"""The sampled deformable convolution against torchvision's `deform_conv2d` (the reference op)."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import deform_conv2d

from unipan.modeling.layers.deform_conv import deform_conv2d_any, deform_conv2d_sampled


@pytest.mark.parametrize(
    ("shape", "k", "padding", "dilation", "seed"),
    [((2, 3, 7, 9), 3, 1, 1, 0), ((1, 4, 5, 6), 3, 2, 2, 1), ((2, 2, 1, 8), 3, 1, 1, 2), ((1, 3, 6, 6), 1, 0, 1, 3)],
)
def test_matches_torchvision_forward_and_backward(
    shape: tuple[int, int, int, int], k: int, padding: int, dilation: int, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    ho, wo = h + 2 * padding - dilation * (k - 1), w + 2 * padding - dilation * (k - 1)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    # offsets large enough to leave the image and cross pixel boundaries
    offset = 3 * torch.randn(b, 2 * k * k, ho, wo, generator=g, dtype=torch.float64)
    weight = torch.randn(5, c, k, k, generator=g, dtype=torch.float64)
    bias = torch.randn(5, generator=g, dtype=torch.float64)
    inputs = [t.clone().requires_grad_() for t in (x, offset, weight, bias)]
    ref_inputs = [t.clone().requires_grad_() for t in (x, offset, weight, bias)]
    out = deform_conv2d_sampled(*inputs, padding=padding, dilation=dilation)
    ref = deform_conv2d(*ref_inputs, padding=(padding, padding), dilation=(dilation, dilation))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    # offsets landing exactly on a pixel grid line are measure-zero; random ones give equal gradients
    for got, want in zip(inputs, ref_inputs, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradcheck(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    offset = (2 * torch.randn(1, 18, 4, 5, generator=g, dtype=torch.float64)).requires_grad_()
    weight = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(deform_conv2d_sampled, (x, offset, weight, bias))


def test_zero_offsets_equal_a_plain_convolution_and_cpu_dispatch() -> None:
    x = torch.randn(2, 3, 6, 7)
    weight = torch.randn(4, 3, 3, 3)
    zero = torch.zeros(2, 18, 6, 7)
    plain = torch.nn.functional.conv2d(x, weight, padding=1)
    torch.testing.assert_close(deform_conv2d_any(x, zero, weight, padding=1), plain, rtol=1e-5, atol=1e-5)


def test_bad_offset_shape_is_an_error() -> None:
    with pytest.raises(ValueError, match="offset has shape"):
        deform_conv2d_sampled(torch.zeros(1, 2, 4, 4), torch.zeros(1, 9, 4, 4), torch.zeros(3, 2, 3, 3))
