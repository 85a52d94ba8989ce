"""DCNv2: the sampled CPU form against torchvision's `deform_conv2d(..., mask=)`, and its modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

from unipan.modeling.layers.modulated_deform_conv import (
    ModulatedDeformConv2d,
    ModulatedDeformConvPack,
    modulated_deform_conv2d,
    modulated_deform_conv2d_sampled,
    split_offset_mask,
)


@pytest.mark.parametrize(("shape", "stride", "padding", "dilation"), [((2, 3, 7, 9), 1, 1, 1), ((1, 4, 9, 8), 2, 1, 1)])
def test_matches_torchvision_forward_and_backward(
    shape: tuple[int, int, int, int], stride: int, padding: int, dilation: int
) -> None:
    g = torch.Generator().manual_seed(0)
    b, c, h, w = shape
    k = 3
    ho = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    offset = 2 * torch.randn(b, 2 * k * k, ho, wo, generator=g, dtype=torch.float64)
    mask = torch.rand(b, k * k, ho, wo, generator=g, dtype=torch.float64)
    weight = torch.randn(5, c, k, k, generator=g, dtype=torch.float64)
    bias = torch.randn(5, generator=g, dtype=torch.float64)
    ours = [t.clone().requires_grad_() for t in (x, offset, mask, weight, bias)]
    ref = [t.clone().requires_grad_() for t in (x, offset, mask, weight, bias)]
    out = modulated_deform_conv2d_sampled(*ours, stride=stride, padding=padding, dilation=dilation)
    want = deform_conv2d(ref[0], ref[1], ref[3], ref[4], stride=stride, padding=padding, dilation=dilation, mask=ref[2])
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    up = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (out * up).sum().backward()
    (want * up).sum().backward()
    for got, exp in zip(ours, ref, strict=True):
        torch.testing.assert_close(got.grad, exp.grad, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("stride", [1, 2])
def test_zero_offsets_and_unit_modulation_equal_conv2d(stride: int) -> None:
    x = torch.randn(2, 3, 8, 10)
    weight = torch.randn(4, 3, 3, 3)
    bias = torch.randn(4)
    plain = F.conv2d(x, weight, bias, stride=stride, padding=1)
    ho, wo = plain.shape[-2:]
    got = modulated_deform_conv2d(x, torch.zeros(2, 18, ho, wo), torch.ones(2, 9, ho, wo), weight, bias, stride)
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)


def test_offset_conv_output_split() -> None:
    """27 channels: offsets = channels 0-17 (chunks 0 and 1), modulation = sigmoid(channels 18-26)."""
    out = torch.randn(2, 27, 4, 5)
    offset, mask = split_offset_mask(out)
    assert torch.equal(offset, out[:, :18]) and torch.equal(mask, out[:, 18:].sigmoid())
    with pytest.raises(ValueError, match="3 \\* k \\* k"):
        split_offset_mask(torch.zeros(1, 26, 2, 2))


def test_modules() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
    pack = ModulatedDeformConvPack.from_conv(conv)
    assert isinstance(pack, ModulatedDeformConv2d) and isinstance(pack, torch.nn.Conv2d)
    assert pack.conv_offset.out_channels == 27 and pack.conv_offset.stride == (2, 2)
    x = torch.randn(1, 3, 9, 9)
    # the offset conv starts at zero: offsets 0, modulation 0.5
    torch.testing.assert_close(pack(x), 0.5 * (conv(x) - conv.bias.view(1, -1, 1, 1)) + conv.bias.view(1, -1, 1, 1))
    with torch.no_grad():
        pack.conv_offset.bias[18:] = 30.0  # modulation 1
    torch.testing.assert_close(pack(x), conv(x), rtol=1e-5, atol=1e-5)
    frozen = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False).requires_grad_(False)
    assert not any(p.requires_grad for p in ModulatedDeformConvPack.from_conv(frozen).parameters())
