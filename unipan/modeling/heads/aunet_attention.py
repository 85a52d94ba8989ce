"""AUNet's attention modules (Li et al. 2019, Sec. 3.3) and the background branch they act in.

- `AttentionModule`: Eq. 1-2 (an FG guide -> 1 - sigmoid(M) -> residual S * (1 + M')) with the
  optional background reweighting of Eq. 3-4 (`BackgroundReweight`). With a level's RPN features
  as the guide it is the Proposal Attention Module (PAM, Sec. 3.3.1); with the RoIUpsampled mask
  features it is the Mask Attention Module (MAM, Sec. 3.3.2, "similar with that in PAM").
- `attended_semantic_features`: Panoptic FPN's semantic towers (`SemanticFPNHead`) with PAM_i
  after the first [conv, norm, ReLU] block of level i, where the map still has the level's (and
  its RPN features') resolution; returns the summed stride-4 map S_pam.
- `mask_guide`: RoIUpsample of the FG mask features into each RoI's pyramid level, upsampled to
  stride 4 and summed (the MAM guide F_mask).
- `HiddenMaskPredictor`: Mask R-CNN's mask predictor that also keeps its 28 x 28 hidden features
  (deconv + ReLU, before the per-class 1x1 logits), which MAM reads.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

from unipan.modeling.heads.semantic_fpn import SemanticFPNHead
from unipan.modeling.layers.roi_upsample import multiscale_roi_upsample

__all__ = [
    "AttentionModule",
    "BackgroundReweight",
    "HiddenMaskPredictor",
    "attended_semantic_features",
    "mask_guide",
]

MIN_CHANNELS_PER_GROUP = 4
"""GroupNorm over the C_s x 1 x 1 vector of Eq. 3: with 1 channel per group its output is the
constant beta (the reweighting vanishes), with 2 it is +-gamma + beta; keep at least 4."""


def _msra_init(conv: nn.Conv2d) -> None:
    """MSRA init (He et al. 2015), zero bias: the paper's init of the non-backbone layers (Sec. 3.4)."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class BackgroundReweight(nn.Module):
    """Eq. 3-4: N = sigmoid(GN(conv1x1(GAP(S')))), S'' = S' * N (SE-like channel reweighting).

    Args:
        channels: C_s.
        groups: GroupNorm groups (C_s / groups >= 4).

    Raises:
        ValueError: when `channels` is not a multiple of `groups` or leaves fewer than 4 per group.
    """

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        if groups < 1 or channels % groups or channels // groups < MIN_CHANNELS_PER_GROUP:
            raise ValueError(
                f"background reweight: GroupNorm({groups}) over {channels} channels needs a divisor of "
                f"{channels} leaving >= {MIN_CHANNELS_PER_GROUP} channels per group (model.aunet.reweight_gn_groups)"
            )
        # w_{i,3} in R^{C_s x C_s x 1 x 1}; no bias, GN follows
        self.conv = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.norm = nn.GroupNorm(groups, channels)
        _msra_init(self.conv)

    def forward(self, s: Tensor) -> Tensor:
        """S'' of S' FloatTensor[B, C_s, H, W] (same shape); N FloatTensor[B, C_s, 1, 1] is per image."""
        n = torch.sigmoid(self.norm(self.conv(s.mean(dim=(2, 3), keepdim=True))))
        return s * n


class AttentionModule(nn.Module):
    """Eq. 1-4: S -> S' = S * (1 + M'), M' = 1 - sigmoid(conv(ReLU(conv(P)))), optionally reweighted.

    Args:
        guide_channels: C of the guide (PAM: C_r, the RPN features; MAM: C_m, the mask features).
        channels: C_s of the attended semantic features.
        reweight: apply Eq. 3-4 after the attention (Table 1's "rewt").
        reweight_groups: GroupNorm groups of the reweighting.
    """

    def __init__(self, guide_channels: int, channels: int, reweight: bool, reweight_groups: int = 32) -> None:
        super().__init__()
        # w_{i,1} in R^{C_r x C_r x 1 x 1} and w_{i,2} in R^{1 x C_r x 1 x 1} (Eq. 1), with biases
        self.conv1 = nn.Conv2d(guide_channels, guide_channels, kernel_size=1)
        self.conv2 = nn.Conv2d(guide_channels, 1, kernel_size=1)
        _msra_init(self.conv1)
        _msra_init(self.conv2)
        self.reweight = BackgroundReweight(channels, reweight_groups) if reweight else None
        self.guide_channels = guide_channels
        self.channels = channels

    def attention(self, guide: Tensor) -> Tensor:
        """M' = 1 - sigmoid(M) of a guide FloatTensor[B, C_g, H, W]: FloatTensor[B, 1, H, W] in (0, 1).

        sigma in Eq. 1 is a ReLU, as the paper writes; 1 - sigmoid "emphasizes the background".
        """
        return 1 - torch.sigmoid(self.conv2(F.relu(self.conv1(guide))))

    def forward(self, s: Tensor, guide: Tensor) -> tuple[Tensor, Tensor]:
        """Attend S with the guide.

        Args:
            s: FloatTensor[B, C_s, H, W] semantic features.
            guide: FloatTensor[B, C_g, H, W] FG features at the same resolution.

        Returns:
            (S'' or S' FloatTensor[B, C_s, H, W], M' FloatTensor[B, 1, H, W]).
        """
        if guide.shape[-2:] != s.shape[-2:] or guide.shape[0] != s.shape[0]:
            raise ValueError(
                f"attention guide {tuple(guide.shape)} and semantic features {tuple(s.shape)} differ in batch or size"
            )
        m = self.attention(guide)
        # Eq. 2: S'_j = S_j (x) M' (+) S_j, for every channel j
        out = s * (1 + m)
        if self.reweight is not None:
            out = self.reweight(out)
        return out, m


class HiddenMaskPredictor(nn.Sequential):
    """torchvision's `MaskRCNNPredictor` (conv5_mask -> ReLU -> mask_fcn_logits) keeping its hidden map.

    Built from an existing predictor's modules, so parameters, their names and their values are
    unchanged (the instance branch stays Mask R-CNN's). After each call `hidden` holds the
    FloatTensor[K, C_m, 2M', 2M'] deconv + ReLU output of that call, with its graph;
    `take_hidden` hands it over and clears it.
    """

    def __init__(self, predictor: MaskRCNNPredictor) -> None:
        super().__init__(OrderedDict(predictor.named_children()))
        self.hidden: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        """Mask logits FloatTensor[K, T, 2M', 2M'] of the mask head's features FloatTensor[K, C, M', M']."""
        deconv, relu, logits = (self._modules[n] for n in ("conv5_mask", "relu", "mask_fcn_logits"))
        assert deconv is not None and relu is not None and logits is not None
        hidden = relu(deconv(x))
        self.hidden = hidden
        return logits(hidden)

    def take_hidden(self) -> Tensor:
        """The hidden features of the last call (FloatTensor[K, C_m, 2M', 2M']); cleared after."""
        if self.hidden is None:
            raise RuntimeError("HiddenMaskPredictor.take_hidden called before the mask head ran")
        hidden, self.hidden = self.hidden, None
        return hidden


def _first_block_end(tower: nn.Sequential) -> int:
    """Index after the first ReLU of a semantic tower: the end of its first [conv, norm, ReLU] block."""
    for i, module in enumerate(tower):
        if isinstance(module, nn.ReLU):
            return i + 1
    raise ValueError("semantic tower without a ReLU: cannot place the proposal attention")


def attended_semantic_features(
    head: SemanticFPNHead,
    features: Mapping[str, Tensor],
    pam: Mapping[str, AttentionModule] | None = None,
    rpn_features: Mapping[str, Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Panoptic FPN's summed stride-4 semantic map, with PAM inside the towers of `pam`'s levels.

    Without `pam` this is `head.layers(features)` exactly.

    Args:
        head: the semantic head (its towers; the predictor is not applied).
        features: backbone features holding `head.in_features`.
        pam: {level: PAM} for the attended levels (None or empty: no attention).
        rpn_features: {level: FloatTensor[B, C_r, H_l, W_l]}, the RPN's shared 3x3 conv + ReLU
            output of every attended level.

    Returns:
        (S_pam FloatTensor[B, C_s, H/4, W/4], {level: M'_l FloatTensor[B, 1, H_l, W_l]}).
    """
    fused: Tensor | None = None
    maps: dict[str, Tensor] = {}
    for name in head.in_features:
        tower = head.scale_heads[name]
        assert isinstance(tower, nn.Sequential)
        if pam is not None and name in pam:
            assert rpn_features is not None
            cut = _first_block_end(tower)
            y, maps[name] = pam[name](tower[:cut](features[name]), rpn_features[name])
            y = tower[cut:](y)
        else:
            y = tower(features[name])
        fused = y if fused is None else fused + y
    assert fused is not None
    return fused, maps


def mask_guide(
    mask_features: Tensor,
    boxes: Sequence[Tensor],
    level_shapes: Sequence[tuple[int, int]],
    padded_size: tuple[int, int],
    output_size: tuple[int, int],
    *,
    sampling_ratio: int,
    normalize: bool,
    per_level: bool = True,
    canonical_scale: int = 224,
    canonical_level: int = 4,
) -> Tensor:
    """F_mask: FG mask features RoIUpsampled into the map, as MAM's guide (Sec. 3.3.2, Fig. 5).

    Args:
        mask_features: FloatTensor[sum K_i, C_m, m, m] of the boxes (the mask head's).
        boxes: per image FloatTensor[K_i, 4] xyxy in input pixels (the RoIs the mask head ran on).
        level_shapes: (H_l, W_l) of the levels the mask head pools from (P2..P5), fine to coarse.
        padded_size: (Hp, Wp) of the padded batch.
        output_size: (H', W') of the result (the semantic map's stride 4).
        sampling_ratio: the mask pooler's (RoIUpsample inverts that pooling).
        normalize: the paper's Eq. 6 normalisation.
        per_level: True: each RoI goes to its FPN level (as it was pooled), the level maps are
            upsampled bilinearly to `output_size` and summed, as the paper; False: every RoI
            straight into one map at `output_size`.
        canonical_scale, canonical_level: the mask pooler's level mapping.

    Returns:
        FloatTensor[B, C_m, H', W']; RoIs overlapping a pixel add up, pixels under no RoI are 0.
    """
    if per_level:
        levels = multiscale_roi_upsample(
            mask_features,
            boxes,
            level_shapes,
            padded_size,
            sampling_ratio,
            normalize=normalize,
            canonical_scale=canonical_scale,
            canonical_level=canonical_level,
        )
    else:
        levels = multiscale_roi_upsample(
            mask_features, boxes, [output_size], padded_size, sampling_ratio, normalize=normalize
        )
    out: Tensor | None = None
    for level in levels:  # upsample and add level by level: one full-size copy at a time
        if tuple(level.shape[-2:]) != tuple(output_size):
            level = F.interpolate(level, size=output_size, mode="bilinear", align_corners=False)
        out = level if out is None else out + level
    assert out is not None
    return out
