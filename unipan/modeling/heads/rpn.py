"""Mask R-CNN's region proposal network on pyramid levels, every intermediate result kept.

`RPN` is torchvision's `RegionProposalNetwork` (anchor generator, `RPNHead`, box coder, matcher,
sampler, `filter_proposals`, `compute_loss`) with its own `forward`: it runs those parts itself
so that the RPN's features, objectness and deltas stay reachable (AUNet's proposal attention reads
the features), and it takes unipan's inputs (a feature dict, image sizes, the padded size) instead
of an `ImageList` of the images.

Proposal filtering is torchvision's (top-n per level before NMS, NMS per level, then the best
`post_nms_top_n` of the image), or, with `post_nms_per_level`, the official UPSNet's
"individual proposals": the best `post_nms_top_n` of each level after its NMS, no cap per image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.ops import boxes as box_ops

from unipan.config import RPNConfig
from unipan.modeling.layers import require_features

__all__ = ["RPN", "RPN_IN_FEATURES", "RPNOutputs", "build_rpn"]

RPN_IN_FEATURES = ("p2", "p3", "p4", "p5", "p6")
"""Pyramid levels the RPN runs on (Mask R-CNN R50-FPN)."""


@dataclass
class RPNOutputs:
    """Everything the RPN computed for a batch.

    Attributes:
        proposals: per image FloatTensor[P, 4] xyxy proposals after NMS (P <= post_nms_top_n, per
            level with post_nms_per_level),
            detached (Faster R-CNN does not backpropagate through proposal coordinates).
        proposal_scores: per image FloatTensor[P] objectness probabilities of `proposals`.
        objectness: per level FloatTensor[B, A, Hl, Wl] objectness logits.
        box_deltas: per level FloatTensor[B, 4A, Hl, Wl] anchor regression deltas.
        features: per level FloatTensor[B, C, Hl, Wl], the RPN's shared 3x3 conv + ReLU output.
        anchors: per image FloatTensor[sum_l A*Hl*Wl, 4].
        losses: {"loss_rpn_objectness", "loss_rpn_box_reg"} (FloatTensor[] each) in training,
            else empty.
    """

    proposals: list[Tensor]
    proposal_scores: list[Tensor]
    objectness: list[Tensor]
    box_deltas: list[Tensor]
    features: list[Tensor]
    anchors: list[Tensor]
    losses: dict[str, Tensor] = field(default_factory=dict)


class RPN(RegionProposalNetwork):
    """torchvision's RPN over named pyramid levels, returning `RPNOutputs`.

    The constructor arguments are torchvision's `RegionProposalNetwork`'s, plus `in_features`.
    torchvision's `forward(images, features, targets)` is replaced by the one below (it would
    recompute what `RPNOutputs` keeps); the torchvision parts and methods are used unchanged.

    Args:
        anchor_generator: one anchor size tuple per level of `in_features`.
        head: torchvision `RPNHead` (with `conv`, `cls_logits` and `bbox_pred`).
        in_features: pyramid levels fed to the head, in order of the anchor sizes.
        fg_iou_thresh: IoU above which an anchor is positive.
        bg_iou_thresh: IoU below which an anchor is negative.
        batch_size_per_image: anchors sampled per image for the loss.
        positive_fraction: positive fraction of those anchors.
        pre_nms_top_n: {"training": n, "testing": n} proposals kept per level before NMS.
        post_nms_top_n: {"training": n, "testing": n} proposals kept per image after NMS (per
            level with `post_nms_per_level`).
        nms_thresh: NMS IoU among proposals.
        score_thresh: minimum objectness probability of a proposal (0: torchvision's default).
        post_nms_per_level: keep `post_nms_top_n` proposals of each level and no cap per image
            (official UPSNet; up to levels x n proposals) instead of n per image.

    Raises:
        TypeError: when `head` is not an `RPNHead`-like module.
        ValueError: when the anchor sizes do not give one entry per input level.
    """

    def __init__(
        self,
        *,
        anchor_generator: AnchorGenerator,
        head: RPNHead,
        in_features: Sequence[str],
        fg_iou_thresh: float,
        bg_iou_thresh: float,
        batch_size_per_image: int,
        positive_fraction: float,
        pre_nms_top_n: dict[str, int],
        post_nms_top_n: dict[str, int],
        nms_thresh: float,
        score_thresh: float = 0.0,
        post_nms_per_level: bool = False,
    ) -> None:
        if not all(hasattr(head, a) for a in ("conv", "cls_logits", "bbox_pred")):
            raise TypeError("the RPN head must be a torchvision RPNHead (with conv, cls_logits and bbox_pred)")
        num_sizes = len(anchor_generator.sizes)
        if num_sizes != len(in_features):
            raise ValueError(f"{len(in_features)} RPN input levels {list(in_features)} but {num_sizes} anchor sizes")
        super().__init__(
            anchor_generator,
            head,
            fg_iou_thresh=fg_iou_thresh,
            bg_iou_thresh=bg_iou_thresh,
            batch_size_per_image=batch_size_per_image,
            positive_fraction=positive_fraction,
            pre_nms_top_n=pre_nms_top_n,
            post_nms_top_n=post_nms_top_n,
            nms_thresh=nms_thresh,
            score_thresh=score_thresh,
        )
        self.in_features = list(in_features)
        self.post_nms_per_level = bool(post_nms_per_level)

    def filter_proposals(
        self,
        proposals: Tensor,
        objectness: Tensor,
        image_shapes: list[tuple[int, int]],
        num_anchors_per_level: list[int],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per image (FloatTensor[P, 4] boxes, FloatTensor[P] objectness probabilities), by score.

        torchvision's filtering, or with `post_nms_per_level` the per-level budget (see the class).

        Args:
            proposals: FloatTensor[B, sum_l A_l, 4] decoded anchors, levels concatenated.
            objectness: FloatTensor[B * sum_l A_l, 1] (or [B, sum_l A_l]) objectness logits.
            image_shapes: per image (h, w) to clip to.
            num_anchors_per_level: A_l.
        """
        if not self.post_nms_per_level:
            return super().filter_proposals(proposals, objectness, image_shapes, num_anchors_per_level)
        num_images = proposals.shape[0]
        device = proposals.device
        objectness = objectness.detach().reshape(num_images, -1)
        level_of = torch.cat(
            [torch.full((n,), k, dtype=torch.int64, device=device) for k, n in enumerate(num_anchors_per_level)]
        )
        top = self._get_top_n_idx(objectness, num_anchors_per_level)  # pre-NMS top-n of each level
        rows = torch.arange(num_images, device=device)[:, None]
        probs = torch.sigmoid(objectness[rows, top])
        candidates = proposals[rows, top]
        levels = level_of[top]
        per_level = self.post_nms_top_n()
        num_levels = len(num_anchors_per_level)
        out_boxes: list[Tensor] = []
        out_scores: list[Tensor] = []
        for boxes, scores, lvl, shape in zip(candidates, probs, levels, image_shapes, strict=True):
            boxes = box_ops.clip_boxes_to_image(boxes, shape)
            keep = box_ops.remove_small_boxes(boxes, self.min_size)
            keep = keep[scores[keep] >= self.score_thresh]
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = box_ops.batched_nms(boxes, scores, lvl, self.nms_thresh)  # by decreasing score
            # rank of each survivor among its level's survivors; the best `per_level` of each stay
            onehot = torch.nn.functional.one_hot(lvl[keep], num_levels)
            rank = (onehot.cumsum(0) * onehot).sum(1) - 1
            keep = keep[rank < per_level]
            out_boxes.append(boxes[keep])
            out_scores.append(scores[keep])
        return out_boxes, out_scores

    def forward(
        self,
        features: Mapping[str, Tensor],
        image_sizes: Sequence[tuple[int, int]],
        padded_size: tuple[int, int],
        tv_targets: Sequence[dict[str, Tensor]] | None = None,
    ) -> RPNOutputs:
        """Proposals (and losses in training) of a batch, with the head's outputs kept.

        Args:
            features: pyramid features FloatTensor[B, C, Hl, Wl] holding `in_features`.
            image_sizes: per image (h, w) before padding (proposals are clipped to it).
            padded_size: (Hp, Wp) of the padded batch (anchor strides derive from it).
            tv_targets: torchvision targets (`heads.instance.torchvision_targets`; "boxes"
                FloatTensor[N, 4] is read), required in training.

        Returns:
            The RPN's outputs; `losses` is filled in training only.

        Raises:
            ValueError: in training mode without targets.
        """
        levels = [features[name] for name in self.in_features]
        batch = levels[0].shape[0]
        head = self.head
        rpn_features = [head.conv(x) for x in levels]
        objectness = [head.cls_logits(t) for t in rpn_features]
        box_deltas = [head.bbox_pred(t) for t in rpn_features]
        # The anchor generator reads only the padded size, dtype and device of `tensors`: an empty
        # channel dimension avoids keeping a copy of the images around.
        placeholder = levels[0].new_empty((batch, 0, int(padded_size[0]), int(padded_size[1])))
        image_list = ImageList(placeholder, [(int(h), int(w)) for h, w in image_sizes])
        anchors = self.anchor_generator(image_list, levels)
        num_anchors_per_level = [int(o[0].numel()) for o in objectness]
        flat_objectness, flat_deltas = concat_box_prediction_layers(objectness, box_deltas)
        # Faster R-CNN does not backpropagate through the proposal coordinates.
        proposals = self.box_coder.decode(flat_deltas.detach(), anchors).view(batch, -1, 4)
        boxes, scores = self.filter_proposals(proposals, flat_objectness, image_list.image_sizes, num_anchors_per_level)
        losses: dict[str, Tensor] = {}
        if self.training:
            if tv_targets is None:
                raise ValueError("the RPN needs targets in training mode")
            labels, matched_gt_boxes = self.assign_targets_to_anchors(anchors, list(tv_targets))
            regression_targets = self.box_coder.encode(matched_gt_boxes, anchors)
            loss_objectness, loss_box_reg = self.compute_loss(flat_objectness, flat_deltas, labels, regression_targets)
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


def build_rpn(
    cfg: RPNConfig, feature_shapes: Mapping[str, tuple[int, int]], in_features: Sequence[str] = RPN_IN_FEATURES
) -> RPN:
    """Mask R-CNN's RPN sized by `cfg` and the backbone.

    Args:
        cfg: anchors, sampling and proposal filtering.
        feature_shapes: {name: (channels, stride)} of the backbone; `in_features` must be present
            with equal channels (the head is shared by the levels).
        in_features: the levels, one per anchor size.

    Raises:
        ValueError: for missing levels, unequal channels or an anchor size count that does not fit.
    """
    channels = {c for c, _ in require_features(feature_shapes, in_features, "RPN")}
    if len(channels) != 1:
        raise ValueError(f"RPN levels {list(in_features)} must share one channel count, got {channels}")
    if len(cfg.anchor_sizes) != len(in_features):
        raise ValueError(f"model.rpn.anchor_sizes needs one size per level {list(in_features)}, got {cfg.anchor_sizes}")
    anchor_generator = AnchorGenerator(
        sizes=tuple((int(s),) for s in cfg.anchor_sizes),
        aspect_ratios=(tuple(float(r) for r in cfg.aspect_ratios),) * len(in_features),
    )
    return RPN(
        anchor_generator=anchor_generator,
        head=RPNHead(channels.pop(), anchor_generator.num_anchors_per_location()[0]),
        in_features=in_features,
        fg_iou_thresh=cfg.fg_iou_thresh,
        bg_iou_thresh=cfg.bg_iou_thresh,
        batch_size_per_image=cfg.batch_size_per_image,
        positive_fraction=cfg.positive_fraction,
        pre_nms_top_n={"training": cfg.pre_nms_top_n_train, "testing": cfg.pre_nms_top_n_test},
        post_nms_top_n={"training": cfg.post_nms_top_n_train, "testing": cfg.post_nms_top_n_test},
        nms_thresh=cfg.nms_thresh,
        post_nms_per_level=cfg.post_nms_per_level,
    )
