"""Mask R-CNN instance branch driven from unipan's `Batch`, built on torchvision's RPN and RoIHeads.

`InstanceBranch` runs the parts of a torchvision `RegionProposalNetwork` and `RoIHeads` itself
(anchor generator, RPN head, box coder, matcher, sampler, RoI pools, box and mask heads) instead of
their `forward`s, so that what later models need stays reachable: RPN features and objectness
(AUNet), proposals, box features (REFINE), and the mask logits of every thing class together with
the mask head's features (UPSNet).

Label spaces: torchvision's box classifier has class 0 = background, so a thing index t is
torchvision label t + 1. The mask predictor has one channel per thing index (no background
channel, as in detectron2). Every output of this module speaks thing indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, project_masks_on_boxes
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.ops import MultiScaleRoIAlign

from unipan.config import ModelConfig
from unipan.structures import DatasetMeta, PanopticTarget

__all__ = [
    "RPN_IN_FEATURES",
    "ROI_IN_FEATURES",
    "RPNOutputs",
    "InstanceOutputs",
    "InstanceBranch",
    "build_instance_branch",
    "torchvision_targets",
]

RPN_IN_FEATURES = ("p2", "p3", "p4", "p5", "p6")
"""Pyramid levels the RPN runs on (Mask R-CNN R50-FPN)."""

ROI_IN_FEATURES = ("p2", "p3", "p4", "p5")
"""Pyramid levels the RoI pools read (P6 is for proposals only)."""


@dataclass
class RPNOutputs:
    """Everything the RPN computed for a batch.

    Attributes:
        proposals: per image FloatTensor[P, 4] xyxy proposals after NMS (P <= post_nms_top_n).
        proposal_scores: per image FloatTensor[P] objectness probabilities of `proposals`.
        objectness: per level FloatTensor[B, A, Hl, Wl] objectness logits.
        box_deltas: per level FloatTensor[B, 4A, Hl, Wl] anchor regression deltas.
        features: per level FloatTensor[B, C, Hl, Wl], the RPN's shared 3x3 conv + ReLU output
            (AUNet's proposal attention reads these).
        anchors: per image FloatTensor[sum_l A*Hl*Wl, 4].
        losses: {"loss_rpn_objectness", "loss_rpn_box_reg"} in training, else empty.
    """

    proposals: list[Tensor]
    proposal_scores: list[Tensor]
    objectness: list[Tensor]
    box_deltas: list[Tensor]
    features: list[Tensor]
    anchors: list[Tensor]
    losses: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class InstanceOutputs:
    """Everything the instance branch computed for a batch.

    Attributes:
        detections: eval: per image {"boxes": FloatTensor[N, 4], "scores": FloatTensor[N],
            "labels": LongTensor[N] thing index, "mask_probs": FloatTensor[N, M, M],
            "mask_logits": FloatTensor[N, M, M]} (mask of the predicted class); training: per
            image {"boxes": proposals FloatTensor[P, 4], "scores": objectness FloatTensor[P]}.
        losses: training: loss_rpn_objectness, loss_rpn_box_reg, loss_classifier, loss_box_reg,
            loss_mask (unweighted); eval: empty.
        rpn: the RPN's outputs.
        box_rois: per image FloatTensor[R, 4] boxes the box head ran on (training: sampled
            proposals + GT; eval: all proposals).
        box_features: FloatTensor[sum R, D] box head representations of `box_rois`.
        box_labels: training: per image LongTensor[R] thing index of each sampled RoI, -1 for
            background; eval: empty.
        mask_rois: per image FloatTensor[K, 4] boxes the mask head ran on (training: the
            foreground sampled RoIs; eval: the detections).
        mask_labels: per image LongTensor[K] thing index whose mask channel is used.
        mask_logits: FloatTensor[sum K, T, M, M] mask logits of every thing class.
        mask_features: FloatTensor[sum K, Cm, M/2, M/2] mask head output before the predictor.
    """

    detections: list[dict[str, Tensor]]
    losses: dict[str, Tensor]
    rpn: RPNOutputs
    box_rois: list[Tensor]
    box_features: Tensor
    box_labels: list[Tensor]
    mask_rois: list[Tensor]
    mask_labels: list[Tensor]
    mask_logits: Tensor
    mask_features: Tensor


def torchvision_targets(
    targets: Sequence[PanopticTarget], image_sizes: Sequence[tuple[int, int]], num_things: int
) -> list[dict[str, Tensor]]:
    """Convert canonical targets to torchvision's detection targets, checking them.

    Args:
        targets: per image ground truth at its input size.
        image_sizes: per image (h, w) the targets must have.
        num_things: T; labels must lie in 0..T-1.

    Returns:
        per image {"boxes": FloatTensor[N, 4], "labels": LongTensor[N] thing index + 1,
        "masks": BoolTensor[N, h, w]}.

    Raises:
        ValueError: naming the image (and instance) whose boxes, labels or masks are malformed.
    """
    if len(targets) != len(image_sizes):
        raise ValueError(f"{len(targets)} targets for {len(image_sizes)} images")
    out: list[dict[str, Tensor]] = []
    for t, (h, w) in zip(targets, image_sizes, strict=True):
        name = f"image {t.image_id!r}"
        n = int(t.labels.numel())
        if t.boxes.shape != (n, 4) or t.masks.shape != (n, h, w):
            raise ValueError(
                f"{name}: {n} labels but boxes {tuple(t.boxes.shape)} and masks {tuple(t.masks.shape)} "
                f"(expected [{n}, 4] and [{n}, {h}, {w}])"
            )
        if n:
            bad_label = (t.labels < 0) | (t.labels >= num_things)
            if bool(bad_label.any()):
                k = int(torch.nonzero(bad_label)[0])
                raise ValueError(f"{name}, instance {k}: thing index {int(t.labels[k])} not in 0..{num_things - 1}")
            wh = t.boxes[:, 2:] - t.boxes[:, :2]
            degenerate = (wh <= 0).any(dim=1)
            if bool(degenerate.any()):
                k = int(torch.nonzero(degenerate)[0])
                raise ValueError(
                    f"{name}, instance {k}: degenerate box {t.boxes[k].tolist()} (needs x1 > x0 and y1 > y0)"
                )
        out.append(
            {
                "boxes": t.boxes.to(torch.float32),
                "labels": t.labels.to(torch.int64) + 1,
                # bool is fine: the mask crops convert to the RoIs' float dtype anyway
                "masks": t.masks,
            }
        )
    return out


class InstanceBranch(nn.Module):
    """Mask R-CNN's RPN + box head + mask head over pyramid features.

    Args:
        rpn: torchvision RPN whose head has `conv`, `cls_logits` and `bbox_pred` (`RPNHead`).
        roi_heads: torchvision RoIHeads with box and mask parts; its box predictor has T + 1
            classes (background first) and its mask predictor T channels (one per thing index).
        in_features: pyramid levels fed to the RPN, in order of its anchor sizes (the RoI pools
            choose their own levels by name).
    """

    def __init__(self, *, rpn: RegionProposalNetwork, roi_heads: RoIHeads, in_features: list[str]) -> None:
        super().__init__()
        head = rpn.head
        if not all(hasattr(head, a) for a in ("conv", "cls_logits", "bbox_pred")):
            raise TypeError("rpn.head must be a torchvision RPNHead (with conv, cls_logits and bbox_pred)")
        if not roi_heads.has_mask():
            raise ValueError("roi_heads needs mask_roi_pool, mask_head and mask_predictor")
        num_sizes = len(rpn.anchor_generator.sizes)
        if num_sizes != len(in_features):
            raise ValueError(f"{len(in_features)} RPN input levels {in_features} but {num_sizes} anchor sizes")
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.in_features = list(in_features)
        cls_score = getattr(roi_heads.box_predictor, "cls_score", None)
        self.num_things = int(cls_score.out_features) - 1 if isinstance(cls_score, nn.Linear) else -1
        mask_out = getattr(roi_heads.mask_predictor, "mask_fcn_logits", None)
        if isinstance(mask_out, nn.Conv2d) and self.num_things >= 0 and mask_out.out_channels != self.num_things:
            raise ValueError(
                f"mask predictor has {mask_out.out_channels} channels; expected one per thing index "
                f"({self.num_things}, the box predictor's classes minus background)"
            )

    # --- RPN -----------------------------------------------------------------------------------
    def forward_rpn(
        self,
        features: dict[str, Tensor],
        image_sizes: Sequence[tuple[int, int]],
        padded_size: tuple[int, int],
        tv_targets: list[dict[str, Tensor]] | None = None,
    ) -> RPNOutputs:
        """Run the RPN (torchvision's RegionProposalNetwork logic, features kept).

        Args:
            features: pyramid features FloatTensor[B, C, Hl, Wl] holding `in_features`.
            image_sizes: per image (h, w) before padding (proposals are clipped to it).
            padded_size: (Hp, Wp) of the padded batch (anchor strides derive from it).
            tv_targets: torchvision targets (see `torchvision_targets`) in training.
        """
        rpn = self.rpn
        levels = [features[name] for name in self.in_features]
        batch = levels[0].shape[0]
        rpn_features = [rpn.head.conv(x) for x in levels]
        objectness = [rpn.head.cls_logits(t) for t in rpn_features]
        box_deltas = [rpn.head.bbox_pred(t) for t in rpn_features]
        # The anchor generator reads only the padded size, dtype and device of `tensors`: an empty
        # channel dimension avoids keeping a copy of the images around.
        placeholder = levels[0].new_empty((batch, 0, int(padded_size[0]), int(padded_size[1])))
        image_list = ImageList(placeholder, [(int(h), int(w)) for h, w in image_sizes])
        anchors = rpn.anchor_generator(image_list, levels)
        num_anchors_per_level = [int(o[0].numel()) for o in objectness]
        flat_objectness, flat_deltas = concat_box_prediction_layers(objectness, box_deltas)
        # Faster R-CNN does not backpropagate through the proposal coordinates.
        proposals = rpn.box_coder.decode(flat_deltas.detach(), anchors).view(batch, -1, 4)
        boxes, scores = rpn.filter_proposals(proposals, flat_objectness, image_list.image_sizes, num_anchors_per_level)
        losses: dict[str, Tensor] = {}
        if self.training:
            if tv_targets is None:
                raise ValueError("the RPN needs targets in training mode")
            labels, matched_gt_boxes = rpn.assign_targets_to_anchors(anchors, tv_targets)
            regression_targets = rpn.box_coder.encode(matched_gt_boxes, anchors)
            loss_objectness, loss_box_reg = rpn.compute_loss(flat_objectness, flat_deltas, labels, regression_targets)
            losses = {"loss_rpn_objectness": loss_objectness, "loss_rpn_box_reg": loss_box_reg}
        return RPNOutputs(
            proposals=boxes,
            proposal_scores=scores,
            objectness=objectness,
            box_deltas=box_deltas,
            features=rpn_features,
            anchors=anchors,
            losses=losses,
        )

    # --- masks ---------------------------------------------------------------------------------
    def forward_masks(
        self, features: dict[str, Tensor], boxes: Sequence[Tensor], padded_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """Mask logits of every thing class for arbitrary boxes (UPSNet runs it on GT boxes too).

        Args:
            features: pyramid features holding the mask pool's levels.
            boxes: per image FloatTensor[K_i, 4] xyxy boxes in input pixels.
            padded_size: (Hp, Wp) of the padded batch.

        Returns:
            (mask_logits FloatTensor[sum K_i, T, M, M], mask_features FloatTensor[sum K_i, Cm, M/2, M/2]).
        """
        heads = self.roi_heads
        batch = len(boxes)
        # The pools infer each level's scale from the image size; the padded size gives it exactly
        # (an unpadded size well below the padded one would round to the wrong power of two).
        pooled = heads.mask_roi_pool(features, list(boxes), [tuple(padded_size)] * batch)
        mask_features = heads.mask_head(pooled)
        mask_logits = heads.mask_predictor(mask_features)
        return mask_logits, mask_features

    # --- everything ----------------------------------------------------------------------------
    def run(
        self,
        features: dict[str, Tensor],
        image_sizes: Sequence[tuple[int, int]],
        padded_size: tuple[int, int],
        targets: Sequence[PanopticTarget] | None = None,
    ) -> InstanceOutputs:
        """RPN, box head and mask head, with every intermediate result kept.

        Args:
            features: pyramid features FloatTensor[B, C, Hl, Wl] (p2..p6).
            image_sizes: per image (h, w) before padding.
            padded_size: (Hp, Wp) of the padded batch.
            targets: per image ground truth (required in training mode, ignored in eval).
        """
        heads = self.roi_heads
        image_sizes = [(int(h), int(w)) for h, w in image_sizes]
        padded_size = (int(padded_size[0]), int(padded_size[1]))
        if len(image_sizes) != features[self.in_features[0]].shape[0]:
            raise ValueError(f"{len(image_sizes)} image sizes for a batch of {features[self.in_features[0]].shape[0]}")
        tv_targets = None
        if self.training:
            if targets is None:
                raise ValueError("the instance branch needs targets in training mode")
            num_things = self.num_things if self.num_things >= 0 else 1 << 30
            tv_targets = torchvision_targets(targets, image_sizes, num_things)
        rpn_out = self.forward_rpn(features, image_sizes, padded_size, tv_targets)
        losses = dict(rpn_out.losses)
        batch = len(image_sizes)
        pool_sizes = [padded_size] * batch

        if self.training:
            assert tv_targets is not None
            proposals = [p.detach() for p in rpn_out.proposals]
            box_rois, matched_idxs, tv_labels, regression_targets = heads.select_training_samples(proposals, tv_targets)
        else:
            box_rois, matched_idxs, tv_labels, regression_targets = rpn_out.proposals, [], [], []
        box_features = heads.box_head(heads.box_roi_pool(features, box_rois, pool_sizes))
        class_logits, box_regression = heads.box_predictor(box_features)

        detections: list[dict[str, Tensor]] = []
        if self.training:
            loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, tv_labels, regression_targets)
            losses.update(loss_classifier=loss_classifier, loss_box_reg=loss_box_reg)
            # The mask head learns on the foreground sampled RoIs only (Mask R-CNN).
            mask_rois, mask_labels, mask_gt_index = [], [], []
            for rois, labels, matched in zip(box_rois, tv_labels, matched_idxs, strict=True):
                fg = torch.nonzero(labels > 0).flatten()
                mask_rois.append(rois[fg])
                mask_labels.append(labels[fg] - 1)
                mask_gt_index.append(matched[fg])
            mask_logits, mask_features = self.forward_masks(features, mask_rois, padded_size)
            losses["loss_mask"] = _mask_loss(mask_logits, mask_rois, mask_labels, mask_gt_index, tv_targets)
            box_labels = [labels - 1 for labels in tv_labels]
            for boxes, scores in zip(rpn_out.proposals, rpn_out.proposal_scores, strict=True):
                detections.append({"boxes": boxes, "scores": scores})
        else:
            det_boxes, det_scores, det_labels = heads.postprocess_detections(
                class_logits, box_regression, box_rois, image_sizes
            )
            mask_rois = det_boxes
            mask_labels = [labels - 1 for labels in det_labels]
            mask_logits, mask_features = self.forward_masks(features, mask_rois, padded_size)
            own_logits = _select_class(mask_logits, torch.cat(mask_labels))
            per_image = own_logits.split([int(b.shape[0]) for b in det_boxes])
            for boxes, scores, labels, logits in zip(det_boxes, det_scores, mask_labels, per_image, strict=True):
                detections.append(
                    {
                        "boxes": boxes,
                        "scores": scores,
                        "labels": labels,
                        "mask_probs": logits.sigmoid(),
                        "mask_logits": logits,
                    }
                )
            box_labels = []
        return InstanceOutputs(
            detections=detections,
            losses=losses,
            rpn=rpn_out,
            box_rois=list(box_rois),
            box_features=box_features,
            box_labels=box_labels,
            mask_rois=list(mask_rois),
            mask_labels=mask_labels,
            mask_logits=mask_logits,
            mask_features=mask_features,
        )

    def forward(
        self,
        features: dict[str, Tensor],
        image_sizes: Sequence[tuple[int, int]],
        padded_size: tuple[int, int],
        targets: Sequence[PanopticTarget] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """(detections, losses); see `InstanceOutputs` for both, and `run` for everything else."""
        out = self.run(features, image_sizes, padded_size, targets)
        return out.detections, out.losses


def _select_class(mask_logits: Tensor, thing_index: Tensor) -> Tensor:
    """FloatTensor[K, T, M, M] -> FloatTensor[K, M, M], the channel of each RoI's thing index."""
    rows = torch.arange(mask_logits.shape[0], device=mask_logits.device)
    return mask_logits[rows, thing_index]


def _mask_loss(
    mask_logits: Tensor,
    mask_rois: Sequence[Tensor],
    mask_labels: Sequence[Tensor],
    gt_index: Sequence[Tensor],
    tv_targets: Sequence[dict[str, Tensor]],
) -> Tensor:
    """Mask R-CNN's per-pixel sigmoid cross-entropy on each foreground RoI's own class channel.

    Args:
        mask_logits: FloatTensor[K, T, M, M].
        mask_rois: per image FloatTensor[K_i, 4] foreground RoIs.
        mask_labels: per image LongTensor[K_i] thing index of the matched GT.
        gt_index: per image LongTensor[K_i] index of the matched GT instance.
        tv_targets: per image targets holding "masks" BoolTensor[N, h, w].

    Returns:
        FloatTensor[] mean over K * M * M, or 0 (keeping the graph) when no RoI is foreground.
    """
    size = int(mask_logits.shape[-1])
    crops = [
        project_masks_on_boxes(t["masks"], rois, idx, size)
        for t, rois, idx in zip(tv_targets, mask_rois, gt_index, strict=True)
        if rois.shape[0] > 0
    ]
    if not crops:
        return mask_logits.sum() * 0.0
    mask_targets = torch.cat(crops)
    own = _select_class(mask_logits, torch.cat(list(mask_labels)))
    return F.binary_cross_entropy_with_logits(own, mask_targets)


def build_instance_branch(
    cfg: ModelConfig, num_things: int, feature_shapes: dict[str, tuple[int, int]]
) -> InstanceBranch:
    """Mask R-CNN R50-FPN's instance branch sized by `cfg.rpn`, `cfg.roi_heads` and the backbone.

    Args:
        cfg: the model config (rpn and roi_heads sections are read).
        num_things: T, the number of thing classes.
        feature_shapes: {name: (channels, stride)} of the backbone; p2..p6 must be present with
            equal channels.
    """
    if num_things < 1:
        raise ValueError(f"the instance branch needs at least one thing class, got {num_things}")
    missing = [f for f in RPN_IN_FEATURES if f not in feature_shapes]
    if missing:
        raise ValueError(f"instance branch inputs {missing} not among backbone outputs {sorted(feature_shapes)}")
    channels = {feature_shapes[f][0] for f in RPN_IN_FEATURES}
    if len(channels) != 1:
        raise ValueError(f"pyramid levels {RPN_IN_FEATURES} must share one channel count, got {channels}")
    in_channels = channels.pop()
    rpn_cfg, roi_cfg = cfg.rpn, cfg.roi_heads
    if len(rpn_cfg.anchor_sizes) != len(RPN_IN_FEATURES):
        raise ValueError(
            f"model.rpn.anchor_sizes needs one size per level {list(RPN_IN_FEATURES)}, got {rpn_cfg.anchor_sizes}"
        )
    anchor_generator = AnchorGenerator(
        sizes=tuple((int(s),) for s in rpn_cfg.anchor_sizes),
        aspect_ratios=(tuple(float(r) for r in rpn_cfg.aspect_ratios),) * len(RPN_IN_FEATURES),
    )
    rpn = RegionProposalNetwork(
        anchor_generator,
        RPNHead(in_channels, anchor_generator.num_anchors_per_location()[0]),
        fg_iou_thresh=rpn_cfg.fg_iou_thresh,
        bg_iou_thresh=rpn_cfg.bg_iou_thresh,
        batch_size_per_image=rpn_cfg.batch_size_per_image,
        positive_fraction=rpn_cfg.positive_fraction,
        pre_nms_top_n={"training": rpn_cfg.pre_nms_top_n_train, "testing": rpn_cfg.pre_nms_top_n_test},
        post_nms_top_n={"training": rpn_cfg.post_nms_top_n_train, "testing": rpn_cfg.post_nms_top_n_test},
        nms_thresh=rpn_cfg.nms_thresh,
    )
    box_resolution = roi_cfg.box_pooler_resolution
    mask_resolution = roi_cfg.mask_pooler_resolution
    sampling_ratio = roi_cfg.pooler_sampling_ratio
    mask_layers = [roi_cfg.mask_head_channels] * roi_cfg.mask_head_convs
    mask_in = mask_layers[-1] if mask_layers else in_channels
    roi_heads = RoIHeads(
        box_roi_pool=MultiScaleRoIAlign(list(ROI_IN_FEATURES), box_resolution, sampling_ratio),
        box_head=TwoMLPHead(in_channels * box_resolution**2, roi_cfg.box_head_dim),
        box_predictor=FastRCNNPredictor(roi_cfg.box_head_dim, num_things + 1),
        fg_iou_thresh=roi_cfg.fg_iou_thresh,
        bg_iou_thresh=roi_cfg.bg_iou_thresh,
        batch_size_per_image=roi_cfg.batch_size_per_image,
        positive_fraction=roi_cfg.positive_fraction,
        bbox_reg_weights=None,
        score_thresh=roi_cfg.score_thresh,
        nms_thresh=roi_cfg.nms_thresh,
        detections_per_img=roi_cfg.detections_per_img,
        mask_roi_pool=MultiScaleRoIAlign(list(ROI_IN_FEATURES), mask_resolution, sampling_ratio),
        mask_head=MaskRCNNHeads(in_channels, mask_layers, 1) if mask_layers else nn.Identity(),
        mask_predictor=MaskRCNNPredictor(mask_in, roi_cfg.mask_head_channels, num_things),
    )
    return InstanceBranch(rpn=rpn, roi_heads=roi_heads, in_features=list(RPN_IN_FEATURES))


def check_num_things(instance_branch: InstanceBranch, meta: DatasetMeta) -> None:
    """Raise ValueError when the instance branch predicts another number of thing classes."""
    if instance_branch.num_things >= 0 and instance_branch.num_things != meta.num_things:
        raise ValueError(
            f"instance branch has {instance_branch.num_things} thing classes, {meta!r} has {meta.num_things}"
        )
