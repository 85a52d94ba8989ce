"""SPINet (Hwang, Oh, Kim 2021, "Single-shot Path Integrated Panoptic Segmentation").

FPN (P2 at stride 8) -> filter sampling module (class head + filter head over the FPN levels) and
Panoptic-Feature generator (one 256-channel feature at stride 4) -> one "single-shot" convolution
per image with the dynamic thing kernels of the sampled locations and the learned stuff kernels.
Thing channels are sigmoid masks, stuff channels a softmax; the heuristic fusion of Panoptic FPN
merges them. Training adds two auxiliary losses on the Panoptic-Feature (Sec. 4): the
inter-class contour loss (1x1 conv + pixel shuffle, focal) and the intra-class triplet loss
(pooled halves of each instance, softplus form of Eq. 5).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, sigmoid_focal_loss

from unipan.config.models import SPINetConfig, SPINetHeadsConfig
from unipan.fusion.heuristic import heuristic_fusion
from unipan.modeling.backbone import FPN, build_backbone
from unipan.modeling.heads.spinet_heads import (
    IGNORE_LOCATION,
    ContourHead,
    FilterSamplingModule,
    PanopticFeatureGenerator,
    TripletHead,
    location_targets,
)
from unipan.modeling.layers.deform_block import make_deformable
from unipan.modeling.layers.dynamic_conv import single_shot_conv
from unipan.modeling.layers.losses import (
    bootstrapped_cross_entropy,
    contour_loss,
    contour_targets,
    dice_loss,
    multiclass_dice_loss,
    soft_margin_triplet_loss,
    upsample_logits,
)
from unipan.modeling.meta_arch import Fusion, PanopticModel, check_sem_seg
from unipan.segments import semantic_argmax, to_semantic_space
from unipan.structures import Batch, DatasetMeta, PanopticTarget, RawPrediction, SemSpace, logit_boxes

__all__ = ["SPINet", "build_spinet", "fuse_kernels", "image_prediction", "paste_mask_logits"]

DEDUP = ("box_nms", "kernel_fusion", "none")
TRIPLET_NEGATIVES = ("any", "same_class")


class SPINet(PanopticModel):
    """Backbone -> (filter sampling module || Panoptic-Feature generator) -> single-shot conv.

    Args:
        backbone: SPINet's FPN (or any backbone holding the FSM and PFG levels).
        fsm: the filter sampling module.
        pfg: the Panoptic-Feature generator (things and stuff when integrated; things otherwise).
        pfg_stuff: a second generator for the stuff kernels (Table 5 "separate"), or None.
        contour_head: the inter-class contour head, or None (L_inter off).
        triplet_head: the intra-class triplet FC, or None (L_intra off).
        meta: the dataset's classes.
        fuse: the fusion, settings bound (the heuristic fusion).
        settings: losses, sampling and inference settings.
        mask_thresh: probability at which thing masks are binarised (the fusion's).

    Losses (training, already weighted): loss_cls, loss_stuff_ce, loss_thing_dice, and, when on,
    loss_stuff_dice (multi-class dice), loss_contour, loss_triplet. Raw predictions: thing
    masks as BoolTensor crops on their tight boxes (`mask_crops`), those boxes, location scores and
    labels; sem_logits FloatTensor[S, h, w] ("stuff") or [S + 1, h, w] ("stuff+things").
    """

    def __init__(
        self,
        *,
        backbone: FPN,
        fsm: FilterSamplingModule,
        pfg: PanopticFeatureGenerator,
        pfg_stuff: PanopticFeatureGenerator | None,
        contour_head: ContourHead | None,
        triplet_head: TripletHead | None,
        meta: DatasetMeta,
        fuse: Fusion,
        settings: SPINetHeadsConfig,
        mask_thresh: float = 0.5,
    ) -> None:
        super().__init__(meta=meta, size_divisibility=int(backbone.size_divisibility), fuse=fuse)
        self.check_num_classes("filter sampling module", fsm.num_things, meta.num_things, "things")
        if settings.dedup not in DEDUP:
            raise ValueError(f"model.spinet.dedup {settings.dedup!r} unknown; known: {list(DEDUP)}")
        if settings.triplet_negatives not in TRIPLET_NEGATIVES:
            raise ValueError(
                f"model.spinet.triplet_negatives {settings.triplet_negatives!r} unknown; "
                f"known: {list(TRIPLET_NEGATIVES)}"
            )
        ranges = settings.scale_ranges
        if ranges and (
            len(ranges) != len(fsm.strides)
            or any(len(r) != 2 or not 0 <= r[0] < r[1] for r in ranges)
            or any(ranges[i + 1][0] > ranges[i][1] or ranges[i + 1][0] < ranges[i][0] for i in range(len(ranges) - 1))
        ):
            raise ValueError(
                f"model.spinet.scale_ranges must be one [lo, hi] per FSM level ({len(fsm.strides)}), 0 <= lo < hi, "
                f"ascending without gaps; got {ranges}"
            )
        self.scale_ranges = [(float(lo), float(hi)) for lo, hi in ranges] or None
        if not 0 < settings.bootstrap_ratio <= 1:
            raise ValueError(f"model.spinet.bootstrap_ratio must be in (0, 1], got {settings.bootstrap_ratio}")
        if not 0 < mask_thresh < 1:
            raise ValueError(f"model.fusion.mask_thresh must be in (0, 1) for sigmoid masks, got {mask_thresh}")
        self.backbone = backbone
        self.fsm = fsm
        self.pfg = pfg
        self.pfg_stuff = pfg_stuff
        self.contour_head = contour_head
        self.triplet_head = triplet_head
        self.settings = settings
        self.sem_space: SemSpace = "stuff+things" if settings.stuff_things_channel else "stuff"
        num_stuff_kernels = meta.num_stuff + int(settings.stuff_things_channel)
        k, d = fsm.kernel_size, fsm.panoptic_channels
        # learned stuff kernels (Sec. 3.4); Panoptic FCN's kernel init
        self.stuff_kernels = nn.Parameter(torch.empty(num_stuff_kernels, d, k, k))
        nn.init.normal_(self.stuff_kernels, std=0.01)
        self.stuff_bias = nn.Parameter(torch.zeros(num_stuff_kernels)) if fsm.kernel_bias else None
        # sigmoid(x) >= t  <=>  x >= logit(t)
        self.mask_logit_thresh = math.log(mask_thresh / (1 - mask_thresh))

    # --- shared forward ---------------------------------------------------------------------------
    def _features(self, batch: Batch) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
        """Class logits and filter maps per FSM level, the thing and the stuff Panoptic-Features."""
        features = self.backbone(batch.images)
        cls_logits, filter_maps = self.fsm(features, batch.image_sizes)
        phi = self.pfg(features, batch.image_sizes)
        phi_stuff = phi if self.pfg_stuff is None else self.pfg_stuff(features, batch.image_sizes)
        return cls_logits, filter_maps, phi, phi_stuff

    def _single_shot(
        self, phi: Tensor, phi_stuff: Tensor, kernels: list[Tensor], biases: list[Tensor] | None
    ) -> tuple[list[Tensor], Tensor]:
        """Thing logits per image FloatTensor[N_b, H/4, W/4] and stuff logits FloatTensor[B, S', H/4, W/4]."""
        n = [int(kk.shape[0]) for kk in kernels]
        if self.pfg_stuff is None:
            # the paper's path: one convolution per image for things and stuff together
            outs = single_shot_conv(phi, kernels, self.stuff_kernels, biases, self.stuff_bias)
            return [o[:m] for o, m in zip(outs, n, strict=True)], torch.stack(
                [o[m:] for o, m in zip(outs, n, strict=True)]
            )
        things = single_shot_conv(phi, kernels, self.stuff_kernels[:0], biases, None)
        k = self.stuff_kernels.shape[-1]
        stuff = F.conv2d(phi_stuff, self.stuff_kernels, self.stuff_bias, padding=k // 2)
        return things, stuff

    # --- training ---------------------------------------------------------------------------------
    def losses(self, batch: Batch) -> dict[str, Tensor]:
        """Weighted training losses of `batch` (see the class docstring)."""
        assert batch.targets is not None
        s = self.settings
        padded_size = (int(batch.images.shape[-2]), int(batch.images.shape[-1]))
        # crowd pixels train as their class, as the other models' semantic losses and the contour
        # targets below (with S + 1 kernels a crowd region is "things"; with S it is ignored anyway)
        padded_sem_seg = batch.padded_sem_seg(crowd_meta=self.meta)
        check_sem_seg(padded_sem_seg, batch.image_ids, self.meta.num_classes)
        cls_logits, filter_maps, phi, phi_stuff = self._features(batch)
        targets = batch.targets

        # class head: sigmoid focal loss over every location, normalised by the positives
        shapes = [(int(x.shape[-2]), int(x.shape[-1])) for x in cls_logits]
        assigned = [location_targets(t, shapes, self.fsm.strides, self.scale_ranges) for t in targets]
        loss_cls, positives = self._class_loss(cls_logits, assigned, targets)

        # thing kernels of uniformly sampled positive locations -> dice on their instance's mask
        level, bidx, ys, xs, inst = self._sample_filters(positives, len(targets), s.filters_per_image, phi.device)
        kernels, bias = self.fsm.kernels(filter_maps, level, bidx, ys, xs)
        per_image = [torch.nonzero(bidx == b).flatten() for b in range(len(targets))]
        thing_logits, stuff_logits = self._single_shot(
            phi,
            phi_stuff,
            [kernels[sel] for sel in per_image],
            None if bias is None else [bias[sel] for sel in per_image],
        )
        # instance masks at stride 4, soft (the covered fraction of each cell)
        masks4 = [_masks_at_stride(t.masks, padded_size, 4) for t in targets]
        dice_terms = []
        for b, (sel, logits) in enumerate(zip(per_image, thing_logits, strict=True)):
            if sel.numel():
                dice_terms.append(dice_loss(logits.float().sigmoid(), masks4[b][inst[sel]]))
        zero = phi.sum() * 0.0  # a zero that keeps every loss on the graph
        loss_thing = torch.cat(dice_terms).mean() if dice_terms else zero

        # stuff: (bootstrapped) cross-entropy + multi-class dice at input resolution
        sem_targets = to_semantic_space(padded_sem_seg, self.meta.num_stuff, self.sem_space)
        # every loss in float32 (spec §7): under autocast the logits and the Panoptic-Feature are
        # half precision, whose sums over an image (dice, the triplet's pooled halves) overflow
        stuff_up = upsample_logits(stuff_logits.float(), padded_size)
        losses = {
            "loss_cls": loss_cls * s.cls_weight,
            "loss_thing_dice": loss_thing * s.thing_weight,
            "loss_stuff_ce": bootstrapped_cross_entropy(stuff_up, sem_targets, s.bootstrap_ratio) * s.stuff_weight,
        }
        if s.multiclass_dice:
            losses["loss_stuff_dice"] = multiclass_dice_loss(stuff_up, sem_targets) * s.stuff_weight
        # Table 5's separate Panoptic-Features: the shared auxiliary heads see both (spec G25), and
        # their losses are averaged over the two, so that lambda_3 / lambda_4 weigh the same total
        # as on the one integrated feature (G25 says "applied to both", not how to combine them)
        phis = [phi] if self.pfg_stuff is None else [phi, phi_stuff]
        if self.contour_head is not None:
            labels = torch.full_like(padded_sem_seg, -1)
            for b, t in enumerate(targets):
                h, w = t.image_size
                labels[b, :h, :w] = t.sem_seg_with_crowd(self.meta)
            soft = contour_targets(labels, s.contour_sigma)
            alpha, gamma = s.contour_focal_alpha, s.contour_focal_gamma
            terms = [contour_loss(self.contour_head(p).float(), soft, labels >= 0, alpha, gamma) for p in phis]
            losses["loss_contour"] = torch.stack(terms).mean() * s.contour_weight
        if self.triplet_head is not None:
            terms = [self._triplet_loss(p, targets, masks4) for p in phis]
            losses["loss_triplet"] = torch.stack(terms).mean() * s.triplet_weight
        return losses

    def _class_loss(
        self, cls_logits: list[Tensor], assigned: list[list[Tensor]], targets: list[PanopticTarget]
    ) -> tuple[Tensor, list[Tensor]]:
        """Focal loss of the class head and the positive locations [P, 5] (level, b, y, x, instance)."""
        s = self.settings
        logits_all, onehot_all, positives = [], [], []
        labels = torch.cat([t.labels for t in targets])
        offsets = torch.tensor([0] + [len(t) for t in targets], device=labels.device).cumsum(0)
        for lvl, logits in enumerate(cls_logits):
            idx = torch.stack([a[lvl] for a in assigned])  # [B, H_l, W_l]
            onehot = torch.zeros_like(logits.permute(0, 2, 3, 1))  # [B, H_l, W_l, T]
            pos = torch.nonzero(idx >= 0)  # [P, 3] (b, y, x)
            if pos.numel():
                inst = idx[pos[:, 0], pos[:, 1], pos[:, 2]]
                onehot[pos[:, 0], pos[:, 1], pos[:, 2], labels[offsets[pos[:, 0]] + inst]] = 1.0
                positives.append(torch.stack([torch.full_like(inst, lvl), pos[:, 0], pos[:, 1], pos[:, 2], inst], 1))
            valid = idx != IGNORE_LOCATION
            logits_all.append(logits.permute(0, 2, 3, 1)[valid])
            onehot_all.append(onehot[valid])
        num_pos = sum(int(p.shape[0]) for p in positives)
        loss = sigmoid_focal_loss(
            torch.cat(logits_all).float(),
            torch.cat(onehot_all).float(),
            alpha=s.focal_alpha,
            gamma=s.focal_gamma,
            reduction="sum",
        ) / max(num_pos, 1)
        return loss, positives

    @staticmethod
    def _sample_filters(
        positives: list[Tensor], batch_size: int, per_image: int, device: torch.device
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Up to `per_image` positive locations per image, uniformly without replacement."""
        if not positives:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            return empty, empty, empty, empty, empty
        pos = torch.cat(positives)
        chosen = []
        for b in range(batch_size):
            rows = torch.nonzero(pos[:, 1] == b).flatten()
            if rows.numel() > per_image:
                rows = rows[torch.randperm(rows.numel(), device=rows.device)[:per_image]]
            chosen.append(rows)
        pos = pos[torch.cat(chosen)]
        return pos[:, 0], pos[:, 1], pos[:, 2], pos[:, 3], pos[:, 4]

    def _triplet_loss(self, phi: Tensor, targets: list[PanopticTarget], masks4: list[Tensor]) -> Tensor:
        """Intra-class triplet loss (Eq. 3-5) on the Panoptic-Feature of the batch.

        Per instance, a random half-plane through its centroid (m_r) splits its stride-4 mask into
        two halves (M, M'); an instance with an empty half is skipped. Each half's mean feature
        goes through the FC; anchor and positive are the two halves of one instance (both ways),
        negatives both halves of every other instance of the image (of the same class with
        `triplet_negatives: same_class`). Images with fewer than two instances add no triplet;
        none in the batch gives 0 on the graph.

        Args:
            phi: FloatTensor[B, D, H/4, W/4].
            targets: the batch's ground truth.
            masks4: per image FloatTensor[N_b, H/4, W/4] covered fraction of each cell.
        """
        assert self.triplet_head is not None
        phi = phi.float()  # the pooled halves sum thousands of cells (see `losses`)
        h4, w4 = phi.shape[-2:]
        ys = torch.arange(h4, device=phi.device, dtype=phi.dtype)[:, None]
        xs = torch.arange(w4, device=phi.device, dtype=phi.dtype)[None, :]
        anchors, positives, negatives = [], [], []
        for b, t in enumerate(targets):
            if len(t) < 2:
                continue
            m = (masks4[b] >= 0.5).to(phi.dtype)  # [N, H/4, W/4]
            count = m.sum(dim=(1, 2)).clamp(min=1)
            cy = (m * ys).sum(dim=(1, 2)) / count
            cx = (m * xs).sum(dim=(1, 2)) / count
            theta = torch.rand(m.shape[0], device=phi.device, dtype=phi.dtype) * math.pi
            side = (xs - cx[:, None, None]) * theta.cos()[:, None, None] + (ys - cy[:, None, None]) * theta.sin()[
                :, None, None
            ] >= 0
            halves = torch.stack([m * side, m * ~side], dim=1)  # [N, 2, H/4, W/4]
            sizes = halves.sum(dim=(2, 3))  # [N, 2]
            keep = torch.nonzero((sizes > 0).all(dim=1)).flatten()
            if keep.numel() < 2:
                continue
            pooled = torch.einsum("nshw,dhw->nsd", halves[keep], phi[b]) / sizes[keep][..., None]
            v = self.triplet_head(pooled).float()  # [K, 2, E]
            k = v.shape[0]
            labels = t.labels[keep]
            # every (anchor instance i, anchor half a, negative instance j != i, negative half c)
            i, a, j, c = torch.meshgrid(*(torch.arange(n, device=phi.device) for n in (k, 2, k, 2)), indexing="ij")
            ok = i != j
            if self.settings.triplet_negatives == "same_class":
                ok &= labels[i] == labels[j]
            i, a, j, c = i[ok], a[ok], j[ok], c[ok]
            anchors.append(v[i, a])
            positives.append(v[i, 1 - a])
            negatives.append(v[j, c])
        if not anchors:
            return phi.sum() * 0.0
        return soft_margin_triplet_loss(torch.cat(anchors), torch.cat(positives), torch.cat(negatives)).mean()

    # --- inference --------------------------------------------------------------------------------
    @torch.no_grad()
    def raw_predictions(self, batch: Batch) -> list[RawPrediction]:
        """Per image RawPrediction at its input size (thing masks as crops on their tight boxes)."""
        s = self.settings
        cls_logits, filter_maps, phi, phi_stuff = self._features(batch)
        # candidates: locations whose best class scores above the threshold, top-k per level,
        # centres inside the image (the padding holds no objects)
        cands: list[list[Tensor]] = [[] for _ in range(6)]  # level, b, y, x, score, label
        for lvl, (logits, stride) in enumerate(zip(cls_logits, self.fsm.strides, strict=True)):
            scores, labels = logits.sigmoid().max(dim=1)  # [B, H_l, W_l]
            for b, (h, w) in enumerate(batch.image_sizes):
                sc = scores[b, : math.ceil((h - stride // 2) / stride), : math.ceil((w - stride // 2) / stride)]
                keep = torch.nonzero(sc > s.score_thresh)
                vals = sc[keep[:, 0], keep[:, 1]]
                if vals.numel() > s.pre_topk:
                    vals, top = vals.topk(s.pre_topk)
                    keep = keep[top]
                for lst, value in zip(
                    cands,
                    (
                        torch.full_like(vals, lvl, dtype=torch.long),
                        torch.full_like(vals, b, dtype=torch.long),
                        keep[:, 0],
                        keep[:, 1],
                        vals,
                        labels[b][keep[:, 0], keep[:, 1]],
                    ),
                    strict=True,
                ):
                    lst.append(value)
        level, bidx, ys, xs, scores_all, labels_all = (torch.cat(c) for c in cands)
        kernels, bias = self.fsm.kernels(filter_maps, level, bidx, ys, xs)
        per_image = [torch.nonzero(bidx == b).flatten() for b in range(len(batch))]
        image_kernels, image_bias, image_scores, image_labels = [], [], [], []
        for sel in per_image:
            item = (kernels[sel], None if bias is None else bias[sel], scores_all[sel], labels_all[sel])
            if s.dedup == "kernel_fusion":  # duplicates merge before the conv: one mask per fused kernel
                item = fuse_kernels(*item, s.kernel_sim_thresh)
            image_kernels.append(item[0])
            image_bias.append(item[1])
            image_scores.append(item[2])
            image_labels.append(item[3])
        biases = None if bias is None else [b for b in image_bias if b is not None]
        thing_logits, stuff_logits = self._single_shot(phi, phi_stuff, image_kernels, biases)
        return [
            image_prediction(
                thing_logits[b],
                stuff_logits[b],
                image_scores[b],
                image_labels[b],
                (h, w),
                scale=4,
                mask_logit_thresh=self.mask_logit_thresh,
                dedup="none" if s.dedup == "kernel_fusion" else s.dedup,
                nms_thresh=s.nms_thresh,
                max_detections=s.max_detections,
                sem_space=self.sem_space,
            )
            for b, (h, w) in enumerate(batch.image_sizes)
        ]


def fuse_kernels(
    kernels: Tensor, bias: Tensor | None, scores: Tensor, labels: Tensor, sim_thresh: float
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Panoptic FCN's kernel fusion (`dedup: kernel_fusion`, spec G15): merge duplicate kernels.

    In score order, a kernel is a duplicate of an earlier one of the same class whose cosine
    similarity to it (over the flattened weights) is at least `sim_thresh`. Each kernel joins the
    first (highest-scoring) kernel it duplicates; a kernel that duplicates none is kept, and the
    kernel put in its place is the mean of the kernels that joined it (itself included), with its
    own score and class. A kernel whose first match is itself a duplicate is dropped, as in
    Panoptic FCN's `ThingGenerator.kernel_fusion` (default threshold 0.9, class-specific). Biases,
    which Panoptic FCN's 1x1 kernels lack, are averaged with their kernels and take no part in the
    similarity. Every kernel counts as its own match (a zero kernel too).

    Args:
        kernels: FloatTensor[N, D, k, k] of one image; bias: FloatTensor[N] or None.
        scores: FloatTensor[N]; labels: LongTensor[N].
        sim_thresh: cosine similarity at or above which two kernels of one class are duplicates.

    Returns:
        (kernels [K, D, k, k], bias [K] or None, scores [K], labels [K]), by descending score.
    """
    if kernels.shape[0] == 0:
        return kernels, bias, scores, labels
    order = torch.argsort(scores, descending=True, stable=True)
    flat = kernels[order].flatten(1)
    unit = flat / flat.norm(dim=1, keepdim=True).clamp(min=1e-8)
    labels_sorted = labels[order]
    # match[i, j], i <= j: kernel j duplicates the (at least as high-scoring) kernel i
    match = (unit @ unit.T >= sim_thresh) & (labels_sorted[:, None] == labels_sorted[None, :])
    match = match.triu()
    match.fill_diagonal_(True)
    # per column, its first matching row (argmax returns the first maximum; the diagonal matches)
    first = match.to(torch.uint8).argmax(dim=0)
    kept = torch.nonzero(first == torch.arange(first.numel(), device=first.device)).flatten()
    members = (first[None, :] == kept[:, None]).to(flat.dtype)  # [K, N]
    counts = members.sum(dim=1, keepdim=True)
    fused = (members @ flat / counts).reshape(-1, *kernels.shape[1:])
    fused_bias = None if bias is None else (members @ bias[order][:, None] / counts).flatten()
    return fused, fused_bias, scores[order][kept], labels_sorted[kept]


def image_prediction(
    thing_logits: Tensor,
    stuff_logits: Tensor,
    scores: Tensor,
    labels: Tensor,
    image_size: tuple[int, int],
    *,
    scale: int,
    mask_logit_thresh: float,
    dedup: str,
    nms_thresh: float,
    max_detections: int,
    sem_space: SemSpace,
) -> RawPrediction:
    """The inference tail of one image: the single-shot conv's logits -> its RawPrediction.

    Thing masks are thresholded at stride `scale`; empty ones are dropped; their boxes drive the
    class-wise NMS (or, with dedup "none", only the score order); the kept thing logits and the
    stuff logits are upsampled bilinearly to the padded input and cropped to the image.

    Args:
        thing_logits: FloatTensor[N, h', w'] at stride `scale` (the whole padded map).
        stuff_logits: FloatTensor[S', h', w'].
        scores: FloatTensor[N] location scores; labels: LongTensor[N] thing indices.
        image_size: (h, w) of the image in input pixels.
        scale: stride of the logits (4; 1 for logits at input resolution).
        mask_logit_thresh: logit at which a thing pixel is in its mask.
        dedup: "box_nms" | "none" ("kernel_fusion" merges the kernels before the conv, so its
            masks come here as "none"); nms_thresh: IoU of the class-wise NMS.
        max_detections: instances kept (by score).
        sem_space: the class space of the stuff logits.

    Returns:
        RawPrediction at (h, w), its thing masks as crops on their tight boxes (`mask_crops`).
    """
    h, w = image_size
    padded_size = (int(stuff_logits.shape[-2]) * scale, int(stuff_logits.shape[-1]) * scale)
    boxes = logit_boxes(thing_logits, mask_logit_thresh)
    # a mask without a cell at the threshold stays empty when upsampled (bilinear values are convex
    # combinations of cells): not a detection, and it must not take one of the `max_detections`
    # places (its zero box overlaps no box, so no NMS suppresses it)
    nonempty = torch.nonzero((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).flatten()
    if dedup == "box_nms":
        keep = nonempty[batched_nms(boxes[nonempty], scores[nonempty], labels[nonempty], nms_thresh)]
    else:
        keep = nonempty[torch.argsort(scores[nonempty], descending=True, stable=True)]
    keep = keep[:max_detections]
    kept = [thing_logits[i] for i in keep.tolist()]  # views: no copy of the kept maps
    crops, mask_boxes = paste_mask_logits(kept, boxes[keep], (h, w), mask_logit_thresh, scale)
    sem_logits = upsample_logits(stuff_logits[None], padded_size)[0, :, :h, :w]
    return RawPrediction(
        boxes=mask_boxes,
        scores=scores[keep],
        labels=labels[keep],
        sem_logits=sem_logits,
        mask_crops=crops,
        sem_space=sem_space,
        sem_pred=semantic_argmax(sem_logits),
    )


def _masks_at_stride(masks: Tensor, padded_size: tuple[int, int], stride: int) -> Tensor:
    """BoolTensor[N, h, w] -> FloatTensor[N, Hp/stride, Wp/stride]: the covered fraction of each cell."""
    hp, wp = padded_size
    h, w = masks.shape[-2:]
    padded = F.pad(masks.float(), (0, wp - w, 0, hp - h))
    return F.avg_pool2d(padded[None], stride)[0] if padded.shape[0] else padded[:, ::stride, ::stride]


def paste_mask_logits(
    logits: Tensor | Sequence[Tensor], boxes: Tensor, size: tuple[int, int], thresh: float, scale: int = 4
) -> tuple[list[Tensor], Tensor]:
    """Binary masks of stride-`scale` logits, upsampled bilinearly only near each mask, as crops.

    Equal to `interpolate(logits, scale_factor=scale, mode="bilinear") >= thresh` cropped to
    `size`: beyond one cell outside the tight box of the cells at or above `thresh`, every
    interpolated value mixes cells below it; the upsampled window reaches two cells beyond the box,
    so the values up to one cell beyond it are those of the full map. Each mask is returned on its
    tight pixel box (`RawPrediction.mask_crops`): no full-image mask is ever allocated.

    Args:
        logits: FloatTensor[N, h4, w4] mask logits at stride `scale` (or N FloatTensor[h4, w4]).
        boxes: FloatTensor[N, 4] xyxy (x1/y1 exclusive) cell boxes of `logits >= thresh`.
        size: (h, w) of the output, at most (h4 * scale, w4 * scale).
        thresh: logit threshold.
        scale: the stride of `logits`.

    Returns:
        N BoolTensor[y1 - y0, x1 - x0] crops and their tight xyxy pixel boxes FloatTensor[N, 4]
        (x1/y1 exclusive; a zero box and a 0 x 0 crop for an empty mask), as `masks_to_boxes`.
    """
    h, w = size
    empty = torch.zeros((0, 0), dtype=torch.bool, device=boxes.device)
    crops = [empty] * len(logits)
    tight = [(0, 0, 0, 0)] * len(logits)
    for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
        if x1 <= x0 or y1 <= y0:
            continue
        h4, w4 = logits[i].shape
        wy0, wy1, wx0, wx1 = max(y0 - 2, 0), min(y1 + 2, h4), max(x0 - 2, 0), min(x1 + 2, w4)
        window = logits[i][wy0:wy1, wx0:wx1][None, None]
        up = (
            window[0, 0]
            if scale == 1
            else F.interpolate(window, scale_factor=scale, mode="bilinear", align_corners=False)[0, 0]
        )
        # the exact part: cells [y0 - 1, y1 + 1) (the window's own border cells only at the map's)
        ey0, ey1, ex0, ex1 = max(y0 - 1, 0), min(y1 + 1, h4), max(x0 - 1, 0), min(x1 + 1, w4)
        py0, py1 = ey0 * scale, min(ey1 * scale, h)
        px0, px1 = ex0 * scale, min(ex1 * scale, w)
        if py1 <= py0 or px1 <= px0:
            continue
        oy, ox = (ey0 - wy0) * scale, (ex0 - wx0) * scale
        region = up[oy : oy + py1 - py0, ox : ox + px1 - px0]
        # the tight box from the float maxima (vectorised), then the mask on it alone
        # (a NaN drops its row and its column: NaN logits, a diverged model, cannot raise here)
        rows = torch.nonzero(region.amax(dim=1) >= thresh).flatten().tolist()
        cols = torch.nonzero(region.amax(dim=0) >= thresh).flatten().tolist() if rows else []
        if cols:
            r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
            crops[i] = region[r0:r1, c0:c1] >= thresh
            tight[i] = (px0 + c0, py0 + r0, px0 + c1, py0 + r1)
    return crops, torch.tensor(tight, dtype=torch.float32, device=boxes.device).reshape(-1, 4)


def build_spinet(cfg: SPINetConfig, meta: DatasetMeta) -> SPINet:
    """SPINet for `meta`'s classes from its model config."""
    s = cfg.spinet
    backbone = build_backbone(cfg.backbone)
    if s.deformable:
        # SPINet + deform (Table 1): the placement is not stated; res3-res5, as the DCN ResNets
        for stage in (backbone.trunk.layer2, backbone.trunk.layer3, backbone.trunk.layer4):
            make_deformable(stage)
    shapes = backbone.output_shape()
    fsm = FilterSamplingModule(
        in_shapes=shapes,
        in_features=s.fsm_levels,
        num_things=meta.num_things,
        num_convs=s.fsm_num_convs,
        filter_channels=s.filter_channels,
        panoptic_channels=s.panoptic_channels,
        kernel_size=s.kernel_size,
        kernel_bias=s.kernel_bias,
        coords=s.coords,
    )
    if s.head_init_std != 0.01:
        for m in fsm.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight, std=s.head_init_std)

    def pfg() -> PanopticFeatureGenerator:
        return PanopticFeatureGenerator(
            in_shapes=shapes,
            in_features=s.pfg_levels,
            conv_dims=s.pfg_channels,
            out_channels=s.panoptic_channels,
            coords=s.coords,
            deconv_kernel=s.deconv_kernel,
        )

    thing_pfg = pfg()
    stuff_pfg = None if s.integrated else pfg()
    contour = ContourHead(s.panoptic_channels) if s.contour_weight > 0 else None
    triplet = TripletHead(s.panoptic_channels, s.triplet_dim) if s.triplet_weight > 0 else None
    return SPINet(
        backbone=backbone,
        fsm=fsm,
        pfg=thing_pfg,
        pfg_stuff=stuff_pfg,
        contour_head=contour,
        triplet_head=triplet,
        meta=meta,
        fuse=functools.partial(heuristic_fusion, **dataclasses.asdict(cfg.fusion)),
        settings=s,
        mask_thresh=cfg.fusion.mask_thresh,
    )
