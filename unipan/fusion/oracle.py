"""Predictions made of ground truth: the oracles of UPSNet's Table 6 and every model's PQ-100 test.

Ground truth through a fusion must give back the ground truth (PQ 100); a model's ground-truth
modes (UPSNet's GT semantic logits, GT boxes and classes) feed it parts of it. All of them share
one logit magnitude, `ORACLE_LOGIT`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unipan.fusion.settings import ORACLE_LOGIT
from unipan.structures import IGNORE_LABEL, DatasetMeta, PanopticTarget, RawPrediction, masks_to_boxes

__all__ = ["ORACLE_LOGIT", "oracle_raw_prediction", "oracle_sem_logits"]


def oracle_sem_logits(sem_seg: Tensor, num_classes: int, scale: float = ORACLE_LOGIT) -> Tensor:
    """One-hot ground-truth semantic logits: `scale` on the GT class, 0 elsewhere.

    Args:
        sem_seg: LongTensor[h, w] class index, IGNORE_LABEL where unknown (all-zero logits).
        num_classes: C.
        scale: the logit of the GT class.

    Returns:
        FloatTensor[C, h, w].

    Raises:
        ValueError: when `sem_seg` holds a class outside [0, C) other than IGNORE_LABEL.
    """
    valid = sem_seg != IGNORE_LABEL
    if valid.any() and (int(sem_seg[valid].max()) >= num_classes or int(sem_seg[valid].min()) < 0):
        raise ValueError(f"sem_seg has classes outside [0, {num_classes}) besides the ignore label")
    h, w = sem_seg.shape
    out = torch.zeros((num_classes, h, w), dtype=torch.float32, device=sem_seg.device)
    out.scatter_(0, torch.where(valid, sem_seg, 0)[None], (valid.float() * scale)[None])
    return out


def oracle_raw_prediction(
    target: PanopticTarget, meta: DatasetMeta, scale: float = ORACLE_LOGIT, include_crowd: bool = True
) -> RawPrediction:
    """A RawPrediction made of ground truth (the oracle rows of the paper's Table 6, all at once).

    GT boxes and classes with score 1, GT masks as +-scale full-image logits, one-hot GT semantic
    logits (crowd pixels carry their crowd class: it is what they show).

    Why crowd regions enter as instances (`include_crowd`): a crowd pixel inside the box of a GT
    instance of the crowd's class has X_mask = scale and Y_mask = -scale there, so its instance
    logit, the unknown logit and the stuff logits all tie at 0 and the first stuff class takes
    it; a stuff segment made of crowd pixels is a false positive for PQ. As an instance of its
    own, the crowd region becomes a thing segment lying on a same-class crowd region, which PQ
    ignores, just as it ignores a detector's crowd detections.

    Args:
        target: the ground truth of one image.
        meta: its classes.
        scale: logit magnitude.
        include_crowd: add each crowd segment as an instance (after the real instances).

    Returns:
        RawPrediction with sem_space "all", boxes/labels/scores/masks, and
        extras["full_mask_logits"] FloatTensor[N, h, w].
    """
    # every tensor on the targets' device (CUDA targets must not meet CPU-made ones in a cat)
    device = target.sem_seg.device
    sem_seg = target.sem_seg.clone()
    boxes, labels, masks = [target.boxes.float()], [target.labels], [target.masks]
    crowd_segments = [seg for seg in target.segments if seg.iscrowd]
    for seg in crowd_segments:
        region = target.panoptic == seg.id
        sem_seg[region] = meta.class_index(seg.category_id)
        if include_crowd and meta.isthing(seg.category_id):
            masks.append(region[None])
            boxes.append(masks_to_boxes(region[None]))
            labels.append(torch.tensor([meta.thing_index(seg.category_id)], device=device))
    mask_t = torch.cat(masks)
    return RawPrediction(
        boxes=torch.cat(boxes),
        scores=torch.ones(mask_t.shape[0], device=device),
        labels=torch.cat(labels).long(),
        sem_logits=oracle_sem_logits(sem_seg, meta.num_classes, scale),
        masks=mask_t,
        sem_space="all",
        extras={"full_mask_logits": mask_t.float() * (2 * scale) - scale},
    )
