"""Transforms that move an image and its panoptic id map together.

Every transform maps ``(image, panoptic)`` to the same pair, where

- image: FloatTensor[3, H, W], RGB; 0..255 until `Normalize`, which is the last step;
- panoptic: IntTensor[H, W] (int32) segment ids, 0 = void; or None at inference.

The target (sem_seg, masks, boxes, crowd) is derived from the transformed id map afterwards by
`PanopticTarget.from_panoptic`, so its fields cannot drift apart, and instances that a crop
removes disappear there.

Geometry: the image is resized bilinearly (antialiased when it shrinks), the id map with
nearest-neighbour on the same half-pixel grid (``nearest-exact``), so both stay aligned. Padding
puts void (0) in the id map and the pixel mean in the image, which `Normalize` turns into 0, the
value `collate` pads batches with: padded pixels look the same wherever the padding came from.

Randomness comes from torch's global RNG, so `torch.manual_seed` and the DataLoader's per-worker
seeding make pipelines reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from unipan.config import DataConfig
from unipan.config.parts import IMAGENET_MEAN, IMAGENET_STD
from unipan.data.common import Transform
from unipan.segments import nearest_source_index
from unipan.structures import VOID_ID


def _check_pair(image: Tensor, panoptic: Tensor | None) -> None:
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be FloatTensor[3, H, W], got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"image must be a float tensor (0..255), got {image.dtype}")
    if panoptic is not None and panoptic.shape != image.shape[1:]:
        raise ValueError(f"panoptic map {tuple(panoptic.shape)} and image {tuple(image.shape[1:])} differ in size")


def resize_pair(image: Tensor, panoptic: Tensor | None, size: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
    """Resize an image bilinearly and its id map by nearest neighbour to `size` = (h, w).

    Args:
        image: FloatTensor[3, H, W].
        panoptic: IntTensor[H, W] or None.
        size: output (h, w), both >= 1.

    Returns:
        FloatTensor[3, h, w] and IntTensor[h, w] (or None).
    """
    out_h, out_w = int(size[0]), int(size[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(f"resize target {size} must be at least 1 x 1")
    h, w = image.shape[-2:]
    if (out_h, out_w) == (h, w):
        return image, panoptic
    shrinking = out_h < h or out_w < w
    image = F.interpolate(image[None], size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=shrinking)[
        0
    ]
    if panoptic is not None:
        # index gathering keeps int32 ids exact (no float round trip) and copies no ids that
        # were not there
        rows = nearest_source_index(out_h, h, panoptic.device)
        cols = nearest_source_index(out_w, w, panoptic.device)
        panoptic = panoptic.index_select(0, rows).index_select(1, cols)
    return image, panoptic


def shortest_edge_size(h: int, w: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """Output (h, w) when the shorter side becomes `short_edge`, the longer capped at `max_size`.

    The aspect ratio is kept; sizes are rounded to the nearest integer (as detectron2's
    ResizeShortestEdge). `max_size` <= 0 means no cap.
    """
    scale = short_edge / min(h, w)
    new_h, new_w = h * scale, w * scale
    if max_size > 0 and max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, panoptic: Tensor | None) -> tuple[Tensor, Tensor | None]:
        for t in self.transforms:
            image, panoptic = t(image, panoptic)  # type: ignore[arg-type]
        return image, panoptic

    def __len__(self) -> int:
        return len(self.transforms)

    def __getitem__(self, i: int) -> Transform:
        return self.transforms[i]

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class ResizeShortestEdge:
    """Resize so the shorter side is a drawn length and the longer side at most `max_size`.

    Args:
        short_edge: one length, or several: with sample="choice" one of them is drawn uniformly
            per call; with sample="range" two values (low, high) and an integer is drawn
            uniformly from [low, high].
        max_size: cap on the longer side after resizing (<= 0: no cap).
        sample: "choice" or "range".
    """

    def __init__(self, short_edge: int | Sequence[int], max_size: int, sample: str = "choice") -> None:
        edges = [int(short_edge)] if isinstance(short_edge, int) else [int(s) for s in short_edge]
        if not edges or any(s <= 0 for s in edges):
            raise ValueError(f"short_edge must be positive lengths, got {short_edge!r}")
        if sample not in ("choice", "range"):
            raise ValueError(f"sample must be 'choice' or 'range', got {sample!r}")
        if sample == "range" and (len(edges) != 2 or edges[0] > edges[1]):
            raise ValueError(f"sample='range' needs short_edge=(low, high) with low <= high, got {edges}")
        self.short_edge = edges
        self.max_size = int(max_size)
        self.sample = sample

    def draw_short_edge(self) -> int:
        if self.sample == "range":
            low, high = self.short_edge
            return int(torch.randint(low, high + 1, ()).item())
        if len(self.short_edge) == 1:
            return self.short_edge[0]
        return self.short_edge[int(torch.randint(len(self.short_edge), ()).item())]

    def __call__(self, image: Tensor, panoptic: Tensor | None) -> tuple[Tensor, Tensor | None]:
        _check_pair(image, panoptic)
        h, w = image.shape[-2:]
        size = shortest_edge_size(h, w, self.draw_short_edge(), self.max_size)
        return resize_pair(image, panoptic, size)

    def __repr__(self) -> str:
        return f"ResizeShortestEdge(short_edge={self.short_edge}, max_size={self.max_size}, sample={self.sample!r})"


class LimitLongestEdge:
    """Shrink an image whose longer side exceeds `max_size` to that size (aspect kept); others pass.

    What `min_size_test: 0` ("keep the file's size") does at test time: a 6000 x 8000 photo is
    not run at full size, a small image is not enlarged.
    """

    def __init__(self, max_size: int) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be a positive length, got {max_size}")
        self.max_size = int(max_size)

    def __call__(self, image: Tensor, panoptic: Tensor | None) -> tuple[Tensor, Tensor | None]:
        _check_pair(image, panoptic)
        h, w = image.shape[-2:]
        if max(h, w) <= self.max_size:
            return image, panoptic
        return resize_pair(image, panoptic, shortest_edge_size(h, w, min(h, w), self.max_size))

    def __repr__(self) -> str:
        return f"LimitLongestEdge(max_size={self.max_size})"


class RandomHorizontalFlip:
    """Mirror image and id map left-right with probability `p`."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must lie in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, image: Tensor, panoptic: Tensor | None) -> tuple[Tensor, Tensor | None]:
        _check_pair(image, panoptic)
        # draw even when p is 0 or 1, so the RNG stream does not depend on p
        if float(torch.rand(())) < self.p:
            image = image.flip(-1)
            panoptic = None if panoptic is None else panoptic.flip(-1)
        return image, panoptic

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomScaleCrop:
    """Scale by a random factor, then cut a random `crop_size` window, padding where too small.

    The factor is drawn uniformly from `scale_range` and applied to the current size (so it
    follows a ResizeShortestEdge, as in the Cityscapes recipes: scale 0.5-2.0, crop 512 x 1024).
    Where the scaled image is smaller than the crop, it is padded at the bottom/right: the id map
    with void (0, hence IGNORE_LABEL in sem_seg) and the image with `pad_value`, the pixel mean, so
    padding is 0 after `Normalize`. Instances cut away entirely vanish from the target;
    boxes of the others are recomputed from their cropped masks.

    Args:
        scale_range: (low, high) scale factors, 0 < low <= high.
        crop_size: output (h, w); None scales without cropping.
        pad_value: RGB fill for the image on the 0..255 scale.
    """

    def __init__(
        self,
        scale_range: Sequence[float] = (0.5, 2.0),
        crop_size: Sequence[int] | None = None,
        pad_value: Sequence[float] = IMAGENET_MEAN,
    ) -> None:
        if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range!r}")
        if crop_size is not None and (len(crop_size) != 2 or min(crop_size) < 1):
            raise ValueError(f"crop_size must be (h, w) of positive sizes, got {crop_size!r}")
        if len(pad_value) != 3:
            raise ValueError(f"pad_value must have 3 (RGB) values, got {pad_value!r}")
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.crop_size = None if crop_size is None else (int(crop_size[0]), int(crop_size[1]))
        self.pad_value = tuple(float(v) for v in pad_value)

    def __call__(self, image: Tensor, panoptic: Tensor | None) -> tuple[Tensor, Tensor | None]:
        _check_pair(image, panoptic)
        low, high = self.scale_range
        scale = low + (high - low) * float(torch.rand(()))
        h, w = image.shape[-2:]
        image, panoptic = resize_pair(image, panoptic, (max(1, round(h * scale)), max(1, round(w * scale))))
        if self.crop_size is None:
            return image, panoptic
        crop_h, crop_w = self.crop_size
        image, panoptic = self._pad_to(image, panoptic, crop_h, crop_w)
        h, w = image.shape[-2:]
        y0 = int(torch.randint(h - crop_h + 1, ()))
        x0 = int(torch.randint(w - crop_w + 1, ()))
        image = image[:, y0 : y0 + crop_h, x0 : x0 + crop_w]
        if panoptic is not None:
            panoptic = panoptic[y0 : y0 + crop_h, x0 : x0 + crop_w]
        return image, panoptic

    def _pad_to(self, image: Tensor, panoptic: Tensor | None, min_h: int, min_w: int) -> tuple[Tensor, Tensor | None]:
        h, w = image.shape[-2:]
        out_h, out_w = max(h, min_h), max(w, min_w)
        if (out_h, out_w) == (h, w):
            return image, panoptic
        fill = torch.tensor(self.pad_value, dtype=image.dtype, device=image.device)
        padded = fill[:, None, None].expand(3, out_h, out_w).clone()
        padded[:, :h, :w] = image
        if panoptic is not None:
            pan = panoptic.new_full((out_h, out_w), VOID_ID)
            pan[:h, :w] = panoptic
            panoptic = pan
        return padded, panoptic

    def __repr__(self) -> str:
        return f"RandomScaleCrop(scale_range={self.scale_range}, crop_size={self.crop_size})"


class Normalize:
    """(image - mean) / std per RGB channel; the id map passes through. The last transform.

    Args:
        mean: RGB mean on the 0..255 scale.
        std: RGB standard deviation on the 0..255 scale (all > 0).
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 (RGB) values, got {mean!r}, {std!r}")
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {std!r}")
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def __call__(self, image: Tensor, panoptic: Tensor | None) -> tuple[Tensor, Tensor | None]:
        _check_pair(image, panoptic)
        mean = torch.tensor(self.mean, dtype=image.dtype, device=image.device)[:, None, None]
        std = torch.tensor(self.std, dtype=image.dtype, device=image.device)[:, None, None]
        return (image - mean) / std, panoptic

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


def build_transforms(cfg: DataConfig, is_train: bool) -> Compose:
    """The data pipeline of a config.

    Training: ResizeShortestEdge(min_size_train, drawn per image, max_size_train) unless
    min_size_train is empty or [0]; RandomScaleCrop when scale_range or crop_size is set
    (scale (1, 1) when only crop_size is, no crop when only scale_range is); flip with
    flip_prob; Normalize. Testing: ResizeShortestEdge(min_size_test, max_size_test); with
    min_size_test 0 ("keep the file's size") max_size_test still caps the longer side (a large
    photo is shrunk to it, a smaller one kept as it is); Normalize.
    """
    transforms: list[Transform] = []
    if is_train:
        sizes = [int(s) for s in cfg.min_size_train]
        if sizes and sizes != [0]:
            transforms.append(ResizeShortestEdge(sizes, cfg.max_size_train, sample="choice"))
        if cfg.scale_range or cfg.crop_size:
            scale_range = tuple(cfg.scale_range) if cfg.scale_range else (1.0, 1.0)
            crop_size = tuple(cfg.crop_size) if cfg.crop_size else None
            transforms.append(RandomScaleCrop(scale_range, crop_size, pad_value=cfg.pixel_mean))
        if cfg.flip_prob > 0:
            transforms.append(RandomHorizontalFlip(cfg.flip_prob))
    elif cfg.min_size_test > 0:
        transforms.append(ResizeShortestEdge(cfg.min_size_test, cfg.max_size_test))
    elif cfg.max_size_test > 0:
        transforms.append(LimitLongestEdge(cfg.max_size_test))
    transforms.append(Normalize(cfg.pixel_mean, cfg.pixel_std))
    return Compose(transforms)
