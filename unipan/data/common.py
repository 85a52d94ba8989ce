"""The one path from decoded arrays to a `Sample`, shared by every dataset (real or synthetic).

The dataset contract, beyond `__len__` and `__getitem__(i) -> Sample`: a dataset used for
evaluation also offers `original_panoptic(i)` (`HasOriginalPanoptic`), the ground truth of item i
as its file holds it, without transforms. PQ, mIoU and AP are measured against it at each image's
original size, as panopticapi measures them; the evaluator asks for it only when the item's input
size differs from its `original_size` (test-time transforms only resize, so an item that kept its
size carries its original ground truth in `Sample.target`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from unipan.structures import DatasetMeta, PanopticTarget, Sample, SegmentInfo

Transform = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""(image FloatTensor[3, H, W], panoptic IntTensor[H, W]) -> the same, transformed in step."""


@runtime_checkable
class HasOriginalPanoptic(Protocol):
    """A dataset that can give the untransformed ground truth of an item (for evaluation)."""

    def original_panoptic(self, i: int) -> tuple[np.ndarray, list[SegmentInfo]]:
        """Ground truth of item i at the file's size, without transforms and without the photo.

        Returns:
            ids int32[H, W] (0 = void; H x W = the item's `Sample.original_size`) and its segments
            as the annotation lists them (crowd included, with their stated areas).
        """
        ...


def _torch_ready(a: np.ndarray, dtype: type | None = None) -> np.ndarray:
    """C-contiguous array of `dtype` that torch.from_numpy can share without copying.

    Read-only arrays (decoders often return them) are copied, since torch cannot wrap them safely.
    """
    return np.array(a, dtype=dtype, order="C", copy=None if a.flags.writeable else True)


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
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image {image_id!r}: expected an H x W x 3 RGB array, got shape {image.shape}")
    if panoptic.ndim != 2:
        raise ValueError(f"image {image_id!r}: expected an H x W panoptic id map, got shape {panoptic.shape}")
    if image.shape[:2] != panoptic.shape[:2]:
        raise ValueError(
            f"image {image_id!r}: image size {image.shape[:2]} differs from panoptic PNG size {panoptic.shape[:2]}"
        )
    img_t = torch.from_numpy(_torch_ready(image)).permute(2, 0, 1).float()
    pan_t = torch.from_numpy(_torch_ready(panoptic, np.int32))
    if transform is not None:
        img_t, pan_t = transform(img_t, pan_t)
    target = PanopticTarget.from_panoptic(pan_t, segments, meta, image_id=image_id)
    return Sample(image=img_t, target=target, image_id=image_id, original_size=tuple(image.shape[:2]))
