"""SPINet's ops: single-shot conv = naive per-kernel convs, window gathering, coordinates, DCN block,
the stride-8 P2 pyramid and the deep stems."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unipan.config import BackboneConfig
from unipan.modeling.backbone import FPN, SPINetFPN, build_backbone
from unipan.modeling.heads.spinet_heads import FilterSamplingModule
from unipan.modeling.layers.deform_block import DeformConv3x3, make_deformable
from unipan.modeling.layers.dynamic_conv import coord_features, gather_windows, single_shot_conv

TINY = {"name": "resnet18", "base_width": 16, "depths": [1, 1, 1, 1], "fpn_channels": 32, "freeze_at": 0, "norm": "bn"}


# --- single-shot convolution ----------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3])
def test_single_shot_conv_equals_naive_per_kernel_convs(k: int) -> None:
    """One conv per image of [things; stuff] == a conv per kernel == unfold + matmul, values and grads."""
    g = torch.Generator().manual_seed(0)
    b, d, h, w = 3, 4, 7, 5  # odd sizes
    phi = torch.randn(b, d, h, w, dtype=torch.float64, generator=g, requires_grad=True)
    things = [torch.randn(n, d, k, k, dtype=torch.float64, generator=g, requires_grad=True) for n in (0, 1, 7)]
    stuff = torch.randn(3, d, k, k, dtype=torch.float64, generator=g, requires_grad=True)
    outs = single_shot_conv(phi, things, stuff)
    naive = []
    for i in range(b):
        kernels = torch.cat([things[i], stuff])
        per_kernel = torch.cat(
            [F.conv2d(phi[i : i + 1], kernels[n : n + 1], padding=k // 2) for n in range(len(kernels))], 1
        )
        cols = F.unfold(phi[i : i + 1], k, padding=k // 2)[0]  # [d k k, h w]
        matmul = (kernels.flatten(1) @ cols).view(-1, h, w)
        torch.testing.assert_close(per_kernel[0], matmul, rtol=0, atol=1e-12)
        naive.append(per_kernel[0])
    for got, want in zip(outs, naive, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    weights = [torch.randn(o.shape, dtype=torch.float64, generator=g) for o in outs]
    grads = torch.autograd.grad(
        sum((o * wt).sum() for o, wt in zip(outs, weights, strict=True)), [phi, stuff, *things[1:]]
    )
    want_grads = torch.autograd.grad(
        sum((o * wt).sum() for o, wt in zip(naive, weights, strict=True)), [phi, stuff, *things[1:]]
    )
    for got, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_single_shot_conv_bias_and_gradcheck() -> None:
    g = torch.Generator().manual_seed(1)
    phi = torch.randn(1, 3, 6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    things = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    stuff = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    tb = torch.randn(2, dtype=torch.float64, generator=g, requires_grad=True)
    sb = torch.randn(2, dtype=torch.float64, generator=g, requires_grad=True)
    (out,) = single_shot_conv(phi, [things], stuff, [tb], sb)
    want = F.conv2d(phi, torch.cat([things, stuff]), torch.cat([tb, sb]), padding=1)[0]
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda p, t, s, a, c: single_shot_conv(p, [t], s, [a], c)[0], (phi, things, stuff, tb, sb)
    )
    with pytest.raises(ValueError, match="thing kernel sets for a batch of 1"):
        single_shot_conv(phi, [], stuff)


# --- filter windows -------------------------------------------------------------------------------
def test_gather_windows_equals_padded_slices_including_corners() -> None:
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(2, 4, 5, 6, dtype=torch.float64, generator=g)
    b = torch.tensor([0, 1, 1, 0, 1])
    ys = torch.tensor([0, 4, 0, 2, 4])
    xs = torch.tensor([0, 5, 5, 3, 0])  # every corner and an interior cell
    for k in (1, 3, 5):
        got = gather_windows(feats, b, ys, xs, k)
        padded = F.pad(feats, (k // 2,) * 4)
        for n in range(5):
            window = padded[b[n], :, ys[n] : ys[n] + k, xs[n] : xs[n] + k]  # (C, k, k) order
            torch.testing.assert_close(got[n], window.flatten(), rtol=0, atol=0)
    # zero padding: the top-left corner window's first row and column are zeros
    w3 = gather_windows(feats, b[:1], ys[:1], xs[:1], 3).view(4, 3, 3)
    assert bool((w3[:, 0] == 0).all()) and bool((w3[:, :, 0] == 0).all())
    feats.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: gather_windows(f, b, ys, xs, 3), (feats,))
    with pytest.raises(ValueError, match="odd"):
        gather_windows(feats, b, ys, xs, 2)


def test_fc_kernels_equal_a_hand_built_kernel() -> None:
    """Window -> FC -> reshape: with the FC set to the identity the kernel is the window itself."""
    shapes = {"p3": (32, 8)}
    fsm = FilterSamplingModule(
        in_shapes=shapes, in_features=["p3"], num_things=2, num_convs=1, filter_channels=4, panoptic_channels=4
    ).double()
    with torch.no_grad():
        fsm.fc.weight.copy_(torch.eye(36, dtype=torch.float64))
        fsm.fc.bias.zero_()
    g = torch.Generator().manual_seed(3)
    fmap = torch.randn(1, 4, 6, 6, dtype=torch.float64, generator=g)
    one = torch.tensor([0])
    kernels, bias = fsm.kernels([fmap], one, one, torch.tensor([2]), torch.tensor([3]))
    assert bias is None and kernels.shape == (1, 4, 3, 3)
    torch.testing.assert_close(kernels[0], fmap[0, :, 1:4, 2:5], rtol=0, atol=0)
    # applied to features, it is the correlation with that window
    phi = torch.randn(1, 4, 5, 5, dtype=torch.float64, generator=g)
    (out,) = single_shot_conv(phi, [kernels], kernels[:0])
    torch.testing.assert_close(out[0, 2, 2], (phi[0, :, 1:4, 1:4] * fmap[0, :, 1:4, 2:5]).sum(), rtol=0, atol=1e-12)


def test_fsm_levels_of_one_size_batched_equal_one_level_at_a_time() -> None:
    """P2 and P3 (both stride 8) go through the shared towers as one batch; each level alone agrees."""
    shapes = {"p2": (32, 8), "p3": (32, 8), "p4": (32, 16)}
    torch.manual_seed(0)
    fsm = FilterSamplingModule(
        in_shapes=shapes,
        in_features=["p2", "p3", "p4"],
        num_things=3,
        num_convs=2,
        filter_channels=8,
        panoptic_channels=4,
    ).double()
    for m in fsm.modules():  # weights large enough that a wrong pairing shows
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.2)
    g = torch.Generator().manual_seed(1)
    sizes = [(60, 44), (64, 48)]
    feats = {
        name: torch.randn(2, 32, 64 // stride, 48 // stride, dtype=torch.float64, generator=g)
        for name, (_, stride) in shapes.items()
    }
    logits, filters = fsm(feats, sizes)
    for name, lg, fm in zip(fsm.in_features, logits, filters, strict=True):
        x = feats[name]
        stride = shapes[name][1]
        torch.testing.assert_close(lg, fsm.class_head.cls_logits(fsm.class_head.conv(x)))
        coords = coord_features(tuple(x.shape[-2:]), stride, sizes).double()
        torch.testing.assert_close(fm, fsm.filter_out(fsm.filter_tower(torch.cat([x, coords], dim=1))))


def test_coord_features_per_image_size() -> None:
    c = coord_features((4, 6), 8, [(32, 48), (16, 24)])
    assert c.shape == (2, 2, 4, 6)
    # cell centres (j + 0.5) * 8 over the image's own width, in [-1, 1]
    torch.testing.assert_close(c[0, 0, 0], (torch.arange(6) + 0.5) * 8 / 48 * 2 - 1)
    torch.testing.assert_close(c[0, 1, :, 0], (torch.arange(4) + 0.5) * 8 / 32 * 2 - 1)
    torch.testing.assert_close(c[1, 0, 0, :3], (torch.arange(3) + 0.5) * 8 / 24 * 2 - 1)
    # the same image alone gets the same coordinates on its own extent
    torch.testing.assert_close(coord_features((2, 3), 8, [(16, 24)])[0], c[1, :, :2, :3])


# --- deformable block -----------------------------------------------------------------------------
@pytest.mark.parametrize("stride", [1, 2])
def test_deform_block_with_zero_offsets_is_the_conv(stride: int) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=1, bias=False)
    x = torch.randn(2, 4, 9, 8)
    want = conv(x)
    dcn = DeformConv3x3(conv)
    assert dcn.weight is conv.weight
    torch.testing.assert_close(dcn(x), want, rtol=1e-5, atol=1e-5)
    dcn(x).sum().backward()
    assert dcn.offset.weight.grad is not None


def test_make_deformable_keeps_weight_names() -> None:
    backbone = build_backbone(BackboneConfig(**TINY))  # type: ignore[arg-type]
    keys = set(backbone.state_dict())
    assert make_deformable(backbone.trunk.layer3) == 1
    new_keys = set(backbone.state_dict())
    assert keys <= new_keys and new_keys - keys == {
        "trunk.layer3.0.conv2.offset.weight",
        "trunk.layer3.0.conv2.offset.bias",
    }
    assert backbone(torch.randn(1, 3, 64, 64))["p5"].shape[-1] == 2


# --- SPINet's pyramid and the deep stems ------------------------------------------------------------
def test_spinet_fpn_p2_is_halved_c2_plus_p3_inner() -> None:
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig(**TINY, fpn_levels="p2s8-p5")).eval()  # type: ignore[arg-type]
    assert isinstance(backbone, SPINetFPN) and isinstance(backbone, FPN)
    shapes = backbone.output_shape()
    assert {k: v[1] for k, v in shapes.items() if k.startswith("p")} == {"p2": 8, "p3": 8, "p4": 16, "p5": 32}
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = backbone(x)
        trunk = backbone.trunk(x)
        fpn = backbone.fpn
        inner5 = fpn.inner_blocks[3](trunk["res5"])
        inner4 = fpn.inner_blocks[2](trunk["res4"]) + F.interpolate(inner5, scale_factor=2.0, mode="nearest")
        inner3 = fpn.inner_blocks[1](trunk["res3"]) + F.interpolate(inner4, scale_factor=2.0, mode="nearest")
        # halving after the 1x1 lateral is the same map as before it (both linear)
        inner2 = F.avg_pool2d(fpn.inner_blocks[0](trunk["res2"]), 2) + inner3
        torch.testing.assert_close(out["p2"], fpn.layer_blocks[0](inner2), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["p3"], fpn.layer_blocks[1](inner3), rtol=1e-5, atol=1e-5)
    assert out["p2"].shape == out["p3"].shape == (2, 32, 8, 12)
    # same parameters as the plain 4-level FPN (+ nothing for P6 max-pool)
    plain = build_backbone(BackboneConfig(**TINY, fpn_levels="p2-p6"))  # type: ignore[arg-type]
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in backbone.parameters())


def test_spinet_fpn_p6_p7() -> None:
    b6 = build_backbone(BackboneConfig(**TINY, fpn_levels="p2s8-p6"))  # type: ignore[arg-type]
    b7 = build_backbone(BackboneConfig(**TINY, fpn_levels="p2s8-p7"))  # type: ignore[arg-type]
    with torch.no_grad():
        o6, o7 = b6(torch.randn(1, 3, 64, 64)), b7(torch.randn(1, 3, 64, 64))
    assert o6["p6"].shape[-2:] == (1, 1) and "p7" not in o6 and b6.output_shape()["p6"] == (32, 64)
    assert o7["p7"].shape[-2:] == (1, 1) and b7.output_shape()["p7"] == (32, 128)
    with pytest.raises(ValueError, match="unknown backbone.fpn_levels 'p2s8-p9'"):
        build_backbone(BackboneConfig(**TINY, fpn_levels="p2s8-p9"))  # type: ignore[arg-type]


@pytest.mark.parametrize(("stem", "widths"), [("resnet_c", (8, 8, 16)), ("deeplab", (16, 16, 32))])
def test_deep_stems(stem: str, widths: tuple[int, int, int]) -> None:
    cfg = BackboneConfig(**{**TINY, "norm": "bn", "freeze_at": 1, "stem": stem})  # type: ignore[arg-type]
    backbone = build_backbone(cfg)
    convs = [m for m in backbone.trunk.conv1 if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == list(widths) and [c.kernel_size for c in convs] == [(3, 3)] * 3
    assert backbone.trunk.layer1[0].conv1.in_channels == widths[2]
    # freezing the stem freezes its inner norms too
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.trunk.conv1.modules())
    assert not any(p.requires_grad for p in backbone.trunk.conv1.parameters())
    out = backbone(torch.randn(1, 3, 64, 64))
    assert out["res2"].shape[-2:] == (16, 16)
    with pytest.raises(ValueError, match="unknown backbone stem"):
        build_backbone(BackboneConfig(**{**TINY, "stem": "7x7"}))  # type: ignore[arg-type]
