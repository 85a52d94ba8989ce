"""The feature pyramid: P3-P7 variant, the C5-vs-P5 guard, the global context, the build order."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from unipan.config import BackboneConfig
from unipan.modeling.backbone import FPN, GlobalContext, build_backbone, build_trunk

TINY = {"name": "resnet18", "base_width": 16, "depths": [1, 1, 1, 1], "fpn_channels": 32, "freeze_at": 0, "norm": "bn"}


def tiny_cfg(**kw: object) -> BackboneConfig:
    return BackboneConfig(**{**TINY, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_p3_p7_shapes(name: str) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(tiny_cfg(name=name, base_width=8, fpn_levels="p3-p7")).eval()
    shapes = backbone.output_shape()
    assert list(shapes) == ["res2", "res3", "res4", "res5", "p3", "p4", "p5", "p6", "p7"]
    assert [shapes[f"p{k}"] for k in range(3, 8)] == [(32, 2**k) for k in range(3, 8)]
    assert backbone.size_divisibility == 32
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, 64, 96))
    assert set(out) == set(shapes)
    for key, (channels, stride) in shapes.items():
        # P6/P7 are stride-2 convs with padding 1: sizes round up
        assert out[key].shape == (2, channels, -(-64 // stride), -(-96 // stride)), key
    # the FPN proper covers res3..res5 only (RetinaNet)
    assert len(backbone.fpn.inner_blocks) == 3
    assert backbone.fpn.inner_blocks[0][0].in_channels == shapes["res3"][0]


def test_p6_reads_c5_even_when_c5_and_fpn_widths_are_equal() -> None:
    torch.manual_seed(0)
    # resnet18 with base width 8: C5 has 64 channels, as many as the FPN
    backbone = build_backbone(tiny_cfg(base_width=8, fpn_channels=64, fpn_levels="p3-p7")).eval()
    assert backbone.output_shape()["res5"][0] == 64
    # torchvision's block would silently read P5 with these widths
    assert LastLevelP6P7(64, 64).use_P5
    extra = backbone.fpn.extra_blocks
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 64, 64))
        p6 = F.conv2d(out["res5"], extra.p6.weight, extra.p6.bias, stride=2, padding=1)
        p7 = F.conv2d(F.relu(p6), extra.p7.weight, extra.p7.bias, stride=2, padding=1)
        from_p5 = F.conv2d(out["p5"], extra.p6.weight, extra.p6.bias, stride=2, padding=1)
    assert torch.equal(out["p6"], p6)
    assert torch.equal(out["p7"], p7)
    assert not torch.allclose(out["p6"], from_p5)


def test_p6_from_p5_reads_p5_and_is_checked() -> None:
    """`p6_from: p5` (FCOS / AdelaiDet; SPINet's Table 4 P3-7 rows): P6 = conv(P5), P7 = conv(ReLU(P6))."""
    torch.manual_seed(0)
    backbone = build_backbone(tiny_cfg(base_width=16, fpn_levels="p3-p7", p6_from="p5")).eval()
    extra = backbone.fpn.extra_blocks
    assert extra.p6.in_channels == 32  # the FPN's width, not C5's 128
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 64, 96))
        p6 = F.conv2d(out["p5"], extra.p6.weight, extra.p6.bias, stride=2, padding=1)
        p7 = F.conv2d(F.relu(p6), extra.p7.weight, extra.p7.bias, stride=2, padding=1)
    torch.testing.assert_close(out["p6"], p6)
    torch.testing.assert_close(out["p7"], p7)
    assert build_backbone(tiny_cfg(fpn_levels="p3-p7", p6_from="c5")).fpn.extra_blocks.p6.in_channels == 128
    with pytest.raises(ValueError, match="applies to fpn_levels 'p3-p7' only"):
        build_backbone(tiny_cfg(fpn_levels="p2-p6", p6_from="p5"))
    with pytest.raises(ValueError, match="applies to fpn_levels 'p3-p7' only"):
        build_backbone(tiny_cfg(fpn_levels="p2s8-p7", p6_from="c5"))
    with pytest.raises(ValueError, match="p6_from must be"):
        build_backbone(tiny_cfg(fpn_levels="p3-p7", p6_from="c4"))


def _torchvision_pyramid(backbone: FPN, images: Tensor, context: GlobalContext | None) -> dict[str, Tensor]:
    """torchvision's own FeaturePyramidNetwork.forward, the context added by a hook on the coarsest
    lateral: today's ContextFPN computation without its hand-written top-down pass."""
    trunk_out = backbone.trunk(images)
    handle = None
    if context is not None:
        res5 = trunk_out["res5"]
        handle = backbone.fpn.inner_blocks[-1].register_forward_hook(lambda m, i, o: o + context(res5))
    try:
        pyramid = backbone.fpn(OrderedDict((k, trunk_out[k]) for k in backbone.in_stages))
    finally:
        if handle is not None:
            handle.remove()
    return {**trunk_out, **{f"p{k}": v for k, v in enumerate(pyramid.values(), start=2)}}


def test_pyramid_and_global_context_equal_torchvision_fpn() -> None:
    torch.manual_seed(0)
    cfg = tiny_cfg()
    backbone = build_backbone(cfg, global_context=True).eval()
    context = backbone.context
    assert isinstance(context, GlobalContext)
    with torch.no_grad():
        context.fc.bias.uniform_(-1.0, 1.0)  # a context that visibly moves every level
        images = torch.randn(2, 3, 64, 96)
        out = backbone(images)
        expected = _torchvision_pyramid(backbone, images, context)
        backbone.set_global_context(None)
        plain = backbone(images)
        expected_plain = _torchvision_pyramid(backbone, images, None)
    assert list(out) == list(plain) == ["res2", "res3", "res4", "res5", "p2", "p3", "p4", "p5", "p6"]
    for name in out:
        assert torch.equal(out[name], expected[name]), name
        assert torch.equal(plain[name], expected_plain[name]), name
    # the context reaches every pyramid level through the top-down pass, and no trunk feature
    for name in ("p2", "p3", "p4", "p5", "p6"):
        assert not torch.allclose(out[name], plain[name]), name
    assert torch.equal(out["res5"], plain["res5"])


def test_global_context_is_linear_of_pooled_res5() -> None:
    torch.manual_seed(0)
    ctx = GlobalContext(16, 4)
    res5 = torch.randn(2, 16, 3, 5)
    out = ctx(res5)
    assert out.shape == (2, 4, 1, 1)
    torch.testing.assert_close(out[:, :, 0, 0], res5.mean(dim=(2, 3)) @ ctx.fc.weight.t() + ctx.fc.bias)


def test_build_order_and_keys_are_those_of_the_models_before_the_package() -> None:
    # before: UPSNet built ResNetFPN (trunk, then torchvision's FPN) and then GlobalContext
    cfg = tiny_cfg()
    torch.manual_seed(0)
    with_context = build_backbone(cfg, global_context=True)
    torch.manual_seed(0)
    plain = build_backbone(cfg)
    res5 = plain.output_shape()["res5"][0]
    context = GlobalContext(res5, cfg.fpn_channels)
    expected = {**plain.state_dict(), **{f"context.{k}": v for k, v in context.state_dict().items()}}
    got = with_context.state_dict()
    assert list(got) == list(expected)
    assert all(torch.equal(got[k], expected[k]) for k in got)
    assert {k.split(".")[0] for k in got} == {"trunk", "fpn", "context"}
    # the same parts through the constructor
    same = FPN(trunk=build_trunk(cfg), fpn_channels=cfg.fpn_channels, global_context=GlobalContext(res5, 32))
    assert list(same.state_dict()) == list(got)


def test_bad_levels_and_context_widths() -> None:
    with pytest.raises(ValueError, match="unknown backbone.fpn_levels 'p2-p7'"):
        build_backbone(tiny_cfg(fpn_levels="p2-p7"))
    trunk = build_trunk(tiny_cfg())
    with pytest.raises(ValueError, match="unknown FPN levels"):
        FPN(trunk=trunk, levels="p4-p8")
    with pytest.raises(ValueError, match="fpn_channels must be positive"):
        FPN(trunk=trunk, fpn_channels=0)
    with pytest.raises(ValueError, match=r"global context maps 128 -> 16 channels; the FPN needs res5's 128 -> 32"):
        FPN(trunk=trunk, fpn_channels=32, global_context=GlobalContext(128, 16))


def test_p3_p7_with_context_trains() -> None:
    torch.manual_seed(0)
    backbone = build_backbone(tiny_cfg(fpn_levels="p3-p7"), global_context=True).train()
    out = backbone(torch.randn(2, 3, 64, 64))
    sum(out[f"p{k}"].square().mean() for k in range(3, 8)).backward()
    # res2 has no lateral in p3-p7, but its stage still feeds res3..res5
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in backbone.parameters())
    assert isinstance(backbone.context, nn.Module) and backbone.context.fc.weight.grad is not None
