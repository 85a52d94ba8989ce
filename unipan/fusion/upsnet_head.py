"""UPSNet's parameter-free panoptic head (Xiong et al., CVPR 2019), as pure tensor functions.

For one image with semantic logits X (C = S + T channels, stuff first, the class index space of
`DatasetMeta.class_index`) and N instances (box B_i, thing index c_i, mask logits Y_i), the head
builds the panoptic logits

    Z = [ X_stuff ; X_mask_i + Y_mask_i  (i = 0..N-1) ; unknown ]      (S + N + 1 channels)

- X_mask_i: the channel S + c_i of X inside B_i, zero outside it.
- Y_mask_i: the RoI mask logits of instance i bilinearly resampled onto the pixels of B_i, zero
  outside it.
- unknown = max over the thing channels of X - max_i X_mask_i: large where the semantic head
  sees a thing that no instance explains (paper Sec. 3.1). With no instance at all the second
  term counts as zero, the value every X_mask_i has outside its box.

A pixel belongs to B_i when its centre lies in the box: x0 <= x + 0.5 < x1 (and the same for y),
so an integer GT box (x1, y1 exclusive) covers exactly the pixels of its mask's tight box.

The same functions serve training (at the logits' resolution, differentiable: `panoptic_loss`)
and inference (at full input resolution: `upsnet_fusion`). Inference never materialises Z:
`panoptic_argmax` takes the argmax box by box and equals `panoptic_logits(...).argmax(0)`
exactly, ties included (the first maximal channel wins, as torch.argmax).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import nms

from unipan.fusion.paste import box_pixel_windows, crop_full_mask_logits, paste_mask_logits
from unipan.fusion.settings import PanopticHeadSettings
from unipan.segments import area_at_input_size, compose_panoptic
from unipan.structures import IGNORE_LABEL, DatasetMeta, PanopticResult, RawPrediction

__all__ = [
    "assign_instance_classes",
    "panoptic_argmax",
    "panoptic_logits",
    "panoptic_loss",
    "panoptic_targets",
    "prune_masks",
    "sample_kept_instances",
    "select_detections",
    "upsnet_fusion",
]


# --- panoptic logits (training; reference for inference) -------------------------------------
def _check_head_inputs(
    sem_logits: Tensor, windows: Tensor, thing_labels: Tensor, crops: list[Tensor], num_stuff: int
) -> None:
    if sem_logits.dim() != 3:
        raise ValueError(f"semantic logits must be [C, h, w], got shape {tuple(sem_logits.shape)}")
    c = sem_logits.shape[0]
    n = len(crops)
    if windows.shape != (n, 4) or thing_labels.shape != (n,):
        raise ValueError(
            f"{n} mask crops but windows of shape {tuple(windows.shape)} and labels of shape "
            f"{tuple(thing_labels.shape)}"
        )
    if not 0 <= num_stuff <= c:
        raise ValueError(f"num_stuff={num_stuff} outside [0, {c}] semantic channels")
    if n and (int(thing_labels.min()) < 0 or int(thing_labels.max()) >= c - num_stuff):
        raise ValueError(
            f"thing labels {thing_labels.tolist()} outside [0, {c - num_stuff}) ({c - num_stuff} thing channels)"
        )
    for i, ((y0, y1, x0, x1), crop) in enumerate(zip(windows.tolist(), crops, strict=True)):
        if tuple(crop.shape) != (y1 - y0, x1 - x0):
            raise ValueError(
                f"instance {i}: mask crop of shape {tuple(crop.shape)} does not fit its box pixels "
                f"({y1 - y0}, {x1 - x0})"
            )


def panoptic_logits(
    sem_logits: Tensor,
    windows: Tensor,
    thing_labels: Tensor,
    crops: list[Tensor],
    num_stuff: int,
    unknown: bool = True,
) -> Tensor:
    """Z = [X_stuff ; X_mask_i + Y_mask_i ; unknown], materialised and differentiable.

    Args:
        sem_logits: FloatTensor[C, h, w] semantic logits, stuff first (C = S + T).
        windows: LongTensor[N, 4] box pixel ranges (`box_pixel_windows`) on the (h, w) map.
        thing_labels: LongTensor[N] thing index of each instance.
        crops: N mask-logit crops FloatTensor[y1 - y0, x1 - x0] (`paste_mask_logits`).
        num_stuff: S.
        unknown: append the unknown channel.

    Returns:
        FloatTensor[S + N (+ 1), h, w].
    """
    _check_head_inputs(sem_logits, windows, thing_labels, crops, num_stuff)
    _, h, w = sem_logits.shape
    x_masks: list[Tensor] = []
    for (y0, y1, x0, x1), label in zip(windows.tolist(), thing_labels.tolist(), strict=True):
        x_in = sem_logits[num_stuff + label, y0:y1, x0:x1]
        x_masks.append(F.pad(x_in, (x0, w - x1, y0, h - y1)))
    y_masks = [
        F.pad(crop, (x0, w - x1, y0, h - y1)) for (y0, y1, x0, x1), crop in zip(windows.tolist(), crops, strict=True)
    ]
    parts = [sem_logits[:num_stuff]]
    if x_masks:
        x_mask = torch.stack(x_masks)
        parts.append(x_mask + torch.stack(y_masks))
    if unknown:
        thing_max = sem_logits[num_stuff:].amax(dim=0)
        parts.append((thing_max - x_mask.amax(dim=0) if x_masks else thing_max)[None])
    return torch.cat(parts, dim=0)


def panoptic_argmax(
    sem_logits: Tensor,
    windows: Tensor,
    thing_labels: Tensor,
    crops: list[Tensor],
    num_stuff: int,
    unknown: bool = True,
    return_sem_pred: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Argmax over the channels of Z without building Z (inference at full resolution).

    Equals `panoptic_logits(...).argmax(0)` exactly, ties included. An instance channel is zero
    outside its box, so where every other logit is negative the first instance whose box misses
    the pixel wins; the pixels inside every box of a prefix of the instances form a rectangle,
    which finds that instance without a pass over the whole image per instance.

    Args:
        sem_logits: FloatTensor[C, h, w] semantic logits, stuff first (C = S + T).
        windows: LongTensor[N, 4] box pixel ranges, as in `panoptic_logits`.
        thing_labels: LongTensor[N] thing index of each instance.
        crops: N mask-logit crops FloatTensor[y1 - y0, x1 - x0].
        num_stuff: S.
        unknown: include the unknown channel.
        return_sem_pred: also return the semantic argmax, a by-product of the channel maxima.

    Returns:
        LongTensor[h, w]: channel of Z: 0..S-1 stuff index, S + i instance i, S + N unknown; and,
        with `return_sem_pred`, LongTensor[h, w] `sem_logits.argmax(0)`.
    """
    _check_head_inputs(sem_logits, windows, thing_labels, crops, num_stuff)
    c, h, w = sem_logits.shape
    n = len(crops)
    dev = sem_logits.device
    neg_inf = torch.tensor(float("-inf"), dtype=sem_logits.dtype, device=dev)
    if num_stuff > 0:
        best_val, best_idx = sem_logits[:num_stuff].max(dim=0)
    else:
        best_val = neg_inf.expand(h, w).clone()
        best_idx = torch.zeros((h, w), dtype=torch.long, device=dev)
    has_things = c > num_stuff
    thing_val: Tensor | None = None
    sem_pred: Tensor | None = None
    if has_things and (unknown or return_sem_pred):
        thing_val, thing_idx = sem_logits[num_stuff:].max(dim=0)
        if return_sem_pred:
            # stuff channels come first, so a tie goes to the stuff class, as argmax does
            sem_pred = torch.where(thing_val > best_val, num_stuff + thing_idx, best_idx)
    elif return_sem_pred:
        sem_pred = best_idx.clone()

    if n == 0:
        if unknown and thing_val is not None:
            best_idx = torch.where(thing_val > best_val, num_stuff, best_idx)
        return (best_idx, sem_pred) if return_sem_pred else best_idx  # type: ignore[return-value]

    # Inside the boxes: the first maximal instance among those whose box holds the pixel.
    in_val = neg_inf.expand(h, w).clone()
    in_idx = torch.full((h, w), -1, dtype=torch.long, device=dev)
    x_mask_max = neg_inf.expand(h, w).clone() if unknown else None
    win = windows.tolist()
    for i, ((y0, y1, x0, x1), label) in enumerate(zip(win, thing_labels.tolist(), strict=True)):
        if x1 <= x0 or y1 <= y0:
            continue
        x_in = sem_logits[num_stuff + label, y0:y1, x0:x1]
        z = x_in + crops[i]
        cur_val = in_val[y0:y1, x0:x1]
        better = z > cur_val
        in_val[y0:y1, x0:x1] = torch.where(better, z, cur_val)
        in_idx[y0:y1, x0:x1] = torch.where(better, i, in_idx[y0:y1, x0:x1])
        if x_mask_max is not None:
            x_mask_max[y0:y1, x0:x1] = torch.maximum(x_mask_max[y0:y1, x0:x1], x_in)

    # first_out: the first instance whose box misses the pixel (n where every box holds it).
    first_out = torch.zeros((h, w), dtype=torch.long, device=dev)
    rx0, ry0, rx1, ry1 = 0, 0, w, h
    for i, (y0, y1, x0, x1) in enumerate(win):
        rx0, ry0, rx1, ry1 = max(rx0, x0), max(ry0, y0), min(rx1, x1), min(ry1, y1)
        if rx1 <= rx0 or ry1 <= ry0:
            break
        first_out[ry0:ry1, rx0:rx1] = i + 1
    has_out = first_out < n

    zero = torch.zeros((), dtype=sem_logits.dtype, device=dev)
    inst_val = torch.where(has_out, torch.maximum(in_val, zero), in_val)
    inst_idx = torch.where(
        has_out & (in_val < 0),
        first_out,
        torch.where(has_out & (in_val == 0), torch.minimum(in_idx, first_out), in_idx),
    )
    take = inst_val > best_val
    best_val = torch.where(take, inst_val, best_val)
    best_idx = torch.where(take, num_stuff + inst_idx, best_idx)
    if x_mask_max is not None and thing_val is not None:
        x_mask_all = torch.where(has_out, torch.maximum(x_mask_max, zero), x_mask_max)
        best_idx = torch.where(thing_val - x_mask_all > best_val, num_stuff + n, best_idx)
    return (best_idx, sem_pred) if return_sem_pred else best_idx  # type: ignore[return-value]


# --- training --------------------------------------------------------------------------------
def sample_kept_instances(num_instances: int, keep_fraction: float, generator: torch.Generator | None = None) -> Tensor:
    """Choose max(floor(keep_fraction * N), 1) of N >= 1 ground-truth instances uniformly at random.

    The rest are labelled unknown in the panoptic training target (paper Sec. 3.1: 30% dropped).
    The count is the released code's `max(int(n * 0.7), 1)`: floored, at least one (none of none).

    Returns:
        BoolTensor[N], True for kept instances.
    """
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must lie in [0, 1], got {keep_fraction}")
    # the small epsilon keeps e.g. 0.7 * 10 = 6.9999999 from flooring to 6
    n_keep = max(math.floor(keep_fraction * num_instances + 1e-9), 1) if num_instances > 0 else 0
    keep = torch.zeros(num_instances, dtype=torch.bool)
    if n_keep > 0:
        keep[torch.randperm(num_instances, generator=generator)[:n_keep]] = True
    return keep


def panoptic_targets(
    sem_seg: Tensor, instance_map: Tensor, keep: Tensor, num_stuff: int, unknown: bool = True
) -> Tensor:
    """Per-pixel target channel of Z for the panoptic cross-entropy.

    As the released `MaskMatching`: every thing-class pixel that no kept instance covers is
    unknown, the pixels of dropped instances and those of crowd regions alike, when `sem_seg`
    labels crowd with its class (`PanopticTarget.sem_seg_with_crowd`).

    Args:
        sem_seg: LongTensor[h, w] class index (stuff first), IGNORE_LABEL on void (and on crowd
            when crowd is not trained).
        instance_map: LongTensor[h, w] GT instance index (`PanopticTarget.instance_index_map`),
            -1 elsewhere.
        keep: BoolTensor[N] GT instances that get a channel of Z, in GT order.
        num_stuff: S.
        unknown: label thing pixels without a kept instance (dropped instances, crowd) with the
            unknown channel S + K (K kept instances); when False they are ignored.

    Returns:
        LongTensor[h, w]: stuff index for stuff pixels, S + rank among kept instances for kept
        instance pixels, S + K (or IGNORE_LABEL) for the other thing pixels, IGNORE_LABEL elsewhere.
    """
    if sem_seg.shape != instance_map.shape:
        raise ValueError(f"sem_seg {tuple(sem_seg.shape)} and instance map {tuple(instance_map.shape)} differ")
    n_kept = int(keep.sum())
    if num_stuff + n_kept + 1 > IGNORE_LABEL:
        raise ValueError(
            f"{num_stuff} stuff classes + {n_kept} instances + unknown do not fit below the ignore label {IGNORE_LABEL}"
        )
    keep = keep.to(sem_seg.device)
    # rank of each GT instance among the kept ones; dropped ones map to the unknown channel
    rank = torch.cumsum(keep.long(), 0) - 1
    drop_label = num_stuff + n_kept if unknown else IGNORE_LABEL
    inst_label = torch.where(keep, num_stuff + rank, torch.full_like(rank, drop_label))
    target = torch.full_like(sem_seg, IGNORE_LABEL)
    is_stuff = (sem_seg >= 0) & (sem_seg < num_stuff)
    target[is_stuff] = sem_seg[is_stuff]
    # thing pixels outside every GT instance (crowd): unknown like the dropped instances
    target[(sem_seg >= num_stuff) & (sem_seg != IGNORE_LABEL)] = drop_label
    is_inst = instance_map >= 0
    if is_inst.any():
        target[is_inst] = inst_label[instance_map[is_inst]]
    return target


def panoptic_loss(
    sem_logits: Tensor,
    boxes: Tensor,
    thing_labels: Tensor,
    mask_logits: Tensor,
    sem_seg: Tensor,
    instance_map: Tensor,
    keep: Tensor,
    num_stuff: int,
    unknown: bool = True,
) -> Tensor:
    """Cross-entropy of the panoptic logits built from ground-truth boxes and classes.

    Gradients reach `sem_logits` (through X_stuff, X_mask and unknown) and `mask_logits`.

    Args:
        sem_logits: FloatTensor[C, h, w] semantic logits of one image at the loss resolution.
        boxes: FloatTensor[N, 4] GT boxes in pixels of that resolution.
        thing_labels: LongTensor[N] GT thing index.
        mask_logits: FloatTensor[N, M, M] mask-head logits of the GT class at the GT boxes.
        sem_seg: LongTensor[h, w] class index target at that resolution (IGNORE_LABEL = 255;
            crowd pixels carrying their class become unknown, see `panoptic_targets`).
        instance_map: LongTensor[h, w] GT instance index, -1 elsewhere.
        keep: BoolTensor[N] instances that get a channel (`sample_kept_instances`).
        num_stuff: S.
        unknown: predict the unknown class (dropped instances are its target).

    Returns:
        Scalar FloatTensor: the summed cross-entropy of the labelled pixels divided by the number
        of all h x w pixels, ignored and padded ones included (the released code's `.mean()` of
        the unreduced loss); zero (with gradients) when no pixel has a target.
    """
    h, w = sem_logits.shape[-2:]
    kept = torch.nonzero(keep.to(boxes.device)).flatten()
    kept_boxes = boxes[kept]
    windows = box_pixel_windows(kept_boxes, (h, w))
    crops = paste_mask_logits(mask_logits[kept], kept_boxes, (h, w))
    z = panoptic_logits(sem_logits, windows, thing_labels[kept], crops, num_stuff, unknown=unknown)
    target = panoptic_targets(sem_seg, instance_map, keep, num_stuff, unknown=unknown)
    if not (target != IGNORE_LABEL).any():
        return z.sum() * 0.0
    # float32 for the softmax (Z is fp16 under autocast)
    total = F.cross_entropy(z[None].float(), target[None], ignore_index=IGNORE_LABEL, reduction="sum")
    return total / target.numel()


# --- inference -------------------------------------------------------------------------------
def select_detections(
    boxes: Tensor, scores: Tensor, nms_thresh: float, score_thresh: float, max_detections: int
) -> Tensor:
    """Class-agnostic NMS, then score > score_thresh, then the top `max_detections`.

    Args:
        boxes: FloatTensor[N, 4] xyxy.
        scores: FloatTensor[N].
        nms_thresh: IoU above which the lower-scoring box is suppressed.
        score_thresh: boxes scoring at or below it are dropped.
        max_detections: at most this many are kept.

    Returns:
        LongTensor[K] indices into the inputs, by decreasing score.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    keep = nms(boxes.float(), scores.float(), nms_thresh)  # sorted by decreasing score
    keep = keep[scores[keep] > score_thresh]
    return keep[:max_detections]


def prune_masks(
    crops: list[Tensor], windows: Tensor, thing_labels: Tensor, overlap_thresh: float, size: tuple[int, int]
) -> Tensor:
    """Mask pruning (paper Sec. 3.2), instances given by decreasing score.

    Each mask (logits > 0) is compared with a per-class canvas of the masks kept so far: it is
    dropped when more than `overlap_thresh` of its pixels are already on the canvas, else added.
    A mask with no pixel is dropped: it would enter Z with nothing of its own to claim.

    Args:
        crops: N mask-logit crops on their box pixels (`paste_mask_logits`).
        windows: LongTensor[N, 4] box pixel ranges.
        thing_labels: LongTensor[N] thing index.
        overlap_thresh: 0.3 in the paper.
        size: (h, w) of the image.

    Returns:
        BoolTensor[N], True for kept instances.
    """
    n = len(crops)
    dev = windows.device
    keep = torch.zeros(n, dtype=torch.bool, device=dev)
    canvases: dict[int, Tensor] = {}
    for i, ((y0, y1, x0, x1), label) in enumerate(zip(windows.tolist(), thing_labels.tolist(), strict=True)):
        mask = crops[i] > 0
        area = int(mask.sum())
        if area == 0:
            continue
        canvas = canvases.get(label)
        if canvas is None:
            canvas = canvases[label] = torch.zeros(size, dtype=torch.bool, device=mask.device)
        region = canvas[y0:y1, x0:x1]
        if int((region & mask).sum()) > overlap_thresh * area:
            continue
        region |= mask
        keep[i] = True
    return keep


def assign_instance_classes(
    z_index: Tensor,
    sem_pred: Tensor,
    thing_labels: Tensor,
    num_stuff: int,
    num_classes: int,
    stuff_majority: float = 0.5,
) -> Tensor:
    """Instance class assignment (paper Sec. 3.1) over the region each instance won in Z.

    If the semantic majority class of the region equals the detected class (ties count as equal)
    the detected class stays; else if the majority is a stuff class covering at least
    `stuff_majority` of the region, the region becomes that stuff class; else the detected class
    stays.

    Args:
        z_index: LongTensor[h, w] argmax of Z (`panoptic_argmax`).
        sem_pred: LongTensor[h, w] semantic argmax (class index).
        thing_labels: LongTensor[N] detected thing index.
        num_stuff: S.
        num_classes: C = S + T.
        stuff_majority: 0.5 in the paper.

    Returns:
        LongTensor[N] class index of each instance: S + thing index, or a stuff index (< S).
    """
    n = int(thing_labels.numel())
    detected = num_stuff + thing_labels.to(z_index.device)
    if n == 0:
        return detected
    in_inst = (z_index >= num_stuff) & (z_index < num_stuff + n)
    region = z_index[in_inst] - num_stuff
    sem = sem_pred[in_inst]
    counts = torch.bincount(region * num_classes + sem, minlength=n * num_classes).view(n, num_classes)
    area = counts.sum(dim=1)
    mode_count, mode = counts.max(dim=1)
    consistent = counts.gather(1, detected[:, None]).squeeze(1) >= mode_count
    to_stuff = ~consistent & (mode < num_stuff) & (mode_count >= stuff_majority * area) & (area > 0)
    return torch.where(to_stuff, mode, detected)


def _instance_mask_crops(
    raw: RawPrediction, index: Tensor, boxes: Tensor, windows: Tensor, binary_mask_logit: float, where: str
) -> list[Tensor]:
    """Mask-logit crops of the selected instances from whatever the prediction carries.

    Priority: extras["full_mask_logits"] FloatTensor[N, h, w]; extras["mask_logits"]
    FloatTensor[N, M, M]; `masks` BoolTensor[N, h, w] (as +-binary_mask_logit); `mask_probs`
    FloatTensor[N, M, M] (as logits).
    """
    h, w = raw.sem_logits.shape[-2:]
    full = raw.extras.get("full_mask_logits")
    if full is not None:
        if full.shape[0] != len(raw) or tuple(full.shape[-2:]) != (h, w):
            raise ValueError(
                f"{where}: extras['full_mask_logits'] has shape {tuple(full.shape)}, expected [{len(raw)}, {h}, {w}]"
            )
        return crop_full_mask_logits(full[index], windows)
    grid = raw.extras.get("mask_logits")
    if grid is not None:
        if grid.shape[0] != len(raw):
            raise ValueError(f"{where}: extras['mask_logits'] has {grid.shape[0]} masks for {len(raw)} instances")
        return paste_mask_logits(grid[index], boxes, (h, w))
    masks = raw.dense_masks()
    if masks is not None:
        if masks.shape[0] != len(raw) or tuple(masks.shape[-2:]) != (h, w):
            raise ValueError(f"{where}: masks have shape {tuple(masks.shape)}, expected [{len(raw)}, {h}, {w}]")
        signed = masks[index].to(raw.sem_logits.dtype) * (2 * binary_mask_logit) - binary_mask_logit
        return crop_full_mask_logits(signed, windows)
    if raw.mask_probs is not None:
        if raw.mask_probs.shape[0] != len(raw):
            raise ValueError(f"{where}: mask_probs has {raw.mask_probs.shape[0]} masks for {len(raw)} instances")
        return paste_mask_logits(torch.logit(raw.mask_probs[index].float(), eps=1e-6), boxes, (h, w))
    raise ValueError(
        f"{where}: {len(raw)} instances but no mask logits (extras 'mask_logits' or 'full_mask_logits'), "
        "masks or mask_probs"
    )


def upsnet_fusion(
    raw: RawPrediction,
    meta: DatasetMeta,
    settings: PanopticHeadSettings | None = None,
    image_id: str = "",
    original_size: tuple[int, int] | None = None,
) -> PanopticResult:
    """UPSNet inference: detections + semantic logits -> panoptic segmentation at (h, w).

    Steps (paper Sec. 3.1-3.2): class-agnostic NMS, score filter and top-k; mask pruning;
    argmax of Z at the logits' resolution; unknown -> void; instance class assignment; stuff
    area filter.

    Args:
        raw: prediction with `sem_space == "all"`: sem_logits FloatTensor[S + T, h, w] at the input
            size, boxes FloatTensor[N, 4] in its pixels, scores FloatTensor[N], labels LongTensor[N]
            (thing index), and mask logits (see `_instance_mask_crops` for the accepted forms).
        meta: the dataset's classes.
        settings: inference settings; None = the paper's COCO defaults.
        image_id: copied to the result, and named in errors.
        original_size: (H, W) of the image file; `settings.stuff_area` is in its pixels, as in
            the official UPSNet, and is scaled to the input size here
            (`unipan.segments.area_at_input_size`; `unipan.fusion.heuristic` says why the fusion
            does not run at the original size instead). None = the input size.

    Returns:
        PanopticResult with `raw` attached.
    """
    settings = settings or PanopticHeadSettings()
    where = f"image {image_id!r}" if image_id else "prediction"
    if raw.sem_space != "all":
        raise ValueError(
            f"{where}: UPSNet fusion needs sem_space 'all' (stuff + every thing class), got {raw.sem_space!r}"
        )
    sem_logits = raw.sem_logits
    if sem_logits.dim() != 3 or sem_logits.shape[0] != meta.num_classes:
        raise ValueError(
            f"{where}: semantic logits of shape {tuple(sem_logits.shape)}, expected [{meta.num_classes}, h, w] "
            f"({meta.num_stuff} stuff + {meta.num_things} things)"
        )
    n = len(raw)
    if raw.boxes.shape != (n, 4) or raw.labels.shape != (n,):
        raise ValueError(f"{where}: {n} scores but boxes {tuple(raw.boxes.shape)} and labels {tuple(raw.labels.shape)}")
    if n and (int(raw.labels.min()) < 0 or int(raw.labels.max()) >= meta.num_things):
        raise ValueError(f"{where}: thing labels {raw.labels.tolist()} outside [0, {meta.num_things})")
    h, w = sem_logits.shape[-2:]
    s = meta.num_stuff
    unknown = settings.unknown and meta.num_things > 0

    if settings.filter_detections:
        index = select_detections(
            raw.boxes, raw.scores, settings.nms_thresh, settings.score_thresh, settings.max_detections
        )
    else:
        index = torch.argsort(raw.scores, descending=True, stable=True)
    boxes = raw.boxes[index].to(sem_logits.dtype)
    labels = raw.labels[index]
    windows = box_pixel_windows(boxes, (h, w))
    crops = _instance_mask_crops(raw, index, boxes, windows, settings.binary_mask_logit, where)
    kept = prune_masks(crops, windows, labels, settings.mask_overlap_thresh, (h, w))
    kept_list = torch.nonzero(kept).flatten().tolist()
    index = index[kept]
    labels = labels[kept]
    windows = windows[kept]
    crops = [crops[i] for i in kept_list]

    need_sem_pred = settings.class_assignment and bool(crops) and raw.sem_pred is None
    out = panoptic_argmax(sem_logits, windows, labels, crops, s, unknown=unknown, return_sem_pred=need_sem_pred)
    z_index, sem_pred = out if isinstance(out, tuple) else (out, raw.sem_pred)
    if settings.class_assignment and crops:
        assert sem_pred is not None
        instance_class = assign_instance_classes(
            z_index, sem_pred, labels, s, meta.num_classes, settings.stuff_majority
        )
    else:
        instance_class = s + labels
    panoptic, segments = compose_panoptic(
        z_index,
        instance_class,
        raw.scores[index],
        meta,
        area_at_input_size(settings.stuff_area, (h, w), original_size),
        unknown=unknown,
        sem_logits=sem_logits if settings.stuff_scores else None,
    )
    return PanopticResult(panoptic=panoptic, segments=segments, image_id=image_id, raw=raw)
