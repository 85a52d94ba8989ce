"""SpatialFlow's sub-networks: RetinaNet's head when everything is off, each flow a switch, gradient paths."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import Tensor, nn
from torchvision.models.detection.retinanet import RetinaNetHead

from unipan.modeling.heads.retina import flatten_level
from unipan.modeling.heads.spatialflow_towers import SpatialFlowTowers, TowerOutputs

C, A, T = 16, 9, 3
FLOWS = ("flow_reg_cls", "flow_reg_stuff", "flow_reg_mask", "flow_stuff_mask")


def pyramid(seed: int = 0, b: int = 2) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, C, s, s + 2, generator=g) for s in (16, 8, 4, 2, 1)]


def towers(seed: int = 0, **switches: bool | int) -> SpatialFlowTowers:
    torch.manual_seed(seed)
    # a wider init than RetinaNet's 0.01 keeps every path's contribution well above float noise
    return SpatialFlowTowers(channels=C, num_anchors=A, num_things=T, init_std=0.1, **switches)  # type: ignore[arg-type]


def outputs(out: TowerOutputs) -> list[Tensor]:
    return [*out.cls_logits, *out.box_deltas, *out.stuff_features, *out.mask_features]


def assert_equals_torchvision(out: TowerOutputs, ref: dict[str, Tensor]) -> None:
    """Our flattened logits and deltas against torchvision's RetinaNetHead output."""
    torch.testing.assert_close(torch.cat([flatten_level(x, T) for x in out.cls_logits], 1), ref["cls_logits"])
    torch.testing.assert_close(torch.cat([flatten_level(x, 4) for x in out.box_deltas], 1), ref["bbox_regression"])


def test_towers_and_flows_off_equal_torchvision_retinanet_head() -> None:
    feats = pyramid()
    ours = towers(stuff_convs=0, mask_convs=0, **dict.fromkeys(FLOWS, False))
    theirs = RetinaNetHead(C, A, T)
    with torch.no_grad():
        # torchvision wraps each tower conv in a Conv2dNormActivation (conv, ReLU)
        pairs = [
            *zip([block[0] for block in theirs.classification_head.conv], ours.cls_convs, strict=True),
            *zip([block[0] for block in theirs.regression_head.conv], ours.reg_convs, strict=True),
            (theirs.classification_head.cls_logits, ours.cls_logits),
            (theirs.regression_head.bbox_reg, ours.bbox_reg),
        ]
        for src, dst in pairs:
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
        ref = theirs(feats)
        out = ours(feats)
    assert_equals_torchvision(out, ref)
    # without towers the stuff and mask heads read P3-P5 themselves (the paper's Eq. 1)
    for got, p in zip([*out.stuff_features, *out.mask_features], feats[:3] * 2, strict=True):
        assert got is p
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_gn_towers_equal_torchvision_retinanet_v2_head() -> None:
    # torchvision's RetinaNet v2 head: [conv (no bias), GroupNorm(32), ReLU] x 4 per tower
    c = 32
    g = torch.Generator().manual_seed(4)
    feats = [torch.randn(2, c, s, s + 2, generator=g) for s in (16, 8, 4, 2, 1)]
    torch.manual_seed(5)
    ours = SpatialFlowTowers(
        channels=c,
        num_anchors=A,
        num_things=T,
        stuff_convs=0,
        mask_convs=0,
        norm="GN",
        init_std=0.1,
        **dict.fromkeys(FLOWS, False),
    )
    theirs = RetinaNetHead(c, A, T, norm_layer=partial(nn.GroupNorm, 32))
    with torch.no_grad():
        for blocks, convs, norms in (
            (theirs.classification_head.conv, ours.cls_convs, ours.cls_norms),
            (theirs.regression_head.conv, ours.reg_convs, ours.reg_norms),
        ):
            for block, conv, norm in zip(blocks, convs, norms, strict=True):
                assert block[0].bias is None
                conv.weight.copy_(block[0].weight)
                conv.bias.zero_()
                block[1].weight.uniform_(0.5, 1.5, generator=g)
                block[1].bias.uniform_(-0.5, 0.5, generator=g)
                norm.load_state_dict(block[1].state_dict())
        for src, dst in (
            (theirs.classification_head.cls_logits, ours.cls_logits),
            (theirs.regression_head.bbox_reg, ours.bbox_reg),
        ):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
        ref = theirs(feats)
        out = ours(feats)
    assert_equals_torchvision(out, ref)
    with pytest.raises(ValueError, match="spatialflow.tower_norm must be '' or 'GN', got 'BN'"):
        SpatialFlowTowers(channels=c, num_anchors=A, num_things=T, norm="BN")
    with pytest.raises(ValueError, match="GN needs channels divisible by 32, got 16"):
        SpatialFlowTowers(channels=C, num_anchors=A, num_things=T, norm="GN")


def _flow_modules(t: SpatialFlowTowers, flow: str) -> list[nn.Module]:
    return {
        "flow_reg_cls": list(t.cls_flows),
        "flow_reg_stuff": list(t.stuff_flows),
        "flow_reg_mask": [t.mask_flow],
        "flow_stuff_mask": [t.stuff_mask_flow],
    }[flow]


@pytest.mark.parametrize("flow", FLOWS)
def test_zeroing_a_flow_equals_switching_it_off(flow: str) -> None:
    feats = pyramid(1)
    full = towers(2)
    with torch.no_grad():
        for module in _flow_modules(full, flow):
            module.weight.zero_()
            module.bias.zero_()
        off = towers(3, **{flow: False})
        missing, unexpected = off.load_state_dict(full.state_dict(), strict=False)
        assert not missing and unexpected  # exactly the flow's weights are left over
        for got, want in zip(outputs(off(feats)), outputs(full(feats)), strict=True):
            assert torch.equal(got, want)
    n_flow = sum(p.numel() for m in _flow_modules(full, flow) for p in m.parameters())
    assert sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in off.parameters()) == n_flow


def _grads(output: Tensor, params: list[nn.Parameter]) -> list[Tensor | None]:
    return list(torch.autograd.grad(output.sum(), params, retain_graph=True, allow_unused=True))


def _nonzero(grads: list[Tensor | None]) -> bool:
    return any(g is not None and bool(g.abs().sum() > 0) for g in grads)


def test_box_deltas_get_no_gradient_from_other_subnetworks() -> None:
    t = towers()
    out = t(pyramid())
    others = [p for name, p in t.named_parameters() if not name.startswith(("reg_convs", "bbox_reg"))]
    assert others
    for deltas in out.box_deltas:
        assert not _nonzero(_grads(deltas, others))
    # while the reg tower receives gradients from the cls logits through the flows
    reg = list(t.reg_convs.parameters())
    assert _nonzero(_grads(out.cls_logits[0], reg)) and _nonzero(_grads(out.cls_logits[4], reg))


@pytest.mark.parametrize("flow_reg_stuff", [True, False])
def test_stuff_features_depend_on_the_reg_tower_iff_its_flow_is_on(flow_reg_stuff: bool) -> None:
    t = towers(flow_reg_stuff=flow_reg_stuff)
    out = t(pyramid())
    reg = list(t.reg_convs.parameters())
    for stuff in out.stuff_features:
        assert _nonzero(_grads(stuff, reg)) == flow_reg_stuff


@pytest.mark.parametrize(
    ("flow_reg_mask", "flow_reg_stuff", "flow_stuff_mask", "depends"),
    [
        (True, False, False, True),
        (False, True, True, True),
        (False, True, False, False),
        (False, False, True, False),
        (False, False, False, False),
    ],
)
def test_mask_features_depend_on_the_reg_tower_through_either_path(
    flow_reg_mask: bool, flow_reg_stuff: bool, flow_stuff_mask: bool, depends: bool
) -> None:
    t = towers(flow_reg_mask=flow_reg_mask, flow_reg_stuff=flow_reg_stuff, flow_stuff_mask=flow_stuff_mask)
    out = t(pyramid())
    reg = list(t.reg_convs.parameters())
    for mask in out.mask_features:
        assert _nonzero(_grads(mask, reg)) == depends


def test_p6_p7_do_not_reach_stuff_and_mask_and_shapes() -> None:
    t = towers().eval()
    feats = pyramid()
    changed = [*feats[:3], feats[3] + 1.0, feats[4] - 2.0]
    with torch.no_grad():
        a, b = t(feats), t(changed)
    for x, y in zip([*a.stuff_features, *a.mask_features], [*b.stuff_features, *b.mask_features], strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a.cls_logits[3], b.cls_logits[3])
    for logits, deltas, p in zip(a.cls_logits, a.box_deltas, feats, strict=True):
        assert logits.shape == (2, A * T, *p.shape[-2:]) and deltas.shape == (2, 4 * A, *p.shape[-2:])
    assert [s.shape for s in a.stuff_features] == [p.shape for p in feats[:3]] == [m.shape for m in a.mask_features]


def test_dcn_towers_use_the_flow_convs_as_offsets() -> None:
    t = towers(dcn_cls=True, dcn_stuff=True, dcn_mask=True)
    assert all(f.out_channels == 27 for f in [*t.cls_flows, *t.stuff_flows, t.mask_flow])
    assert t.stuff_mask_flow is not None and t.stuff_mask_flow.out_channels == C
    out = t(pyramid())
    loss = sum(x.sum() for x in outputs(out))
    loss.backward()  # type: ignore[union-attr]
    assert all(f.weight.grad is not None and bool(f.weight.grad.abs().sum() > 0) for f in t.cls_flows)
    # with the flows off the offsets are computed from the tower's own input
    off = towers(dcn_cls=True, flow_reg_cls=False)
    assert len(off.cls_flows) == 4
    reg = list(off.reg_convs.parameters())
    assert not _nonzero(_grads(off(pyramid()).cls_logits[0], reg))


@pytest.mark.parametrize(
    ("switches", "message"),
    [
        ({"stuff_convs": 2}, "stuff_convs must be 0 or cls_reg_convs"),
        ({"mask_convs": 2}, "mask_convs must be 0 or 1"),
        ({"stuff_convs": 0, "flow_stuff_mask": False}, "flow_reg_stuff needs the stuff tower"),
        ({"mask_convs": 0, "flow_stuff_mask": False}, "flow_reg_mask needs the mask tower"),
        ({"mask_convs": 0, "flow_reg_mask": False}, "flow_stuff_mask needs the stuff and mask towers"),
        ({"cls_reg_convs": 0}, "cls_reg_convs must be >= 1"),
    ],
)
def test_impossible_switches_are_named(switches: dict[str, int | bool], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        towers(**switches)


def test_macs_at_800x1216_match_the_derived_budget() -> None:
    """torch.utils.flop_counter on the R50 COCO towers (shapes only, meta device) against the
    per-part MACs derived from the architecture: RetinaNet towers + predictors 130.9 G, stuff and
    mask sub-networks 58.8 G, reg-cls flows 47.8 G, P3-P5 flows 70.6 G."""
    from torch.utils.flop_counter import FlopCounterMode

    sizes = [(100, 152), (50, 76), (25, 38), (13, 19), (7, 10)]

    def gmacs(**switches: bool | int) -> float:
        with torch.device("meta"):
            t = SpatialFlowTowers(channels=256, num_anchors=9, num_things=80, **switches)  # type: ignore[arg-type]
            feats = [torch.empty(1, 256, h, w) for h, w in sizes]
            with FlopCounterMode(display=False) as counter:
                t(feats)
        return counter.get_total_flops() / 2e9

    off = dict.fromkeys(FLOWS, False)
    retina = gmacs(stuff_convs=0, mask_convs=0, **off)
    towers_only = gmacs(**off)
    cls_flows = gmacs(**{**off, "flow_reg_cls": True})
    full = gmacs()
    # each 3x3 256 -> 256 conv over the P3-P7 positions costs 256 * 256 * 9 MACs per position
    positions = sum(h * w for h, w in sizes)
    assert cls_flows - towers_only == pytest.approx(4 * positions * 256 * 256 * 9 / 1e9)
    got = [round(x, 1) for x in (retina, towers_only - retina, cls_flows - towers_only, full - cls_flows)]
    assert got == [130.9, 58.8, 47.8, 70.6]
