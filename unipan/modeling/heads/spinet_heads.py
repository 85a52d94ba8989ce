"""SPINet's heads (Hwang et al. 2021, Sec. 3.2-4): filter sampling, Panoptic-Feature, auxiliary heads.

- `FilterSamplingModule`: a class head (torchvision's `FCOSClassificationHead`: 4 x [3x3 conv,
  GN(32), ReLU] + a 3x3 class conv) and a filter head of the same structure reading the level
  plus two CoordConv channels, both shared over the levels; the filter of a location is the k x k
  window of the filter map around it, through one fully connected layer, reshaped to a kernel
  [D_phi, k, k]. The layer runs only on sampled locations (Sec. 3.2).
- `PanopticFeatureGenerator`: Panoptic-FPN towers merged at stride 8, CoordConv, two 3x3 convs and
  a deconvolution to stride 4 (Sec. 3.3, Fig. 3).
- `ContourHead` (1x1 conv to 16 channels + pixel shuffle 4) and `TripletHead` (one FC) for the
  auxiliary losses of Sec. 4; training only.
- `location_targets`: the instance each FSM location is assigned to (Sec. 5.2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.fcos import FCOSClassificationHead

from unipan.modeling.layers import require_features
from unipan.modeling.layers.dynamic_conv import coord_features, gather_windows
from unipan.structures import PanopticTarget, masks_to_boxes

__all__ = [
    "IGNORE_LOCATION",
    "ContourHead",
    "FilterSamplingModule",
    "PanopticFeatureGenerator",
    "TripletHead",
    "instance_levels",
    "location_targets",
]

IGNORE_LOCATION = -2
"""Value of `location_targets` at cells the classification loss skips (crowd, outside the image)."""


def _gn(channels: int) -> nn.GroupNorm:
    if channels % 32:
        raise ValueError(f"GroupNorm(32) needs channels divisible by 32, got {channels}")
    return nn.GroupNorm(32, channels)


def _equal_channels(in_shapes: dict[str, tuple[int, int]], names: Sequence[str], who: str) -> int:
    shapes = require_features(in_shapes, names, who)
    channels = {c for c, _ in shapes}
    if len(channels) != 1:
        raise ValueError(f"{who} needs inputs of equal widths, got {dict(zip(names, shapes, strict=True))}")
    return channels.pop()


class FilterSamplingModule(nn.Module):
    """Class head + filter head over the FSM levels, and the FC that turns windows into kernels.

    Args:
        in_shapes: {feature name: (channels, stride)} of the backbone.
        in_features: the FSM levels (equal widths).
        num_things: T, the thing classes.
        num_convs: tower depth of both heads (4).
        filter_channels: D_f, channels of the filter map.
        panoptic_channels: D_phi, input channels of the produced kernels.
        kernel_size: k (odd).
        kernel_bias: also produce one bias per kernel (the FC gets one more output).
        coords: give the filter head two CoordConv channels.
        prior_probability: initial foreground probability of the class head (focal-loss prior).
    """

    def __init__(
        self,
        *,
        in_shapes: dict[str, tuple[int, int]],
        in_features: Sequence[str],
        num_things: int,
        num_convs: int = 4,
        filter_channels: int = 256,
        panoptic_channels: int = 256,
        kernel_size: int = 3,
        kernel_bias: bool = False,
        coords: bool = True,
        prior_probability: float = 0.01,
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"SPINet kernel_size must be odd, got {kernel_size}")
        if num_convs < 1:
            raise ValueError(f"filter sampling towers need at least one conv, got num_convs={num_convs}")
        channels = _equal_channels(in_shapes, in_features, "filter sampling module")
        _gn(channels)
        self.in_features = list(in_features)
        self.strides = [in_shapes[name][1] for name in self.in_features]
        self.num_things = num_things
        self.kernel_size = kernel_size
        self.panoptic_channels = panoptic_channels
        self.kernel_bias = kernel_bias
        self.coords = coords
        self.class_head = FCOSClassificationHead(
            channels, 1, num_things, num_convs=num_convs, prior_probability=prior_probability
        )
        tower: list[nn.Module] = []
        for i in range(num_convs):
            in_ch = channels + 2 if (i == 0 and coords) else channels
            tower += [nn.Conv2d(in_ch, channels, kernel_size=3, padding=1), _gn(channels), nn.ReLU()]
        self.filter_tower = nn.Sequential(*tower)
        self.filter_out = nn.Conv2d(channels, filter_channels, kernel_size=3, padding=1)
        for m in [*self.filter_tower, self.filter_out]:
            if isinstance(m, nn.Conv2d):
                # torchvision's / AdelaiDet's FCOS head init
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)  # type: ignore[arg-type]  # made with bias
        k2 = kernel_size * kernel_size
        self.fc = nn.Linear(k2 * filter_channels, k2 * panoptic_channels + int(kernel_bias))
        # CondInst's controller / Panoptic FCN's kernel init
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(
        self, features: dict[str, Tensor], image_sizes: Sequence[tuple[int, int]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Class logits and filter maps of every FSM level.

        Args:
            features: backbone features holding `in_features`, FloatTensor[B, C, H_l, W_l].
            image_sizes: per image (h, w) in input pixels (for the coordinates).

        Returns:
            (class logits per level FloatTensor[B, T, H_l, W_l], filter maps per level
            FloatTensor[B, D_f, H_l, W_l]).
        """
        # The towers are shared over the levels and normalise per image (GroupNorm), so levels of
        # one size and stride (P2 and P3, both at stride 8) run as one batch: fewer, larger convs,
        # the same outputs.
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i, (name, stride) in enumerate(zip(self.in_features, self.strides, strict=True)):
            groups.setdefault((stride, *features[name].shape[-2:]), []).append(i)
        per_level: dict[int, tuple[Tensor, Tensor]] = {}  # level -> (class logits, filter map)
        for (stride, h, w), members in groups.items():
            x = torch.cat([features[self.in_features[i]] for i in members])
            group_logits = self.class_head.cls_logits(self.class_head.conv(x))
            if self.coords:
                coords = coord_features((h, w), stride, image_sizes, device=x.device).to(x.dtype)
                x = torch.cat([x, coords.repeat(len(members), 1, 1, 1)], dim=1)
            group_filters = self.filter_out(self.filter_tower(x))
            chunks = zip(group_logits.chunk(len(members)), group_filters.chunk(len(members)), strict=True)
            per_level.update(zip(members, chunks, strict=True))
        levels = range(len(self.in_features))
        return [per_level[i][0] for i in levels], [per_level[i][1] for i in levels]

    def kernels(
        self, filter_maps: Sequence[Tensor], level: Tensor, batch_index: Tensor, ys: Tensor, xs: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """Dynamic kernels of the given locations: window -> FC -> [D_phi, k, k] (+ bias).

        Args:
            filter_maps: the filter maps of `forward`.
            level: LongTensor[N] index into `filter_maps` of each location.
            batch_index, ys, xs: LongTensor[N] image, row and column of each location.

        Returns:
            kernels FloatTensor[N, D_phi, k, k] and biases FloatTensor[N] (None without
            `kernel_bias`), in the order of the locations.
        """
        k = self.kernel_size
        n = level.numel()
        dim = filter_maps[0].shape[1] * k * k
        windows = filter_maps[0].new_zeros((n, dim))
        for lvl, fmap in enumerate(filter_maps):
            sel = torch.nonzero(level == lvl).flatten()
            if sel.numel():
                windows = windows.index_copy(0, sel, gather_windows(fmap, batch_index[sel], ys[sel], xs[sel], k))
        params = self.fc(windows)
        kernels = params[:, : k * k * self.panoptic_channels].reshape(n, self.panoptic_channels, k, k)
        bias = params[:, -1] if self.kernel_bias else None
        return kernels, bias


class PanopticFeatureGenerator(nn.Module):
    """Panoptic-FPN towers merged at stride 8, CoordConv, two 3x3 convs, deconvolution to stride 4.

    A level of stride s goes through max(1, log2(s / 8)) blocks of [3x3 conv, GN(32), ReLU, 2x
    bilinear upsampling unless at stride 8]; the towers are summed, two coordinate channels are
    appended, and [3x3 conv, GN, ReLU] x 2 and a stride-2 transposed conv (no activation) give the
    Panoptic-Feature at stride 4.

    Args:
        in_shapes: {feature name: (channels, stride)} of the backbone.
        in_features: the PFG levels (strides 8 * 2**k).
        conv_dims: tower width.
        out_channels: D_phi.
        coords: append CoordConv channels before the two convs.
        deconv_kernel: kernel of the transposed conv (even: 2 or 4).
    """

    merge_stride: int = 8

    def __init__(
        self,
        *,
        in_shapes: dict[str, tuple[int, int]],
        in_features: Sequence[str],
        conv_dims: int = 256,
        out_channels: int = 256,
        coords: bool = True,
        deconv_kernel: int = 2,
    ) -> None:
        super().__init__()
        require_features(in_shapes, in_features, "Panoptic-Feature generator")
        if deconv_kernel < 2 or deconv_kernel % 2:
            raise ValueError(f"deconv_kernel must be even (2 or 4), got {deconv_kernel}")
        self.in_features = list(in_features)
        self.coords = coords
        self.out_channels = out_channels
        self.scale_heads = nn.ModuleDict()
        for name in self.in_features:
            channels, stride = in_shapes[name]
            ratio = stride // self.merge_stride
            if stride % self.merge_stride or ratio & (ratio - 1):
                raise ValueError(f"feature {name!r} has stride {stride}; the PFG needs strides 8 * 2**k")
            octaves = int(math.log2(ratio))
            blocks: list[nn.Module] = []
            for k in range(max(1, octaves)):
                blocks += [
                    nn.Conv2d(channels if k == 0 else conv_dims, conv_dims, kernel_size=3, padding=1, bias=False),
                    _gn(conv_dims),
                    nn.ReLU(inplace=True),
                ]
                if octaves > 0:
                    blocks.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads[name] = nn.Sequential(*blocks)
        self.tail = nn.Sequential(
            nn.Conv2d(conv_dims + 2 * int(coords), out_channels, kernel_size=3, padding=1, bias=False),
            _gn(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            _gn(out_channels),
            nn.ReLU(inplace=True),
        )
        self.deconv = nn.ConvTranspose2d(
            out_channels, out_channels, deconv_kernel, stride=2, padding=(deconv_kernel - 2) // 2
        )
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                # detectron2's c2_msra_fill, as the semantic FPN head
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, features: dict[str, Tensor], image_sizes: Sequence[tuple[int, int]]) -> Tensor:
        """The Panoptic-Feature.

        Args:
            features: backbone features holding `in_features`.
            image_sizes: per image (h, w) in input pixels (for the coordinates).

        Returns:
            FloatTensor[B, out_channels, H/4, W/4] for a padded input of H x W (multiples of 32).
        """
        fused: Tensor | None = None
        for name in self.in_features:
            y = self.scale_heads[name](features[name])
            if fused is not None:
                # coarse levels of rounded-up size (P6, P7) come back a little larger: crop
                y = y[..., : fused.shape[-2], : fused.shape[-1]]
            fused = y if fused is None else fused + y
        assert fused is not None
        if self.coords:
            coords = coord_features(
                (int(fused.shape[-2]), int(fused.shape[-1])), self.merge_stride, image_sizes, device=fused.device
            )
            fused = torch.cat([fused, coords.to(fused.dtype)], dim=1)
        return self.deconv(self.tail(fused))


class ContourHead(nn.Module):
    """1x1 conv to 16 channels + pixel shuffle 4: one contour logit per input pixel (Sec. 4).

    Args:
        in_channels: D_phi.
        upscale: the Panoptic-Feature's stride (4): upscale**2 output channels are shuffled.
    """

    def __init__(self, in_channels: int, upscale: int = 4, prior_probability: float = 0.01) -> None:
        super().__init__()
        self.upscale = upscale
        self.conv = nn.Conv2d(in_channels, upscale * upscale, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=0.01)
        # contours are rare: start from the focal-loss prior, as the class head
        nn.init.constant_(self.conv.bias, -math.log((1 - prior_probability) / prior_probability))  # type: ignore[arg-type]

    def forward(self, features: Tensor) -> Tensor:
        """FloatTensor[B, D, h, w] -> FloatTensor[B, h * upscale, w * upscale] contour logits.

        Channel upscale * i + j of cell (y, x) is pixel (upscale * y + i, upscale * x + j).
        """
        return F.pixel_shuffle(self.conv(features), self.upscale)[:, 0]


class TripletHead(nn.Module):
    """The FC of Eq. 4: a pooled Panoptic-Feature vector -> the triplet representation V.

    Args:
        in_channels: D_phi.
        out_channels: size of V.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, out_channels)

    def forward(self, pooled: Tensor) -> Tensor:
        """FloatTensor[N, D] -> FloatTensor[N, out_channels]."""
        return self.fc(pooled)


def instance_levels(masks: Tensor, scale_ranges: Sequence[tuple[float, float]] | None, num_levels: int) -> Tensor:
    """Which FSM levels each instance may be positive on: BoolTensor[N, L].

    Without ranges (the paper) every level. With ranges (Panoptic FCN's and FCOS's size of interest)
    level l takes the instances whose scale, sqrt(w * h) of the mask's tight box in input pixels,
    lies in [lo_l, hi_l]; ranges may overlap, and a scale below the first range or above the last
    goes to the first or last level.
    """
    n = masks.shape[0]
    if scale_ranges is None or n == 0:
        return torch.ones(n, num_levels, dtype=torch.bool, device=masks.device)
    if len(scale_ranges) != num_levels:
        raise ValueError(f"{len(scale_ranges)} scale ranges for {num_levels} FSM levels")
    boxes = masks_to_boxes(masks).double()
    scale = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()
    lo = torch.tensor([r[0] for r in scale_ranges], dtype=torch.float64, device=masks.device)
    hi = torch.tensor([r[1] for r in scale_ranges], dtype=torch.float64, device=masks.device)
    clamped = scale.clamp(min=float(lo[0]), max=float(hi[-1]))
    return (clamped[:, None] >= lo) & (clamped[:, None] <= hi)


def location_targets(
    target: PanopticTarget,
    shapes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    scale_ranges: Sequence[tuple[float, float]] | None = None,
) -> list[Tensor]:
    """The instance assigned to each FSM location of one image (SPINet Sec. 5.2).

    A location (cell (i, j) of a level of stride s) is positive for an instance when the pixel at
    its centre (i * s + s // 2, j * s + s // 2) lies in the instance's mask; where masks overlap
    the smaller instance wins. Centres on crowd pixels or outside the image are ignored. An
    instance without a positive on any level (thin or tiny) gets the cell of the finest level its
    mask covers most, unless another instance holds that cell. With `scale_ranges` an instance
    is positive only on the levels of its scale (`instance_levels`); elsewhere its cells are
    background, and its fallback cell is on the finest of its levels.

    Args:
        target: the ground truth (masks BoolTensor[N, h, w], crowd BoolTensor[h, w]).
        shapes: (H_l, W_l) of every level.
        strides: stride of every level.
        scale_ranges: per level (lo, hi) instance scales in input pixels, or None (every level).

    Returns:
        Per level LongTensor[H_l, W_l]: instance index, -1 background, IGNORE_LOCATION ignored.
    """
    h, w = target.image_size
    masks = target.masks
    device = masks.device
    n = masks.shape[0]
    levels = instance_levels(masks, scale_ranges, len(shapes))
    order = torch.argsort(masks.flatten(1).sum(dim=1), descending=True, stable=True).tolist() if n else []
    maps: dict[tuple[bool, ...], Tensor] = {}

    def index_map(eligible: Tensor) -> Tensor:
        key = tuple(bool(v) for v in eligible)
        if key not in maps:
            m = torch.full((h, w), -1, dtype=torch.long, device=device)
            # larger first, so the smaller instance is painted last and wins an overlap
            for i in order:
                if key[i]:
                    m.masked_fill_(masks[i], i)
            maps[key] = m.masked_fill_(target.crowd & (m < 0), IGNORE_LOCATION)
        return maps[key]

    out = []
    for lvl, ((hl, wl), s) in enumerate(zip(shapes, strides, strict=True)):
        ys = torch.arange(hl, device=device) * s + s // 2
        xs = torch.arange(wl, device=device) * s + s // 2
        level = torch.full((hl, wl), IGNORE_LOCATION, dtype=torch.long, device=device)
        ny, nx = int((ys < h).sum()), int((xs < w).sum())
        level[:ny, :nx] = index_map(levels[:, lvl])[ys[:ny]][:, xs[:nx]]
        out.append(level)
    if n:
        seen = torch.zeros(n, dtype=torch.bool, device=device)
        for level in out:
            ids = level[level >= 0]
            seen[ids] = True
        by_stride = sorted(range(len(strides)), key=lambda k: strides[k])
        for i in torch.nonzero(~seen).flatten().tolist():
            finest = next(k for k in by_stride if bool(levels[i, k]))
            s = strides[finest]
            hl, wl = shapes[finest]
            mask = F.pad(masks[i].float()[None, None], (0, wl * s - w, 0, hl * s - h))
            coverage = F.avg_pool2d(mask, s)[0, 0]
            coverage[out[finest] >= 0] = -1.0  # never take another instance's cell
            best = int(torch.argmax(coverage))
            if float(coverage.flatten()[best]) > 0:
                out[finest][best // wl, best % wl] = i
    return out
