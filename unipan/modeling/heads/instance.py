"""Mask R-CNN's instance branch: an `RPN`, a `BoxHead` and a `MaskHead` composed over pyramid features.

The three parts live in `rpn.py`, `roi_box.py` and `roi_mask.py` (detectron2's roi_heads split),
each usable alone: SpatialFlow runs the mask head on one-stage detections, UPSNet's oracle the box
classifier and the mask head on GT boxes. `InstanceBranch.run` drives them for Mask R-CNN and keeps
every intermediate result: RPN features and objectness (AUNet), proposals, box features (REFINE),
and the mask logits of every thing class with the mask head's features (UPSNet).

Label spaces: every output of this module speaks thing indices 0..T-1 (-1 = background); only the
targets handed to torchvision's losses (`torchvision_targets`) use torchvision's t + 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from unipan.config import MaskHeadConfig, RoIHeadsConfig, RPNConfig
from unipan.modeling.heads.roi_box import ROI_IN_FEATURES, BoxHead, build_box_head
from unipan.modeling.heads.roi_mask import MaskHead, build_mask_head
from unipan.modeling.heads.rpn import RPN, RPN_IN_FEATURES, RPNOutputs, build_rpn
from unipan.structures import PanopticTarget

__all__ = [
    "ROI_IN_FEATURES",
    "RPN_IN_FEATURES",
    "V1_STATE_DICT_RENAMES",
    "InstanceBranch",
    "InstanceOutputs",
    "RPNOutputs",
    "build_instance_branch",
    "rename_state_dict_keys",
    "torchvision_targets",
]

_V1_INSTANCE_RENAMES = [
    ("instance_branch.roi_heads.box_head.", "instance_branch.box_head.mlp."),
    ("instance_branch.roi_heads.box_predictor.", "instance_branch.box_head.predictor."),
    ("instance_branch.roi_heads.mask_head.", "instance_branch.mask_head.convs."),
    ("instance_branch.roi_heads.mask_predictor.", "instance_branch.mask_head.predictor."),
]

V1_STATE_DICT_RENAMES: dict[str, list[tuple[str, str]]] = {
    "panoptic_fpn": list(_V1_INSTANCE_RENAMES),
    "upsnet": [("backbone.backbone.", "backbone."), *_V1_INSTANCE_RENAMES],
}
"""Per model name, (old prefix, new prefix) of the model state-dict keys saved before the backbone
package and the heads split (config version 1). Unlisted keys are unchanged: `backbone.trunk.*`,
`backbone.fpn.*`, `instance_branch.rpn.head.*`, `semantic_head.*`, and UPSNet's
`backbone.context.fc.*`."""


def rename_state_dict_keys(state: Mapping[str, Tensor], renames: Sequence[tuple[str, str]]) -> dict[str, Tensor]:
    """`state` with each key's first matching old prefix replaced by its new prefix.

    Args:
        state: a model state dict.
        renames: (old prefix, new prefix) pairs, e.g. `V1_STATE_DICT_RENAMES[model_name]`.

    Returns:
        A new dict in the same key order.
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key.removeprefix(old)
                break
        out[key] = value
    return out


@dataclass
class InstanceOutputs:
    """Everything the instance branch computed for a batch.

    Attributes:
        proposals: per image FloatTensor[P, 4] the RPN's proposals (training and eval).
        detections: eval: per image {"boxes": FloatTensor[N, 4], "scores": FloatTensor[N],
            "labels": LongTensor[N] thing index, "mask_probs": FloatTensor[N, M, M],
            "mask_logits": FloatTensor[N, M, M]} (mask of the predicted class); training: empty.
        losses: training: loss_rpn_objectness, loss_rpn_box_reg, loss_classifier, loss_box_reg,
            loss_mask (FloatTensor[] each, unweighted); eval: empty.
        rpn: the RPN's outputs.
        box_rois: per image FloatTensor[R, 4] boxes the box head ran on (training: sampled
            proposals + GT; eval: all proposals).
        box_features: FloatTensor[sum R, D] box head representations of `box_rois`.
        box_labels: training: per image LongTensor[R] thing index of each sampled RoI, -1 for
            background; eval: empty.
        mask_rois: per image FloatTensor[K, 4] boxes the mask head ran on (training: the
            foreground sampled RoIs; eval: the detections).
        mask_labels: per image LongTensor[K] thing index whose mask channel is used.
        mask_logits: FloatTensor[sum K, T, M, M] mask logits of every thing class; FloatTensor[0]
            when the mask head did not run (`run(masks=False)`).
        mask_features: FloatTensor[sum K, Cm, M/2, M/2] mask head output before the predictor;
            FloatTensor[0] when the mask head did not run.
        mask_gt_index: training: per image LongTensor[K] index of the GT instance matched by each
            of `mask_rois`; eval: empty.
        class_probs: training: per image FloatTensor[K] the box head's softmax probability of the
            class each of `mask_rois` is labelled with (detached); eval: empty.
    """

    proposals: list[Tensor]
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
    mask_gt_index: list[Tensor] = field(default_factory=list)
    class_probs: list[Tensor] = field(default_factory=list)


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
    """Mask R-CNN's RPN + box head + mask head over pyramid features; `run` is the entry point.

    Args:
        rpn: the region proposal network.
        box_head: the box head (T + 1 classes, background first).
        mask_head: the mask head (T channels, one per thing index); None for a model that runs
            its own mask heads on `run(masks=False)`'s RoIs (REFINE).

    Attributes:
        num_things: T.

    Raises:
        ValueError: when the box and mask heads disagree on T.
    """

    def __init__(self, *, rpn: RPN, box_head: BoxHead, mask_head: MaskHead | None) -> None:
        super().__init__()
        if mask_head is not None and box_head.num_things != mask_head.num_things:
            raise ValueError(
                f"mask head has {mask_head.num_things} channels; expected one per thing index of the box head "
                f"({box_head.num_things}, its classes minus background)"
            )
        self.rpn = rpn
        self.box_head = box_head
        self.mask_head = mask_head
        self.num_things = box_head.num_things

    def forward_masks(
        self, features: Mapping[str, Tensor], boxes: Sequence[Tensor], padded_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """Mask logits of every thing class for arbitrary boxes; see `MaskHead.forward`.

        Returns:
            (mask_logits FloatTensor[sum K_i, T, M, M], mask_features FloatTensor[sum K_i, Cm, M/2, M/2]).

        Raises:
            RuntimeError: when the branch was built without a mask head.
        """
        return self._require_mask_head()(features, boxes, padded_size)

    def _require_mask_head(self) -> MaskHead:
        if self.mask_head is None:
            raise RuntimeError("this instance branch has no mask head (built with mask_head=None)")
        return self.mask_head

    def run(
        self,
        features: Mapping[str, Tensor],
        image_sizes: Sequence[tuple[int, int]],
        padded_size: tuple[int, int],
        targets: Sequence[PanopticTarget] | None = None,
        masks: bool = True,
    ) -> InstanceOutputs:
        """RPN, box head and mask head, with every intermediate result kept.

        Args:
            features: pyramid features FloatTensor[B, C, Hl, Wl] (the RPN's and heads' levels).
            image_sizes: per image (h, w) before padding.
            padded_size: (Hp, Wp) of the padded batch.
            targets: per image ground truth (required in training mode, ignored in eval).
            masks: run the branch's own mask head. False (forced when it has none) stops after
                the box head: `mask_rois` / `mask_labels` (and in training `mask_gt_index` and
                `class_probs`) say where a model's own mask heads should run; there is no
                `loss_mask`, the detections carry no masks, and `mask_logits` / `mask_features`
                are empty.

        Returns:
            Losses in training, detections in eval, and the intermediates (see `InstanceOutputs`).

        Raises:
            ValueError: for a batch/size mismatch, or missing or malformed targets in training.
        """
        image_sizes = [(int(h), int(w)) for h, w in image_sizes]
        padded_size = (int(padded_size[0]), int(padded_size[1]))
        batch = features[self.rpn.in_features[0]].shape[0]
        if len(image_sizes) != batch:
            raise ValueError(f"{len(image_sizes)} image sizes for a batch of {batch}")
        masks = masks and self.mask_head is not None
        if not self.training:
            return self._run_eval(features, image_sizes, padded_size, masks)
        if targets is None:
            raise ValueError("the instance branch needs targets in training mode")
        tv_targets = torchvision_targets(targets, image_sizes, self.num_things)
        rpn_out = self.rpn(features, image_sizes, padded_size, tv_targets)
        losses = dict(rpn_out.losses)
        samples = self.box_head.sample_rois([p.detach() for p in rpn_out.proposals], tv_targets)
        box_features, class_logits, box_deltas = self.box_head(features, samples.rois, padded_size)
        losses.update(self.box_head.loss(class_logits, box_deltas, samples))
        # The mask head learns on the foreground sampled RoIs only (Mask R-CNN).
        fg = [torch.nonzero(labels >= 0).flatten() for labels in samples.labels]
        mask_rois = [rois[i] for rois, i in zip(samples.rois, fg, strict=True)]
        mask_labels = [labels[i] for labels, i in zip(samples.labels, fg, strict=True)]
        mask_gt_index = [index[i] for index, i in zip(samples.gt_index, fg, strict=True)]
        # the probability of each foreground RoI's labelled class (REFINE weights its masks by it)
        probs = class_logits.detach().softmax(dim=-1).split([int(r.shape[0]) for r in samples.rois])
        class_probs = [p[i, labels + 1] for p, i, labels in zip(probs, fg, mask_labels, strict=True)]
        if masks:
            mask_head = self._require_mask_head()
            mask_logits, mask_features = mask_head(features, mask_rois, padded_size)
            losses["loss_mask"] = mask_head.loss(
                mask_logits, mask_rois, mask_labels, mask_gt_index, [t["masks"] for t in tv_targets]
            )
        else:
            mask_logits = mask_features = class_logits.new_zeros((0,))
        return InstanceOutputs(
            proposals=list(rpn_out.proposals),
            detections=[],
            losses=losses,
            rpn=rpn_out,
            box_rois=samples.rois,
            box_features=box_features,
            box_labels=samples.labels,
            mask_rois=mask_rois,
            mask_labels=mask_labels,
            mask_logits=mask_logits,
            mask_features=mask_features,
            mask_gt_index=mask_gt_index,
            class_probs=class_probs,
        )

    def _run_eval(
        self,
        features: Mapping[str, Tensor],
        image_sizes: list[tuple[int, int]],
        padded_size: tuple[int, int],
        masks: bool = True,
    ) -> InstanceOutputs:
        """`run` in eval mode: proposals -> detections -> masks of the detected classes."""
        rpn_out = self.rpn(features, image_sizes, padded_size)
        box_rois = list(rpn_out.proposals)
        box_features, class_logits, box_deltas = self.box_head(features, box_rois, padded_size)
        det_boxes, det_scores, det_labels = self.box_head.detections(class_logits, box_deltas, box_rois, image_sizes)
        if not masks:
            empty = class_logits.new_zeros((0,))
            return InstanceOutputs(
                proposals=box_rois,
                detections=[
                    {"boxes": boxes, "scores": scores, "labels": labels}
                    for boxes, scores, labels in zip(det_boxes, det_scores, det_labels, strict=True)
                ],
                losses={},
                rpn=rpn_out,
                box_rois=box_rois,
                box_features=box_features,
                box_labels=[],
                mask_rois=det_boxes,
                mask_labels=det_labels,
                mask_logits=empty,
                mask_features=empty,
            )
        mask_logits, mask_features = self._require_mask_head()(features, det_boxes, padded_size)
        own_logits = MaskHead.select_class(mask_logits, torch.cat(det_labels))
        per_image = own_logits.split([int(b.shape[0]) for b in det_boxes])
        detections = [
            {"boxes": boxes, "scores": scores, "labels": labels, "mask_probs": logits.sigmoid(), "mask_logits": logits}
            for boxes, scores, labels, logits in zip(det_boxes, det_scores, det_labels, per_image, strict=True)
        ]
        return InstanceOutputs(
            proposals=box_rois,
            detections=detections,
            losses={},
            rpn=rpn_out,
            box_rois=box_rois,
            box_features=box_features,
            box_labels=[],
            mask_rois=det_boxes,
            mask_labels=det_labels,
            mask_logits=mask_logits,
            mask_features=mask_features,
        )


def build_instance_branch(
    rpn: RPNConfig,
    roi_heads: RoIHeadsConfig,
    mask_head: MaskHeadConfig,
    num_things: int,
    feature_shapes: Mapping[str, tuple[int, int]],
    with_mask_head: bool = True,
) -> InstanceBranch:
    """Mask R-CNN R50-FPN's instance branch sized by the part configs and the backbone.

    The parts are created in the order RPN head, box head (fc6, fc7), box predictor, mask convs,
    mask predictor, as before the split, so a seeded build draws the same weights.

    Args:
        rpn: the RPN's config (on p2..p6).
        roi_heads: the box head's config (on p2..p5).
        mask_head: the mask head's config (on p2..p5).
        num_things: T, the number of thing classes (>= 1).
        feature_shapes: {name: (channels, stride)} of the backbone; p2..p6 with equal channels.
        with_mask_head: False builds no mask head (a model with its own mask heads, REFINE):
            no parameters that never get a gradient.

    Raises:
        ValueError: for T < 1, missing levels, unequal channels or anchor sizes that do not fit.
    """
    if num_things < 1:
        raise ValueError(f"the instance branch needs at least one thing class, got {num_things}")
    return InstanceBranch(
        rpn=build_rpn(rpn, feature_shapes, RPN_IN_FEATURES),
        box_head=build_box_head(roi_heads, feature_shapes, num_things, ROI_IN_FEATURES),
        mask_head=build_mask_head(mask_head, feature_shapes, num_things, ROI_IN_FEATURES) if with_mask_head else None,
    )
