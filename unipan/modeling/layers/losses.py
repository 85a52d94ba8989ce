"""Losses and logit resizing shared by the semantic heads of every model."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from unipan.structures import IGNORE_LABEL

__all__ = ["semantic_loss", "upsample_logits"]


def upsample_logits(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear (align_corners=False) resize of logits to `size`.

    Args:
        logits: FloatTensor[B, C, h, w].
        size: (H, W) of the result.

    Returns:
        FloatTensor[B, C, H, W]; `logits` itself when it already has that size.
    """
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def semantic_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-pixel cross-entropy averaged over the non-ignored pixels.

    Unlike `F.cross_entropy(..., ignore_index=255)`, a batch without a single labelled pixel gives
    0 (with a gradient path) instead of NaN.

    Args:
        logits: FloatTensor[B, C, H, W], already at the targets' size.
        targets: LongTensor[B, H, W] in 0..C-1 or IGNORE_LABEL.

    Returns:
        FloatTensor[] the mean loss.

    Raises:
        ValueError: when batch or size differ, or a labelled pixel lies outside 0..C-1.
    """
    if logits.shape[-2:] != targets.shape[-2:] or logits.shape[0] != targets.shape[0]:
        raise ValueError(
            f"semantic logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in batch or size"
        )
    valid = targets != IGNORE_LABEL
    num_classes = logits.shape[1]
    # one check (a single device sync) instead of a CUDA device-side assert without context
    out_of_range = valid & ((targets < 0) | (targets >= num_classes))
    if bool(out_of_range.any()):
        raise ValueError(f"semantic target {int(targets[out_of_range][0])} out of range for {num_classes} classes")
    total = F.cross_entropy(logits, targets, ignore_index=IGNORE_LABEL, reduction="sum")
    return total / valid.sum().clamp(min=1)
