"""Mask R-CNN's region proposal network on pyramid levels, every intermediate result kept.

`RPN` is torchvision's `RegionProposalNetwork` (anchor generator, `RPNHead`, box coder, matcher,
sampler, `filter_proposals`, `compute_loss`) with its own `forward`: it runs those parts itself
so that the RPN's features, objectness and deltas stay reachable (AUNet's proposal attention reads
the features), and it takes unipan's inputs (a feature dict, image sizes, the padded size) instead
of an `ImageList` of the images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers

from unipan.config import RPNConfig
from unipan.modeling.layers import require_features

__all__ = ["RPN", "RPN_IN_FEATURES", "RPNOutputs", "build_rpn"]

RPN_IN_FEATURES = ("p2", "p3", "p4", "p5", "p6")
"""Pyramid levels the RPN runs on (Mask R-CNN R50-FPN)."""


@dataclass
class RPNOutputs:
    """Everything the RPN computed for a batch.

    Attributes:
        proposals: per image FloatTensor[P, 4] xyxy proposals after NMS (P <= post_nms_top_n),
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
        post_nms_top_n: {"training": n, "testing": n} proposals kept per image after NMS.
        nms_thresh: NMS IoU among proposals.
        score_thresh: minimum objectness probability of a proposal (0: torchvision's default).

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
    )
