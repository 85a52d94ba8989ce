"""ResNet(-X) + FPN backbone: shapes, torchvision compatibility, weights loading, freezing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from unipan.config import BackboneConfig
from unipan.modeling.backbone import RESNET_SPECS, ResNetTrunk, build_backbone, convert_frozen_batchnorm

TINY = {"name": "resnet18", "base_width": 16, "depths": [1, 1, 1, 1], "fpn_channels": 32, "freeze_at": 0}


def tiny_cfg(**kw: object) -> BackboneConfig:
    return BackboneConfig(**{**TINY, **kw})  # type: ignore[arg-type]


def test_output_shapes_match_declared_shapes() -> None:
    for name, base_width in (("resnet18", 16), ("resnet50", 8)):
        backbone = build_backbone(tiny_cfg(name=name, base_width=base_width)).eval()
        images = torch.randn(2, 3, 64, 96)
        out = backbone(images)
        shapes = backbone.output_shape()
        assert set(out) == set(shapes) == {"res2", "res3", "res4", "res5", "p2", "p3", "p4", "p5", "p6"}
        for key, (channels, stride) in shapes.items():
            assert out[key].shape == (2, channels, 64 // stride, -(-96 // stride)), key
        expansion = 4 if name == "resnet50" else 1
        assert shapes["res5"] == (base_width * 8 * expansion, 32)
        assert backbone.size_divisibility == 32
        # P6 is P5 subsampled with stride 2 (Mask R-CNN's max-pool with kernel 1)
        assert torch.equal(out["p6"], out["p5"][:, :, ::2, ::2])


@pytest.mark.parametrize("name", sorted(RESNET_SPECS))
def test_trunk_state_dict_matches_torchvision(name: str) -> None:
    # On the meta device: same names and shapes as torchvision's network, without allocating weights.
    with torch.device("meta"):
        ours = build_backbone(BackboneConfig(name=name, freeze_at=0)).trunk
        theirs = getattr(torchvision.models, name)(weights=None)
    ours_sd = ours.state_dict()
    theirs_sd = {k: v for k, v in theirs.state_dict().items() if not k.startswith("fc.")}
    theirs_sd = {k: v for k, v in theirs_sd.items() if not k.endswith("num_batches_tracked")}
    assert set(ours_sd) == set(theirs_sd)
    assert all(ours_sd[k].shape == theirs_sd[k].shape for k in ours_sd)


def test_r50_fpn_parameter_count() -> None:
    with torch.device("meta"):
        backbone = build_backbone(BackboneConfig(name="resnet50", norm="bn", freeze_at=0))
        frozen = build_backbone(BackboneConfig(name="resnet50"))
        resnet = torchvision.models.resnet50(weights=None)
    n_trunk = sum(p.numel() for n, p in resnet.named_parameters() if not n.startswith("fc."))
    # FPN: 4 lateral 1x1 (C_k -> 256) and 4 output 3x3 (256 -> 256) convs with biases
    n_fpn = sum(c * 256 + 256 for c in (256, 512, 1024, 2048)) + 4 * (256 * 256 * 9 + 256)
    assert sum(p.numel() for p in backbone.parameters()) == n_trunk + n_fpn
    # frozen BN keeps its affine terms as buffers, not parameters
    n_bn_affine = sum(2 * m.num_features for m in resnet.modules() if isinstance(m, nn.BatchNorm2d))
    assert sum(p.numel() for p in frozen.parameters()) == n_trunk + n_fpn - n_bn_affine


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """A torchvision ResNet-18 (random weights, non-trivial BN statistics) and its saved state dict."""
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)
    # Non-trivial BN statistics so that a mis-loaded buffer would show.
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    path = tmp_path_factory.mktemp("weights") / "r18.pth"
    torch.save(reference.state_dict(), path)
    return path, reference.eval()


def test_loads_torchvision_weights_and_matches_its_features(resnet18_file: tuple[Path, nn.Module]) -> None:
    path, reference = resnet18_file
    backbone = build_backbone(BackboneConfig(name="resnet18", weights=str(path), freeze_at=2)).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        x = reference.maxpool(reference.relu(reference.bn1(reference.conv1(images))))
        expected = reference.layer4(reference.layer3(reference.layer2(reference.layer1(x))))
        got = backbone(images)["res5"]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    # trainable BN loads the same file (num_batches_tracked included)
    bn_backbone = build_backbone(BackboneConfig(name="resnet18", weights=str(path), norm="bn", freeze_at=0)).eval()
    with torch.no_grad():
        torch.testing.assert_close(bn_backbone(images)["res5"], expected, rtol=1e-4, atol=1e-5)


def test_bad_weights_give_clear_errors(resnet18_file: tuple[Path, nn.Module], tmp_path: Path) -> None:
    path, _ = resnet18_file
    with pytest.raises(ValueError, match=r"r18\.pth.*missing keys"):
        build_backbone(BackboneConfig(name="resnet34", weights=str(path)))
    with pytest.raises(ValueError, match=r"r18\.pth.*shape mismatches"):
        build_backbone(BackboneConfig(name="resnet18", weights=str(path), base_width=32))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_backbone(BackboneConfig(name="resnet18", weights=str(tmp_path / "nope.pth")))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth.*cannot load"):
        build_backbone(BackboneConfig(name="resnet18", weights=str(garbage)))


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 3, 5])
def test_freeze_at(freeze_at: int) -> None:
    backbone = build_backbone(tiny_cfg(norm="bn", freeze_at=freeze_at))
    stages = backbone.trunk.stages()
    for k, stage in enumerate(stages):
        params = list(stage.parameters())
        assert all(p.requires_grad == (k >= freeze_at) for p in params), (k, freeze_at)
        has_bn = any(isinstance(m, nn.BatchNorm2d) for m in stage.modules())
        assert has_bn == (k >= freeze_at), (k, freeze_at)
    # the FPN is never frozen
    assert all(p.requires_grad for p in backbone.fpn.parameters())
    # frozen stages keep their statistics in training mode
    backbone.train()
    before = {k: v.clone() for k, v in backbone.trunk.state_dict().items()}
    backbone(torch.randn(2, 3, 64, 64) * 3 + 1)
    after = backbone.trunk.state_dict()
    frozen_prefixes = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")[: freeze_at + (freeze_at > 0)]
    for key, value in after.items():
        changed = not torch.equal(before[key], value)
        if key.startswith(frozen_prefixes):
            assert not changed, key
    assert any(not torch.equal(before[k], v) for k, v in after.items()) == (freeze_at < 5)


def test_frozen_bn_default_has_no_trainable_norm() -> None:
    backbone = build_backbone(tiny_cfg(norm="frozen_bn", freeze_at=0))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())


def test_convert_frozen_batchnorm_keeps_the_function() -> None:
    bn = nn.BatchNorm2d(8)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.eval()
    block = nn.Sequential(nn.Conv2d(3, 8, 3), bn)
    x = torch.randn(2, 3, 8, 8)
    expected = block(x)
    frozen = convert_frozen_batchnorm(block)
    assert isinstance(frozen[1], FrozenBatchNorm2d)
    torch.testing.assert_close(frozen(x), expected)


def test_bad_configs_and_inputs() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'resnet9'"):
        build_backbone(tiny_cfg(name="resnet9"))
    with pytest.raises(ValueError, match="unknown backbone norm 'gn'"):
        build_backbone(tiny_cfg(norm="gn"))
    with pytest.raises(ValueError, match="freeze_at must be in 0..5"):
        build_backbone(tiny_cfg(freeze_at=6))
    with pytest.raises(ValueError, match="depths must be 4"):
        build_backbone(tiny_cfg(depths=[1, 1, 1]))
    with pytest.raises(ValueError, match="too small for 32 groups"):
        ResNetTrunk(
            block=RESNET_SPECS["resnext101_32x8d"].block,
            depths=[1, 1, 1, 1],
            base_width=4,
            groups=32,
            width_per_group=8,
        )
    backbone = build_backbone(tiny_cfg())
    with pytest.raises(ValueError, match="not a multiple of 32"):
        backbone(torch.randn(1, 3, 64, 70))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        backbone(torch.randn(3, 64, 64))


def test_tiny_backbone_trains() -> None:
    torch.manual_seed(0)
    backbone = build_backbone(tiny_cfg(norm="bn")).train()
    out = backbone(torch.randn(2, 3, 64, 64))
    sum(v.square().mean() for v in out.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.parameters())
