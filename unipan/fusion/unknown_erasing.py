"""Unknown Erasing (REFINE, Ren et al., AAAI 2021, Sec. "Semantic Prediction Refinement", Eq. 8).

PQ charges a region predicted as "unknown" half a false negative, a region of the wrong class half
a false negative plus half a false positive; so low-confidence semantic regions are better left
void. The algorithm is that of BCC-Net (REFINE's predecessor by the same first author; the paper
defers its pseudo-code to an unavailable supplement):

    pred = argmax_c prob;  conf = max_c prob            (softmax over all channels)
    for each stuff class c of pred:
        B = (pred == c)
        D = B dilated `dilation` times by the full 3x3 element   (a (2d+1)^2 square window)
        for each 4-connected component L of D:
            R = L and B              (the original pixels; dilation only groups nearby fragments)
            if mean(conf[R]) < threshold: erase R

so a small confident fragment lying near a large unconfident region of its class is judged with
it. Defaults: threshold 0.5, 50 dilation steps at ~800 x 1333 input resolution.

Our choices: only stuff classes are judged (thing pixels of the semantic map become void in the
fusion anyway, so the result is the same and faster); the dilation is two running maxima per
class (equal to 50 binary dilations, constant time per pixel whatever the radius), computed on the
class's bounding box grown by the radius; the components come from `scipy.ndimage.label` (its
default 2-D structure is 4-connectivity, as in BCC-Net). Means are accumulated in float64 and a
mean of exactly `threshold` is kept.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

__all__ = ["dilate_square", "unknown_erasing"]

# rows of logits converted to probabilities at a time (bounds the memory of the softmax to
# C x _ROWS x w floats whatever the image size)
_ROWS = 128


def max_confidence(sem_logits: Tensor) -> tuple[Tensor, Tensor]:
    """(argmax LongTensor[h, w], max softmax probability FloatTensor[h, w]) of FloatTensor[C, h, w]."""
    _, h, w = sem_logits.shape
    pred = torch.empty((h, w), dtype=torch.long, device=sem_logits.device)
    conf = torch.empty((h, w), dtype=torch.float32, device=sem_logits.device)
    for y in range(0, h, _ROWS):
        chunk = sem_logits[:, y : y + _ROWS].float()
        top, arg = chunk.max(dim=0)
        pred[y : y + _ROWS] = arg
        # max prob = exp(max - logsumexp): no C x h x w probability tensor
        conf[y : y + _ROWS] = torch.exp(top - torch.logsumexp(chunk, dim=0))
    return pred, conf


def dilate_square(mask: np.ndarray, radius: int) -> np.ndarray:
    """`mask` dilated by a (2r+1) x (2r+1) square (= r binary dilations by the full 3x3 element).

    Two running maxima of width 2r + 1 (rows, then columns; `scipy.ndimage.maximum_filter1d`,
    constant time per pixel whatever r). Pixels beyond the border count as background (scipy's
    `binary_dilation` default).

    Args:
        mask: bool array [h, w].
        radius: r >= 0.

    Returns:
        bool array [h, w].
    """
    if radius <= 0:
        return mask.copy()
    out = mask.view(np.uint8)
    for axis in (0, 1):
        out = ndimage.maximum_filter1d(out, 2 * radius + 1, axis=axis, mode="constant", cval=0)
    return out.view(bool)


def unknown_erasing(sem_logits: Tensor, num_stuff: int, *, threshold: float = 0.5, dilation: int = 50) -> Tensor:
    """The pixels Unknown Erasing turns void (see the module docstring).

    Args:
        sem_logits: FloatTensor[C, h, w] semantic logits, stuff classes in channels 0..S-1 (any
            `sem_space`: the softmax runs over all C channels, only stuff regions are judged).
        num_stuff: S.
        threshold: a region whose mean confidence is below this is erased (BCC-Net 0.5).
        dilation: radius in pixels of the square that groups nearby fragments of a class
            (BCC-Net: 50 steps of 3x3 dilation at ~800 x 1333).

    Returns:
        BoolTensor[h, w] on `sem_logits`' device, True where the semantic prediction is erased.

    Raises:
        ValueError: for a non-3-D input or a negative dilation.
    """
    if sem_logits.dim() != 3:
        raise ValueError(f"unknown_erasing: sem_logits must be FloatTensor[C, h, w], got {tuple(sem_logits.shape)}")
    if dilation < 0:
        raise ValueError(f"unknown_erasing: dilation must be >= 0, got {dilation}")
    _, h, w = sem_logits.shape
    erased = np.zeros((h, w), dtype=bool)
    if h == 0 or w == 0 or num_stuff <= 0:
        return torch.from_numpy(erased).to(sem_logits.device)
    pred_t, conf_t = max_confidence(sem_logits)
    pred = pred_t.cpu().numpy()
    conf = conf_t.cpu().numpy().astype(np.float64)
    present = np.flatnonzero(np.bincount(pred.reshape(-1), minlength=num_stuff)[:num_stuff])
    for c in present.tolist():
        region = pred == c
        rows = np.flatnonzero(region.any(axis=1))
        cols = np.flatnonzero(region.any(axis=0))
        # the class's bounding box grown by the radius holds every pixel its dilation reaches
        y0, y1 = max(int(rows[0]) - dilation, 0), min(int(rows[-1]) + dilation + 1, h)
        x0, x1 = max(int(cols[0]) - dilation, 0), min(int(cols[-1]) + dilation + 1, w)
        sub = region[y0:y1, x0:x1]
        components, n = ndimage.label(dilate_square(sub, dilation))
        ids = components[sub]
        sums = np.bincount(ids, weights=conf[y0:y1, x0:x1][sub], minlength=n + 1)
        counts = np.bincount(ids, minlength=n + 1)
        low = sums < threshold * np.maximum(counts, 1)  # mean < threshold, without a division
        if low[1:].any():
            erased[y0:y1, x0:x1][sub] = low[ids]
    return torch.from_numpy(erased).to(sem_logits.device)
