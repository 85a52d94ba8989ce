"""Losses and logit resizing shared by the semantic heads of every model."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss

from unipan.structures import IGNORE_LABEL

__all__ = [
    "bootstrapped_cross_entropy",
    "contour_loss",
    "contour_targets",
    "dice_loss",
    "multiclass_dice_loss",
    "semantic_loss",
    "soft_margin_triplet_loss",
    "upsample_logits",
]


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


# --- SPINet (Hwang et al. 2021): dice, bootstrapped CE, triplet, contour --------------------------
def dice_loss(probs: Tensor, targets: Tensor, eps: float = 1e-5) -> Tensor:
    """V-Net dice loss per row: 1 - 2 sum(p t) / (sum(p^2) + sum(t^2) + eps).

    An all-zero target gives exactly 1 with zero gradient (the numerator is 0 for every p).

    Args:
        probs: FloatTensor[N, ...] probabilities.
        targets: FloatTensor[N, ...] of the same shape, in [0, 1] (soft targets allowed).
        eps: keeps an all-zero prediction of an all-zero target finite.

    Returns:
        FloatTensor[N].
    """
    if probs.shape != targets.shape:
        raise ValueError(f"dice loss: probabilities {tuple(probs.shape)} and targets {tuple(targets.shape)} differ")
    p = probs.flatten(1)
    t = targets.flatten(1).to(p.dtype)
    return 1 - 2 * (p * t).sum(dim=1) / ((p * p).sum(dim=1) + (t * t).sum(dim=1) + eps)


def multiclass_dice_loss(logits: Tensor, targets: Tensor, eps: float = 1e-5) -> Tensor:
    """SPINet's multi-class dice (Eq. 2): dice of the softmax per class, averaged over the classes.

    Each class is one set over all labelled pixels of the batch; classes absent from the batch
    count (each contributes exactly 1 with zero gradient), the mean is over all C classes.

    Args:
        logits: FloatTensor[B, C, H, W].
        targets: LongTensor[B, H, W] in 0..C-1 or IGNORE_LABEL (ignored pixels are left out).
        eps: as `dice_loss`.

    Returns:
        FloatTensor[].
    """
    _check_targets(logits, targets)
    c = logits.shape[1]
    valid = (targets != IGNORE_LABEL).unsqueeze(1)
    probs = F.softmax(logits, dim=1) * valid
    onehot = F.one_hot(torch.where(valid[:, 0], targets, 0), c).permute(0, 3, 1, 2) * valid
    return dice_loss(probs.transpose(0, 1).flatten(1), onehot.transpose(0, 1).flatten(1), eps).mean()


def bootstrapped_cross_entropy(logits: Tensor, targets: Tensor, top_k_ratio: float) -> Tensor:
    """Cross-entropy averaged over the hardest `top_k_ratio` of the labelled pixels (Wu et al. 2016).

    k = ceil(top_k_ratio x the number of labelled pixels of the batch), at least 1; ratio 1 is
    `semantic_loss`. (detectron2's DeepLabCE counts ignored pixels in k, which averages over more
    than the ratio of the labelled ones when much is ignored.) No labelled pixel gives 0 with a
    gradient path.

    Args:
        logits: FloatTensor[B, C, H, W], at the targets' size.
        targets: LongTensor[B, H, W] in 0..C-1 or IGNORE_LABEL.
        top_k_ratio: in (0, 1].

    Returns:
        FloatTensor[].
    """
    if not 0 < top_k_ratio <= 1:
        raise ValueError(f"top_k_ratio must be in (0, 1], got {top_k_ratio}")
    if top_k_ratio == 1:
        return semantic_loss(logits, targets)
    _check_targets(logits, targets)
    losses = F.cross_entropy(logits, targets, ignore_index=IGNORE_LABEL, reduction="none")
    losses = losses[targets != IGNORE_LABEL]
    if losses.numel() == 0:
        return logits.sum() * 0.0
    # the small slack keeps e.g. 0.2 x 15 = 3.0000000000000004 at k = 3
    k = max(1, math.ceil(top_k_ratio * losses.numel() - 1e-6))
    return losses.topk(k, sorted=False).values.mean()


def soft_margin_triplet_loss(anchor: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
    """softplus(|a - p| - |a - n|): SPINet's intra-class triplet loss (Eq. 5) without overflow.

    Eq. 5 is -log(e^{d_p} / (e^{d_p} + e^{d_n})) with d = -L2 distance, which equals
    log(1 + e^{d_n - d_p}) = softplus(|a - p| - |a - n|); the literal form overflows for large
    distances. Distances are sqrt(sum of squares + 1e-12), so that equal vectors have a finite
    gradient.

    Args:
        anchor, positive, negative: FloatTensor[T, D].

    Returns:
        FloatTensor[T] one loss per triplet.
    """
    d_ap = ((anchor - positive).pow(2).sum(dim=-1) + 1e-12).sqrt()
    d_an = ((anchor - negative).pow(2).sum(dim=-1) + 1e-12).sqrt()
    return F.softplus(d_ap - d_an)


def contour_targets(labels: Tensor, sigma: float = 1.0) -> Tensor:
    """Soft contours between different labels, for SPINet's inter-class contour loss (Eq. 6).

    A pixel is on a contour when a pixel of its 3x3 neighbourhood holds another label (neighbours
    outside the image, label -1, do not count). The soft target of a pixel is
    exp(-d^2 / (2 sigma^2)) for its nearest contour pixel at distance d <= 3 sigma, else 0
    (1 on the contour itself); pixels outside the image get 0.

    Args:
        labels: LongTensor[B, H, W] class labels (void is a label of its own), -1 outside the
            image (padding).
        sigma: width of the soft contour in pixels.

    Returns:
        FloatTensor[B, H, W] in [0, 1].
    """
    if sigma <= 0:
        raise ValueError(f"contour sigma must be positive, got {sigma}")
    h, w = labels.shape[-2:]
    inside = labels >= 0
    # 3x3 max and min of the labels over the image's pixels (padding: below every label for the
    # max, above every label for the min): a pixel is on a contour where they differ
    x = labels[:, None].float()
    big = float(labels.max().clamp(min=0)) + 1
    high = F.max_pool2d(x, 3, stride=1, padding=1)
    low = -F.max_pool2d(-torch.where(x >= 0, x, big), 3, stride=1, padding=1)
    boundary = ((high != low) & inside[:, None]).float()
    # squared distance to the nearest contour pixel within r (separable: the nearest in each row
    # first, then over the rows), then the Gaussian of it
    r = math.floor(3 * sigma)
    inf = float(4 * r * r + 1)
    row_d2 = torch.where(boundary[:, 0] > 0, 0.0, inf)
    padded = F.pad(row_d2, (r, r), value=inf)
    for dx in range(-r, r + 1):
        row_d2 = torch.minimum(row_d2, padded[:, :, r + dx : r + dx + w] + dx * dx)
    d2 = row_d2
    padded = F.pad(row_d2, (0, 0, r, r), value=inf)
    for dy in range(-r, r + 1):
        d2 = torch.minimum(d2, padded[:, r + dy : r + dy + h] + dy * dy)
    soft = torch.where(d2 <= 9 * sigma * sigma, torch.exp(-d2 / (2 * sigma * sigma)), 0.0)
    return soft * inside


def contour_loss(logits: Tensor, targets: Tensor, valid: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss with soft targets, averaged over the valid pixels (SPINet Eq. 6).

    Args:
        logits: FloatTensor[B, H, W] contour logits.
        targets: FloatTensor[B, H, W] soft contours (`contour_targets`).
        valid: BoolTensor[B, H, W] the pixels that count (inside the image).
        alpha, gamma: focal loss parameters (torchvision's `sigmoid_focal_loss`).

    Returns:
        FloatTensor[].
    """
    loss = sigmoid_focal_loss(logits, targets.to(logits.dtype), alpha=alpha, gamma=gamma, reduction="none")
    return (loss * valid).sum() / valid.sum().clamp(min=1)


def _check_targets(logits: Tensor, targets: Tensor) -> None:
    """Raise ValueError when targets do not fit logits (batch, size, class range)."""
    if logits.shape[-2:] != targets.shape[-2:] or logits.shape[0] != targets.shape[0]:
        raise ValueError(
            f"semantic logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in batch or size"
        )
    valid = targets != IGNORE_LABEL
    num_classes = logits.shape[1]
    out_of_range = valid & ((targets < 0) | (targets >= num_classes))
    if bool(out_of_range.any()):
        raise ValueError(f"semantic target {int(targets[out_of_range][0])} out of range for {num_classes} classes")
