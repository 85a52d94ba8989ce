"""The one path from decoded arrays to a `Sample`, shared by every dataset (real or synthetic)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from unipan.structures import DatasetMeta, PanopticTarget, Sample, SegmentInfo

Transform = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""(image FloatTensor[3, H, W], panoptic IntTensor[H, W]) -> the same, transformed in step."""


def make_sample(
    image: np.ndarray,
    panoptic: np.ndarray,
    segments: Sequence[SegmentInfo],
    meta: DatasetMeta,
    image_id: str,
    transform: Transform | None = None,
) -> Sample:
    """Decoded image + id map + segments -> transformed `Sample` with its canonical target.

    Args:
        image: uint8[H, W, 3] RGB.
        panoptic: int32[H, W] segment ids, 0 = void.
        segments: the segments of `panoptic`.
        meta: class information of the dataset.
        image_id: the image's id (used in error messages).
        transform: applied to the float image (0..255) and the id map together; the last step of
            a training/testing pipeline normalises the image.
    """
    if image.shape[:2] != panoptic.shape[:2]:
        raise ValueError(
            f"image {image_id!r}: image size {image.shape[:2]} differs from panoptic PNG size "
            f"{panoptic.shape[:2]}"
        )
    img_t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    pan_t = torch.from_numpy(np.ascontiguousarray(panoptic, dtype=np.int32))
    if transform is not None:
        img_t, pan_t = transform(img_t, pan_t)
    target = PanopticTarget.from_panoptic(pan_t, segments, meta, image_id=image_id)
    return Sample(image=img_t, target=target, image_id=image_id, original_size=tuple(image.shape[:2]))
