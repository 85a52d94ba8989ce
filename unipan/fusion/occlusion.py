"""Occlusion-aware panoptic fusion: REFINE's Soft Occlusion Estimation (Ren et al., AAAI 2021, Eq. 7).

Pieces, all pure functions of predictions:

- `candidate_pairs`: instance pairs whose binary masks overlap by at least `rho` of either mask
  (BCC-Net / OCFusion: 0.2), the pairs an occlusion network is asked about.
- `soft_occlusion` (Eq. 7): O~(i, j) = s_i * exp(-(O(i, j) - 1)^2 / sigma); i lies over j when
  O~(i, j) > O~(j, i). sigma = 0 is the hard rule O(i, j) > O(j, i) (the "OCFusion" and "strong
  baseline" rows of the paper's Table 5); sigma -> inf is the score order.
- `occlusion_relations`: (top, bottom) pairs from a prediction's `extras["occ_pairs"]` /
  `extras["occ_prob"]` (O(i, j), O(j, i) per pair), whoever computed them.
- `shr_relations`: the box rule of SHR (Table 5; BCC-Net's occlusion mode 4): i is on top of j when
  more than `iof` of box i lies inside box j.
- `occlusion_targets`: training labels from non-overlapping panoptic ground truth (our choice, no
  amodal annotations): for two RoIs matched to different GT instances whose masks overlap by
  `rho`, the GT segment owning most of the intersection is the one on top.
- `occlusion_fusion`: the heuristic fusion with OCFusion's greedy reclaim (BCC-Net's
  implementation): instances in descending score; an instance takes its unassigned pixels and, for
  every already placed instance it lies over, the pixels of their intersection that instance holds;
  it is skipped when more than `overlap_thresh` of its mask is lost, exactly the heuristic's test.
  Without relations this is `heuristic_fusion`, segment for segment. Optionally Unknown Erasing
  (`unipan.fusion.unknown_erasing`) voids low-confidence stuff regions first.

Any model's raw prediction with boxes, scores and masks can go through it: "shr" and "none" need
nothing else, "learned" needs the two extras.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from unipan.fusion.heuristic import _check_sem_pred, _instance_windows, _validate
from unipan.fusion.unknown_erasing import unknown_erasing
from unipan.segments import area_at_input_size, label_stats, semantic_argmax, stuff_mean_probs
from unipan.structures import DatasetMeta, PanopticResult, RawPrediction, SegmentInfo

__all__ = [
    "OCCLUSION_METHODS",
    "candidate_pairs",
    "occlusion_fusion",
    "occlusion_relations",
    "occlusion_targets",
    "shr_relations",
    "soft_occlusion",
    "unknown_erasing_mask",
    "with_relations",
]

OCCLUSION_METHODS = ("none", "learned", "shr")


# --- pairs ---------------------------------------------------------------------------------------
def _overlapping(windows: list[tuple[Tensor, int, tuple[int, int, int, int]]], rho: float) -> list[tuple[int, int]]:
    """(a, b), a < b, of windowed binary masks that overlap by >= rho of either mask's area."""
    out: list[tuple[int, int]] = []
    for a in range(len(windows)):
        mask_a, area_a, (ay0, ay1, ax0, ax1) = windows[a]
        if area_a == 0:
            continue
        for b in range(a + 1, len(windows)):
            mask_b, area_b, (by0, by1, bx0, bx1) = windows[b]
            y0, y1, x0, x1 = max(ay0, by0), min(ay1, by1), max(ax0, bx0), min(ax1, bx1)
            if area_b == 0 or y1 <= y0 or x1 <= x0:
                continue
            inter = int(
                torch.count_nonzero(
                    mask_a[y0 - ay0 : y1 - ay0, x0 - ax0 : x1 - ax0] & mask_b[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0]
                )
            )
            if inter and (inter >= rho * area_a or inter >= rho * area_b):
                out.append((a, b))
    return out


def candidate_pairs(
    raw: RawPrediction,
    *,
    score_thresh: float = 0.5,
    mask_thresh: float = 0.5,
    rho: float = 0.2,
    intraclass: bool = True,
) -> Tensor:
    """Pairs of instances whose binary masks overlap by at least `rho` of either mask.

    Args:
        raw: a prediction at input size with boxes, scores, labels and masks (`masks` or
            `mask_probs`, as the fusion reads them).
        score_thresh: only instances scoring at least this (the fusion's instance threshold).
        mask_thresh: binarisation of pasted probabilities.
        rho: overlap fraction (BCC-Net / OCFusion 0.2).
        intraclass: include same-class pairs (the paper's Fig. 5 is a kite-kite pair).

    Returns:
        LongTensor[P, 2] (i, j) indices into the instances with i < j, on the CPU.
    """
    keep = torch.nonzero(raw.scores.cpu() >= score_thresh).flatten()
    if keep.numel() < 2:
        return torch.zeros((0, 2), dtype=torch.long)
    h, w = int(raw.sem_logits.shape[-2]), int(raw.sem_logits.shape[-1])
    windows = list(_instance_windows(raw, keep.to(raw.scores.device), (h, w), mask_thresh))
    labels = raw.labels.cpu()[keep].tolist()
    kept = keep.tolist()
    pairs = [(kept[a], kept[b]) for a, b in _overlapping(windows, rho) if intraclass or labels[a] != labels[b]]
    if not pairs:
        return torch.zeros((0, 2), dtype=torch.long)
    out = torch.tensor(pairs, dtype=torch.long)
    return torch.stack([out.min(dim=1).values, out.max(dim=1).values], dim=1)


# --- relations -----------------------------------------------------------------------------------
def soft_occlusion(occ: Tensor, score: Tensor, sigma: float) -> Tensor:
    """Eq. 7: O~(i, j) = s_i * exp(-(O(i, j) - 1)^2 / sigma); sigma = 0 gives O itself (hard rule).

    Args:
        occ: FloatTensor[...] O(i, j) in [0, 1].
        score: FloatTensor[...] s_i (the detection score).
        sigma: > 0, or 0 for the hard rule.

    Returns:
        FloatTensor[...] of the broadcast shape.
    """
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0 (0 = the hard rule), got {sigma}")
    if sigma == 0:
        return occ + score * 0
    return score * torch.exp(-((occ - 1.0) ** 2) / sigma)


def occlusion_relations(raw: RawPrediction, sigma: float, image_id: str = "") -> Tensor:
    """(top, bottom) instance pairs from `raw.extras["occ_pairs"]` and `["occ_prob"]`.

    For a pair (i, j) with O(i, j) and O(j, i), i is on top when O~(i, j) > O~(j, i) (Eq. 7 with
    the detection scores; sigma = 0 compares O directly), j when it is smaller; a tie gives no
    relation (the score order decides).

    Returns:
        LongTensor[R, 2] on the CPU.

    Raises:
        ValueError: naming the image when the extras are missing or malformed.
    """
    where = f"image {image_id!r}" if image_id else "prediction"
    if "occ_pairs" not in raw.extras or "occ_prob" not in raw.extras:
        raise ValueError(
            f"{where}: occlusion='learned' needs extras['occ_pairs'] and extras['occ_prob'] "
            "(a model with an occlusion head; use occlusion='shr' or 'none' otherwise)"
        )
    pairs = raw.extras["occ_pairs"].cpu().long()
    prob = raw.extras["occ_prob"].cpu().float()
    n = len(raw)
    if pairs.dim() != 2 or pairs.shape[1] != 2 or tuple(prob.shape) != tuple(pairs.shape):
        raise ValueError(
            f"{where}: occ_pairs {tuple(pairs.shape)} and occ_prob {tuple(prob.shape)} must both be [P, 2]"
        )
    if pairs.numel() and (int(pairs.min()) < 0 or int(pairs.max()) >= n):
        raise ValueError(f"{where}: occ_pairs index instances outside 0..{n - 1}")
    if pairs.numel() == 0:
        return torch.zeros((0, 2), dtype=torch.long)
    scores = raw.scores.cpu().float()
    forward = soft_occlusion(prob[:, 0], scores[pairs[:, 0]], sigma)
    backward = soft_occlusion(prob[:, 1], scores[pairs[:, 1]], sigma)
    first = forward > backward
    second = backward > forward
    return torch.cat([pairs[first], pairs[second].flip(1)])


def shr_relations(boxes: Tensor, pairs: Tensor, iof: float = 0.5) -> Tensor:
    """SHR's box rule on `pairs` (IoF = intersection / area of the first box).

    i is over j when IoF(box_i in box_j) > iof, else j over i when IoF(box_j in box_i) > iof, else
    there is no relation.

    Args:
        boxes: FloatTensor[N, 4] xyxy.
        pairs: LongTensor[P, 2].
        iof: threshold (BCC-Net 0.5).

    Returns:
        LongTensor[R, 2] (top, bottom) on the CPU.
    """
    if pairs.numel() == 0:
        return torch.zeros((0, 2), dtype=torch.long)
    b = boxes.detach().cpu().double()
    bi, bj = b[pairs[:, 0]], b[pairs[:, 1]]
    iw = (torch.minimum(bi[:, 2], bj[:, 2]) - torch.maximum(bi[:, 0], bj[:, 0])).clamp(min=0)
    ih = (torch.minimum(bi[:, 3], bj[:, 3]) - torch.maximum(bi[:, 1], bj[:, 1])).clamp(min=0)
    inter = iw * ih
    area_i = ((bi[:, 2] - bi[:, 0]) * (bi[:, 3] - bi[:, 1])).clamp(min=1e-12)
    area_j = ((bj[:, 2] - bj[:, 0]) * (bj[:, 3] - bj[:, 1])).clamp(min=1e-12)
    i_top = inter / area_i > iof
    j_top = ~i_top & (inter / area_j > iof)
    return torch.cat([pairs[i_top], pairs[j_top].flip(1)])


# --- training labels -----------------------------------------------------------------------------
def occlusion_targets(
    masks: Tensor, gt_index: Tensor, panoptic: Tensor, instance_ids: Tensor, rho: float = 0.2
) -> tuple[Tensor, Tensor]:
    """Occlusion labels of RoI pairs from non-overlapping panoptic ground truth.

    1. RoIs r, r' matched to different GT instances g, g';
    2. whose binary masks overlap by at least `rho` of either mask;
    3. top = the most frequent non-void segment id of `panoptic` over the intersection;
    4. the pair is kept iff top is g's or g''s segment: target 1 for (top's RoI, the other), 0 for
       the reverse order. Both orders are returned.

    Args:
        masks: BoolTensor[K, h, w] binary masks of the RoIs on a common canvas.
        gt_index: LongTensor[K] matched GT instance of each RoI.
        panoptic: IntTensor[h, w] GT segment ids on that canvas (0 = void).
        instance_ids: LongTensor[N] segment id of each GT instance.
        rho: overlap fraction.

    Returns:
        (pairs LongTensor[P, 2], targets FloatTensor[P]); P is even, orders adjacent.
    """
    device = masks.device
    k = int(masks.shape[0])
    empty = (torch.zeros((0, 2), dtype=torch.long, device=device), torch.zeros(0, device=device))
    if k < 2:
        return empty
    flat = masks.reshape(k, -1).float()
    inter = flat @ flat.t()
    area = flat.sum(dim=1)
    overlap = (inter >= rho * area[:, None]) | (inter >= rho * area[None, :])
    candidates = (
        torch.triu(torch.ones((k, k), dtype=torch.bool, device=device), diagonal=1)
        & (inter > 0)
        & overlap
        & (gt_index[:, None] != gt_index[None, :])
    )
    pairs = torch.nonzero(candidates)
    if pairs.numel() == 0:
        return empty
    ids, compact = torch.unique(panoptic.reshape(-1).long(), return_inverse=True)
    onehot = torch.nn.functional.one_hot(compact, int(ids.numel())).float()
    onehot[:, ids == 0] = 0  # void never wins
    tops = []
    for chunk in pairs.split(256):
        both = masks[chunk[:, 0]].reshape(len(chunk), -1) & masks[chunk[:, 1]].reshape(len(chunk), -1)
        counts = both.float() @ onehot
        best, arg = counts.max(dim=1)
        tops.append(torch.where(best > 0, ids[arg], torch.zeros_like(arg)))
    top = torch.cat(tops)
    id_i = instance_ids[gt_index[pairs[:, 0]]].to(top.dtype)
    id_j = instance_ids[gt_index[pairs[:, 1]]].to(top.dtype)
    keep = (top != 0) & ((top == id_i) | (top == id_j))
    pairs, i_top = pairs[keep], (top == id_i)[keep]
    ordered = torch.stack([pairs, pairs.flip(1)], dim=1).reshape(-1, 2)
    targets = torch.stack([i_top, ~i_top], dim=1).reshape(-1).float()
    return ordered, targets


# --- fusion --------------------------------------------------------------------------------------
def occlusion_fusion(  # noqa: C901 - one pass over the instances, then one over the stuff
    raw: RawPrediction,
    meta: DatasetMeta,
    *,
    instance_score_thresh: float = 0.5,
    overlap_thresh: float = 0.5,
    mask_thresh: float = 0.5,
    stuff_area: int = 4096,
    occlusion: str = "learned",
    sigma: float = 2.5,
    rho: float = 0.2,
    intraclass: bool = True,
    shr_iof: float = 0.5,
    unknown_erasing: bool = False,
    ue_threshold: float = 0.5,
    ue_dilation: int = 50,
    stuff_scores: bool = False,
    image_id: str = "",
    original_size: tuple[int, int] | None = None,
) -> PanopticResult:
    """Heuristic fusion with occlusion relations and optional Unknown Erasing (module docstring).

    Args:
        raw: the prediction at input size (h, w): boxes, scores, labels, `masks` or `mask_probs`,
            semantic logits in any space; with occlusion="learned" also `extras["occ_pairs"]`
            LongTensor[P, 2] and `extras["occ_prob"]` FloatTensor[P, 2] (O(i, j), O(j, i)).
        meta: the dataset's classes.
        instance_score_thresh: instances below this score are not placed.
        overlap_thresh: an instance losing more than this fraction of its mask is skipped.
        mask_thresh: binarisation of pasted mask probabilities.
        stuff_area: stuff segments smaller than this many original-image pixels become void.
        occlusion: "none" (= `heuristic_fusion`), "learned" (Eq. 7 on the extras) or "shr".
        sigma: Eq. 7's sigma (0 = hard rule O(i, j) > O(j, i)).
        rho: "shr": pairs overlapping by at least this fraction get a relation (the model uses
            the same value for its candidate pairs).
        intraclass: "shr": same-class pairs get a relation too.
        shr_iof: "shr": box intersection-over-first threshold.
        unknown_erasing: void low-confidence stuff regions first (`unknown_erasing`).
        ue_threshold: its mean-confidence threshold.
        ue_dilation: its grouping radius in input pixels.
        stuff_scores: stuff segment score = mean class probability (else 1.0), as the heuristic.
        image_id: stored in the result and named in errors.
        original_size: (H, W) of the original image; `stuff_area` is scaled from it to (h, w)
            (`unipan.segments.area_at_input_size`, as `heuristic_fusion`).

    Returns:
        PanopticResult at (h, w): things in placement order (ids 1..), then stuff by class index.

    Raises:
        ValueError: naming the image for malformed inputs or an unknown `occlusion`.
    """
    if occlusion not in OCCLUSION_METHODS:
        raise ValueError(f"occlusion must be one of {OCCLUSION_METHODS}, got {occlusion!r}")
    h, w, channels = _validate(raw, meta, image_id)
    device = raw.sem_logits.device
    if raw.sem_pred is not None:
        work = raw.sem_pred.to(device=device, dtype=torch.long, copy=True)  # written below
    else:
        work = semantic_argmax(raw.sem_logits)
    if unknown_erasing:
        erased = unknown_erasing_mask(raw, meta, ue_threshold, ue_dilation)
        # S is never a stuff class in any space: erased pixels end void unless a thing covers them
        work.masked_fill_(erased, meta.num_stuff)

    # --- relations ---------------------------------------------------------------------------
    n = raw.scores.numel()
    over: dict[int, list[int]] = {}
    if n and occlusion != "none":
        if occlusion == "learned":
            relations = occlusion_relations(raw, sigma, image_id)
        else:
            pairs = candidate_pairs(
                raw, score_thresh=instance_score_thresh, mask_thresh=mask_thresh, rho=rho, intraclass=intraclass
            )
            relations = shr_relations(raw.boxes, pairs, shr_iof)
        for top, bottom in relations.tolist():
            over.setdefault(top, []).append(bottom)

    # --- things: greedy placement with reclaim -------------------------------------------------
    order = torch.zeros(0, dtype=torch.long)
    if n:
        scores_sorted, order = torch.sort(raw.scores, descending=True, stable=True)
        order = order[: int((scores_sorted >= instance_score_thresh).sum())]
    things: list[tuple[int, float]] = []
    thing_areas: list[int] = []
    if order.numel():
        # As the heuristic: `work` holds the semantic class of free pixels and C + 1 + position of
        # the instance holding a thing pixel; `taken` says which pixels things hold.
        taken = torch.zeros((h, w), dtype=torch.bool, device=device)
        placed: dict[int, int] = {}  # instance index -> position in `things`
        windows = _instance_windows(raw, order, (h, w), mask_thresh)
        instances = zip(windows, order.tolist(), raw.scores[order].tolist(), raw.labels[order].tolist(), strict=True)
        for (mask, area, (y0, y1, x0, x1)), index, score, thing_index in instances:
            if area == 0:
                continue
            taken_region = taken[y0:y1, x0:x1]
            work_region = work[y0:y1, x0:x1]
            take = mask > taken_region  # in the mask and free
            below = [placed[j] for j in over.get(index, []) if j in placed]
            held = None
            if below:
                # pixels of the intersection that instances this one lies over still hold
                below_ids = torch.tensor(below, device=device) + channels + 1
                held = mask & taken_region & torch.isin(work_region, below_ids)
                take = take | held
            kept_area = int(torch.count_nonzero(take))
            if (area - kept_area) / area > overlap_thresh:
                continue
            if held is not None:
                lost = torch.bincount(work_region[held] - (channels + 1), minlength=len(things)).tolist()
                thing_areas = [a - b for a, b in zip(thing_areas, lost, strict=True)]
            placed[index] = len(things)
            things.append((thing_index, float(score)))
            thing_areas.append(kept_area)
            work_region.masked_fill_(take, channels + len(things))
            taken_region.logical_or_(mask)

    # --- stuff, and the statistics of every segment ----------------------------------------------
    bins = channels + 1 + len(things)
    if h == 0 or w == 0:
        return PanopticResult(torch.zeros((h, w), dtype=torch.int32, device=device), [], image_id, raw)
    try:
        areas, bboxes = label_stats(work, bins)
    except (RuntimeError, IndexError):  # a sem_pred value beyond the bins
        _check_sem_pred(raw, channels, image_id)
        raise
    # a sem_pred value in C.. on a free pixel would be counted as a thing; these counts catch it
    if int(areas[channels]) != 0 or areas[channels + 1 :].tolist() != thing_areas:
        _check_sem_pred(raw, channels, image_id)
    threshold = max(area_at_input_size(stuff_area, (h, w), original_size), 1.0)
    stuff_kept = torch.nonzero(areas[: meta.num_stuff] >= threshold).flatten()
    # things that lost every pixel to reclaims vanish
    thing_kept = torch.nonzero(areas[channels + 1 :] > 0).flatten()
    labels = torch.cat([thing_kept + channels + 1, stuff_kept])  # in id order
    lut = torch.zeros(bins, dtype=torch.int32, device=device)
    lut[labels] = torch.arange(1, labels.numel() + 1, dtype=torch.int32, device=device)
    panoptic = lut.index_select(0, work.reshape(-1)).reshape(h, w)

    stuff_score_list = (
        stuff_mean_probs(raw.sem_logits, work, meta.num_stuff)[stuff_kept].tolist()
        if stuff_scores and stuff_kept.numel()
        else [1.0] * stuff_kept.numel()
    )
    kinds = [(True, *things[t]) for t in thing_kept.tolist()] + [
        (False, k, score) for k, score in zip(stuff_kept.tolist(), stuff_score_list, strict=True)
    ]
    stats = zip(areas[labels].tolist(), bboxes[labels].tolist(), strict=True)
    segments = [
        SegmentInfo(
            id=segment_id,
            category_id=meta.thing_dataset_id(index) if isthing else meta.stuff_dataset_id(index),
            isthing=isthing,
            area=int(area),
            bbox=(bx, by, bw, bh),
            score=score,
        )
        for segment_id, ((isthing, index, score), (area, (bx, by, bw, bh))) in enumerate(
            zip(kinds, stats, strict=True), start=1
        )
    ]
    return PanopticResult(panoptic=panoptic, segments=segments, image_id=image_id, raw=raw)


def unknown_erasing_mask(raw: RawPrediction, meta: DatasetMeta, threshold: float, dilation: int) -> Tensor:
    """BoolTensor[h, w] of the pixels Unknown Erasing voids in `raw` (stuff channels 0..S-1)."""
    return unknown_erasing(raw.sem_logits, meta.num_stuff, threshold=threshold, dilation=dilation)


def with_relations(raw: RawPrediction, pairs: Tensor, prob: Tensor) -> RawPrediction:
    """`raw` carrying occlusion probabilities (LongTensor[P, 2] pairs, FloatTensor[P, 2] O)."""
    return replace(raw, extras={**raw.extras, "occ_pairs": pairs, "occ_prob": prob})
