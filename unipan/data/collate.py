"""Samples -> one padded `Batch` that remembers every image's own size."""

from __future__ import annotations

import torch

from unipan.structures import Batch, Sample


def collate(samples: list[Sample], size_divisibility: int = 32) -> Batch:
    """Stack samples into a batch, zero-padding images at the bottom/right.

    Zero is the pixel mean after `Normalize`, the same value the transforms pad with, so a
    network cannot tell batch padding from crop padding. Targets stay at their image's size;
    `Batch.padded_sem_seg` pads them with IGNORE_LABEL when a loss needs the batch shape.

    Args:
        samples: at least one sample; images FloatTensor[3, h_i, w_i] of one dtype and device.
        size_divisibility: both padded sides are rounded up to a multiple of this (FPN strides);
            <= 0 pads only to the largest image.

    Returns:
        Batch with images FloatTensor[B, 3, Hp, Wp] and per-image sizes, ids, original sizes and
        targets.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    for s in samples:
        if s.image.ndim != 3 or s.image.shape[0] != 3:
            raise ValueError(f"image {s.image_id!r}: expected FloatTensor[3, H, W], got {tuple(s.image.shape)}")
    sizes = [(int(s.image.shape[1]), int(s.image.shape[2])) for s in samples]
    max_h = max(h for h, _ in sizes)
    max_w = max(w for _, w in sizes)
    if size_divisibility > 0:
        max_h = -(-max_h // size_divisibility) * size_divisibility
        max_w = -(-max_w // size_divisibility) * size_divisibility
    first = samples[0].image
    images = torch.zeros((len(samples), 3, max_h, max_w), dtype=first.dtype, device=first.device)
    for i, s in enumerate(samples):
        h, w = sizes[i]
        images[i, :, :h, :w] = s.image
    return Batch(
        images=images,
        image_sizes=sizes,
        image_ids=[s.image_id for s in samples],
        targets=[s.target for s in samples],
        original_sizes=[(int(s.original_size[0]), int(s.original_size[1])) for s in samples],
    )


class Collate:
    """`collate` with a fixed size divisibility, picklable for DataLoader worker processes."""

    def __init__(self, size_divisibility: int = 32) -> None:
        self.size_divisibility = int(size_divisibility)

    def __call__(self, samples: list[Sample]) -> Batch:
        return collate(samples, self.size_divisibility)

    def __repr__(self) -> str:
        return f"Collate(size_divisibility={self.size_divisibility})"
