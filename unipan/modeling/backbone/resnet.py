"""ResNet / ResNeXt trunks built from torchvision's blocks, their weights and their freezing.

The trunk keeps torchvision's module names (`conv1`, `bn1`, `layer1`..`layer4`), so a torchvision
ImageNet state dict loads into it unchanged. Its width (`base_width`) and depth (`depths`) can be
shrunk for tiny CPU models; 64 and the named network's depths give the published networks.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FrozenBatchNorm2d

from unipan.config import BackboneConfig
from unipan.files import torch_load_failure

__all__ = [
    "NORMS",
    "RESNET_SPECS",
    "STEMS",
    "TRUNK_STAGES",
    "ResNetSpec",
    "ResNetTrunk",
    "build_trunk",
    "convert_frozen_batchnorm",
    "freeze_stages",
    "load_trunk_weights",
]

TRUNK_STAGES = ("res2", "res3", "res4", "res5")
"""Names of the trunk outputs; res<k> has stride 2**k."""


@dataclass(frozen=True)
class ResNetSpec:
    """The layout of one torchvision ResNet variant."""

    block: type[BasicBlock] | type[Bottleneck]
    depths: tuple[int, int, int, int]
    groups: int = 1
    width_per_group: int = 64


RESNET_SPECS: dict[str, ResNetSpec] = {
    "resnet18": ResNetSpec(BasicBlock, (2, 2, 2, 2)),
    "resnet34": ResNetSpec(BasicBlock, (3, 4, 6, 3)),
    "resnet50": ResNetSpec(Bottleneck, (3, 4, 6, 3)),
    "resnet101": ResNetSpec(Bottleneck, (3, 4, 23, 3)),
    "resnext101_32x8d": ResNetSpec(Bottleneck, (3, 4, 23, 3), groups=32, width_per_group=8),
}

NORMS = ("frozen_bn", "bn")
"""Trunk normalisations: frozen BatchNorm (detection default) or trainable BatchNorm."""

STEMS = ("torchvision", "resnet_c", "deeplab")
"""Trunk stems: torchvision's 7x7 conv; three 3x3 convs of base/2, base/2, base channels (ResNet-C,
He et al. 2019); three 3x3 convs of base, base, 2 base channels (detectron2's DeepLabStem)."""


class ResNetTrunk(nn.Module):
    """A torchvision-compatible ResNet/ResNeXt trunk without the classifier.

    Args:
        block: torchvision `BasicBlock` or `Bottleneck`.
        depths: blocks in res2..res5.
        base_width: channels of the stem and of res2's 3x3 convs (64 in the published networks);
            stage k doubles it k-2 times, and bottlenecks expand their output by 4.
        groups: grouped-conv groups (ResNeXt: 32).
        width_per_group: torchvision's `width_per_group` (ResNeXt 32x8d: 8; plain ResNet: 64).
        norm_layer: `FrozenBatchNorm2d` (detection default) or `nn.BatchNorm2d`.
        stem: one of `STEMS`. For the deep stems `conv1` is a Sequential of the three convs (the
            first two with their norm and ReLU) and `bn1` normalises the last one, so that the
            forward pass and the freezing of the stem stay those of the 7x7 stem.
    """

    def __init__(
        self,
        *,
        block: type[BasicBlock] | type[Bottleneck],
        depths: Sequence[int],
        base_width: int = 64,
        groups: int = 1,
        width_per_group: int = 64,
        norm_layer: Callable[[int], nn.Module] = FrozenBatchNorm2d,
        stem: str = "torchvision",
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown backbone stem {stem!r}; known: {list(STEMS)}")
        if len(depths) != 4 or any(int(d) < 1 for d in depths):
            raise ValueError(f"depths must be 4 positive block counts (res2..res5), got {list(depths)}")
        if base_width < 1:
            raise ValueError(f"base_width must be positive, got {base_width}")
        if block is BasicBlock and (groups != 1 or width_per_group != 64):
            raise ValueError("BasicBlock trunks (resnet18/34) support only groups=1, width_per_group=64")
        if block is Bottleneck:
            inner = int(base_width * (width_per_group / 64.0)) * groups
            if inner < groups or inner % groups:
                raise ValueError(
                    f"base_width {base_width} is too small for {groups} groups x {width_per_group} "
                    f"channels per group (res2 inner width {inner})"
                )
        self.block = block
        self._norm_layer = norm_layer
        self._groups = groups
        self._width_per_group = width_per_group
        self.stem = stem
        self.inplanes = base_width
        self.conv1: nn.Module
        if stem == "torchvision":
            self.conv1 = nn.Conv2d(3, base_width, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            widths = (base_width // 2, base_width // 2, base_width)
            if stem == "deeplab":
                widths = (base_width, base_width, 2 * base_width)
            if min(widths) < 1:
                raise ValueError(f"base_width {base_width} is too small for the {stem} stem")
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, widths[0], kernel_size=3, stride=2, padding=1, bias=False),
                norm_layer(widths[0]),
                nn.ReLU(inplace=True),
                nn.Conv2d(widths[0], widths[1], kernel_size=3, padding=1, bias=False),
                norm_layer(widths[1]),
                nn.ReLU(inplace=True),
                nn.Conv2d(widths[1], widths[2], kernel_size=3, padding=1, bias=False),
            )
            self.inplanes = widths[2]
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_stage(base_width, int(depths[0]), stride=1)
        self.layer2 = self._make_stage(base_width * 2, int(depths[1]), stride=2)
        self.layer3 = self._make_stage(base_width * 4, int(depths[2]), stride=2)
        self.layer4 = self._make_stage(base_width * 8, int(depths[3]), stride=2)
        self.stage_channels = [base_width * m * block.expansion for m in (1, 2, 4, 8)]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out_channels = planes * self.block.expansion
        downsample = None
        if stride != 1 or self.inplanes != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, out_channels, kernel_size=1, stride=stride, bias=False),
                self._norm_layer(out_channels),
            )
        layers: list[nn.Module] = []
        for i in range(blocks):
            layers.append(
                self.block(
                    self.inplanes,
                    planes,
                    stride=stride if i == 0 else 1,
                    downsample=downsample if i == 0 else None,
                    groups=self._groups,
                    base_width=self._width_per_group,
                    norm_layer=self._norm_layer,
                )
            )
            self.inplanes = out_channels
        return nn.Sequential(*layers)

    def stages(self) -> list[nn.Module]:
        """The freezable stages in order: stem (conv1+bn1), res2, res3, res4, res5."""
        return [nn.ModuleList([self.conv1, self.bn1]), self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Run the trunk.

        Args:
            images: FloatTensor[B, 3, H, W] normalised images.

        Returns:
            {"res2": FloatTensor[B, C2, H/4, W/4], ..., "res5": FloatTensor[B, C5, H/32, W/32]}
            (sizes rounded up by the stride-2 convs).
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        out: dict[str, Tensor] = {}
        for name, layer in zip(TRUNK_STAGES, (self.layer1, self.layer2, self.layer3, self.layer4), strict=True):
            x = layer(x)
            out[name] = x
        return out


def convert_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every `nn.BatchNorm2d` under `module` by a `FrozenBatchNorm2d` with its statistics.

    Returns the converted module (a new object when `module` itself is a BatchNorm2d).
    """
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.track_running_stats and module.running_mean is not None:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new_child = convert_frozen_batchnorm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def load_trunk_weights(trunk: ResNetTrunk, path: str | os.PathLike[str]) -> None:
    """Load a torchvision ImageNet ResNet state dict (a local file) into `trunk`.

    The classifier (`fc.*`) is dropped; every other key must match by name and shape.

    Raises:
        FileNotFoundError: when `path` does not exist.
        ValueError: naming the file and the missing, unexpected or mis-shaped keys.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling error means an unusable file
        raise ValueError(f"backbone weights {path}: cannot load: {torch_load_failure(e)}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"backbone weights {path}: expected a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith(("fc.", "module.fc."))}
    expected = trunk.state_dict()
    # FrozenBatchNorm2d has no num_batches_tracked; a trainable BatchNorm2d keeps its own counter
    state = {k: v for k, v in state.items() if not (k.endswith("num_batches_tracked") and k not in expected)}
    missing = sorted(k for k in expected if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in expected)
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[:5]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:5]})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[:3]})")
    if problems:
        raise ValueError(
            f"backbone weights {path} do not fit the trunk (is it the torchvision state dict of the "
            f"configured network, with base_width 64 and the default depths?): " + "; ".join(problems)
        )
    trunk.load_state_dict(state, strict=False)


def freeze_stages(trunk: ResNetTrunk, freeze_at: int) -> None:
    """Freeze the first `freeze_at` stages of `trunk` in place (stem, res2, ..., res5).

    Frozen stages stop receiving gradients, and their trainable BatchNorms become
    `FrozenBatchNorm2d` with the same statistics.

    Args:
        trunk: the trunk to freeze.
        freeze_at: 0 none, 1 stem, 2 stem + res2 (Mask R-CNN default), ..., 5 all stages.

    Raises:
        ValueError: when `freeze_at` is outside 0..5.
    """
    if not 0 <= freeze_at <= 5:
        raise ValueError(f"freeze_at must be in 0..5 (0 none, 1 stem, ..., 5 all stages), got {freeze_at}")
    for stage in trunk.stages()[:freeze_at]:
        for p in stage.parameters():
            p.requires_grad_(False)
    # A frozen stage must also stop updating BN statistics, so its BatchNorms become frozen ones
    # (detectron2 does the same); the stem's bn1 sits directly on the trunk.
    if freeze_at >= 1 and isinstance(trunk.bn1, nn.BatchNorm2d):
        trunk.bn1 = convert_frozen_batchnorm(trunk.bn1)
    if freeze_at >= 1 and isinstance(trunk.conv1, nn.Sequential):
        convert_frozen_batchnorm(trunk.conv1)  # the norms inside a deep stem
    for name in ("layer1", "layer2", "layer3", "layer4")[: max(0, freeze_at - 1)]:
        convert_frozen_batchnorm(getattr(trunk, name))


def build_trunk(cfg: BackboneConfig) -> ResNetTrunk:
    """Build the ResNet(-X) trunk described by `cfg`, load its weights and freeze its stages.

    Weights (when `cfg.weights` is set) are loaded before freezing, so frozen BatchNorms carry the
    file's statistics.

    Raises:
        ValueError: for an unknown network name or norm, bad depths/widths/freeze_at, or unusable
            weights.
        FileNotFoundError: when `cfg.weights` names a missing file.
    """
    if cfg.name not in RESNET_SPECS:
        raise ValueError(f"unknown backbone {cfg.name!r}; known: {sorted(RESNET_SPECS)}")
    if cfg.norm not in NORMS:
        raise ValueError(f"unknown backbone norm {cfg.norm!r}; known: {list(NORMS)}")
    spec = RESNET_SPECS[cfg.name]
    depths = tuple(cfg.depths) if len(cfg.depths) else spec.depths
    norm_layer: Callable[[int], nn.Module] = FrozenBatchNorm2d if cfg.norm == "frozen_bn" else nn.BatchNorm2d
    trunk = ResNetTrunk(
        block=spec.block,
        depths=depths,
        base_width=cfg.base_width,
        groups=spec.groups,
        width_per_group=spec.width_per_group,
        norm_layer=norm_layer,
        stem=cfg.stem,
    )
    if cfg.weights:
        load_trunk_weights(trunk, cfg.weights)
    freeze_stages(trunk, cfg.freeze_at)
    return trunk
