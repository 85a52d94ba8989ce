"""ROI-Flatten: RoI mask probabilities pooled onto one canvas with a channel per thing class.

REFINE (Ren et al., AAAI 2021, Eq. 5) projects the instance branch's 28 x 28 masks back into the
semantic branch's stride-4 space: "pool all instance masks ... onto a single full-channel canvas
P_ins in R^{C_ins x H/4 x W/4}". The paper gives no reduction rule; we follow Instance Mask
Projection (Fu, Berg, Berg 2019, Alg. 1): each RoI is pasted into its box on the canvas of its
class, weighted by its score, and overlapping RoIs of one class meet in a per-pixel maximum:

    canvas[b, c_k] = max(canvas[b, c_k], score_k * paste(mask_k, box_k / stride))

Why a maximum: training flattens every foreground RoI, many of them near-duplicates of one object;
a sum would count such an object several times. Why the score: at inference low-scoring false
positives would otherwise paint "thing" over stuff.

Geometry: detectron2's aligned paste (`unipan.fusion.paste`, ``outside="zero"``): the M x M grid
spans the box edge to edge; canvas pixel x (centre (x + 0.5) * stride in input pixels) samples it
bilinearly, zero beyond the grid. The paste is two matrix products per box (differentiable in the
mask), batched over boxes of similar window size (`iter_paste_masks_batched`: a few calls for
hundreds of training RoIs), and the per-class maximum is one `scatter_reduce("amax")` over the
pasted windows, whose backward splits the gradient evenly between tied maxima. No K x h x w tensor
is materialised.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unipan.fusion.paste import iter_paste_masks_batched

__all__ = ["roi_flatten"]


def roi_flatten(
    mask_probs: Tensor,
    boxes: Tensor,
    labels: Tensor,
    weights: Tensor | None,
    image_index: Tensor,
    batch_size: int,
    num_things: int,
    canvas_size: tuple[int, int],
    stride: float,
) -> Tensor:
    """Flatten K RoI masks onto a [B, T, h, w] canvas (see the module docstring).

    Args:
        mask_probs: FloatTensor[K, M, M] mask probabilities (of each RoI's own class) in [0, 1];
            differentiable.
        boxes: FloatTensor[K, 4] xyxy boxes in input pixels (not differentiated).
        labels: LongTensor[K] thing index 0..T-1 of each RoI (its canvas channel).
        weights: FloatTensor[K] per-RoI factors (scores; the caller detaches them if wanted), or
            None for 1.
        image_index: LongTensor[K] image 0..B-1 of each RoI.
        batch_size: B.
        num_things: T, the canvas channels.
        canvas_size: (h, w) of the canvas (e.g. the padded size / stride).
        stride: input pixels per canvas pixel.

    Returns:
        FloatTensor[B, T, h, w]: 0 where no RoI reaches, else the largest weighted probability of
        the RoIs of that image and class.

    Raises:
        ValueError: for mismatched lengths, labels outside 0..T-1 or images outside 0..B-1.
    """
    k = int(mask_probs.shape[0])
    if mask_probs.dim() != 3:
        raise ValueError(f"roi_flatten: mask_probs must be FloatTensor[K, M, M], got {tuple(mask_probs.shape)}")
    for name, t in (("boxes", boxes), ("labels", labels), ("image_index", image_index)):
        if t.shape[0] != k:
            raise ValueError(f"roi_flatten: {k} masks but {name} of shape {tuple(t.shape)}")
    if weights is not None and tuple(weights.shape) != (k,):
        raise ValueError(f"roi_flatten: {k} masks but weights of shape {tuple(weights.shape)}")
    h, w = int(canvas_size[0]), int(canvas_size[1])
    out = mask_probs.new_zeros((batch_size * num_things * h * w,))
    if k == 0 or h == 0 or w == 0:
        # keep the graph (a model's loss on an empty canvas still backpropagates zeros)
        return (out + mask_probs.sum() * 0.0).view(batch_size, num_things, h, w)
    if int(labels.min()) < 0 or int(labels.max()) >= num_things:
        raise ValueError(f"roi_flatten: labels {int(labels.min())}..{int(labels.max())} outside 0..{num_things - 1}")
    if int(image_index.min()) < 0 or int(image_index.max()) >= batch_size:
        raise ValueError(f"roi_flatten: image index outside 0..{batch_size - 1}")
    values = mask_probs if weights is None else mask_probs * weights.to(mask_probs.dtype)[:, None, None]
    # the paste's bilinear weights are built from the boxes on the CPU; the boxes get no gradient
    scaled = boxes.detach().to(torch.float64) / float(stride)
    pieces: list[Tensor] = []
    targets: list[Tensor] = []
    device = mask_probs.device
    channel = image_index.to(device=device, dtype=torch.long) * num_things + labels.to(device=device, dtype=torch.long)
    for index, pasted, win in iter_paste_masks_batched(values, scaled, (h, w)):
        _, hg, wg = pasted.shape
        rows = torch.arange(hg, device=device).view(1, hg, 1)
        cols = torch.arange(wg, device=device).view(1, 1, wg)
        y0, y1, x0, x1 = (win[:, i].view(-1, 1, 1) for i in range(4))
        inside = (rows < y1 - y0) & (cols < x1 - x0)
        target = channel[index].view(-1, 1, 1) * (h * w) + (y0 + rows) * w + (x0 + cols)
        pieces.append(pasted[inside])
        targets.append(target[inside])
    if not pieces:
        return (out + mask_probs.sum() * 0.0).view(batch_size, num_things, h, w)
    # include_self=False: a pixel that some RoI reaches takes the RoIs' maximum alone, so the
    # canvas' zero neither wins ties nor takes a share of the gradient
    out = out.scatter_reduce(0, torch.cat(targets), torch.cat(pieces), reduce="amax", include_self=False)
    return out.view(batch_size, num_things, h, w)
